"""The demo's arms that need no trained model (stain augmentation and normalisation, the renderer's oracle
arms, real data alone), at the demo's full configuration, without training anything: what they cost and
score, and what they add to a demo run.

    python benchmarks/demo_arms.py [--seed 0] [--work .bench-tmp/demo_arms]

It renders and packs the cohort exactly as `medi-fast demo --seed S` does, makes each such arm's training
data with the arm's own recipe (timed as the demo times it: `arms.cost`), and evaluates the probe as the
demo does.  A probe run's real draw and each arm's added patches depend on the seed and the metadata alone,
so these arms' accuracies are the ones the full demo reports for the same seed; the arms built on a trained
model (CLS, MeDi and what builds on them) are not made here.  The evaluation runs twice, with these arms
and with real data alone: the difference is what they add to the demo's evaluation stage.  Writes
benchmarks/results/demo_arms.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from medi_fast.demo import DemoConfig, arms, stages  # noqa: E402
from medi_fast.demo.run import Timer, prepare_out  # noqa: E402


def untrained(cfg: DemoConfig) -> list[arms.Arm]:
    """The arms whose training data needs no trained model."""
    return [a for a in arms.for_config(cfg) if not a.recipe.trains and not a.recipe.needs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=".bench-tmp/demo_arms", help="where the cohort is rendered (replaced)")
    args = ap.parse_args()
    cfg = DemoConfig.from_options(out=args.work, seed=args.seed)
    out = prepare_out(Path(cfg.out), overwrite=True)
    timer = Timer()
    ctx = arms.Context(cfg, out, timer, lambda msg: print(msg, flush=True), total=3)
    ctx.begin("rendering and packing the cohort")
    t0 = time.perf_counter()
    ctx.index = stages.build_data(cfg, out)["index"]
    data_seconds = time.perf_counter() - t0
    compared = untrained(cfg)
    ctx.begin("making each arm's training data: " + ", ".join(a.name for a in compared))
    for a in compared:
        ctx.made[a.name] = a.recipe.make(a, ctx)
    cost = arms.cost(compared, ctx.seconds)
    ctx.begin("evaluating, with these arms and with real data alone")
    real = ctx.real()
    t0 = time.perf_counter()
    results = stages.evaluate(cfg, ctx.index, real, {n: p for n, p in ctx.made.items() if p is not None},
                              ctx.views, [a.name for a in compared])
    eval_all = time.perf_counter() - t0
    t0 = time.perf_counter()
    stages.evaluate(cfg, ctx.index, real, {}, {}, [arms.REAL.name])
    eval_real = time.perf_counter() - t0
    probe = results["probe"].set_index("arm")
    rows = [{"arm": a.name, "label": a.label, "seconds": cost[a.name],
             "tss_bacc": round(float(probe.loc[a.name, "tss_balanced_accuracy_mean"]), 6),
             "tss_bacc_sem": round(float(probe.loc[a.name, "tss_balanced_accuracy_sem"]), 6),
             "runs": int(probe.loc[a.name, "runs"])} for a in compared]
    for r in rows:
        print(f"{r['arm']:>14}: {r['tss_bacc']:.3f} ± {r['tss_bacc_sem']:.3f}  ({r['seconds']:.1f} s)", flush=True)
    added = sum(cost.values()) + eval_all - eval_real
    print(f"data {data_seconds:.1f} s; evaluation {eval_all:.1f} s with these arms, {eval_real:.1f} s with real data "
          f"alone; these arms add {added:.1f} s to a demo run", flush=True)
    write_results("demo_arms", rows, extra={
        "seed": cfg.seed, "setting": cfg.setting, "data_seconds": round(data_seconds, 1),
        "evaluate_seconds": round(eval_all, 1), "evaluate_real_only_seconds": round(eval_real, 1),
        "added_seconds": round(added, 1),
        "probe_sites": {a: {s: float(v) for s, v in row.items()} for a, row in results["probe_sites"].iterrows()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
