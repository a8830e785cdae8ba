"""The demo's orchestrator: prepares OUT, runs the stages of `stages.py` in order with a timer each, and
hands the results to `report.py`.  This is the one place that knows the order of the whole run."""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from ..errors import MediFastError
from ..io import ensure_dir
from . import arms, stages
from .stages import DemoConfig

# What a demo run writes under OUT (removed by overwrite=True, and nothing else is).
OUTPUTS = ("data", "pack", "runs", "engines", "synthetic", "figures", "index.parquet", "train.csv", "test.csv",
           "report.md", "report.html", "demo_config.json", "results.json", "seeds.json")
SEED_DIR = re.compile(r"seed-\d+")  # one run per seed of `--seeds` (run_seeds)


class Timer:
    """Wall-clock seconds per named stage, in the order they ran."""

    def __init__(self):
        self.rows: list[tuple[str, float]] = []

    def __call__(self, name):
        timer = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.rows.append((name, time.perf_counter() - self.t0))

        return _T()


def _log(msg: str) -> None:
    import click

    click.echo(f"[demo] {msg}", err=True)


def prepare_out(out: Path, overwrite: bool) -> Path:
    """OUT must be new or empty, or a previous demo run's directory with overwrite=True."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MediFastError(f"demo output {out} is a file; choose another --out")
    present = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if present and not overwrite:
        raise MediFastError(f"demo output {out} is not empty; pass --overwrite to replace a previous demo run "
                            "there, or choose another --out")
    foreign = [n for n in present if n not in OUTPUTS and not SEED_DIR.fullmatch(n)]
    if foreign:
        raise MediFastError(f"demo output {out} holds files a demo run does not write ({', '.join(foreign[:3])}); "
                            "choose another --out")
    for name in present:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return ensure_dir(out)


def _steps(compared: list[arms.Arm]) -> int:
    """The run's numbered steps: the data, one per model trained, the samples, the evaluation, the report."""
    return 4 + sum(a.recipe.trains for a in compared)


def run_demo(cfg: DemoConfig, overwrite: bool = False) -> Path:
    """Run every stage; returns the path of report.html."""
    stages.check_precision(cfg)
    out = prepare_out(Path(cfg.out), overwrite)
    timer = Timer()
    t_all = time.perf_counter()
    compared = arms.for_config(cfg)
    ctx = arms.Context(cfg, out, timer, _log, total=_steps(compared))
    ctx.begin(f"rendering the synthetic cohort into {out / 'data'}")
    with timer("data: render, index, pack"):
        data = stages.build_data(cfg, out)
    ctx.index = data["index"]
    for arm in compared:
        arm.recipe.prepare(arm, ctx)
    ctx.begin(f"making each arm's training data ({stages.backend_label(cfg)} DDIM-{cfg.sample_steps}, stain transforms, renderer)")
    for arm in compared:  # in registry order: an arm built on another's patches comes after it
        ctx.made[arm.name] = arm.recipe.make(arm, ctx)
    return _evaluate_and_report(cfg, out, out, data["index"], timer, t_all, ctx,
                                arm_seconds=arms.cost(compared, ctx.seconds),
                                precision={"requested": cfg.precision, "training": stages.training_precision(cfg),
                                           "generation": dict(ctx.backends)})


