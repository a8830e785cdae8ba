"""FID as a chain of named conversions:

``images_to_features`` (uint8 batches -> features) -> ``features_to_stats`` (streaming float64 mean and
covariance, overall and per class) -> ``stats_to_fid`` (Frechet distance, pytorch-fid's formula).

Statistics stream: only the running sum and sum of outer products (float64) are kept, so 271,710
images never sit in memory; they are saved as ``.npz`` and reused.  Per-class FID averaged over
classes is the paper's figure.
"""
from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ..errors import MediFastError

ALL = "__all__"  # key of the statistics over every image


def images_to_features(images, extractor) -> np.ndarray:
    """uint8 (N, H, W, 3), or an iterable of such batches -> float64 (N, D)."""
    if isinstance(images, np.ndarray):
        images = [images]
    out = [np.asarray(extractor(b), dtype=np.float64) for b in images if len(b)]
    return np.concatenate(out) if out else np.zeros((0, extractor.dim))


class RunningStats:
    """Mean and covariance of a stream of feature rows, in float64.

    Sums are taken after subtracting a fixed shift (the first batch's mean) so that the final
    ``E[xx^T] - mu mu^T`` does not lose precision when features sit far from zero.
    """

    def __init__(self, dim: int | None = None):
        self.n, self.dim = 0, dim
        self.shift = self.s1 = self.s2 = None

    def add(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, dtype=np.float64)  # (B, D)
        if f.ndim != 2 or not len(f):
            return
        if self.shift is None:
            self.dim = f.shape[1]
            self.shift = f.mean(0)
            self.s1, self.s2 = np.zeros(self.dim), np.zeros((self.dim, self.dim))
        c = f - self.shift
        self.n += len(f)
        self.s1 += c.sum(0)
        self.s2 += c.T @ c

    @property
    def mu(self) -> np.ndarray:
        return self.shift + self.s1 / self.n

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (``np.cov``'s ddof=1, as pytorch-fid)."""
        if self.n < 2:
            raise MediFastError(f"need at least 2 images for a covariance, got {self.n}; add more images")
        m = self.s1 / self.n
        return (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)


def features_to_stats(features, labels=None) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """float (N, D) [+ labels (N,)] -> {ALL: (mu, sigma, n), label: (mu, sigma, n), ...}.  Groups of
    one image have no covariance and are left out."""
    acc = StatsAccumulator()
    acc.add(features, labels)
    return acc.stats()


class StatsAccumulator:
    """Overall and per-label :class:`RunningStats`, fed batch by batch."""

    def __init__(self):
        self.groups: dict[str, RunningStats] = {ALL: RunningStats()}

    def add(self, features, labels=None) -> None:
        f = np.asarray(features, dtype=np.float64)
        self.groups[ALL].add(f)
        if labels is None:
            return
        labels = np.asarray([str(x) for x in labels])
        for lab in np.unique(labels):
            self.groups.setdefault(lab, RunningStats()).add(f[labels == lab])

    def stats(self) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        return {k: (g.mu, g.sigma, g.n) for k, g in self.groups.items() if g.n >= 2}


def stats_to_fid(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), as pytorch-fid computes it:
    a near-singular product gets ``eps`` added to both diagonals; a tiny imaginary part from
    ``sqrtm``'s rounding is dropped, a large one is an error."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MediFastError(f"statistics of different feature sizes ({mu1.shape[0]} vs {mu2.shape[0]}); compute "
                            f"both with the same --features extractor")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is expected and handled just below
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MediFastError(f"matrix square root has a large imaginary part "
                                f"({np.max(np.abs(covmean.imag)):.3g}); use more images per group")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_stats(path, stats: dict, extractor: str = "") -> Path:
    """{group: (mu, sigma, n)} -> ``.npz`` (keys ``<group>/mu``, ``<group>/sigma``, ``<group>/n``), atomically."""
    from ..io import atomic_path

    path = Path(path)
    if path.suffix != ".npz":
        raise MediFastError(f"statistics file {path} must end in .npz")
    arrays = {"extractor": np.array(extractor)}
    for k, (mu, sigma, n) in stats.items():
        arrays[f"{k}/mu"], arrays[f"{k}/sigma"], arrays[f"{k}/n"] = mu, sigma, np.array(n)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path


