"""Does a MeDi model render the tissue source site?  Per-site colour of generated vs real patches.

    python benchmarks/site_fidelity.py --checkpoint demo_out/runs/medi/checkpoints/best.pt \
        --index demo_out/index.parquet [--n 48 --steps 25]

For every (class, site) of the checkpoint it generates n patches (DDIM) and compares their mean RGB
with that of up to n real patches of that combination from the index, with the measure `medi-fast
demo` reports (`medi_fast.eval.site_fidelity`: site effect = a combination's mean minus its class's
mean over its trained sites, per channel; correlation and slope of generated on real effects, 1.0 =
the full stain difference between sites is reproduced, 0 = the site is ignored), plus the table,
including the combinations absent from training (generated only).  Writes benchmarks/results/site_fidelity.json.
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
from medi_fast.eval.site_fidelity import site_colours, site_fidelity  # noqa: E402


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
    gen, gen_labels, real, real_labels = [], [], [], []
    for c in names["class"]:
        for s in names["tss"]:
            if s == "Unknown":
                continue
            gen.append(pipe.generate(c, tss=s, n=args.n, seed=args.seed))
            gen_labels += [(c, s)] * args.n
            sel = index[(index["class"] == c) & (index["tissue_source_site"] == s)]["path"][: args.n]
            real += [load_patch(p, pipe.info.resolution) for p in sel]
            real_labels += [(c, s)] * len(sel)
    res = site_fidelity(site_colours(np.concatenate(gen), *zip(*gen_labels), np.stack(real), *zip(*real_labels)))
    df, corr, slope = res.table, res.correlation, res.slope
    g, r = res.mean_abs_effect_generated, res.mean_abs_effect_real
    print(df.round(1).to_string(index=False))
    print(f"\nsite effect (class-centred per-channel means over {len(res.effects)} trained combinations): "
          f"correlation generated vs real {corr:.3f}, slope {slope:.3f}; mean |effect| generated "
          f"{g:.2f}, real {r:.2f} grey levels")
    path = write_results("site_fidelity", df.to_dict("records"),
                         {"checkpoint": args.checkpoint, "correlation": corr, "slope": slope,
                          "mean_abs_effect_generated": g, "mean_abs_effect_real": r})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
