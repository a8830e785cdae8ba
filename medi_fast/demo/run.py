"""The demo's orchestrator: prepares OUT, runs the stages of `stages.py` in order with a timer each, and
hands the results to `report.py`.  This is the one place that knows the order of the whole run."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import MediFastError
from ..io import ensure_dir
from . import stages
from .stages import DemoConfig

# What a demo run writes under OUT (removed by overwrite=True, and nothing else is).
OUTPUTS = ("data", "pack", "runs", "engines", "synthetic", "figures", "index.parquet", "train.csv", "test.csv",
           "report.md", "report.html", "demo_config.json")


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
    foreign = [n for n in present if n not in OUTPUTS]
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
    _log("5/6 evaluating (colour-texture features: FID-style distance, linear probe, shortcut meter, site colours)")
    with timer("evaluate"):
        real_images = stages._real(out)
        results = stages.evaluate(cfg, index, real_images, synthetic)
        results["site"] = stages.measure_site_fidelity(index, real_images, synthetic["MeDi"])
    _log("6/6 writing the report")
    with timer("report"):
        path = write_report(out, cfg, index, real_images, synthetic, results, timer.rows, started=t_all)
    (out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    _log(f"done in {(time.perf_counter() - t_all) / 60:.1f} min: {path}")
    return path
