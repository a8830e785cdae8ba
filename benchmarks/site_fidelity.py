"""Does a MeDi model render the tissue source site?  Per-site colour of generated vs real patches.

    python benchmarks/site_fidelity.py --checkpoint demo_out/runs/medi/checkpoints/best.pt \
        --index demo_out/index.parquet [--n 48 --steps 25]

For every (class, site) of the checkpoint it generates n patches (DDIM) and compares their mean RGB
with that of up to n real patches of that combination from the index, with the measure `medi-fast
demo` reports (`medi_fast.eval.site_fidelity`: site effect = a combination's mean minus its class's
mean over its trained sites, per channel; correlation and slope of generated on real effects, 1.0 =
the full stain difference between sites is reproduced, 0 = the site is ignored), plus the table,
including the combinations absent from training (generated only).  Writes benchmarks/results/site_fidelity.json
(--results-name NAME: NAME.json).

--noise-levels 999,900,600,300 also asks where colour gets lost: for each trained combination, real patches
are noised to level t and the model estimates the clean image (for an epsilon model
x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t); v and x0 models as the samplers convert them);
the slope of the estimates' per-combination mean colour on the real one (centred over combinations, all
channels) is the share of the colour differences between combinations the model knows at that noise
level.  At t = 999 nothing of the patch survives the noise, so a well-trained model predicts each
combination's mean colour (slope 1); a sampler starting from noise can only get the colour from there.
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
    ap.add_argument("--noise-levels", default="", help="e.g. 999,900,600,300: the clean-image estimate's colour there")
    ap.add_argument("--results-name", default="site_fidelity",
                    help="write benchmarks/results/NAME.json (to keep the measures of several checkpoints)")
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
    levels = [int(t) for t in args.noise_levels.split(",") if t.strip()]
    by_noise = x0_colour_by_noise(args.checkpoint, real, real_labels, levels, args.seed) if levels else []
    for row in by_noise:
        print(f"noise level t={row['t']}: the clean-image estimate carries {row['slope']:.2f} of the colour "
              f"differences between combinations (correlation {row['correlation']:.2f})")
    path = write_results(args.results_name, df.to_dict("records"),
                         {"checkpoint": args.checkpoint, "correlation": corr, "slope": slope,
                          "mean_abs_effect_generated": g, "mean_abs_effect_real": r,
                          "colour_spread_generated": res.colour_spread_generated,
                          "colour_spread_real": res.colour_spread_real, "x0_colour_by_noise_level": by_noise})
    print(f"wrote {path}")
    return 0


def x0_colour_by_noise(checkpoint_path, real, labels, levels, seed) -> list[dict]:
    """Per noise level t: slope and correlation of the model's clean-image estimate's mean colour per
    (class, site) on the real patches' mean colour, both centred over the combinations."""
    import torch

    from medi_fast import checkpoint
    from medi_fast.schedule import split_output

    ck = checkpoint.load(checkpoint_path)
    model = ck.build(ema=True).eval()
    abar = ck.schedule.alphas_cumprod
    real = np.stack(real)
    labels = np.array([f"{c}@{s}" for c, s in labels])
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t in levels:
        if not 0 <= t < len(abar):
            raise SystemExit(f"--noise-levels: {t} is outside 0..{len(abar) - 1}")
        a = abar[t]
        est, ref = [], []
        for cell in dict.fromkeys(labels):
            x0 = torch.tensor(real[labels == cell]).permute(0, 3, 1, 2).float() / 127.5 - 1
            c, s = cell.split("@")
            cond = ck.spec.encode({"class": [c] * len(x0), "tss": [s] * len(x0)})
            xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen)
            with torch.no_grad():
                out = model(xt, torch.full((len(x0),), t), cond)
            x0_hat = split_output(ck.schedule.prediction_type, out, xt, a.sqrt(), (1 - a).sqrt())[0].clamp(-1, 1)
            est.append(x0_hat.mean((0, 2, 3)).numpy()), ref.append(x0.mean((0, 2, 3)).numpy())
        est, ref = np.array(est), np.array(ref)
        e, r = (est - est.mean(0)).ravel(), (ref - ref.mean(0)).ravel()
        rows.append({"t": t, "slope": float(np.polyfit(r, e, 1)[0]), "correlation": float(np.corrcoef(e, r)[0, 1])})
    return rows


if __name__ == "__main__":
    sys.exit(main())
