"""Dataset report: counts, the class x TSS coverage matrix (CSV + heatmap PNG, like the paper's dataset
figure) and race/gender bars.  Matplotlib runs headless (Agg)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import MediFastError
from ..io import atomic_path, atomic_write_text, ensure_dir

UNITS = ("patches", "slides")


def coverage_matrix(table: pd.DataFrame, unit: str = "patches") -> pd.DataFrame:
    """Rows = classes, columns = TSS codes (both sorted), cells = number of patches (or slides)."""
    if unit not in UNITS:
        raise MediFastError(f"unknown unit {unit!r}; choose one of {', '.join(UNITS)}")
    for col in ("class", "tissue_source_site"):
        if col not in table.columns:
            raise MediFastError(f"table has no column {col!r}; pass an index written by `medi-fast data index`")
    t = table.drop_duplicates("slide_submitter_id") if unit == "slides" else table
    m = pd.crosstab(t["class"].astype(str), t["tissue_source_site"].astype(str))
    return m.sort_index().sort_index(axis=1)


def counts(table: pd.DataFrame) -> dict:
    """Headline numbers of an index table."""
    cov = coverage_matrix(table)
    out = {
        "patches": int(len(table)),
        "slides": int(table["slide_submitter_id"].nunique()),
        "cases": int(table["case_submitter_id"].nunique()) if "case_submitter_id" in table else None,
        "classes": int(cov.shape[0]),
        "tss": int(cov.shape[1]),
        "class_tss_combinations": int((cov.to_numpy() > 0).sum()),
        "combination_fill": float((cov.to_numpy() > 0).mean()),
        "patches_per_class": {k: int(v) for k, v in table["class"].value_counts().sort_index().items()},
    }
    for col in ("gender", "race"):
        if col in table.columns:
            slides = table.drop_duplicates("slide_submitter_id")
            out[f"slides_per_{col}"] = {k: int(v) for k, v in slides[col].value_counts().items()}
    return out


def counts_text(c: dict) -> str:
    lines = [f"{c['patches']} patches, {c['slides']} slides, {c['cases']} cases, {c['classes']} classes, "
             f"{c['tss']} TSS; {c['class_tss_combinations']} (class, TSS) combinations present "
             f"({100 * c['combination_fill']:.1f}% of classes x TSS)"]
    lines.append("patches per class: " + ", ".join(f"{k} {v}" for k, v in c["patches_per_class"].items()))
    for col in ("gender", "race"):
        if f"slides_per_{col}" in c:
            lines.append(f"slides per {col}: " + ", ".join(f"{k} {v}" for k, v in c[f"slides_per_{col}"].items()))
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or clusters
    import matplotlib.pyplot as plt

    return plt


def plot_coverage(cov: pd.DataFrame, path, unit: str = "patches") -> Path:
    """Heatmap of the coverage matrix (log colour scale; white = combination absent)."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    h, w = cov.shape
    fig, ax = plt.subplots(figsize=(min(40, 3 + 0.12 * w), min(20, 1.5 + 0.3 * h)))
    data = cov.to_numpy().astype(float)
    masked = np.ma.masked_where(data == 0, data)
    vmax = max(1.0, float(data.max()))
    im = ax.imshow(masked, aspect="auto", cmap="viridis", norm=LogNorm(vmin=1, vmax=vmax), interpolation="nearest")
    ax.set_yticks(range(h), cov.index, fontsize=7)
    step = max(1, w // 60)  # keep TSS labels legible on the full cohort (626 sites)
    ax.set_xticks(range(0, w, step), cov.columns[::step], rotation=90, fontsize=6)
    ax.set_xlabel("tissue source site (TSS)")
    ax.set_ylabel("class")
    ax.set_title(f"{unit} per (class, TSS); {int((data > 0).sum())} of {h * w} combinations present")
    fig.colorbar(im, ax=ax, label=unit, fraction=0.03, pad=0.01)
    fig.tight_layout()
    return _save(fig, path)


def plot_demographics(table: pd.DataFrame, path) -> Path:
    """Bars of slides per race and per gender."""
    plt = _plt()
    slides = table.drop_duplicates("slide_submitter_id")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, col in zip(axes, ("race", "gender")):
        vc = slides[col].astype(str).value_counts() if col in slides.columns else pd.Series(dtype=int)
        ax.barh(vc.index[::-1], vc.to_numpy()[::-1], color="#7b4f9d")
        for y, v in enumerate(vc.to_numpy()[::-1]):
            ax.text(v, y, f" {v}", va="center", fontsize=8)
        ax.set_title(f"slides per {col}")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    plt = _plt()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def write_report(table: pd.DataFrame, out_dir, unit: str = "patches", problems: pd.DataFrame | None = None) -> dict:
    """Write coverage.csv, coverage.png, demographics.png and counts.json to ``out_dir``; return the counts."""
    import json

    out_dir = ensure_dir(out_dir)
    cov = coverage_matrix(table, unit)
    with atomic_path(out_dir / "coverage.csv") as tmp:
        cov.to_csv(tmp, index_label="class")
    plot_coverage(cov, out_dir / "coverage.png", unit)
    plot_demographics(table, out_dir / "demographics.png")
    c = counts(table)
    if problems is not None:
        c["problems"] = {k: int(v) for k, v in problems["problem"].value_counts().items()}
    atomic_write_text(out_dir / "counts.json", json.dumps(c, indent=2) + "\n")
    return c