def load_stats(path) -> tuple[dict, str]:
    """``.npz`` written by :func:`save_stats` -> ({group: (mu, sigma, n)}, extractor name)."""
    path = Path(path)
    if not path.is_file():
        raise MediFastError(f"statistics file {path} does not exist; compute it with `medi-fast fid "
                            f"--save-real-stats {path.name}` or `medi-fast generate --fid-stats {path.name}`")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise MediFastError(f"cannot read statistics {path} ({type(e).__name__}); recompute them with "
                            f"`medi-fast fid --save-real-stats` or `generate --fid-stats`") from None
    with z:
        groups = sorted({k.rsplit("/", 1)[0] for k in z.files if "/" in k})
        if ALL not in groups:
            raise MediFastError(f"{path} holds no FID statistics; recompute it with `medi-fast fid`")
        stats = {g: (z[f"{g}/mu"], z[f"{g}/sigma"], int(z[f"{g}/n"])) for g in groups}
        return stats, str(z["extractor"]) if "extractor" in z.files else ""


def fid_table(real: dict, fake: dict) -> pd.DataFrame:
    """Per-group FID for every group in both, plus ``mean`` (the paper's per-class average) and
    ``all`` (every image pooled)."""
    for side, stats in (("real", real), ("generated", fake)):
        if ALL not in stats:  # features_to_stats leaves out groups of one image
            raise MediFastError(f"the {side} set has fewer than 2 images; FID needs at least 2 images per set")
    rows = []
    for g in sorted(set(real) & set(fake) - {ALL}):
        (m1, s1, n1), (m2, s2, n2) = real[g], fake[g]
        rows.append({"group": g, "fid": stats_to_fid(m1, s1, m2, s2), "n_real": n1, "n_fake": n2})
    if rows:
        rows.append({"group": "mean", "fid": float(np.mean([r["fid"] for r in rows])),
                     "n_real": sum(r["n_real"] for r in rows), "n_fake": sum(r["n_fake"] for r in rows)})
    (m1, s1, n1), (m2, s2, n2) = real[ALL], fake[ALL]
    rows.append({"group": "all", "fid": stats_to_fid(m1, s1, m2, s2), "n_real": n1, "n_fake": n2})
    return pd.DataFrame(rows, columns=["group", "fid", "n_real", "n_fake"])


def table_stats(table: pd.DataFrame, extractor, per: str | None = "class", batch_size: int = 64,
                resolution: int | None = None, progress: bool = False) -> dict:
    """Stream the images of a :func:`read_image_table` table through ``extractor`` -> stats."""
    from .images import iter_image_batches

    if per is not None and per not in table.columns:
        raise MediFastError(f"cannot group by {per!r}: the image table has no such column (has "
                            f"{', '.join(table.columns[:8])})")
    acc = StatsAccumulator()
    batches: Iterable = iter_image_batches(table["path"], batch_size, resolution)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-len(table) // batch_size), unit="batch", desc="features")
    for i, imgs in enumerate(batches):
        rows = table.iloc[i * batch_size:(i + 1) * batch_size]
        acc.add(extractor(imgs), rows[per].to_numpy() if per else None)
    return acc.stats()


class FIDStatsSink:
    """Streams generated images into FID statistics (``medi-fast generate --fid-stats OUT.npz``).

    ``add(images uint8 (B, H, W, 3), rows DataFrame with a "class" column)``; ``close()`` writes the
    npz (overall + per-group mu/sigma/n) atomically.  ``extractor`` overrides the Inception network
    (e.g. ``ColourTexture()`` for demos).
    """

    def __init__(self, path, inception_weights=None, per: str | None = "class", device=None, extractor=None):
        self.path, self.per = Path(path), per
        if self.path.suffix != ".npz":
            raise MediFastError(f"--fid-stats {self.path} must end in .npz")
        if extractor is None:
            from .inception import InceptionExtractor

            extractor = InceptionExtractor(inception_weights, device=device)
        self.extractor, self.acc = extractor, StatsAccumulator()

    def add(self, images: np.ndarray, rows: pd.DataFrame) -> None:
        labels = None
        if self.per is not None:
            if self.per not in rows.columns:
                raise MediFastError(f"cannot group FID statistics by {self.per!r}: the plan has no such column")
            labels = rows[self.per].to_numpy()
        self.acc.add(self.extractor(images), labels)

    __call__ = add

    def close(self) -> Path:
        if self.acc.groups[ALL].n < 2:
            raise MediFastError(f"only {self.acc.groups[ALL].n} image(s) reached --fid-stats; generate at least 2")
        return save_stats(self.path, self.acc.stats(), getattr(self.extractor, "name", ""))


