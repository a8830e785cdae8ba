"""Quality vs steps of the samplers on a trained checkpoint: the fewest solver steps within 5 % of DDIM-100.

    python benchmarks/solver_quality.py --checkpoint demo/medi.pt [--n-per-combo 16] [--steps 5,8,10,15,20,25]

For every sampler (ddim, dpmpp-2m, unipc) and step count it generates the same images (one seed per
image, so every sampler starts from the same x_T) and reports:

* ``dist``: the Frechet distance of ``colour-texture`` features (48-d, no weights; see
  medi_fast/eval/features.py) between the generated images and real patches rendered by the built-in
  synthetic generator for the same (class, site) combinations.  Needs a checkpoint trained on that
  synthetic data (the demo's): real images of other checkpoints are not available offline here.
  ``noise_floor`` (distance between two independent real sets of the same size) says which
  differences are meaningful.
* ``rmse_ref``: RMS pixel difference (in [-1, 1] units) to a reference solution of the same
  probability-flow ODE from the same x_T (dpmpp-2m with ``--ref-steps``, no x0 clipping): the
  solver's own discretisation error, far less noisy than any distribution distance.
* ``s``: wall time of the sampling (torch eager, fp32, this machine).

Writes benchmarks/results/solver_quality.json (with the machine description) and prints one table.
"""
from __future__ import annotations

import argparse
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from medi_fast import checkpoint  # noqa: E402
from medi_fast.data.synth import render_patches  # noqa: E402
from medi_fast.eval.features import ColourTexture  # noqa: E402
from medi_fast.eval.fid import frechet_distance as frechet  # noqa: E402
from medi_fast.pixels import to_uint8  # noqa: E402
from medi_fast.samplers import get_sampler, timesteps_for  # noqa: E402

BASELINE = ("ddim", 100)  # the published FID protocol's sampler
TOLERANCE = 0.05  # "within 5 % of DDIM-100"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a checkpoint trained on the built-in synthetic data")
    ap.add_argument("--n-per-combo", type=int, default=16, help="images per (class, site) combination")
    ap.add_argument("--steps", default="5,8,10,15,20,25", help="step counts to try for every sampler")
    ap.add_argument("--samplers", default="ddim,dpmpp-2m,unipc,dpmpp-2m-clip,unipc-clip")
    ap.add_argument("--ref-steps", type=int, default=200, help="steps of the reference ODE solution (dpmpp-2m)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="solver_quality", help="results file: benchmarks/results/NAME.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ckpt = checkpoint.load(args.checkpoint)
    model, schedule, spec = ckpt.build(), ckpt.schedule, ckpt.spec
    res = ckpt.resolution
    attrs = {a.name: a for a in spec.attributes}
    classes = list(attrs["class"].vocab.names)
    sites = list(attrs["tss"].vocab.names) if "tss" in attrs else [None]
    combos = list(product(classes, sites))
    n = args.n_per_combo * len(combos)
    labels = [c for c in combos for _ in range(args.n_per_combo)]
    values = {"class": [c for c, _ in labels]}
    if "tss" in spec.names:
        values["tss"] = [s for _, s in labels]
    cond_all = spec.encode(values, n)
    gens = [torch.Generator().manual_seed(args.seed * 1_000_003 + i) for i in range(n)]
    x_T = torch.stack([torch.randn(3, res, res, generator=g) for g in gens])  # (N, 3, H, W)

    # real patches: two independent sets (the second only for the noise floor)
    feat = ColourTexture()
    real = [np.concatenate([render_patches(c, s or "S1", args.n_per_combo, res, seed=[args.seed, k, i])
                            for i, (c, s) in enumerate(combos)]) for k in (1, 2)]
    f_real = [feat(r) for r in real]
    noise_floor = frechet(f_real[0], f_real[1])

    def run(name: str, steps: int, sched=schedule) -> tuple[torch.Tensor, float]:
        sampler, ts = get_sampler(name), timesteps_for(name, sched, steps)
        out, t0 = [], time.perf_counter()
        with torch.no_grad():
            for i in range(0, n, args.batch_size):
                cond = {k: v[i:i + args.batch_size] for k, v in cond_all.items()}
                out.append(sampler(model, x_T[i:i + args.batch_size], ts, sched, cond))
        return torch.cat(out), time.perf_counter() - t0

    from dataclasses import replace
    ref, _ = run("dpmpp-2m", args.ref_steps, replace(schedule, clip_sample=False))
    rows = []
    todo = [BASELINE] + [(s, k) for s in args.samplers.split(",") for k in map(int, args.steps.split(","))]
    for name, steps in todo:
        x, secs = run(name, steps)
        rows.append({"sampler": name, "steps": steps, "dist": frechet(feat(to_uint8(x)), f_real[0]),
                     "rmse_ref": float(((x.clamp(-1, 1) - ref.clamp(-1, 1)) ** 2).mean().sqrt()), "s": secs})
        r = rows[-1]
        print(f"{name:9s} {steps:4d}  dist {r['dist']:8.3f}  rmse_ref {r['rmse_ref']:.4f}  {secs:7.1f} s", flush=True)

    base = rows[0]
    fewest = {}
    for name in args.samplers.split(","):
        ok = [r["steps"] for r in rows[1:] if r["sampler"] == name and r["dist"] <= (1 + TOLERANCE) * base["dist"]]
        fewest[name] = min(ok) if ok else None
    print(f"\nDDIM-100 dist {base['dist']:.3f}  (real-vs-real noise floor {noise_floor:.3f}, n = {n})")
    print("| sampler | steps | dist | dist / DDIM-100 | rmse vs ref ODE | seconds | speed-up vs DDIM-100 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['steps']} | {r['dist']:.3f} | {r['dist'] / base['dist']:.3f} | "
              f"{r['rmse_ref']:.4f} | {r['s']:.1f} | {base['s'] / r['s']:.1f}x |")
    print("fewest steps within 5 % of DDIM-100:", fewest)
    path = write_results(args.name, rows, {
        "command": " ".join(["python", "benchmarks/solver_quality.py", *(argv or sys.argv[1:])]),
        "checkpoint": str(args.checkpoint), "checkpoint_hash": ckpt.hash, "n_images": n,
        "noise_floor": noise_floor, "fewest_steps_within_5pct": fewest})
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
