"""Import checkpoints of the reference MeDi code (diffusers UNet2DModel + embedding tables).

The reference safetensors holds the UNet2DModel weights plus ``class_embedding.weight``,
``domain_embeddings.<column>.weight`` and, in ``linear`` mode, ``linear_comb.{weight,bias}``.
Mapping onto MeDiUNet (whose UNet has class_embed_type="identity", so z_cond is added to the
timestep embedding exactly where the reference adds its combined embedding):

    class_embedding.weight               -> conditioner.tables.class.weight[:-1]
    domain_embeddings.<column>.weight    -> conditioner.tables.<attribute>.weight[:-1]
                                            (tissue_source_site -> tss, see conditioning.COLUMNS)
    linear_comb.*                        -> conditioner.linear_comb.*
    everything else                      -> unet.*

Our tables have one extra last row (the null id, for guidance); the reference never trained one,
so it is filled with the mean of the table's rows (default) or zeros.  Vocabularies are rebuilt
from the reference training metadata CSV as the reference code builds them: classes sorted,
metadata in order of first appearance with "Unknown" appended if absent.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import torch

from medi_fast import checkpoint as ckpt_io
from medi_fast.conditioning import COLUMNS, ConditionSpec
from medi_fast.errors import MediFastError
from medi_fast.model import MeDiUNet
from medi_fast.schedule import Schedule

UNKNOWN = "Unknown"
CLASS_COLUMNS = ("class", "project_id", "cancer_type")
_ATTRIBUTE_FOR_COLUMN = {col: name for name, col in COLUMNS.items()}


def read_reference(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MediFastError(f"reference weights {path} do not exist; check the path")
    try:
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a bad file
        raise MediFastError(f"{path} is not a readable safetensors file ({str(e)[:120]}); pass the reference "
                            f"model's diffusion_pytorch_model.safetensors") from None


def infer_unet_config(unet_sd: dict[str, torch.Tensor], resolution: int) -> dict:
    """UNet2DModel config from weight shapes (norm_num_groups and attention_head_dim are not visible
    in shapes: diffusers' defaults 32 and 8 are assumed; override with --unet-config)."""
    if "conv_in.weight" not in unet_sd:
        raise MediFastError("the file has no conv_in.weight: not a diffusers UNet2DModel; pass the reference "
                            "model's weights")
    levels = sorted({int(m.group(1)) for k in unet_sd for m in [re.match(r"down_blocks\.(\d+)\.", k)] if m})
    channels = [int(unet_sd[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in levels]
    layers = len({m.group(1) for k in unet_sd for m in [re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)] if m})
    down = ["AttnDownBlock2D" if any(k.startswith(f"down_blocks.{i}.attentions.") for k in unet_sd) else "DownBlock2D"
            for i in levels]
    up = ["AttnUpBlock2D" if any(k.startswith(f"up_blocks.{i}.attentions.") for k in unet_sd) else "UpBlock2D"
          for i in levels]
    return {"sample_size": resolution, "in_channels": int(unet_sd["conv_in.weight"].shape[1]),
            "out_channels": int(unet_sd["conv_out.weight"].shape[0]), "layers_per_block": layers,
            "block_out_channels": channels, "down_block_types": down, "up_block_types": up,
            "add_attention": any(k.startswith("mid_block.attentions.") for k in unet_sd),
            "norm_num_groups": 32, "class_embed_type": "identity"}


def reference_vocabularies(metadata_csv, columns: list[str], class_column: str | None = None):
    """(class names sorted, {column: values in order of first appearance + 'Unknown'})."""
    path = Path(metadata_csv)
    if not path.is_file():
        raise MediFastError(f"--metadata {path} does not exist; pass the reference run's training metadata CSV")
    table = pd.read_csv(path, dtype=str)  # codes stay strings: "05" is not 5
    if class_column is None:
        class_column = next((c for c in CLASS_COLUMNS if c in table.columns), None)
    if class_column is None or class_column not in table.columns:
        raise MediFastError(f"--metadata {path} has no class column ({', '.join(CLASS_COLUMNS)}); pass --class-column")
    classes = sorted(table[class_column].dropna().astype(str).str.strip().unique())
    vocabs = {}
    for col in columns:
        if col not in table.columns:
            raise MediFastError(f"--condition {col}: column not in {path} (columns: {', '.join(table.columns)})")
        values = list(dict.fromkeys(table[col].fillna(UNKNOWN).astype(str).str.strip()))
        if UNKNOWN not in values:
            values.append(UNKNOWN)
        vocabs[col] = values
    return classes, vocabs


def _with_null(weight: torch.Tensor, null_fill: str) -> torch.Tensor:
    null = weight.mean(0, keepdim=True) if null_fill == "mean" else torch.zeros_like(weight[:1])
    return torch.cat([weight, null], 0)  # (V + 1, d)


def import_medi(weights, metadata_csv, columns: list[str], *, mode: str = "concat", class_column: str | None = None,
                resolution: int = 128, unet_config: dict | None = None, null_fill: str = "mean",
                out=None) -> ckpt_io.Checkpoint:
    """Reference safetensors + training metadata CSV -> medi-fast Checkpoint (saved if ``out``)."""
    sd = read_reference(weights)
    if "class_embedding.weight" not in sd and any(k.startswith("unet.") for k in sd):
        sd = {k[5:] if k.startswith("unet.") else k: v for k, v in sd.items()}
    if "class_embedding.weight" not in sd:
        raise MediFastError(f"{weights} has no class_embedding.weight: not a reference MeDi checkpoint")
    found = sorted(k.split(".")[1] for k in sd if k.startswith("domain_embeddings.") and k.endswith(".weight"))
    if sorted(columns) != found:
        raise MediFastError(f"the file has domain embeddings for {found or 'no columns'} but --condition says "
                            f"{columns or 'none'}; pass --condition {','.join(found)}")
    classes, vocabs = reference_vocabularies(metadata_csv, columns, class_column)
    tables = {"class": sd["class_embedding.weight"], **{c: sd[f"domain_embeddings.{c}.weight"] for c in columns}}
    sizes = {"class": classes, **vocabs}
    for col, w in tables.items():
        if w.shape[0] != len(sizes[col]):
            raise MediFastError(f"{'class_embedding' if col == 'class' else 'domain_embeddings.' + col} has "
                                f"{w.shape[0]} rows but {metadata_csv} gives {len(sizes[col])} values for {col}; "
                                f"pass the metadata CSV the reference model was trained on")
    unet_sd = {k: v for k, v in sd.items()
               if not k.startswith(("class_embedding.", "domain_embeddings.", "linear_comb."))}
    cfg = infer_unet_config(unet_sd, resolution)
    cfg.update(unet_config or {})
    cfg["class_embed_type"] = "identity"
    d_t = int(cfg["block_out_channels"][0]) * 4
    names = {c: _ATTRIBUTE_FOR_COLUMN.get(c, c) for c in columns}
    widths = {"class": int(tables["class"].shape[1]), **{names[c]: int(tables[c].shape[1]) for c in columns}}
    spec = ConditionSpec.build(d_t, classes, {names[c]: vocabs[c] for c in columns}, widths=widths, mode=mode)
    model = MeDiUNet(spec, cfg)
    ours = {f"unet.{k}": v for k, v in unet_sd.items() if not k.startswith("class_embedding")}
    ours["conditioner.tables.class.weight"] = _with_null(tables["class"], null_fill)
    for c in columns:
        ours[f"conditioner.tables.{names[c]}.weight"] = _with_null(tables[c], null_fill)
    if mode == "linear":
        if "linear_comb.weight" not in sd:
            raise MediFastError(f"--mode linear but {weights} has no linear_comb weights; pass the right --mode")
        ours["conditioner.linear_comb.weight"] = sd["linear_comb.weight"]
        ours["conditioner.linear_comb.bias"] = sd["linear_comb.bias"]
    try:
        missing, unexpected = model.load_state_dict(ours, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise MediFastError(f"the weights do not fit the inferred UNet ({str(e).splitlines()[-1].strip()[:160]}); "
                            f"pass --unet-config with the reference model's config") from None
    if missing or unexpected:
        raise MediFastError(f"the weights do not fit the inferred UNet ({len(missing)} missing, e.g. "
                            f"{(missing or ['-'])[0]}; {len(unexpected)} unexpected, e.g. {(unexpected or ['-'])[0]}); "
                            f"pass --unet-config with the reference model's config")
    prov = {"imported_from": str(weights), "metadata": str(metadata_csv), "mode": mode, "null_row": null_fill}
    ck = ckpt_io.from_model(model, Schedule(), preset="", provenance=prov)
    if out is not None:
        ckpt_io.save(ck, out)
    return ck
