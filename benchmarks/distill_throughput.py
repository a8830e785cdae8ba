"""What a distillation iteration costs beside a training step of the same model, in the same run.

    python benchmarks/distill_throughput.py --teacher demo_out/runs/medi/checkpoints/best.pt \
        [--pack demo_out/pack --split demo_out/train.csv] [--iters 60] [--rounds 2]

One progressive-distillation iteration (medi_fast.training.distill) runs the teacher twice (two DDIM
steps, no gradient) and one optimiser step of the student, a copy of the teacher: by arithmetic it
should cost one training step plus two forward passes.  This script times, alternating the three in
--rounds rounds so a noisy machine slows them alike:

* ``train``: `medi-fast train` (medi_fast.training.loop.train) of the teacher's preset on the same data
  and batch, seconds per step from its own metrics.csv clock (elapsed_s between its first and last
  logged step: start-up excluded);
* ``distill``: `medi-fast distill` of the teacher, one halving stage of --iters iterations, seconds per
  iteration from its metrics.csv clock the same way;
* ``forward``: the teacher's forward pass at the batch size under torch.no_grad, the median of
  --iters calls.

It reports distill / train (measured) against (train + 2 x forward) / train (the arithmetic).  Writes
benchmarks/results/distill_throughput.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402


def per_step(metrics: Path) -> float:
    """Seconds per step between the first and last logged steps of a run's metrics.csv."""
    m = pd.read_csv(metrics)
    m = m[pd.to_numeric(m["elapsed_s"], errors="coerce").notna()]
    first, last = m.iloc[0], m.iloc[-1]
    return (float(last["elapsed_s"]) - float(first["elapsed_s"])) / (int(last["step"]) - int(first["step"]))


def time_train(ck, args, work: Path, r: int) -> float:
    from medi_fast.training.config import TrainConfig
    from medi_fast.training.loop import train

    out = work / f"train-{r}"
    cond = ",".join(ck.spec.names)
    train(TrainConfig(data=args.pack, split=args.split, condition=cond, preset=ck.preset,
                      prediction_type=ck.schedule.prediction_type, resolution=ck.resolution, batch_size=args.batch_size,
                      lr=1e-4, steps=args.iters, out=str(out), warmup=0, workers=0, seed=r, checkpoint_every=args.iters,
                      keep_last=1, log_every=10, grid_every=0, device="cpu"))
    return per_step(out / "metrics.csv")


def time_distill(args, work: Path, r: int) -> float:
    from medi_fast.training.distill import distill

    out = work / f"student-{r}.pt"
    distill(teacher=args.teacher, steps=args.teacher_steps // 2, teacher_steps=args.teacher_steps, out=str(out),
            data=args.pack, split=args.split, iters_per_stage=args.iters, batch_size=args.batch_size, lr=5e-4,
            seed=r, device="cpu", checkpoint_every=args.iters, log_every=10, progress=False)
    return per_step(out.with_name(out.stem + ".distill") / "metrics.csv")


def time_forward(ck, args) -> float:
    model = ck.build(ema=True).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, ck.resolution, ck.resolution, generator=g)
    t = torch.randint(0, 1000, (args.batch_size,), generator=g)
    cond = {n: torch.zeros(args.batch_size, dtype=torch.long) for n in ck.spec.names}
    times = []
    with torch.no_grad():
        model(x, t, cond)
        for _ in range(args.iters):
            t0 = time.perf_counter()
            model(x, t, cond)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="a medi-fast train checkpoint (the demo's MeDi model)")
    ap.add_argument("--pack", help="its training pack (default: the run's demo directory's pack)")
    ap.add_argument("--split", help="its training split CSV (default: the demo directory's train.csv)")
    ap.add_argument("--iters", type=int, default=60, help="training steps and distillation iterations per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--teacher-steps", type=int, default=16)
    args = ap.parse_args(argv)
    from medi_fast import checkpoint

    demo = Path(args.teacher).resolve().parents[3]  # <demo>/runs/medi/checkpoints/x.pt
    args.pack = args.pack or str(demo / "pack")
    args.split = args.split or str(demo / "train.csv")
    ck = checkpoint.load(args.teacher)
    rows = []
    with tempfile.TemporaryDirectory(prefix="medi-fast-distill-throughput-") as tmp:
        for r in range(args.rounds):
            rows.append({"round": r, "what": "train", "s_per_step": time_train(ck, args, Path(tmp), r)})
            rows.append({"round": r, "what": "distill", "s_per_step": time_distill(args, Path(tmp), r)})
            rows.append({"round": r, "what": "forward", "s_per_step": time_forward(ck, args)})
            print(rows[-3:], flush=True)
    t = pd.DataFrame(rows).groupby("what")["s_per_step"].median()
    ratio, arithmetic = t["distill"] / t["train"], (t["train"] + 2 * t["forward"]) / t["train"]
    print(f"train {t['train']:.3f} s/step, distill {t['distill']:.3f} s/iteration, forward {t['forward']:.3f} s: "
          f"distill / train {ratio:.2f} (arithmetic {arithmetic:.2f})")
    write_results("distill_throughput", rows, extra={
        "teacher": args.teacher, "preset": ck.preset, "resolution": ck.resolution, "batch_size": args.batch_size,
        "iters": args.iters, "rounds": args.rounds, "teacher_steps": args.teacher_steps,
        "median_s": {k: round(float(v), 4) for k, v in t.items()},
        "distill_over_train": round(float(ratio), 3), "arithmetic_over_train": round(float(arithmetic), 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