def _evaluate_and_report(cfg: DemoConfig, out: Path, run: Path, index, timer: Timer,
                         t_all: float, ctx: arms.Context, arm_seconds: dict[str, float], precision: dict | None,
                         extra: dict | None = None) -> Path:
    """The evaluation and the report on the cohort of the run in `run` and the arms' patches in `ctx`
    (`made`, `views`), into `out`."""
    from .report import write_report

    compared = arms.for_config(cfg)
    synthetic = {name: patches for name, patches in ctx.made.items() if patches is not None}
    ctx.begin("evaluating (colour-texture features: FID-style distance, linear probe, shortcut meter, site colours)")
    with timer("evaluate"):
        real_images = ctx.real()
        results = stages.evaluate(cfg, index, real_images, synthetic, ctx.views, [a.name for a in compared])
        # per arm whose samples carry a site: how well they reproduce each site's stain
        results["site"] = {a.name: stages.measure_site_fidelity(cfg, index, real_images, synthetic[a.name])
                           for a in compared if a.recipe.per_site}
        results["arm_seconds"] = arm_seconds
        results["precision"] = precision  # what the models trained in and the patches were made with
    ctx.begin("writing the report")
    with timer("report"):
        path = write_report(out, cfg, index, real_images, synthetic, results, timer.rows, started=t_all,
                            source=None if run == out else run)
    (out / "demo_config.json").write_text(json.dumps(recorded_config(cfg), indent=2) + "\n")
    record = summary_record(cfg, results, time.perf_counter() - t_all)
    if extra is not None:  # the run's cost is its source's; this process only evaluated
        record = {**record, "reevaluate_seconds": record["seconds"], **extra}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    _log(f"done in {(time.perf_counter() - t_all) / 60:.1f} min: {path}")
    return path


# DemoConfig fields that change only the evaluation: a run that differs from a finished one in these alone
# is evaluated again from that run's cohort and synthetic patches (`reevaluate`) instead of being retrained.
EVALUATION_FIELDS = ("k", "probe_ratio", "probe_repeats")


def recorded_config(cfg: DemoConfig) -> dict:
    """What demo_config.json records: the DemoConfig, and the setting's test sites (a setting's definition
    may change between versions; its name alone would not tell the runs apart)."""
    return json.loads(json.dumps({**asdict(cfg), "test_sites": list(cfg.spec.test_sites)}))


def same_config(recorded: dict, cfg: DemoConfig, ignore: tuple[str, ...] = ()) -> bool:
    """Did the run recorded as `recorded` (its demo_config.json) have configuration `cfg`, up to the fields
    in `ignore`?  Where the run was written is not part of its configuration; a run that recorded other
    fields than this version does was made by another version and is never the same."""
    want = recorded_config(cfg)
    if set(recorded) != set(want):  # recorded by a version with other fields: not this configuration
        return False
    return all(recorded[k] == want[k] for k in want if k not in ("out", *ignore))


def reevaluate(cfg: DemoConfig, source, overwrite: bool = False) -> Path:
    """Evaluate a finished demo run again with cfg's evaluation settings (EVALUATION_FIELDS), from its
    cohort and synthetic patches on disk, into cfg.out; returns report.html.  The source run must have
    been made with cfg's every other setting."""
    source = Path(source)
    conf = source / "demo_config.json"
    if not (conf.is_file() and (source / "results.json").is_file()):
        raise MediFastError(f"{source} holds no finished demo run (no demo_config.json and results.json); "
                            "run `medi-fast demo` there first")
    recorded = json.loads(conf.read_text())
    if not same_config(recorded, cfg, ignore=EVALUATION_FIELDS):
        raise MediFastError(f"the demo run in {source} was made with other settings than these, beyond "
                            f"{', '.join(EVALUATION_FIELDS)}; run the demo afresh")
    if Path(cfg.out).resolve() == source.resolve():
        raise MediFastError(f"re-evaluating {source} into itself would replace the run it reads; choose another out")
    compared = arms.for_config(cfg)
    done = json.loads((source / "results.json").read_text())
    costs = done.get("arm_seconds") if isinstance(done, dict) else None
    if not (isinstance(costs, dict) and list(costs) == [a.name for a in compared]
            and all(isinstance(v, (int, float)) and v >= 0 for v in costs.values())
            and isinstance(done.get("seconds"), (int, float))):
        raise MediFastError(f"the results.json of the demo run in {source} does not record this version's arms and "
                            "their seconds; run the demo afresh")
    precision = done.get("precision")
    if precision is not None and not _valid_precision(precision):
        raise MediFastError(f"the results.json of the demo run in {source} records a damaged precision; run the demo "
                            "afresh")
    t_all = time.perf_counter()
    index = pd.read_parquet(source / "index.parquet")
    total = _steps(compared)
    ctx = arms.Context(cfg, Path(cfg.out), Timer(), _log, total=total, done=total - 2,  # the run's last two steps
                       index=index, data=source)
    for a in compared:  # in registry order, as the run made them; a load that fails leaves out untouched
        ctx.made[a.name] = a.recipe.load(a, source, ctx)
    out = ctx.out = prepare_out(Path(cfg.out), overwrite)
    return _evaluate_and_report(cfg, out, source, index, ctx.timer, t_all, ctx, costs, precision=precision,
                                extra={"reevaluated_from": str(source), "seconds": done["seconds"]})


