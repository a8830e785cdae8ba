"""How well does `medi-fast edit` move a patch to another site?  Measured where the exact answer exists.

    python benchmarks/edit_quality.py [--work edit_quality_work] [--train-steps 700] [--n 8] [--steps 20]
    python benchmarks/edit_quality.py --checkpoint edit_quality_work/runs/medi/checkpoints/best.pt

The demo's renderer (medi_fast.data.synth) draws a patch's tissue from a seed and its colour from the
site, so the same seed at another site is the exact counterfactual: this tissue as that site renders it.
The script builds the demo's cohort and trains its MeDi model (class + tss, the demo's recipe; or takes
--checkpoint), then for every class moves n unseen patches from the class's first training site to each
other cohort site (the class was trained at some of them, not at the others) and compares, with the
rendered truth at the target site:

- identity (the source patch unchanged): the floor any method must beat;
- Macenko and Reinhard stain normalisation (torchstain, numpy backend) fitted on a mosaic of four other
  patches of that class at the target site (what a user of stain normalisation has: reference patches
  of the target site, not the counterfactual);
- `edit` SDEdit and DDIM inversion at each --strengths value.

Measures, per image then averaged: SSIM (scikit-image, RGB, data range 255) and the mean colour error
(the absolute difference of the per-channel mean colour, averaged over channels, in grey levels of
255). Patches are rendered at 64 px, JPEG-compressed at the site's quality and resized (Lanczos) to the
model's 32 px, as the demo's training data.  Writes benchmarks/results/edit_quality.json and, with
--figure PATH, a grid: source, identity... each method at strength 0.5, and the truth.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from medi_fast.demo import stain  # noqa: E402

import medi_fast  # noqa: E402
from medi_fast.data.synth import render_patches, site_style  # noqa: E402

# Seeds of the benchmark's patches: far from the demo's training renders (seed 0 and up).
SEED_BASE = 1_000_000


def observed(images: np.ndarray, site: str, resolution: int) -> np.ndarray:
    """Rendered patches as the demo's data pipeline stores and packs them: the site's JPEG, then Lanczos."""
    from PIL import Image

    quality = site_style(site).jpeg_quality
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        out.append(np.asarray(im.resize((resolution, resolution), Image.Resampling.LANCZOS)))
    return np.stack(out)


def render(cls: str, site: str, seeds, resolution: int) -> np.ndarray:
    return observed(np.concatenate([render_patches(cls, site, 1, 64, seed=int(s)) for s in seeds]), site, resolution)


def measures(out: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: SSIM and mean colour error (grey levels)."""
    from skimage.metrics import structural_similarity

    ssim = np.array([structural_similarity(o, t, channel_axis=2, data_range=255) for o, t in zip(out, truth)])
    colour = np.abs(out.reshape(len(out), -1, 3).mean(1) - truth.reshape(len(truth), -1, 3).mean(1)).mean(1)
    return ssim, colour


