"""Sampling images/s of generate's sampling path beside the reference-style loop, in one run.

Reference-style loop = what the published code runs: diffusers ``DDIMScheduler`` + the eager fp32
``UNet2DModel``, batched.  Ours = ``medi_fast.generate.sample_rows`` on a backend: per-sample
seeded noise, medi-fast's DDIM, conversion to uint8 included, i.e. everything `generate` does except
writing files.  The candidates alternate for --repeats rounds (benchmarks/_common.alternate) so that
machine noise hits all alike; ratios are best round against best round and the median of the
same-round ratios.  (`benchmarks/backends.py` times every backend and its variants.)

    python benchmarks/sampling_throughput.py                      # tiny-32 and small-64, batch 16
    python benchmarks/sampling_throughput.py --backends torch,torch-compile --steps 10

Prints one table and writes benchmarks/results/sampling_throughput.json (with the machine).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, compare, export_checkpoint, random_checkpoint, write_results  # noqa: E402
from backends import REFERENCE, reference_loop  # noqa: E402

from medi_fast import backends, plan as plans  # noqa: E402
from medi_fast.generate import GenerateConfig, sample_rows  # noqa: E402
from medi_fast.schedule import Schedule  # noqa: E402

CLASSES, SITES = ["LUAD", "LUSC"], ["05", "44"]


def run(preset: str, batch: int, steps: int, repeats: int, names: list[str], tmp: Path):
    schedule = Schedule()
    model, path = random_checkpoint(preset, tmp, CLASSES, SITES)
    info = backends.open_model(path)
    plan = plans.single(info.spec, {"class": "LUAD", "tss": "05"}, batch, seed=0)
    x_T = torch.randn(batch, 3, model.resolution, model.resolution)
    cond = model.spec.encode({"class": ["LUAD"] * batch, "tss": ["05"] * batch})

    # label -> loop of n steps; every one but the reference is generate's own path (shipped)
    loops = {REFERENCE: lambda n: reference_loop(model, x_T, cond, n, schedule)}
    onnx_info = None
    for name in names:
        entry = backends.BACKENDS[name]
        if not entry.availability()[0]:
            continue
        model_info = info
        if "checkpoint" not in entry.kinds:  # an ONNX runtime: export once (the same weights)
            if onnx_info is None:
                onnx_info = backends.open_model(export_checkpoint(path, tmp / preset))
            model_info = onnx_info
        be = backends.create(name, model_info, **({"device": "cpu"} if model_info is info else {}))
        loops[f"{name} (sample_rows: seeded noise, DDIM, uint8)"] = (
            lambda n, be=be, mi=model_info: sample_rows(be, mi, plan.rows, GenerateConfig(steps=n, batch_size=batch)))
    # untimed 1-step warm-up (torch.compile compiles here), then alternating rounds
    timings = alternate({k: (lambda f=f: f(steps)) for k, f in loops.items()}, repeats,
                        warmup_fns={k: (lambda f=f: f(1)) for k, f in loops.items()})
    rows = []
    for k, c in compare(timings.wall, REFERENCE).items():
        lo, hi = c["ratio_per_round_range"]
        rows.append({"preset": preset, "candidate": k, "batch": batch, "steps": steps, "shipped": k != REFERENCE,
                     "seconds": round(c["seconds"], 4), "seconds_per_round": [round(t, 4) for t in c["seconds_per_round"]],
                     "images_per_s": round(batch / c["seconds"], 3), "ratio_vs_reference": round(c["ratio_best"], 3),
                     "ratio_per_round_median": round(c["ratio_per_round_median"], 3),
                     "ratio_per_round_range": [round(lo, 3), round(hi, 3)]})
        print(f"{preset:<9} {k:<52} {batch / c['seconds']:>9.2f} img/s {c['ratio_best']:>6.2f}x "
              f"(rounds: median {c['ratio_per_round_median']:.2f}x, {lo:.2f}-{hi:.2f})", flush=True)
    return rows, timings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny-32,small-64")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", default="10,4", help="DDIM steps per preset (comma list, same order)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="torch,ort-cpu", help="comma-separated backends to time (torch ones on the "
                    "checkpoint, ONNX ones on its export)")
    args = ap.parse_args()
    presets = args.presets.split(",")
    steps = [int(s) for s in args.steps.split(",")]
    steps += [steps[-1]] * (len(presets) - len(steps))
    names = args.backends.split(",")
    unknown = [n for n in names if n not in backends.BACKENDS]
    if unknown:
        ap.error(f"unknown backend(s) {', '.join(unknown)}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for preset, n in zip(presets, steps):
            preset_rows, timings = run(preset, args.batch, n, args.repeats, names, Path(d))
            rows += preset_rows
    print(f"wrote {write_results('sampling_throughput', rows, timing=timings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