class _Extractor:
    """The feature extractor of one :func:`compute_fid` call, built on first use and then reused, so
    that two image sets share one network and a run that only reads ``.npz`` statistics loads none."""

    def __init__(self, features: str, extractor=None, **kw):
        self.name = getattr(extractor, "name", None) or features
        self._ex, self._kw, self._features = extractor, kw, features

    def get(self):
        if self._ex is None:
            from .features import get_extractor

            self._ex = get_extractor(self._features, **self._kw)
        return self._ex


def _source_stats(source, labels, ex: _Extractor, per, batch_size, resolution, save, progress) -> dict:
    """Statistics of one side of :func:`compute_fid` (see there for what ``source`` may be)."""
    if isinstance(source, dict):
        return source
    if isinstance(source, np.ndarray):
        x = images_to_features(source, ex.get()) if source.ndim == 4 else np.asarray(source, dtype=np.float64)
        if x.ndim != 2:
            raise MediFastError(f"expected uint8 images (N, H, W, 3) or features (N, D), got shape {source.shape}")
        stats = features_to_stats(x, labels)
    else:
        source = Path(source)
        if source.suffix == ".npz":
            stats, name = load_stats(source)
            if name and name != ex.name:
                raise MediFastError(f"{source} holds {name} statistics but --features is {ex.name}; pass "
                                    f"--features {name} or recompute the statistics")
            return stats
        from .images import read_image_table

        table = read_image_table(source)
        if progress:
            import sys

            print(f"{source}: {len(table)} images", file=sys.stderr)
        stats = table_stats(table, ex.get(), per=per, batch_size=batch_size, resolution=resolution, progress=progress)
    if save is not None:
        save_stats(save, stats, ex.name)
    return stats


def _check_sources(sources, saves, ex: _Extractor) -> None:
    """Refuse a missing set, an unreadable one, a missing extractor or an unwritable save path before
    any statistics are computed (and before any progress is printed)."""
    from ..io import check_output_file, require_file
    from .images import read_image_table

    for option, save in zip(("--save-real-stats", "--save-fake-stats"), saves):
        if save is not None:
            check_output_file(save, option, (".npz",))
    for source in sources:
        if isinstance(source, (str, Path)):
            if Path(source).suffix == ".npz":
                require_file(source, "statistics file", "give the .npz written by --save-real-stats/--save-fake-stats")
            else:
                n = len(read_image_table(source))
                if n < 2:  # one image has no covariance
                    raise MediFastError(f"{source} holds {n} image(s); FID needs at least 2 images per set")
                ex.get()


def compute_fid(real, fake, *, per: str | None = "class", real_labels=None, fake_labels=None,
                features: str = "inception", extractor=None, weights=None, device=None, batch_size: int = 50,
                resolution: int | None = None, save_real_stats=None, save_fake_stats=None,
                progress: bool = False) -> pd.DataFrame:
    """FID between two sets, whatever form they come in: the one evaluation entry (``medi-fast fid``, the
    demo and the benchmarks all call it).

    ``real`` and ``fake`` are each an image set path (index parquet, ``manifest.csv`` or its folder, an
    image folder; grouped by the ``per`` column), ``.npz`` statistics from :func:`save_stats`, uint8
    images ``(N, H, W, 3)``, features ``(N, D)`` (grouped by ``real_labels``/``fake_labels`` when given),
    or a statistics dict from :func:`features_to_stats`.  The extractor (``features`` by name, or an
    ``extractor`` object) is built once, only if a set needs it.  ``per=None``: overall FID only.

    Returns :func:`fid_table`'s table: one row per group in both sets, ``mean`` (the paper's per-class
    average) and ``all`` (every image pooled).
    """
    from ..resources import check_image_options

    check_image_options(batch_size, resolution, device)
    ex = _Extractor(features, extractor, weights=weights, device=device, batch_size=batch_size)
    _check_sources((real, fake), (save_real_stats, save_fake_stats), ex)
    if per is None:
        real_labels = fake_labels = None
    r = _source_stats(real, real_labels, ex, per, batch_size, resolution, save_real_stats, progress)
    f = _source_stats(fake, fake_labels, ex, per, batch_size, resolution, save_fake_stats, progress)
    if per is None:
        r, f = ({k: v for k, v in side.items() if k == ALL} for side in (r, f))
    return fid_table(r, f)


def frechet_distance(a, b) -> float:
    """Frechet distance of two feature sets ``(N, D)``, all rows pooled (:func:`compute_fid` with
    ``per=None``)."""
    return float(compute_fid(a, b, per=None)["fid"].iloc[-1])
