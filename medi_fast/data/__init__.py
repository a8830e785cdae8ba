"""Data: index, report, split, synthetic H&E set, pack, datasets and sampling weights.

Modules (imported on use, so ``import medi_fast.data`` stays light):
  barcode   parse TCGA barcodes (TSS, participant, sample, slide)
  clinical  read GDC clinical CSVs as strings, normalise missing markers to "Unknown"
  index     ``build_index(root, metadata_csv, strict=False) -> DataFrame`` (one row per patch)
  report    class x TSS coverage matrix (CSV + heatmap), race/gender bars
  split     ``split_metadata(df, strategy, seed, frac, by) -> SplitResult`` (the published protocol)
  synth     ``SynthConfig``, ``render_dataset(config, out_dir)``: procedural H&E in the TCGA-UT layout
  pack      ``pack_index(index, resolution, out_dir)``: uint8 memmap (N, 3, R, R) + labels.parquet
  dataset   ``open_dataset(path, split_csv=None, resolution=None) -> PatchDataset``
  sampling  ``sampling_weights(table, mode)``: uniform / class- / combination-balanced
"""
