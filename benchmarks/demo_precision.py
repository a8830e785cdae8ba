"""The full demo in fp32 and at its default precision, side by side in one run: how much faster bf16 makes it.

    python benchmarks/demo_precision.py [--seed 0] [--work .bench-tmp/demo_precision]

Runs `medi-fast demo --seed N --precision fp32` and `medi-fast demo --seed N` (precision auto: bf16 training
and generation where the CPU has bf16 units) into WORK/fp32 and WORK/auto, in turn, each afresh, and records
per run: the wall time, each arm's seconds to make its training data (results.json's arm_seconds), the
training stage of each model (its own clock), what the run trained in and generated with, and every arm's
probe accuracy.  `speed_vs_fp32`: fp32's wall time over the run's.  One seed's accuracies are one draw: the
result over seeds is benchmarks/demo_seeds.py's (ring4 against ring4-fp32).  Writes
benchmarks/results/demo_precision.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from medi_fast.demo import DemoConfig, run_demo  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=".bench-tmp/demo_precision", help="where the two demo runs go (replaced)")
    ap.add_argument("--quick", action="store_true", help="--quick demo runs (a smoke test of this script)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    rows = []
    for precision in ("fp32", "auto"):
        cfg = replace(DemoConfig.from_options(str(work / precision), quick=args.quick, seed=args.seed),
                      precision=precision)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        t0 = time.perf_counter()
        run_demo(cfg, overwrite=True)
        wall = time.perf_counter() - t0
        res = json.loads((work / precision / "results.json").read_text())
        train = {}
        for model in ("medi", "cls"):
            metrics = work / precision / "runs" / model / "metrics.csv"
            train[f"train_s_{model}"] = float(pd.read_csv(metrics)["elapsed_s"].iloc[-1]) if metrics.is_file() else None
        prec = res.get("precision") or {}
        rows.append({"precision": precision, "training": prec.get("training"),
                     "generation": ", ".join(sorted(set((prec.get("generation") or {}).values()))),
                     "seconds": round(wall, 1), "load_avg_1_before": load, **train,
                     **{f"arm_s {a}": round(v, 1) for a, v in res["arm_seconds"].items() if v >= 5},
                     **{f"probe {a}": round(v["tss_bacc"], 4) for a, v in res["probe"].items()}})
        print(f"== {precision}: {wall / 60:.1f} min ({prec})", flush=True)
    for r in rows:
        r["speed_vs_fp32"] = round(rows[0]["seconds"] / r["seconds"], 3)
    print("wrote", write_results("demo_precision", rows, {"seed": args.seed, "quick": args.quick}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
