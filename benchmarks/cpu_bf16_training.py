"""The demo's MeDi model trained in fp32 and in bf16 autocast on this CPU: loss curves and steps/s.

The demo's data and training settings (``medi_fast.demo.stages``: the demo-32 preset, its batch, lr,
warm-up, EMA and 700 steps, seed 0), one run per precision in turn, the same data and seed.  The
loss is logged every 25 steps (the mean over those steps); the curves are compared point by point.
bf16 is worth making the demo's default only if the curves agree and the demo's result (the arms'
order and separation over seeds) holds; the second is `benchmarks/demo_seeds.py`'s to say.

    python benchmarks/cpu_bf16_training.py                 # the demo's 700 steps (minutes per precision)
    python benchmarks/cpu_bf16_training.py --steps 50      # a short check

Writes benchmarks/results/cpu_bf16_training.json (with the machine and whether its CPU has bf16 units:
where it has not, torch emulates bf16 and the speed figures say nothing about bf16 hardware).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from medi_fast.backends import cpu_bf16_native  # noqa: E402
from medi_fast.demo import stages  # noqa: E402
from medi_fast.training.loop import train  # noqa: E402


def curve(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "steps_per_s": float(r["steps_per_s"])}
                for r in csv.DictReader(f)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=stages.DemoConfig().train_steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--name", default="cpu_bf16_training")
    args = ap.parse_args(argv)
    precisions = args.precisions.split(",")
    rows, curves = [], {}
    with tempfile.TemporaryDirectory(prefix="medi-bf16-train-") as tmp:
        out = Path(tmp)
        cfg = replace(stages.DemoConfig(out=str(out)), seed=args.seed, train_steps=args.steps)
        stages.build_data(cfg, out)
        for precision in precisions:
            tc = replace(stages.train_config(cfg, out, f"medi-{precision}", "class,tss"), precision=precision)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            result = train(tc)
            wall = time.perf_counter() - t0
            curves[precision] = curve(Path(result["out"]))
            rows.append({"precision": precision, "steps": args.steps, "seconds": round(wall, 1),
                         "steps_per_s": round(args.steps / wall, 3), "final_loss": result["loss"],
                         "load_avg_1_before": round(load, 2), "curve": curves[precision]})
            print(f"{precision}: {wall:.1f} s, {args.steps / wall:.2f} steps/s, final loss {result['loss']:.4f}",
                  flush=True)
    base = rows[0]
    for row in rows[1:]:
        pairs = list(zip(curves[base["precision"]], curves[row["precision"]]))
        row["speed_vs_" + base["precision"]] = round(row["steps_per_s"] / base["steps_per_s"], 3)
        row["max_rel_loss_diff_vs_" + base["precision"]] = round(
            max(abs(b["loss"] - a["loss"]) / a["loss"] for a, b in pairs), 4)
        row["mean_rel_loss_diff_vs_" + base["precision"]] = round(
            sum(abs(b["loss"] - a["loss"]) / a["loss"] for a, b in pairs) / len(pairs), 4)
        print(f"{row['precision']} vs {base['precision']}: {row['speed_vs_' + base['precision']]:.2f}x steps/s, "
              f"loss curves differ by {row['mean_rel_loss_diff_vs_' + base['precision']]:.2%} on average "
              f"(at most {row['max_rel_loss_diff_vs_' + base['precision']]:.2%})", flush=True)
    path = write_results(args.name, rows, {"cpu_bf16_native": cpu_bf16_native(), "seed": args.seed,
                                           "command": " ".join(["python", "benchmarks/cpu_bf16_training.py",
                                                                *sys.argv[1:]])})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
