"""``medi-fast data``: index, report, split, synth, pack (see docs/data.md)."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import MediFastError


@click.group("data")
def data():
    """Data: index a TCGA-UT folder, report it, split it, render a synthetic set, pack for training."""


def _problems_path(index_out: Path) -> Path:
    return index_out.with_name(index_out.stem + ".problems.csv")


@data.command("index")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--metadata", "metadata", required=True, type=click.Path(path_type=Path),
              help="GDC clinical CSV (columns project_id, slide_submitter_id, case_submitter_id, "
                   "tissue_source_site, gender, race, age_at_index).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Index parquet to write.")
@click.option("--strict", is_flag=True, help="Fail on any undecodable image or slide without metadata "
                                            "(default: list them in OUT.problems.csv and exclude them).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Decode every image to find corrupt ones (--no-verify: trust the files, much faster).")
@click.option("--workers", type=int, default=None, help="Decoder threads (default: 2 x CPU cores, at most 8).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def index_cmd(root, metadata, out, strict, verify, workers, overwrite):
    """Index ROOT/<cancer type>/<slide_submitter_id>/*.jpg joined with clinical metadata (one row per patch)."""
    from ..data.index import build_index_with_problems, write_index
    from ..io import atomic_path, refuse_existing

    refuse_existing([out], overwrite=overwrite)

    df, problems = build_index_with_problems(root, metadata, strict=strict, verify=verify, workers=workers)
    write_index(df, out)
    ptab = problems.table()
    ppath = _problems_path(out)
    if len(ptab):
        with atomic_path(ppath) as tmp:
            ptab.to_csv(tmp, index=False)
    elif ppath.exists():
        ppath.unlink()  # a stale list from an earlier run would mislead
    click.echo(f"indexed {len(df)} patches of {df['slide_submitter_id'].nunique()} slides, "
               f"{df['class'].nunique()} classes, {df['tissue_source_site'].nunique()} TSS -> {out} "
               f"(path column: absolute)")
    click.echo(problems.summary() + (f"; listed in {ppath}" if len(ptab) else ""))


@data.command("report")
@click.argument("index", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder for coverage.csv/.png, demographics.png, counts.json "
                   "[default: INDEX without suffix + '_report'].")
@click.option("--unit", type=click.Choice(["patches", "slides"]), default="patches", show_default=True,
              help="What the coverage matrix counts.")
def report_cmd(index, out, unit):
    """Print counts; write the class x TSS coverage matrix (CSV + heatmap PNG) and race/gender bars."""
    import pandas as pd

    from ..data.index import read_index
    from ..data.report import counts_text, write_report

    df = read_index(index)
    ppath = _problems_path(index)
    problems = pd.read_csv(ppath, dtype=str, keep_default_na=False) if ppath.is_file() else None
    out = out or index.with_name(index.stem + "_report")
    c = write_report(df, out, unit=unit, problems=problems)
    click.echo(counts_text(c))
    if problems is not None and len(problems):
        click.echo("excluded at indexing: " + ", ".join(f"{v} {k}" for k, v in c["problems"].items())
                   + f" (see {ppath})")
    click.echo(f"wrote {out}/coverage.csv, coverage.png, demographics.png, counts.json")


@data.command("split")
@click.option("--metadata", required=True, type=click.Path(path_type=Path), help="GDC clinical CSV to split.")
@click.option("--strategy", type=click.Choice(["published", "random"]), default="published", show_default=True,
              help="published: the paper's key order; random: keys shuffled with --seed.")
@click.option("--seed", type=int, default=0, show_default=True, help="Shuffle seed (random strategy).")
@click.option("--frac", type=float, default=0.7, show_default=True, help="Share of keys that go to train.")
@click.option("--by", type=click.Choice(["combo", "tss"]), default="combo", show_default=True,
              help="combo: hold out (TSS, gender, race) keys; tss: hold out whole sites.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for train.csv, holdout.csv, summary.json.")
@click.option("--overwrite", is_flag=True, help="Replace an existing split in --out.")
def split_cmd(metadata, strategy, seed, frac, by, out, overwrite):
    """Split clinical records into train/holdout with whole subpopulations held out; check leakage."""
    from ..data.clinical import read_csv_str
    from ..data.split import split_metadata, write_split
    from ..io import refuse_existing

    if out.exists() and not out.is_dir():
        raise MediFastError(f"--out {out} is a file; give a folder for train.csv, holdout.csv, summary.json")
    refuse_existing([out / "train.csv", out / "holdout.csv", out / "summary.json"], overwrite=overwrite)

    result = split_metadata(read_csv_str(metadata), strategy=strategy, seed=seed, frac=frac, by=by)
    write_split(result, out)
    click.echo(result.text())
    click.echo(f"wrote {out}/train.csv, holdout.csv, summary.json")


@data.command("synth")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Dataset folder to create.")
@click.option("--setting", type=click.Choice(["full", "confounded"]), default="confounded", show_default=True,
              help="full: every class at every site; confounded: each class at its own train site, "
                   "test sites hold every class (the paper's downstream experiment).")
@click.option("--classes", default="LUAD,LUSC", show_default=True,
              help="Comma-separated classes (LUAD, LUSC, KIRC, DLBC).")
@click.option("--sites", default="S1,S2,S3,S4", show_default=True, help="Site codes for --setting full.")
@click.option("--train-sites", default=None,
              help="confounded: one site per class [default: S1, S2, ...].")
@click.option("--test-sites", default=None, help="confounded: sites holding every class [default: two more].")
@click.option("--n-per-combo", type=int, default=64, show_default=True, help="Patches per (class, site).")
@click.option("--n-test-per-combo", type=int, default=None,
              help="confounded: patches per (class, test site) [default: --n-per-combo].")
@click.option("--resolution", type=int, default=64, show_default=True, help="Patch side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True, help="Morphology and demographics seed.")
@click.option("--patches-per-slide", type=int, default=8, show_default=True, help="Patches per synthetic slide.")
@click.option("--appearance-seed", type=int, default=0, show_default=True,
              help="Seed of the per-site stain appearance (same code + seed = same look).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
def synth_cmd(out, setting, classes, sites, train_sites, test_sites, n_per_combo, n_test_per_combo, resolution,
              seed, patches_per_slide, appearance_seed, overwrite):
    """Render a synthetic H&E dataset (class = morphology, site = stain) in the TCGA-UT layout."""
    import time

    from ..data.synth import SynthConfig, render_dataset
    from ..vocab import parse_list

    kw = dict(resolution=resolution, seed=seed, patches_per_slide=patches_per_slide, appearance_seed=appearance_seed)
    if setting == "full":
        if train_sites or test_sites or n_test_per_combo is not None:
            raise MediFastError("--train-sites/--test-sites/--n-test-per-combo apply to --setting confounded; "
                                "use --sites with --setting full")
        cfg = SynthConfig.full(parse_list(classes), parse_list(sites), n_per_combo, **kw)
    else:
        cfg = SynthConfig.confounded(parse_list(classes), parse_list(train_sites) if train_sites else None,
                                     parse_list(test_sites) if test_sites else None, n_per_combo,
                                     n_test_per_combo, **kw)
    t0 = time.perf_counter()
    render_dataset(cfg, out, overwrite=overwrite)
    dt = time.perf_counter() - t0
    click.echo(f"rendered {cfg.n_patches} patches ({len(cfg.combos)} class x site combinations, "
               f"{cfg.resolution} px) in {dt:.1f} s ({cfg.n_patches / dt:.0f} patches/s) -> {out}")
    click.echo(f"next: medi-fast data index {out} --metadata {out}/clinical.csv --out {out}/index.parquet")


@data.command("pack")
@click.argument("index", type=click.Path(path_type=Path))
@click.option("--resolution", type=int, required=True, help="Side length of the packed patches (e.g. 128).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Pack folder to create.")
@click.option("--split", "split_csv", type=click.Path(path_type=Path), default=None,
              help="Keep only slides listed in this train.csv/holdout.csv (from `data split`).")
@click.option("--workers", type=int, default=None, help="Decoder threads (default: 2 x CPU cores, at most 8).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
def pack_cmd(index, resolution, out, split_csv, workers, overwrite):
    """Resize every patch once into a uint8 memmap (N, 3, R, R) + labels.parquet + pack.json."""
    import time

    from ..data.dataset import rows_in_split
    from ..data.index import read_index
    from ..data.pack import pack_index

    df = read_index(index)
    if split_csv is not None:
        df = df.iloc[rows_in_split(df, split_csv)]
    t0 = time.perf_counter()
    pack_index(df, resolution, out, overwrite=overwrite, workers=workers, progress=True)
    dt = time.perf_counter() - t0
    click.echo(f"packed {len(df)} patches at {resolution} px in {dt:.1f} s -> {out} "
               f"({len(df) * 3 * resolution * resolution / 2**20:.1f} MiB)")