def train(args) -> Path:
    from medi_fast.demo.stages import DemoConfig, build_data, train_model

    cfg = DemoConfig(out=str(args.work), n_test_per_combo=4, train_steps=args.train_steps, seed=args.seed)
    work = Path(args.work)
    build_data(cfg, work)
    return train_model(cfg, work, "medi", "class,tss")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a trained demo MeDi checkpoint (default: train one in --work)")
    ap.add_argument("--work", default="edit_quality_work", help="where the demo cohort and model are made")
    ap.add_argument("--train-steps", type=int, default=700, help="the demo's default")
    ap.add_argument("--n", type=int, default=8, help="patches per (class, target site)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of the whole trajectory")
    ap.add_argument("--strengths", default="0.25,0.5,0.75,1.0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figure", help="write the grid of one class's edits to this PNG")
    args = ap.parse_args()
    strengths = [float(s) for s in args.strengths.split(",")]

    t0 = time.perf_counter()
    ckpt = Path(args.checkpoint) if args.checkpoint else train(args)
    train_s = time.perf_counter() - t0
    from medi_fast.demo.stages import SETTINGS, DEFAULT_SETTING

    setting = SETTINGS[DEFAULT_SETTING]
    pipe = medi_fast.load(ckpt, backend="torch", steps=args.steps, batch_size=64)
    res = pipe.info.resolution
    results: dict = {}  # (method, strength, seen) -> list of (ssim, colour) arrays
    picture: dict = {}
    t1 = time.perf_counter()
    for ci, cls in enumerate(setting.classes):
        source = setting.cohort[cls][0]
        for target in (s for s in setting.sites if s != source):
            seen = target in setting.cohort[cls]
            seeds = SEED_BASE + 1000 * ci + np.arange(args.n)
            src, truth = render(cls, source, seeds, res), render(cls, target, seeds, res)
            reference = render(cls, target, SEED_BASE + 500 + 1000 * ci + np.arange(4), res)
            outs = {("identity", 0.0): src}
            for name in stain.NORMALISATIONS:  # the demo's normalisation arms, fitted on the reference mosaic
                outs[(name, 0.0)] = stain.normalise(name, src, stain.mosaic(reference))
            for method in ("sdedit", "inversion"):
                for s in strengths:
                    outs[(method, s)] = pipe.edit(src, cls, tss=target, strength=s, method=method,
                                                  source={"class": cls, "tss": source}, seed=args.seed)
            for (name, s), out in outs.items():
                results.setdefault((name, s, seen), []).append(np.stack(measures(out, truth)))
            if not picture and not seen:
                picture = {"class": cls, "source_site": source, "target_site": target, "source": src,
                           "truth": truth, **{f"{n} {s:g}" if n in ("sdedit", "inversion") else n: o
                                              for (n, s), o in outs.items() if s in (0.0, 0.5)}}
    edit_s = time.perf_counter() - t1

    rows = []
    for (name, s, seen), parts in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        m = np.concatenate(parts, axis=1)  # (2, images)
        rows.append({"method": name, "strength": s, "target": "trained" if seen else "unseen",
                     "images": int(m.shape[1]), "ssim": round(float(m[0].mean()), 4),
                     "ssim_sd": round(float(m[0].std()), 4), "colour_error": round(float(m[1].mean()), 2),
                     "colour_error_sd": round(float(m[1].std()), 2)})
    print(f"{'method':<10} {'strength':>8} {'target':<8} {'n':>4} {'SSIM':>7} {'colour err':>10}")
    for r in rows:
        print(f"{r['method']:<10} {r['strength']:>8g} {r['target']:<8} {r['images']:>4} {r['ssim']:>7.3f} "
              f"{r['colour_error']:>10.2f}")
    path = write_results("edit_quality", rows, {
        "checkpoint": str(ckpt), "train_steps": args.train_steps if not args.checkpoint else None,
        "steps": args.steps, "n_per_pair": args.n, "seed": args.seed, "setting": DEFAULT_SETTING,
        "train_seconds": round(train_s, 1), "edit_and_measure_seconds": round(edit_s, 1)})
    print(f"wrote {path}")
    if args.figure and picture:
        figure(picture, Path(args.figure))
    return 0


def figure(p: dict, path: Path) -> None:
    from medi_fast.plotting import pyplot, save_png

    plt = pyplot()
    columns = ["source", "identity", "macenko", "reinhard", "sdedit 0.5", "inversion 0.5", "truth"]
    k = min(4, len(p["source"]))
    fig, axes = plt.subplots(k, len(columns), figsize=(1.4 * len(columns), 1.4 * k + 0.5), squeeze=False)
    for j, col in enumerate(columns):
        for i in range(k):
            ax = axes[i][j]
            ax.imshow(p[col][i])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col, fontsize=8)
    fig.suptitle(f"{p['class']}: {p['source_site']} -> {p['target_site']} (a site the class was not trained at)",
                 fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
