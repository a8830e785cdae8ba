"""The demo report's pictures: sample grids (several patches per class x site cell, upscaled without
smoothing so each pixel stays a pixel), the probe's bar chart, real vs generated site colours, timings.
Everything is written under OUT/figures as PNG; matplotlib runs headless."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from ..eval.site_fidelity import CHANNELS
from ..plotting import pyplot, save_png

PER_SIDE = 3   # a cell shows PER_SIDE x PER_SIDE patches
GAP = 2        # px between patches of a cell
CELL_GAP = 10  # px between cells


def _font(size: int):
    try:  # Pillow >= 10.1 scales its built-in font; older ones only have the small bitmap font
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _scale(res: int) -> int:
    return max(1, 64 // res)  # 32 px patches are shown at 64 px


def mosaic(patches: list[np.ndarray], res: int) -> Image.Image:
    """Up to PER_SIDE**2 patches in a square, each upscaled (nearest neighbour); empty slots stay light grey."""
    s = res * _scale(res)
    side = PER_SIDE * s + (PER_SIDE - 1) * GAP
    img = Image.new("RGB", (side, side), (235, 235, 235))
    for k, p in enumerate(patches[:PER_SIDE ** 2]):
        i, j = divmod(k, PER_SIDE)
        img.paste(Image.fromarray(p).resize((s, s), Image.NEAREST), (j * (s + GAP), i * (s + GAP)))
    return img


def grid(cells: list[list[list[np.ndarray] | None]], rows: list[str], cols: list[str], res: int,
         marks=None) -> Image.Image:
    """Labelled rows x cols of mosaics; ``None`` cells are absent combinations (crossed out), ``marks``
    (row, col) pairs are outlined in red."""
    side = PER_SIDE * res * _scale(res) + (PER_SIDE - 1) * GAP
    left, top = 70, 30
    img = Image.new("RGB", (left + len(cols) * (side + CELL_GAP), top + len(rows) * (side + CELL_GAP)), "white")
    d = ImageDraw.Draw(img)
    font = _font(15)
    for j, c in enumerate(cols):
        d.text((left + j * (side + CELL_GAP) + 4, 6), c, fill="black", font=font)
    for i, r in enumerate(rows):
        y0 = top + i * (side + CELL_GAP)
        d.text((6, y0 + side // 2 - 8), r, fill="black", font=font)
        for j in range(len(cols)):
            x0 = left + j * (side + CELL_GAP)
            if cells[i][j] is None:
                d.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], fill=(235, 235, 235))
                d.line([x0, y0, x0 + side - 1, y0 + side - 1], fill=(190, 190, 190), width=2)
                d.line([x0, y0 + side - 1, x0 + side - 1, y0], fill=(190, 190, 190), width=2)
            else:
                img.paste(mosaic(cells[i][j], res), (x0, y0))
            if marks and (rows[i], cols[j]) in marks:
                d.rectangle([x0 - 3, y0 - 3, x0 + side + 2, y0 + side + 2], outline="red", width=3)
    return img


def sample_grids(fig: Path, index: pd.DataFrame, real: np.ndarray, synthetic: dict, cohort: dict, test_sites,
                 classes, grids: list) -> dict:
    """real.png (every site, test sites marked) and one picture per arm of `grids` (arms.Arm), named after
    its folder: an arm whose samples carry a site shows every class x cohort site (combinations absent from
    training outlined in red), a class-only arm as many samples per class in columns.  The first
    PER_SIDE**2 patches of each cell; returns {"real" or the arm's folder: path}."""
    n = PER_SIDE ** 2
    res = real.shape[1]
    sites = sorted(index["tissue_source_site"].unique())
    cohort_sites = sorted({s for ss in cohort.values() for s in ss})

    def first(cls_arr, site_arr, images, c, s):
        pos = np.flatnonzero((cls_arr == c) & (site_arr == s))[:n]
        return [images[p] for p in pos] if len(pos) else None

    ci, si = index["class"].to_numpy(), index["tissue_source_site"].to_numpy()
    cells = [[first(ci, si, real, c, s) for s in sites] for c in classes]
    grid(cells, list(classes), [s + (" (test)" if s in test_sites else "") for s in sites], res).save(fig / "real.png")
    paths = {"real": fig / "real.png"}
    missing = {(c, s) for c in classes for s in cohort_sites if s not in cohort[c]}
    k = len(cohort_sites)
    for arm in grids:
        meta, images = synthetic[arm.name]
        path = fig / f"{arm.recipe.folder}.png"
        if arm.recipe.per_site:
            cm, sm = meta["class"].to_numpy(), meta["tissue_source_site"].to_numpy()
            cells = [[first(cm, sm, images, c, s) for s in cohort_sites] for c in classes]
            grid(cells, list(classes), cohort_sites, res, marks=missing).save(path)
        else:
            cells = [[[images[p] for p in np.flatnonzero(meta["class"].to_numpy() == c)[j * n:(j + 1) * n]] or None
                      for j in range(k)] for c in classes]
            grid(cells, list(classes), [f"samples {j * n + 1}-{(j + 1) * n}" for j in range(k)], res).save(path)
        paths[arm.recipe.folder] = path
    return paths


def counterfactual_grid(path: Path, pool: np.ndarray, meta: pd.DataFrame, images: np.ndarray, source: str,
                        classes, sites) -> Path:
    """The edited arm's counterfactuals: per class (rows) the first PER_SIDE**2 real patches it edited
    (`pool[meta[source]]`, first column) and each one moved to every site (columns), a patch in the same
    place of every cell."""
    n = PER_SIDE ** 2
    src, cls_, site = meta[source].to_numpy(), meta["class"].to_numpy(), meta["tissue_source_site"].to_numpy()
    cells = []
    for c in classes:
        firsts = list(dict.fromkeys(src[cls_ == c]))[:n]
        row = [[pool[r] for r in firsts] or None]
        for s in sites:
            pos = [np.flatnonzero((src == r) & (site == s)) for r in firsts]
            row.append([images[p[0]] for p in pos if len(p)] or None)
        cells.append(row)
    grid(cells, list(classes), ["real", *[f"-> {s}" for s in sites]], pool.shape[1]).save(path)
    return path


def probe_chart(summary: pd.DataFrame, colours: dict[str, str], path: Path, chance: float = 0.5) -> Path:
    """Balanced and TSS-averaged balanced accuracy per arm, mean with SEM error bars, values written on;
    ``colours``: each arm's bar colour; ``chance``: 1 / the number of classes."""
    plt = pyplot()
    metrics = (("balanced_accuracy", "balanced accuracy"), ("tss_balanced_accuracy", "TSS-averaged balanced accuracy"))
    arms = list(summary["arm"])
    width = 0.8 / len(arms)
    many = len(arms) > 4  # then the values stand upright above narrower bars, and the legend wraps
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(arms)), 4.4 if many else 3.8))
    for a, arm in enumerate(arms):
        r = summary[summary["arm"] == arm].iloc[0]
        x = np.arange(len(metrics)) + (a - (len(arms) - 1) / 2) * width
        means = [r[f"{m}_mean"] for m, _ in metrics]
        sems = [r[f"{m}_sem"] for m, _ in metrics]
        ax.bar(x, means, width, yerr=sems, capsize=4, label=f"{arm} ({int(r['runs'])} runs)",
               color=colours[arm])
        for xi, m, s in zip(x, means, sems):
            ax.text(xi, m + s + 0.015, f"{m:.3f}" if many else f"{m:.3f}\n±{s:.3f}", ha="center", va="bottom",
                    fontsize=7, rotation=90 if many else 0)
    ax.axhline(chance, color="black", lw=0.8, ls=":", label="chance")
    ax.set_xticks(range(len(metrics)), [t for _, t in metrics])
    ax.set_ylim(0, 1.18)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("linear probe, unseen test sites")
    ax.legend(loc="lower center", ncol=min(len(arms) + 1, 6), fontsize=8,
              bbox_to_anchor=(0.5, -0.42 if many else -0.32), frameon=False)
    fig.tight_layout()
    return save_png(fig, path)


