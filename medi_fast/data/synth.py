"""A synthetic H&E dataset: class = morphology, site = appearance, in the TCGA-UT layout.

Every stage of the pipeline (index, split, training, generation, evaluation, demo) must run without
real slides, and the paper's downstream experiment needs a dataset in which the site is a shortcut
for the class.  Patches are rendered as stain densities and turned into colour with the Beer-Lambert
law, ``RGB = background * 10^-(d_H * h + d_E * e)``, as colour deconvolution assumes (Ruifrok &
Johnston's H&E matrix), so a site's stain vectors are real-looking perturbations of the standard ones.

Morphology (the class) uses cellular noise: one candidate nucleus per grid cell, jittered, so every
pixel only looks at the 3x3 cells around it (vectorised, O(9 * B * H * W)).
  LUAD  adenocarcinoma-like: gland rings of columnar nuclei around a clear lumen, pink stroma.
  LUSC  squamous-like: sheets of large polygonal nuclei in eosinophilic cytoplasm, keratin whorls.
  KIRC  clear-cell-like: clear cytoplasm in a fine eosinophilic cell-border network, small nuclei.
  DLBC  lymphoma-like: a dense carpet of small round very dark nuclei.
Site (the hospital): H and E stain vectors, stain intensities, background tint, blur, JPEG quality,
all drawn from the site code alone so that "S1" looks the same in every dataset.
"""
from __future__ import annotations

import io
import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MediFastError
from ..vocab import TCGA_PROJECTS, canonical_class

# Ruifrok & Johnston (2001) optical-density vectors for haematoxylin and eosin.
H_REF = np.array([0.650, 0.704, 0.286])
E_REF = np.array([0.072, 0.990, 0.105])
CLASSES = ("LUAD", "LUSC", "KIRC", "DLBC")
GENDERS = ("male", "female")
RACES = ("white", "black or african american", "asian", "not reported")
RACE_P = (0.74, 0.11, 0.08, 0.07)  # about TCGA-UT's mix, with GDC's own missing marker


MAX_PER_COMBO = 1_000_000


@dataclass(frozen=True)
class SiteStyle:
    """How one site's slides look; drawn from the site code (see :func:`site_style`)."""

    site: str
    stain_h: tuple[float, float, float]
    stain_e: tuple[float, float, float]
    intensity_h: float
    intensity_e: float
    background: tuple[float, float, float]
    blur_sigma: float  # in pixels at 64 px; scaled with the resolution
    jpeg_quality: int


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.abs(v)
    return v / np.linalg.norm(v)


def site_style(site: str, appearance_seed: int = 0) -> SiteStyle:
    """Deterministic appearance of ``site``: the same code looks the same in every dataset."""
    rng = np.random.default_rng([appearance_seed, zlib.crc32(str(site).encode())])
    h = _unit(H_REF + rng.normal(0, 0.09, 3))
    e = _unit(E_REF + rng.normal(0, 0.09, 3))
    bg = 0.90 + rng.uniform(0, 0.08, 3)
    return SiteStyle(str(site), tuple(np.round(h, 4)), tuple(np.round(e, 4)),
                     round(float(rng.uniform(0.65, 1.35)), 3), round(float(rng.uniform(0.6, 1.4)), 3),
                     tuple(np.round(bg, 4)), round(float(rng.uniform(0.0, 0.9)), 3), int(rng.integers(60, 96)))