def _valid_precision(precision) -> bool:
    """Is a run's recorded precision what run_demo writes: the precision asked for, the one trained in, and a
    registered backend per synthetic/ folder?"""
    from ..backends import BACKENDS

    gen = precision.get("generation") if isinstance(precision, dict) else None
    return (isinstance(precision, dict) and precision.get("requested") in stages.PRECISIONS
            and precision.get("training") in ("fp32", "bf16") and isinstance(gen, dict)
            and all(isinstance(k, str) and v in BACKENDS for k, v in gen.items()))


def summary_record(cfg: DemoConfig, results: dict, seconds: float) -> dict:
    """One run's numbers as plain data (results.json): what `run_seeds` and benchmarks/demo_seeds.py
    aggregate over seeds."""
    probe = results["probe"].set_index("arm")
    cells = results["fid_cells"].pivot_table(index=["class", "site"], columns="model", values="distance")
    hi, lo = arms.HEADLINE.hi, arms.HEADLINE.lo
    site = results["site"][hi]
    return {"seed": cfg.seed, "setting": cfg.setting, "quick": cfg.quick, "seconds": round(seconds, 1),
            "probe": {a: {"tss_bacc": float(probe.loc[a, "tss_balanced_accuracy_mean"]),
                          "tss_bacc_sem": float(probe.loc[a, "tss_balanced_accuracy_sem"]),
                          "runs": int(probe.loc[a, "runs"])} for a in probe.index},
            # per arm and test site, the balanced accuracy (mean over the probe runs)
            "probe_sites": {a: {s: float(v) for s, v in row.items()} for a, row in results["probe_sites"].iterrows()},
            "fid_class_mean": {m: float(v) for m, v in results["fid"].groupby("model")["distance"].mean().items()},
            "fid_cell_mean": {m: float(cells[m].mean()) for m in cells.columns},
            # the headline arm's cells closer than the other's; its stain fidelity
            "cells_medi_closer": int((cells[hi] < cells[lo]).sum()), "cells": int(len(cells)),
            "site_correlation": float(site.correlation), "site_slope": float(site.slope),
            "colour_spread_generated": float(site.colour_spread_generated),
            "colour_spread_real": float(site.colour_spread_real),
            # seconds to make each arm's probe training data (arms.cost)
            "arm_seconds": results["arm_seconds"],
            # the precision asked for, the one the models trained in, the backend each synthetic/ folder was made with
            "precision": results.get("precision")}


def run_seeds(cfg: DemoConfig, seeds: list[int], overwrite: bool = False) -> Path:
    """The demo once per seed, each into OUT/seed-S (its own report), then OUT/report.md + .html and
    OUT/seeds.json: every arm's result as mean and spread over the seeds.  Returns OUT/report.html."""
    from .seeds import write_seeds_report

    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise MediFastError(f"--seeds needs two or more different seeds (got {','.join(map(str, seeds))}); "
                            "use --seed for one run")
    stages.check_precision(cfg)
    out = prepare_out(Path(cfg.out), overwrite)
    records = []
    for seed in seeds:
        _log(f"seed {seed} ({len(records) + 1} of {len(seeds)})")
        run_demo(replace(cfg, out=str(out / f"seed-{seed}"), seed=seed))
        records.append(json.loads((out / f"seed-{seed}" / "results.json").read_text()))
    return write_seeds_report(out, cfg, records)
