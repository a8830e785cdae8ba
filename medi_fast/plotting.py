"""Figures for reports: matplotlib without a display, and PNGs written atomically like every other output."""
from __future__ import annotations

from pathlib import Path

from .io import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: reports are made on CI machines and clusters with no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path`` (temporary file, then rename) and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
    return path
