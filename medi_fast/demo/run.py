"""The demo's orchestrator: prepares OUT, runs the stages of `stages.py` in order with a timer each, and
hands the results to `report.py`.  This is the one place that knows the order of the whole run."""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..errors import MediFastError
from ..io import ensure_dir
from . import stages
from .stages import DemoConfig

# What a demo run writes under OUT (removed by overwrite=True, and nothing else is).
OUTPUTS = ("data", "pack", "runs", "engines", "synthetic", "figures", "index.parquet", "train.csv", "test.csv",
           "report.md", "report.html", "demo_config.json", "results.json", "seeds.json")
STUDENT = "MeDi-{steps}-step"  # the distilled student's arm in the report (--distill)
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


def run_demo(cfg: DemoConfig, overwrite: bool = False) -> Path:
    """Run every stage; returns the path of report.html."""
    from .report import write_report

    out = prepare_out(Path(cfg.out), overwrite)
    timer = Timer()
    t_all = time.perf_counter()
    _log(f"1/6 rendering the synthetic cohort into {out / 'data'}")
    with timer("data: render, index, pack"):
        data = stages.build_data(cfg, out)
    index = data["index"]
    ckpts, onnx = {}, {}
    for i, (name, cond) in enumerate((("CLS", "class"), ("MeDi", "class,tss"))):
        _log(f"{2 + i}/6 training the {name} model (--condition {cond}, {cfg.train_steps} steps)")
        with timer(f"train {name} ({cfg.train_steps} steps, batch {cfg.batch_size})"):
            ckpts[name] = stages.train_model(cfg, out, name.lower(), cond)
        with timer(f"export {name} to ONNX"):
            onnx[name] = stages.export_model(ckpts[name], out, name.lower())
    synthetic = {}
    _log(f"4/6 generating with ONNX Runtime (DDIM-{cfg.sample_steps})")
    for name in ("CLS", "MeDi"):
        with timer(f"generate {name} (ort-cpu, DDIM-{cfg.sample_steps})"):
            synthetic[name] = stages.generate(cfg, onnx[name], out, name.lower(), cls_only=(name == "CLS"))
    if cfg.distill:
        student = STUDENT.format(steps=cfg.distill_steps)
        _log(f"4/6 distilling MeDi into a {cfg.distill_steps}-step student (DDIM-{cfg.distill_teacher_steps} -> "
             f"{cfg.distill_steps}, {cfg.distill_iters} iterations per stage)")
        with timer(f"distil MeDi -> {student}"):
            path = stages.distill_model(cfg, ckpts["MeDi"], out)
        with timer(f"export {student} to ONNX"):
            onnx[student] = stages.export_model(path, out, "medi-student")
        with timer(f"generate {student} (ort-cpu, its own steps)"):
            synthetic[student] = stages.generate(cfg, onnx[student], out, "medi-student", cls_only=False)
    _log("5/6 evaluating (colour-texture features: FID-style distance, linear probe, shortcut meter, site colours)")
    with timer("evaluate"):
        real_images = stages._real(out)
        results = stages.evaluate(cfg, index, real_images, synthetic)
        results["site"] = stages.measure_site_fidelity(cfg, index, real_images, synthetic["MeDi"])
        if cfg.distill:
            results["site_student"] = stages.measure_site_fidelity(cfg, index, real_images, synthetic[student])
    _log("6/6 writing the report")
    with timer("report"):
        path = write_report(out, cfg, index, real_images, synthetic, results, timer.rows, started=t_all)
    (out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    (out / "results.json").write_text(json.dumps(summary_record(cfg, results, time.perf_counter() - t_all), indent=2)
                                      + "\n")
    _log(f"done in {(time.perf_counter() - t_all) / 60:.1f} min: {path}")
    return path


def summary_record(cfg: DemoConfig, results: dict, seconds: float) -> dict:
    """One run's numbers as plain data (results.json): what `run_seeds` and benchmarks/demo_seeds.py
    aggregate over seeds."""
    probe = results["probe"].set_index("arm")
    cells = results["fid_cells"].pivot_table(index=["class", "site"], columns="model", values="distance")
    site = results["site"]
    return {"seed": cfg.seed, "setting": cfg.setting, "quick": cfg.quick, "seconds": round(seconds, 1),
            "probe": {a: {"tss_bacc": float(probe.loc[a, "tss_balanced_accuracy_mean"]),
                          "tss_bacc_sem": float(probe.loc[a, "tss_balanced_accuracy_sem"]),
                          "runs": int(probe.loc[a, "runs"])} for a in probe.index},
            "fid_class_mean": {m: float(v) for m, v in results["fid"].groupby("model")["distance"].mean().items()},
            "fid_cell_mean": {m: float(cells[m].mean()) for m in cells.columns},
            "cells_medi_closer": int((cells["MeDi"] < cells["CLS"]).sum()), "cells": int(len(cells)),
            "site_correlation": float(site.correlation), "site_slope": float(site.slope),
            "colour_spread_generated": float(site.colour_spread_generated),
            "colour_spread_real": float(site.colour_spread_real)}


def run_seeds(cfg: DemoConfig, seeds: list[int], overwrite: bool = False) -> Path:
    """The demo once per seed, each into OUT/seed-S (its own report), then OUT/report.md + .html and
    OUT/seeds.json: every arm's result as mean and spread over the seeds.  Returns OUT/report.html."""
    from .seeds import write_seeds_report

    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise MediFastError(f"--seeds needs two or more different seeds (got {','.join(map(str, seeds))}); "
                            "use --seed for one run")
    out = prepare_out(Path(cfg.out), overwrite)
    records = []
    for seed in seeds:
        _log(f"seed {seed} ({len(records) + 1} of {len(seeds)})")
        run_demo(replace(cfg, out=str(out / f"seed-{seed}"), seed=seed))
        records.append(json.loads((out / f"seed-{seed}" / "results.json").read_text()))
    return write_seeds_report(out, cfg, records)
