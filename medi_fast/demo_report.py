"""The demo's report: sample grids (real, CLS, MeDi), coverage heatmap, tables; report.md + report.html."""
from __future__ import annotations

import html
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from . import __version__
from .io import atomic_write_text

CELL = 96  # px per patch in the grids (patches are upscaled, nearest neighbour)
LABEL = 22


def _grid(cells: list[list[np.ndarray | None]], rows: list[str], cols: list[str], marks=None) -> Image.Image:
    """A labelled grid; ``None`` cells are absent combinations (grey), ``marks`` are outlined in red."""
    h, w = len(rows), len(cols)
    img = Image.new("RGB", (LABEL * 3 + w * CELL, LABEL + h * CELL), "white")
    d = ImageDraw.Draw(img)
    for j, c in enumerate(cols):
        d.text((LABEL * 3 + j * CELL + 4, 4), c, fill="black")
    for i, r in enumerate(rows):
        d.text((4, LABEL + i * CELL + CELL // 2 - 6), r, fill="black")
        for j in range(w):
            x0, y0 = LABEL * 3 + j * CELL, LABEL + i * CELL
            patch = cells[i][j]
            if patch is None:
                d.rectangle([x0 + 1, y0 + 1, x0 + CELL - 2, y0 + CELL - 2], fill=(225, 225, 225))
                d.line([x0 + 1, y0 + 1, x0 + CELL - 2, y0 + CELL - 2], fill=(180, 180, 180))
            else:
                img.paste(Image.fromarray(patch).resize((CELL - 2, CELL - 2), Image.NEAREST), (x0 + 1, y0 + 1))
            if marks and (rows[i], cols[j]) in marks:
                d.rectangle([x0, y0, x0 + CELL - 1, y0 + CELL - 1], outline="red", width=3)
    return img


def grids(out: Path, index: pd.DataFrame, real: np.ndarray, synthetic: dict, cohort: dict, test_sites, classes) -> dict:
    """Write real.png, cls.png, medi.png and coverage.png under out/figures; returns their paths."""
    from .data.report import coverage_matrix, plot_coverage

    fig = out / "figures"
    fig.mkdir(parents=True, exist_ok=True)
    sites = sorted(index["tissue_source_site"].unique())
    cohort_sites = sorted({s for ss in cohort.values() for s in ss})
    cls_arr, site_arr = index["class"].to_numpy(), index["tissue_source_site"].to_numpy()

    def first(mask, images):
        pos = np.flatnonzero(mask)
        return images[pos[0]] if len(pos) else None

    paths = {}
    cells = [[first((cls_arr == c) & (site_arr == s), real) for s in sites] for c in classes]
    _grid(cells, list(classes), [s + (" (test)" if s in test_sites else "") for s in sites]).save(fig / "real.png")
    paths["real"] = fig / "real.png"
    meta, images = synthetic["MeDi"]
    missing = {(c, s) for c in classes for s in cohort_sites if s not in cohort[c]}
    cells = [[first((meta["class"].to_numpy() == c) & (meta["tissue_source_site"].to_numpy() == s), images)
              for s in cohort_sites] for c in classes]
    _grid(cells, list(classes), cohort_sites, marks=missing).save(fig / "medi.png")
    paths["medi"] = fig / "medi.png"
    meta, images = synthetic["CLS"]
    cells = [[images[p] for p in np.flatnonzero(meta["class"].to_numpy() == c)[:len(cohort_sites)]] for c in classes]
    _grid(cells, list(classes), [f"sample {i + 1}" for i in range(len(cohort_sites))]).save(fig / "cls.png")
    paths["cls"] = fig / "cls.png"
    paths["coverage"] = plot_coverage(coverage_matrix(index), fig / "coverage.png")
    return paths


def verdict(probe: pd.DataFrame) -> tuple[bool, str]:
    """Did MeDi beat CLS on the TSS-averaged balanced accuracy, beyond the standard errors?"""
    r = probe.set_index("arm")
    m, c, n = (r.loc[a, "tss_balanced_accuracy_mean"] for a in ("MeDi", "CLS", "no-synthetic"))
    se = float(np.hypot(r.loc["MeDi", "tss_balanced_accuracy_sem"], r.loc["CLS", "tss_balanced_accuracy_sem"]))
    beat = bool(m - c > se)
    text = (f"MeDi {'beat' if beat else 'did not beat'} CLS in this run: TSS-averaged balanced accuracy "
            f"{m:.3f} (MeDi) vs {c:.3f} (CLS) vs {n:.3f} (no synthetic data); difference {m - c:+.3f}, "
            f"combined standard error {se:.3f}.")
    return beat, text


def write_report(out: Path, cfg, index: pd.DataFrame, results: dict, pictures: dict, timings) -> Path:
    from .eval.probe import to_markdown

    beat, text = verdict(results["probe"])
    rel = {k: Path(v).relative_to(out).as_posix() for k, v in pictures.items()}
    timing = pd.DataFrame(timings, columns=["stage", "seconds"])
    fid = results["fid"].pivot(index="class", columns="model", values="distance")
    fid.loc["mean"] = fid.mean()
    mi = results["mi"][["training_set", "n", "mi_bits", "mi_fraction"]]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    intro = (f"medi-fast {__version__} demo, {when}. Synthetic H&E cohort (classes LUAD, LUSC; {len(index)} real "
             f"patches), `{cfg.preset}` UNets trained {cfg.train_steps} steps at {cfg.resolution} px on the CPU, "
             f"exported to ONNX and sampled with ONNX Runtime (DDIM-{cfg.sample_steps}). Features: the "
             f"`colour-texture` statistics (48-d, no weights; not UNI, not Inception), so the distance below is "
             f"FID-style, not FID.")
    setup = ("Training cohort: LUAD at sites S1-S3, LUSC at S2-S4. Probe: k = "
             f"{cfg.k} real patches per class, each class from one site where the other class is absent (LUAD from "
             "S1 or S2, LUSC from S3 or S4: the stain gives the class away), tested on unseen sites S5, S6; "
             "synthetic:real 1:1 (MeDi: every class x site of S1-S4, including the never-seen LUAD@S4 and LUSC@S1, "
             "outlined in red; CLS: class only).")
    md = [f"# medi-fast demo report\n\n{intro}\n\n{setup}\n\n## Result\n\n**{text}**\n",
          "## Linear probe (Table-1 style, mean ± SEM over runs)\n\n" + to_markdown(results["probe"]),
          "## FID-style distance to the real cohort (colour-texture features; lower is closer)\n\n"
          + fid.to_markdown(floatfmt=".3f") + "\n",
          "## Shortcut meter\n\nClass-site mutual information of the probe's real pool (the patches its k per class are drawn "
          "from), before and after adding the MeDi samples; 1 bit = the site gives the class away.\n\n"
          + mi.to_markdown(index=False, floatfmt=".3f") + "\n",
          f"## Data coverage (patches per class x site)\n\n![coverage]({rel['coverage']})\n",
          f"## Samples (classes x sites)\n\nReal:\n\n![real]({rel['real']})\n\nMeDi (red: combinations absent from "
          f"training):\n\n![medi]({rel['medi']})\n\nCLS (no site control):\n\n![cls]({rel['cls']})\n",
          "## Timings\n\n" + timing.to_markdown(index=False, floatfmt=".1f") + "\n"]
    atomic_write_text(out / "report.md", "\n".join(md))

    def table(df, **kw):
        return df.to_html(float_format=lambda v: f"{v:.3f}", border=0, **kw)

    probe_html = html.escape(to_markdown(results["probe"]))
    body = [f"<h1>medi-fast demo report</h1><p>{html.escape(intro)}</p><p>{html.escape(setup)}</p>",
            f"<h2>Result</h2><p style='font-weight:bold;color:{'#060' if beat else '#a00'}'>{html.escape(text)}</p>",
            f"<h2>Linear probe</h2><pre>{probe_html}</pre>",
            f"<h2>FID-style distance</h2>{table(fid)}",
            f"<h2>Shortcut meter</h2>{table(mi, index=False)}",
            f"<h2>Data coverage</h2><img src='{rel['coverage']}' style='max-width:100%'>",
            f"<h2>Samples</h2><h3>Real</h3><img src='{rel['real']}'><h3>MeDi (red: absent from training)</h3>"
            f"<img src='{rel['medi']}'><h3>CLS</h3><img src='{rel['cls']}'>",
            f"<h2>Timings</h2>{table(timing, index=False)}"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>medi-fast demo</title><style>body{font-family:"
            "sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}td,th{padding:2px 8px;"
            "border-bottom:1px solid #ddd}</style></head><body>" + "\n".join(body) + "</body></html>")
    atomic_write_text(out / "report.html", page)
    return out / "report.html"