@dataclass(frozen=True)
class SynthConfig:
    """Which (class, site) combinations exist and how many patches each; how they are rendered."""

    # Class codes (real TCGA projects so the probe tasks, e.g. nsclc = LUAD vs LUSC, apply).
    classes: tuple[str, ...] = ("LUAD", "LUSC")
    sites: tuple[str, ...] = ("S1", "S2", "S3", "S4")
    # {(class, site): n_patches}; absent combinations do not exist in the dataset.
    combos: dict = field(default_factory=dict)
    # 64 px keeps CI fast and matches the small-64 preset; the published models use 128.
    resolution: int = 64
    seed: int = 0
    # TCGA-UT has tens of patches per slide; 8 keeps slide-level splits meaningful on small sets.
    patches_per_slide: int = 8
    # Site appearance depends only on (site code, appearance_seed), not on `seed`.
    appearance_seed: int = 0
    # Which combinations are the "train" (confounded) ones; recorded as gt_role in the CSV.
    train_combos: tuple = ()

    def __post_init__(self):
        from ..errors import check_seed

        check_seed(self.seed)
        check_seed(self.appearance_seed, "--appearance-seed")
        classes = tuple(canonical_class(c) for c in self.classes)
        if not classes or not self.sites:
            raise MediFastError("a synthetic set needs at least one class and one site; give --classes and --sites")
        unknown = [c for c in classes if c not in CLASSES]
        if unknown:
            raise MediFastError(f"synthetic class {unknown[0]!r} is not available; choose from {', '.join(CLASSES)}")
        sites = tuple(str(s).strip().upper() for s in self.sites)
        for what, names in (("--classes", classes), ("site list", sites)):
            twice = [v for i, v in enumerate(names) if v in names[:i]]
            if twice:  # the same combination twice would render it twice under one slide name
                raise MediFastError(f"{what} names {twice[0]!r} twice; give each once")
        bad = [s for s in sites if len(s) != 2 or not s.isalnum()]
        if bad:
            raise MediFastError(f"site code {bad[0]!r} is not two letters/digits (a TCGA TSS code such as 'S1')")
        combos = {(canonical_class(c), str(s).upper()): int(n) for (c, s), n in dict(self.combos).items()}
        if not combos:
            combos = {(c, s): 32 for c in classes for s in sites}
        for (c, s), n in combos.items():
            if c not in classes or s not in sites:
                raise MediFastError(f"combination ({c}, {s}) uses a class or site not in classes/sites")
            if n < 0:
                raise MediFastError(f"combination ({c}, {s}) has {n} patches; give a count >= 0")
            if n > MAX_PER_COMBO:  # a synthetic set is for tests and demos; more would render for days
                raise MediFastError(f"combination ({c}, {s}) asks for {n} patches; give at most {MAX_PER_COMBO}")
        if not any(combos.values()):
            raise MediFastError("the synthetic set would hold 0 patches; give a positive --n-per-combo")
        if self.resolution < 16 or self.resolution > 1024:
            raise MediFastError(f"resolution {self.resolution} is out of range; use 16..1024 (e.g. 64 or 128)")
        if self.patches_per_slide < 1:
            raise MediFastError("patches_per_slide must be >= 1")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "combos", combos)
        object.__setattr__(self, "train_combos", tuple((canonical_class(c), str(s).upper())
                                                       for c, s in self.train_combos))

    @property
    def n_patches(self) -> int:
        return sum(self.combos.values())

    @classmethod
    def full(cls, classes=("LUAD", "LUSC"), sites=("S1", "S2", "S3", "S4"), n_per_combo=32, **kw) -> "SynthConfig":
        """Every class at every site."""
        return cls(tuple(classes), tuple(sites), {(c, s): n_per_combo for c in classes for s in sites}, **kw)

    @classmethod
    def confounded(cls, classes=("LUAD", "LUSC"), train_sites=None, test_sites=None, n_per_combo=32,
                   n_test_per_combo=None, **kw) -> "SynthConfig":
        """The paper's downstream setting: in training each class comes from its own single site
        (site = shortcut for class); the test sites hold every class."""
        classes = tuple(classes)
        train_sites = tuple(train_sites or (f"S{i + 1}" for i in range(len(classes))))
        test_sites = tuple(test_sites or (f"S{len(classes) + i + 1}" for i in range(2)))
        if len(train_sites) != len(classes):
            raise MediFastError(f"confounded needs one train site per class: {len(classes)} classes, "
                                f"{len(train_sites)} train sites")
        if set(train_sites) & set(test_sites):
            raise MediFastError("train and test sites overlap; give disjoint site codes")
        n_test = n_per_combo if n_test_per_combo is None else n_test_per_combo
        combos = {(c, s): n_per_combo for c, s in zip(classes, train_sites)}
        combos.update({(c, s): n_test for s in test_sites for c in classes})
        return cls(classes, train_sites + test_sites, combos, train_combos=tuple(zip(classes, train_sites)), **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["combos"] = [[c, s, n] for (c, s), n in self.combos.items()]
        d["train_combos"] = [list(x) for x in self.train_combos]
        return d


# ----------------------------------------------------------------------------------------------
# Rendering: stain density maps (B, H, W) per class, then colour per site.


def _smooth_noise(rng, b: int, r: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: coarse uniform grid, bilinearly upsampled.  # (B, r, r)"""
    g = max(2, r // cell + 2)
    coarse = rng.random((b, g, g)).astype(np.float32)
    pos = np.linspace(0, g - 1.001, r, dtype=np.float32)
    i0 = pos.astype(int)
    f = pos - i0
    rows = coarse[:, i0] * (1 - f)[None, :, None] + coarse[:, i0 + 1] * f[None, :, None]  # (B, r, g)
    return rows[:, :, i0] * (1 - f) + rows[:, :, i0 + 1] * f


def _grid_centres(rng, b, r, c: int):
    """Jittered grid: one candidate nucleus centre per cell of c x c pixels, with a one-cell border
    so every pixel has its 3x3 neighbourhood.  # (B, G+2, G+2, 2) as (y, x) in pixels"""
    g = -(-r // c) + 2
    ii, jj = np.meshgrid((np.arange(g) - 1) * c, (np.arange(g) - 1) * c, indexing="ij")
    base = np.stack([ii, jj], -1)[None].astype(np.float32)  # (1, G, G, 2)
    return base + rng.uniform(0.15, 0.85, (b, g, g, 2)).astype(np.float32) * c


def _nuclei(centres, present, radius, aspect, angle, power, r: int, c: int, borders: bool = False):
    """Render one nucleus per cell (cellular noise over the 3x3 neighbourhood).

    Pixels are grouped in c x c blocks, one per cell.  Arrays are laid out (c, c, B, G, G): the pixel's
    offset inside its block first, so each neighbour's per-cell parameters (B, G, G) broadcast over
    long contiguous runs and the offset-only terms stay 1/c of full size.  Reshaped to (B, r, r) at
    the end.  ``power`` 2 gives ellipses, 4 rounded squares (polygonal squamous nuclei).  Returns the
    nucleus density (B, r, r) in [0, 1] and, if ``borders``, F2 - F1: the gap between the distances to
    the nearest and second-nearest centre (small on Voronoi cell borders), else None.
    """
    b, gp = centres.shape[:2]
    g = gp - 2
    # absent nuclei get a vanishing radius, so they never light up
    inv_r = np.where(present > 0, 1.0 / radius, 1e4).astype(np.float32)
    ca, sa = np.cos(angle), np.sin(angle)
    par = np.stack([centres[..., 0], centres[..., 1], ca * inv_r / aspect, sa * inv_r / aspect, ca * inv_r,
                    sa * inv_r, np.maximum(present, 0)], 0).astype(np.float32)  # (7, B, G+2, G+2)
    origin = np.arange(g, dtype=np.float32) * c  # top-left pixel of each block
    off = np.arange(c, dtype=np.float32) + 0.5  # pixel centres inside a block
    oy = off[:, None, None, None, None]  # (c, 1, 1, 1, 1)
    ox = off[None, :, None, None, None]  # (1, c, 1, 1, 1)
    shape = (c, c, b, g, g)
    dens = np.zeros(shape, np.float32)
    f1 = f2 = None
    if borders:
        f1 = np.full(shape, 1e9, np.float32)
        f2 = np.full(shape, 1e9, np.float32)
    for di in (0, 1, 2):
        for dj in (0, 1, 2):
            cy, cx, a1, a2, b1, b2, w = par[:, :, di:di + g, dj:dj + g]  # (B, G, G) each
            dy = oy - (cy - origin[:, None])  # (c, 1, B, G, G): pixel minus centre, in block coordinates
            dx = ox - (cx - origin[None, :])  # (1, c, B, G, G)
            if borders:
                d2 = dy * dy + dx * dx
                np.minimum(f2, np.maximum(f1, d2), out=f2)
                np.minimum(f1, d2, out=f1)
            u = dy * a1 + dx * a2  # (c, c, B, G, G): along the long axis, in radii
            v = dx * b1 - dy * b2
            u *= u
            v *= v
            n2 = np.sqrt(u * u + v * v) if power == 4 else u + v  # squared radius in the nucleus' metric
            n2 = np.clip((1.0 - n2) * 2.5, 0, 1, out=n2)
            n2 *= w
            np.maximum(dens, n2, out=dens)

    def image(x):  # (c, c, B, G, G) -> (B, G*c, G*c) -> (B, r, r)
        return x.transpose(2, 3, 0, 4, 1).reshape(b, g * c, g * c)[:, :r, :r]

    return image(dens), (image(np.sqrt(f2) - np.sqrt(f1)) if borders else None)


def _cell_params(rng, b, g, r_lo, r_hi, asp_lo, asp_hi):
    shape = (b, g, g)
    return (rng.uniform(r_lo, r_hi, shape).astype(np.float32), rng.uniform(asp_lo, asp_hi, shape).astype(np.float32),
            rng.uniform(0, np.pi, shape).astype(np.float32))


def _radial(r: int, centres: np.ndarray) -> np.ndarray:
    """Distance from every pixel to the nearest of K centres.  centres (B, K, 2) -> (B, r, r)."""
    y = np.arange(r, dtype=np.float32) + 0.5
    dy = y[None, None, :, None] - centres[:, :, 0, None, None]
    dx = y[None, None, None, :] - centres[:, :, 1, None, None]
    return np.sqrt(dy * dy + dx * dx)  # (B, K, r, r)


def _densities(cls: str, b: int, r: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin density maps for ``b`` patches of class ``cls``.  # (B, r, r) each"""
    s = r / 64.0  # morphology is defined at 64 px and scales with the resolution
    fib = _smooth_noise(rng, b, r, max(2, int(3 * s)))  # fibrous stroma texture
    if cls == "LUAD":
        c = max(2, round(5 * s))
        k = 3
        gl = np.stack([rng.uniform(8, 56, (b, k)) * s, rng.uniform(8, 56, (b, k)) * s], -1).astype(np.float32)
        gr = rng.uniform(10, 17, (b, k)).astype(np.float32) * s
        nglands = rng.integers(1, k + 1, b)
        active = (np.arange(k)[None] < nglands[:, None])
        cen = _grid_centres(rng, b, r, c)
        g = cen.shape[1]
        # ring membership of each candidate nucleus: |distance to gland centre - gland radius| small
        dcen = np.sqrt(((cen[:, :, :, None, :] - gl[:, None, None, :, :]) ** 2).sum(-1))  # (B, G, G, K)
        ring = (np.abs(dcen - gr[:, None, None, :]) < 2.4 * s) & active[:, None, None, :]
        inside = ((dcen < gr[:, None, None, :] - 2.4 * s) & active[:, None, None, :]).any(-1)
        on_ring = ring.any(-1)
        present = np.where(on_ring, 1.0, np.where(inside, 0.0, (rng.random((b, g, g)) < 0.12) * 0.8))
        rad, asp, ang = _cell_params(rng, b, g, 1.5 * s, 2.0 * s, 1.5, 2.0)
        # columnar nuclei point at the lumen: long axis along the gland radius
        kk = np.argmin(np.abs(dcen - gr[:, None, None, :]) + (~active[:, None, None, :]) * 1e6, -1)
        gsel = np.take_along_axis(gl[:, None, None, :, :], kk[..., None, None], 3)[:, :, :, 0, :]
        radial = np.arctan2(cen[..., 1] - gsel[..., 1], cen[..., 0] - gsel[..., 0])
        ang = np.where(on_ring, radial, ang).astype(np.float32)
        asp = np.where(on_ring, asp, 2.6).astype(np.float32)  # stromal fibroblasts: spindles
        dens, _ = _nuclei(cen, present, rad, asp, ang, 2, r, c)
        dpix = _radial(r, gl) - gr[:, :, None, None]  # (B, K, r, r) signed distance to each ring
        dpix = np.where(active[:, :, None, None], dpix, 1e6).min(1)
        lumen = np.clip((-dpix - 2.0 * s) / (1.5 * s), 0, 1)
        epith = np.clip(1 - np.abs(dpix) / (4.0 * s), 0, 1)
        eos = (0.30 + 0.25 * fib) * (1 - lumen) + 0.25 * epith
        eos = eos * (1 - 0.9 * lumen)
        hem = 1.05 * dens + 0.05 * (1 - lumen)
    elif cls == "LUSC":
        c = max(3, round(7 * s))
        cen = _grid_centres(rng, b, r, c)
        g = cen.shape[1]
        k = 2
        wc = np.stack([rng.uniform(6, 58, (b, k)) * s, rng.uniform(6, 58, (b, k)) * s], -1).astype(np.float32)
        wr = rng.uniform(7, 12, (b, k)).astype(np.float32) * s
        active = rng.random((b, k)) < np.array([0.85, 0.4])
        dc = np.sqrt(((cen[:, :, :, None, :] - wc[:, None, None, :, :]) ** 2).sum(-1))
        in_whorl = ((dc < wr[:, None, None, :] + 0.5 * s) & active[:, None, None, :]).any(-1)
        present = np.where(in_whorl, 0.0, (rng.random((b, g, g)) < 0.9) * rng.uniform(0.8, 1.0, (b, g, g)))
        rad, asp, ang = _cell_params(rng, b, g, 2.4 * s, 3.1 * s, 1.0, 1.35)
        dens, gap = _nuclei(cen, present, rad, asp, ang, 4, r, c, borders=True)
        border = np.clip(1 - gap / (0.9 * s), 0, 1)
        dpix = _radial(r, wc)  # (B, K, r, r)
        rel = np.where(active[:, :, None, None], dpix / wr[:, :, None, None], 9.0).min(1)
        whorl = np.clip((1.0 - rel) * 3, 0, 1)
        rings = 0.5 + 0.5 * np.cos(2 * np.pi * rel * wr.max(1)[:, None, None] / (2.2 * s))
        eos = 0.50 + 0.15 * fib + 0.12 * border
        eos = eos * (1 - whorl) + whorl * (0.75 + 0.55 * rings)
        hem = 0.85 * dens * (1 - whorl) + 0.04
    elif cls == "KIRC":
        c = max(3, round(8 * s))
        cen = _grid_centres(rng, b, r, c)
        g = cen.shape[1]
        present = (rng.random((b, g, g)) < 0.6).astype(np.float32)
        rad, asp, ang = _cell_params(rng, b, g, 1.2 * s, 1.6 * s, 1.0, 1.2)
        dens, gap = _nuclei(cen, present, rad, asp, ang, 2, r, c, borders=True)
        border = np.clip(1 - gap / (0.8 * s), 0, 1)
        eos = 0.04 + 0.55 * border + 0.06 * fib
        hem = 1.2 * dens + 0.03 + 0.08 * border
    elif cls == "DLBC":
        c = max(2, round(4 * s))
        cen = _grid_centres(rng, b, r, c)
        g = cen.shape[1]
        present = (rng.random((b, g, g)) < 0.93).astype(np.float32)
        rad, asp, ang = _cell_params(rng, b, g, 1.25 * s, 1.65 * s, 1.0, 1.15)
        dens, _ = _nuclei(cen, present, rad, asp, ang, 2, r, c)
        eos = 0.16 + 0.12 * fib
        hem = 1.35 * dens + 0.06
    else:  # pragma: no cover - SynthConfig validates classes
        raise MediFastError(f"no renderer for synthetic class {cls!r}")
    chrom = (0.8 + 0.35 * rng.random((b, r, r), dtype=np.float32))  # chromatin granularity
    return (hem * chrom).astype(np.float32), eos.astype(np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.15:
        return img
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma=(0, sigma, sigma, 0), mode="reflect", truncate=2.5)


def render_patches(cls: str, site: str | SiteStyle, n: int, resolution: int = 64, seed=0,
                   appearance_seed: int = 0) -> np.ndarray:
    """``n`` patches of class ``cls`` in the style of ``site``.  # (n, R, R, 3) uint8

    ``seed`` is anything ``np.random.default_rng`` accepts.  Returned before JPEG compression.
    """
    style = site if isinstance(site, SiteStyle) else site_style(site, appearance_seed)
    rng = np.random.default_rng(seed)
    r = resolution
    hem, eos = _densities(canonical_class(cls), n, r, rng)
    # per-patch stain variation within a site (section thickness), small beside the between-site spread
    jit = rng.uniform(0.93, 1.07, (n, 2, 1, 1, 1)).astype(np.float32)
    h = np.asarray(style.stain_h, np.float32) * np.float32(style.intensity_h * -np.log(10))
    e = np.asarray(style.stain_e, np.float32) * np.float32(style.intensity_e * -np.log(10))
    od = hem[..., None] * (jit[:, 0] * h)  # (n, R, R, 3): -ln(10) * optical density
    od += eos[..., None] * (jit[:, 1] * e)
    np.exp(od, out=od)
    od *= np.asarray(style.background, np.float32) * 255.0  # Beer-Lambert: I = I0 * 10^-OD
    img = _blur(od, style.blur_sigma * r / 64.0)
    img += 0.5
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


def jpeg_bytes(img: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# The dataset on disk


def _write_jpeg(path: Path, img: np.ndarray, quality: int) -> None:
    path.write_bytes(jpeg_bytes(img, quality))


def _slide_id(site: str, participant: int) -> str:
    return f"TCGA-{site}-{participant:04d}-01Z-00-DX1"


def render_dataset(config: SynthConfig, out_dir, *, overwrite: bool = False, batch: int = 64) -> Path:
    """Write ``out_dir/<class folder>/<slide_submitter_id>/*.jpg``, ``out_dir/clinical.csv`` (GDC-like
    columns plus ground-truth ``gt_*`` factors, one row per slide) and ``out_dir/synth.json``.

    The directory appears whole or not at all (rendered into a temporary sibling, then renamed).
    """
    import pandas as pd

    from ..io import atomic_dir, claim_output_dir

    out_dir = Path(out_dir)
    folders = {TCGA_PROJECTS.get(c, c) for c in CLASSES}
    claim_output_dir(out_dir, overwrite=overwrite, marker="synth.json",
                     names=lambda name: name in folders or name in ("clinical.csv", "synth.json"),
                     command="medi-fast data synth")
    rows = []
    next_participant: dict[str, int] = {}
    # JPEG encoding and file writes (which release the GIL) overlap with rendering the next batch
    with atomic_dir(out_dir, overwrite=overwrite) as tmp, ThreadPoolExecutor(2) as pool:
        pending = []
        for (cls, site), n in config.combos.items():
            if n == 0:
                continue
            style = site_style(site, config.appearance_seed)
            # one generator per combination: adding a combination never changes the others' pixels
            rng = np.random.default_rng([config.seed, zlib.crc32(cls.encode()), zlib.crc32(site.encode())])
            imgs = np.concatenate([render_patches(cls, style, min(batch, n - i), config.resolution,
                                                  seed=rng.integers(2**63), appearance_seed=config.appearance_seed)
                                   for i in range(0, n, batch)])
            folder = tmp / TCGA_PROJECTS.get(cls, cls)
            role = ("train" if (cls, site) in config.train_combos else "test") if config.train_combos else ""
            for j0 in range(0, n, config.patches_per_slide):
                part = next_participant.get(site, 1)
                next_participant[site] = part + 1
                slide = _slide_id(site, part)
                (folder / slide).mkdir(parents=True)
                k = min(config.patches_per_slide, n - j0)
                for j in range(k):
                    pending.append(pool.submit(_write_jpeg, folder / slide / f"{slide}_{j:04d}.jpg", imgs[j0 + j],
                                               style.jpeg_quality))
                rows.append({
                    "project_id": f"TCGA-{cls}", "case_submitter_id": slide[:12],
                    "sample_submitter_id": slide[:16], "slide_submitter_id": slide, "tissue_source_site": site,
                    "gender": GENDERS[int(rng.integers(2))], "race": RACES[int(rng.choice(len(RACES), p=RACE_P))],
                    "age_at_index": str(int(rng.integers(35, 86))), "n_patches": k,
                    "gt_class": cls, "gt_site": site, "gt_role": role,
                    "gt_stain_h": ";".join(f"{v:.4f}" for v in style.stain_h),
                    "gt_stain_e": ";".join(f"{v:.4f}" for v in style.stain_e),
                    "gt_intensity_h": style.intensity_h, "gt_intensity_e": style.intensity_e,
                    "gt_background": ";".join(f"{v:.4f}" for v in style.background),
                    "gt_blur_sigma": style.blur_sigma, "gt_jpeg_quality": style.jpeg_quality,
                })
        for f in pending:
            f.result()  # re-raise any write error (e.g. disk full) before the rename
        pd.DataFrame(rows).to_csv(tmp / "clinical.csv", index=False)
        (tmp / "synth.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return out_dir
