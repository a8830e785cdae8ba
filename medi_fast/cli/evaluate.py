"""Evaluation commands: ``fid``, ``embed``, ``probe``, ``shortcut`` (see docs/eval.md)."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import MediFastError, check_seed
from ..eval.features import EXTRACTORS

_PATH = click.Path(path_type=Path)


def _write_csv(df, path: Path | None) -> None:
    if path is not None:
        from ..io import atomic_write_text

        atomic_write_text(path, df.to_csv(index=False))


def _check_outputs(*options, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse every unwritable output path (``(option, path)``; None: not asked for) before any work,
    and one that medi-fast.toml names when it exists already."""
    from ..defaults import check_config_output
    from ..io import check_output_file

    for option, path in options:
        if path is not None:
            check_config_output(option.lstrip("-").replace("-", "_"), path)
            check_output_file(path, option, suffixes)


def _named_sets(values) -> dict[str, Path]:
    """``NAME=PATH`` (or ``PATH``, named by its file stem) -> {name: path}."""
    out: dict[str, Path] = {}
    for v in values:
        name, _, path = v.partition("=") if "=" in v else (Path(v).stem, "", v)
        if not name or not path:
            raise MediFastError(f"--synthetic {v!r}: write NAME=PATH, e.g. MeDi=medi_emb.parquet")
        if name in out:
            raise MediFastError(f"--synthetic name {name!r} given twice; name each set differently (CLS=..., MeDi=...)")
        out[name] = Path(path)
    return out


@click.command("fid")
@click.option("--real", required=True, type=_PATH, help="Real images: index parquet, manifest.csv, folder, or saved .npz stats.")
@click.option("--fake", required=True, type=_PATH, help="Generated images: manifest.csv or its folder, folder, index, or .npz stats.")
@click.option("--per", default="class", show_default=True, help="Group column for per-group FID ('none': overall only).")
@click.option("--features", "features", default="inception", show_default=True,
              type=click.Choice(["inception", "inception-random", "colour-texture"]),
              help="Feature extractor; only 'inception' gives FID comparable to papers.")
@click.option("--inception-weights", type=_PATH, help="Local FID Inception weights (pt_inception-2015-12-05-6726825d.pth).")
@click.option("--batch-size", type=int, default=50, show_default=True, help="Images per forward pass.")
@click.option("--resolution", type=int, help="Resize images to this size before the extractor (needed if sizes differ).")
@click.option("--device", help="torch device (default: cuda if available, else cpu).")
@click.option("--save-real-stats", type=_PATH, help="Save the real statistics to this .npz for reuse.")
@click.option("--save-fake-stats", type=_PATH, help="Save the generated statistics to this .npz for reuse.")
@click.option("--out-csv", type=_PATH, help="Write the FID table as CSV.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def fid(real, fake, per, features, inception_weights, batch_size, resolution, device, save_real_stats,
        save_fake_stats, out_csv, quiet):
    """FID between real and generated images, per class and averaged (the paper's figure)."""
    from ..eval.fid import compute_fid

    _check_outputs(("--out-csv", out_csv))
    _check_outputs(("--save-real-stats", save_real_stats), ("--save-fake-stats", save_fake_stats), suffixes=(".npz",))
    per = None if per.lower() == "none" else per
    table = compute_fid(real, fake, per=per, features=features, weights=inception_weights, device=device,
                        batch_size=batch_size, resolution=resolution, save_real_stats=save_real_stats,
                        save_fake_stats=save_fake_stats, progress=not quiet)
    if per and len(table) == 1:
        click.echo(f"medi-fast: warning: no {per} has >= 2 images in both sets; only the overall FID is reported",
                   err=True)
    _write_csv(table, out_csv)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


@click.command("embed")
@click.option("--images", required=True, type=_PATH, help="Index parquet, manifest.csv (or its folder), or folder of images.")
@click.option("--out", required=True, type=_PATH, help="Output file: .parquet or .npz (embeddings + metadata columns).")
@click.option("--extractor", default="uni", show_default=True, type=click.Choice(list(EXTRACTORS)),
              help="A pathology encoder (uni, uni2-h, virchow2, h-optimus-0, h-optimus-1; --weights) or an FID "
                   "extractor as in `medi-fast fid --features`.")
@click.option("--weights", type=_PATH, help="Encoder weights: the model's pytorch_model.bin/model.safetensors or its "
                                            "HF cache folder (default: the model's folder in the local HF cache).")
@click.option("--encoder", help="Another timm architecture with UNI's recipe (--extractor uni only; tests, demos).")
@click.option("--random-init", is_flag=True, help="Random encoder weights (tests, demos): embeddings mean nothing.")
@click.option("--image-size", type=int, default=224, show_default=True, help="Input size for --encoder (the registry "
                                                                            "encoders use their card's size).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per forward pass.")
