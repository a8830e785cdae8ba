"""Does a MeDi model render the tissue source site?  Per-site colour of generated vs real patches.

    python benchmarks/site_fidelity.py --checkpoint demo_out/runs/medi/checkpoints/best.pt \
        --index demo_out/index.parquet [--n 48 --steps 25]

For every (class, site) of the checkpoint it generates n patches (DDIM) and takes the mean RGB, and
the mean RGB of up to n real patches of that combination from the index.  Site effect = each
combination's mean minus its class's mean over the sites the class was trained on, per channel.
Reports the correlation of generated and real site effects and the slope (1.0 = the full stain
difference between sites is reproduced; 0 = the site is ignored), plus the table, including the
combinations absent from training (generated only).  Writes benchmarks/results/site_fidelity.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

import medi_fast  # noqa: E402
from medi_fast.data.imageio import load_patch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--index", required=True, help="the index of the real patches the model was trained on")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    pipe = medi_fast.load(args.checkpoint, backend="torch", steps=args.steps, batch_size=64)
    names = {a.name: list(a.vocab.names) for a in pipe.spec.attributes}
    if "tss" not in names:
        raise SystemExit("the checkpoint has no tss conditioning; pass a MeDi (class + tss) checkpoint")
    index = pd.read_parquet(args.index)
    ch = ["R", "G", "B"]
    rows = []
    for c in names["class"]:
        for s in names["tss"]:
            if s == "Unknown":
                continue
            gen = pipe.generate(c, tss=s, n=args.n, seed=args.seed).reshape(-1, 3).astype(float).mean(0)
            sel = index[(index["class"] == c) & (index["tissue_source_site"] == s)]["path"][: args.n]
            real = (np.stack([load_patch(p, pipe.info.resolution) for p in sel]).reshape(-1, 3).astype(float).mean(0)
                    if len(sel) else np.full(3, np.nan))
            rows.append({"class": c, "site": s, "real_patches": len(sel),
                         **{f"gen_{k}": v for k, v in zip(ch, gen)}, **{f"real_{k}": v for k, v in zip(ch, real)}})
    df = pd.DataFrame(rows)
    seen = df[df["real_patches"] > 0].copy()
    for k in ("gen", "real"):
        for c in ch:
            seen[f"{k}_{c}"] -= seen.groupby("class")[f"{k}_{c}"].transform("mean")
    g = seen[[f"gen_{c}" for c in ch]].to_numpy().ravel()
    r = seen[[f"real_{c}" for c in ch]].to_numpy().ravel()
    corr = float(np.corrcoef(g, r)[0, 1])
    slope = float(np.polyfit(r, g, 1)[0])
    print(df.round(1).to_string(index=False))
    print(f"\nsite effect (class-centred per-channel means over {len(seen)} trained combinations): "
          f"correlation generated vs real {corr:.3f}, slope {slope:.3f}; mean |effect| generated "
          f"{np.abs(g).mean():.2f}, real {np.abs(r).mean():.2f} grey levels")
    path = write_results("site_fidelity", df.to_dict("records"),
                         {"checkpoint": args.checkpoint, "correlation": corr, "slope": slope,
                          "mean_abs_effect_generated": float(np.abs(g).mean()),
                          "mean_abs_effect_real": float(np.abs(r).mean())})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