def site_chart(fidelity, arm: str, path: Path) -> Path:
    """Left: per-site stain effect, generated (by `arm`) vs real (one point per trained class x site x channel).
    Right: the mean colour of each class x site, real next to generated (never-seen ones: generated only)."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    fig, (ax, sw) = plt.subplots(1, 2, figsize=(9, 4), gridspec_kw={"width_ratios": [1.2, 1]})
    e = fidelity.effects
    for c, colour in zip(CHANNELS, ("#d62728", "#2ca02c", "#1f77b4")):
        ax.scatter(e[f"real_{c}"], e[f"gen_{c}"], color=colour, label=c, s=28, alpha=0.85)
    lim = max(1.0, float(np.nanmax(np.abs(e[[f"{k}_{c}" for k in ("real", "gen") for c in CHANNELS]].to_numpy()))) * 1.15)
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--", label="generated = real")
    if np.isfinite(fidelity.slope):
        ax.plot([-lim, lim], [-lim * fidelity.slope, lim * fidelity.slope], color="black", lw=1,
                label=f"fit, slope {fidelity.slope:.2f}")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel("real site effect (grey levels)")
    ax.set_ylabel("generated site effect (grey levels)")
    ax.set_title(f"site stain effect: correlation {fidelity.correlation:.2f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    t = fidelity.table
    for i, r in enumerate(t.itertuples(index=False)):
        y = len(t) - 1 - i
        real = np.array([getattr(r, f"real_{c}") for c in CHANNELS])
        gen = np.array([getattr(r, f"gen_{c}") for c in CHANNELS])
        if np.isfinite(real).all():
            sw.add_patch(Rectangle((0, y + 0.1), 0.9, 0.8, color=real / 255))
        else:
            sw.text(0.45, y + 0.5, "not in training", ha="center", va="center", fontsize=7, color="#a00")
        sw.add_patch(Rectangle((1, y + 0.1), 0.9, 0.8, color=gen / 255))
    sw.set_xlim(0, 1.9)
    sw.set_ylim(0, len(t))
    sw.set_xticks([0.45, 1.45], ["real", f"generated ({arm})"])
    sw.set_yticks(np.arange(len(t)) + 0.5, [f"{r['class']} @ {r['site']}" for _, r in t.iloc[::-1].iterrows()],
                  fontsize=8)
    sw.tick_params(length=0)
    for s in sw.spines.values():
        s.set_visible(False)
    sw.set_title("mean colour per class x site", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


def timings_chart(timings: list[tuple[str, float]], total: float, path: Path) -> Path:
    plt = pyplot()
    names, secs = [n for n, _ in timings][::-1], [s for _, s in timings][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(names) + 1.2))
    ax.barh(names, secs, color="#4a7fb5")
    for y, s in enumerate(secs):
        ax.text(s, y, f" {s:.1f} s", va="center", fontsize=8)
    ax.set_xlim(0, max(secs) * 1.18 if secs else 1)
    ax.set_xlabel("seconds (wall clock)")
    ax.set_title(f"total {total / 60:.1f} min", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return save_png(fig, path)
