"""Stain augmentation and stain normalisation: what a pathology user would do about site shift instead of
generating samples.  The demo's arms (`arms.py`) apply them to its patches.

* HED jitter: each patch's haematoxylin, eosin and DAB amounts scaled and shifted by a random factor per
  channel (alpha ~ U(1 - sigma, 1 + sigma), beta ~ U(-sigma, sigma)), in scikit-image's HED space;
* Macenko augmentation (torchstain): the same perturbation of the stain concentrations that Macenko's
  method estimates for each patch;
* Macenko and Reinhard normalisation (torchstain) of every patch to one reference.

Every function takes and returns uint8 (N, R, R, 3) arrays and draws its randomness from the seed it is
given, so a re-evaluated run makes the same patches.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ..errors import MediFastError

AUGMENTATIONS = ("hed", "macenko")
NORMALISATIONS = ("macenko", "reinhard")
# HED jitter's range: alpha in 1 +- HED_SIGMA, beta in +- HED_SIGMA (in scikit-image's stain units, where a
# pixel's amounts run from 0 to about 1).
HED_SIGMA = 0.05
# torchstain's MacenkoAugmentor defaults: concentrations scaled by U(1 +- 0.2) and shifted by U(+- 0.2).
MACENKO_SIGMA = 0.2


def _hed_matrices():
    from skimage.color import hed_from_rgb, rgb_from_hed

    return hed_from_rgb, rgb_from_hed


# scikit-image's optical density: log(rgb) / log(1e-6), rgb in (0, 1].
_LOG_ADJUST = np.log(1e-6)


def to_hed(images: np.ndarray) -> np.ndarray:
    """uint8 RGB -> stain amounts (haematoxylin, eosin, DAB), with scikit-image's stain vectors and optical
    density.  Unlike `skimage.color.rgb2hed` it keeps negative amounts: that function clamps them to 0,
    which loses every colour outside the cone of its three vectors (many of the demo's site stains), so
    its round trip would change a patch even with no jitter at all."""
    hed_from_rgb, _ = _hed_matrices()
    rgb = np.maximum(np.asarray(images, np.float64) / 255.0, 1e-6)
    return (np.log(rgb) / _LOG_ADJUST) @ hed_from_rgb


def from_hed(stains: np.ndarray) -> np.ndarray:
    """Stain amounts -> uint8 RGB: the inverse of `to_hed` (rounded and clipped to 0..255)."""
    _, rgb_from_hed = _hed_matrices()
    rgb = np.exp((np.asarray(stains, np.float64) @ rgb_from_hed) * _LOG_ADJUST)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def hed_jitter(images: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Each patch's stain amounts times `alpha` plus `beta`: (N, 3) each, one factor per patch and channel."""
    stains = to_hed(images)
    alpha = np.asarray(alpha, np.float64)[:, None, None, :]
    beta = np.asarray(beta, np.float64)[:, None, None, :]
    return from_hed(stains * alpha + beta)


@contextmanager
def _numpy_global_seed(seed):
    """torchstain's augmentor draws from numpy's global generator: seed it for the call, then put back the
    state the caller had, so the demo's patches depend on `seed` alone and nothing else is disturbed."""
    state = np.random.get_state()
    np.random.seed(np.random.default_rng(seed).integers(2 ** 32))
    try:
        yield
    finally:
        np.random.set_state(state)


def augment(method: str, images: np.ndarray, copies: int, seed) -> np.ndarray:
    """`copies` augmented versions of every patch, patch by patch: (N * copies, R, R, 3), the copies of
    patch i at rows i * copies .. i * copies + copies - 1."""
    if method not in AUGMENTATIONS:
        raise MediFastError(f"stain augmentation {method!r} does not exist; choose from {', '.join(AUGMENTATIONS)}")
    images = np.asarray(images, np.uint8)
    src = np.repeat(images, copies, axis=0)
    if method == "hed":
        rng = np.random.default_rng(seed)
        alpha = rng.uniform(1 - HED_SIGMA, 1 + HED_SIGMA, (len(src), 3))
        beta = rng.uniform(-HED_SIGMA, HED_SIGMA, (len(src), 3))
        return hed_jitter(src, alpha, beta)
    return macenko_augment(images, copies, seed)


def macenko_augment(images: np.ndarray, copies: int, seed, sigma1: float = MACENKO_SIGMA,
                    sigma2: float = MACENKO_SIGMA) -> np.ndarray:
    """torchstain's Macenko augmentation: per patch, its stain matrix and concentrations (Macenko et al.),
    the concentrations scaled by U(1 +- sigma1) and shifted by U(+- sigma2) per stain, recomposed."""
    from torchstain.base.augmentors import MacenkoAugmentor

    aug = MacenkoAugmentor(backend="numpy", sigma1=sigma1, sigma2=sigma2)
    out = np.empty((len(images) * copies, *images.shape[1:]), np.uint8)
    with _numpy_global_seed(seed):
        for i, img in enumerate(images):
            aug.fit(img)
            for j in range(copies):
                out[i * copies + j] = aug.augment()
    return out


def normaliser(method: str, reference: np.ndarray):
    """A torchstain normaliser (numpy backend) fitted to `reference` (one uint8 RGB image)."""
    from torchstain.base.normalizers import MacenkoNormalizer, ReinhardNormalizer

    if method not in NORMALISATIONS:
        raise MediFastError(f"stain normalisation {method!r} does not exist; choose from {', '.join(NORMALISATIONS)}")
    norm = MacenkoNormalizer(backend="numpy") if method == "macenko" else ReinhardNormalizer(backend="numpy")
    norm.fit(np.asarray(reference, np.uint8))
    return norm


def normalise(method: str, images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Every patch normalised to `reference`'s stain (Macenko: its stain matrix and concentration range;
    Reinhard: its mean and spread per LAB channel)."""
    norm = normaliser(method, reference)
    if method == "macenko":
        return np.stack([norm.normalize(img, stains=False)[0] for img in images])
    return np.stack([norm.normalize(img) for img in images])


def mosaic(images: np.ndarray) -> np.ndarray:
    """Patches tiled side by side into one image (a reference for normalisation built from many patches)."""
    return np.concatenate(list(images), axis=1)