@click.option("--resolution", type=int, help="Decode-time resize (needed if image sizes differ).")
@click.option("--device", help="torch device (default: cuda if available, else cpu); fp16 autocast on CUDA.")
@click.option("--quiet", is_flag=True, help="No progress output (the licence line is still printed).")
def embed(images, out, extractor, weights, encoder, random_init, image_size, batch_size, resolution, device, quiet):
    """Embed images (UNI by default) into ONE file with their metadata columns."""
    from ..eval.embed import embed_images

    _check_outputs(("--out", out), suffixes=(".parquet", ".npz"))
    if (encoder or image_size != 224) and extractor != "uni":
        raise MediFastError(f"--encoder/--image-size apply to --extractor uni only (got --extractor {extractor}); "
                            f"drop them: {extractor} uses its model card's architecture and size")
    path, n, dim, name = embed_images(images, out, extractor=extractor, weights=weights, encoder=encoder,
                                      random_init=random_init, image_size=image_size, batch_size=batch_size,
                                      resolution=resolution, device=device, progress=not quiet,
                                      notify=lambda msg: click.echo(msg, err=True))
    if not quiet:
        click.echo(f"{n} embeddings ({dim}-d, {name}) -> {path}", err=True)


@click.command("probe")
@click.option("--real-train", required=True, type=_PATH, help="Embeddings of the real training pool (from `embed`).")
@click.option("--real-test", required=True, type=_PATH, help="Embeddings of the real test set.")
@click.option("--synthetic", multiple=True, metavar="NAME=EMB", help="Synthetic embeddings, e.g. CLS=cls.parquet MeDi=medi.parquet (repeatable).")
@click.option("--task", required=True, help="nsclc (LUAD,LUSC), rcc (KIRC,KIRP,KICH), uterine (UCEC,UCS), or CLASS1,CLASS2,...")
@click.option("--k", type=int, default=20, show_default=True, help="Real training patches per class.")
@click.option("--ratio", type=float, default=1.0, show_default=True, help="Synthetic:real patches per class.")
@click.option("--one-site-per-class", is_flag=True, help="Each class's real patches from a single site (the published setting).")
@click.option("--max-runs", type=int, default=50, show_default=True, help="Site combinations to run (sampled if more); 0 = all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the site sample and patch draws.")
@click.option("--C", "c", type=float, default=1.0, show_default=True, help="LogisticRegression inverse regularisation.")
@click.option("--out-md", type=_PATH, help="Write the Table-1-style markdown here.")
@click.option("--out-csv", type=_PATH, help="Write the summary (mean, sem per metric and arm) as CSV.")
@click.option("--runs-csv", type=_PATH, help="Write every run's metrics as CSV.")
def probe(real_train, real_test, synthetic, task, k, ratio, one_site_per_class, max_runs, seed, c, out_md, out_csv,
          runs_csv):
    """Linear probe (the paper's Table 1): no-synthetic vs each synthetic set, mean ± SEM over site combinations."""
    from ..eval.probe import ProbeConfig, probe_table
    from ..io import atomic_write_text

    if max_runs < 0:
        raise MediFastError(f"--max-runs must be >= 0 (0: every site combination), got {max_runs}")
    _check_outputs(("--out-md", out_md), ("--out-csv", out_csv), ("--runs-csv", runs_csv))
    cfg = ProbeConfig(k=k, ratio=ratio, one_site_per_class=one_site_per_class, max_runs=max_runs or None,
                      seed=seed, C=c)
    summary, runs, md = probe_table(real_train, real_test, _named_sets(synthetic), task, cfg)
    if out_md is not None:
        atomic_write_text(out_md, md)
    _write_csv(summary, out_csv)
    _write_csv(runs, runs_csv)
    click.echo(md, nl=False)


@click.command("shortcut")
@click.option("--embeddings", required=True, type=_PATH, help="Embeddings of the real training set (from `embed`).")
@click.option("--synthetic", multiple=True, metavar="NAME=EMB", help="Synthetic sets to add (labels) and to measure (repeatable).")
@click.option("--folds", type=int, default=5, show_default=True, help="Cross-validation folds for site prediction.")
@click.option("--min-per-site", type=int, default=5, show_default=True, help="Ignore sites with fewer patches of a class.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fold split.")
@click.option("--out-csv", type=_PATH, help="Write both tables into one CSV (column 'table').")
def shortcut(embeddings, synthetic, folds, min_per_site, seed, out_csv):
    """Measure the class-site shortcut: site predictability per class, I(class; site) before/after augmentation."""
    import pandas as pd

    from ..eval.shortcut import shortcut_report

    check_seed(seed)  # scikit-learn's random_state takes 0 .. 2**32-1
    _check_outputs(("--out-csv", out_csv))
    pred, mi = shortcut_report(embeddings, _named_sets(synthetic), folds, min_per_site, seed)
    fmt = lambda v: f"{v:.3f}"  # noqa: E731
    click.echo("Site predictability within each class (cross-validated balanced accuracy vs chance):")
    click.echo(pred[["embeddings", "class", "n", "sites", "chance", "site_balanced_accuracy", "lift"]]
               .to_string(index=False, float_format=fmt))
    click.echo("\nClass-site mutual information of the training set (bits; 0 = site says nothing about class):")
    click.echo(mi.to_string(index=False, float_format=fmt))
    _write_csv(pd.concat([pred.assign(table="site_predictability"), mi.assign(table="mutual_information")],
                         ignore_index=True), out_csv)
