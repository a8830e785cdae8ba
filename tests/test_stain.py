"""The demo's stain transforms (medi_fast.demo.stain) against worked examples: a known haematoxylin colour,
the library's own HED conversion, the stain matrix of a synthetic two-stain image, LAB statistics."""
from __future__ import annotations

import numpy as np
import pytest

from medi_fast.demo import stain
from medi_fast.errors import MediFastError

# Beer-Lambert with torchstain's Macenko defaults (Io = 240): unit optical-density vectors of two stains.
H = np.array([0.650, 0.704, 0.286]) / np.linalg.norm([0.650, 0.704, 0.286])
E = np.array([0.072, 0.990, 0.105]) / np.linalg.norm([0.072, 0.990, 0.105])


def two_stain(h_vec, e_vec, n=48, seed=0, io=240.0) -> np.ndarray:
    """An n x n image of two stains, I = Io * exp(-(h H + e E)): pixels of haematoxylin alone, of eosin alone
    (dense enough that every channel absorbs beyond Macenko's transparency threshold) and of both."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, (n, n, 1), p=[0.4, 0.4, 0.2])
    h = np.where(kind != 1, rng.uniform(0.3, 1.5, (n, n, 1)), 0.0)
    e = np.where(kind != 0, rng.uniform(2.2, 3.0, (n, n, 1)), 0.0)
    return np.clip(np.rint(io * np.exp(-(h * h_vec + e * e_vec))), 0, 255).astype(np.uint8)


def test_hed_of_a_known_haematoxylin_colour_and_its_jitter():
    # 0.1 units of pure haematoxylin in scikit-image's convention: rgb = 1e-6 ** (0.1 * (0.65, 0.70, 0.29))
    pixel = np.array([[[104, 97, 171]]], np.uint8)  # 255 * (0.4074, 0.3802, 0.6699), rounded
    assert stain.to_hed(pixel)[0, 0] == pytest.approx([0.1, 0.0, 0.0], abs=2e-3)
    # twice the haematoxylin: 255 * 1e-6 ** (0.2 * (0.65, 0.70, 0.29)) = (42.3, 36.9, 114.4)
    doubled = stain.hed_jitter(pixel[None], alpha=[[2.0, 1.0, 1.0]], beta=[[0.0, 0.0, 0.0]])
    assert np.abs(doubled[0, 0, 0].astype(int) - [42, 37, 114]).max() <= 1
    # a shift of the eosin amount alone leaves a pure-haematoxylin pixel's haematoxylin as it was
    shifted = stain.hed_jitter(pixel[None], alpha=[[1.0, 1.0, 1.0]], beta=[[0.0, 0.05, 0.0]])
    assert stain.to_hed(shifted)[0, 0, 0, 1] == pytest.approx(0.05, abs=3e-3)
    assert stain.to_hed(shifted)[0, 0, 0, 0] == pytest.approx(0.1, abs=3e-3)


def test_hed_round_trip_is_exact_and_matches_scikit_image_inside_its_stain_cone():
    from skimage.color import rgb2hed

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    assert np.array_equal(stain.from_hed(stain.to_hed(images)), images)
    # identity jitter changes nothing, even for colours outside the cone (which rgb2hed would clamp)
    ones, zeros = np.ones((4, 3)), np.zeros((4, 3))
    assert np.array_equal(stain.hed_jitter(images, ones, zeros), images)
    hed = stain.to_hed(images)
    inside = (hed >= 0).all(-1)
    assert inside.any() and (~inside).any()
    ref = rgb2hed(images.reshape(-1, 16, 3)).reshape(hed.shape)
    np.testing.assert_allclose(hed[inside], ref[inside], atol=1e-9)


def test_macenko_recovers_the_stain_matrix_of_a_two_stain_image():
    norm = stain.normaliser("macenko", two_stain(H, E))
    he = norm.HERef / np.linalg.norm(norm.HERef, axis=0)
    # haematoxylin first (the larger red absorption), each within a few degrees of the truth
    assert he[:, 0] @ H > 0.995 and he[:, 1] @ E > 0.995


def test_macenko_normalisation_moves_an_image_to_the_references_stains():
    other_h = np.array([0.45, 0.80, 0.40]) / np.linalg.norm([0.45, 0.80, 0.40])
    other_e = np.array([0.20, 0.95, 0.25]) / np.linalg.norm([0.20, 0.95, 0.25])
    source, reference = two_stain(other_h, other_e, seed=2), two_stain(H, E, seed=3)
    out = stain.normalise("macenko", source[None], reference)[0]
    he = stain.normaliser("macenko", out).HERef
    he = he / np.linalg.norm(he, axis=0)
    assert he[:, 0] @ H > 0.99 and he[:, 1] @ E > 0.99
    assert not (he[:, 0] @ other_h > 0.99)  # it did move


def test_reinhard_normalisation_matches_the_references_lab_mean_and_spread():
    from skimage.color import rgb2lab

    source, reference = two_stain(H * 0.5, E * 0.6, seed=4), two_stain(H, E, seed=5)
    out = stain.normalise("reinhard", source[None], reference)[0]
    lab_out, lab_ref, lab_src = (rgb2lab(x).reshape(-1, 3) for x in (out, reference, source))
    assert np.abs(lab_out.mean(0) - lab_ref.mean(0)).max() < 1.0
    assert np.abs(lab_out.std(0) - lab_ref.std(0)).max() < 1.0
    assert np.abs(lab_src.mean(0) - lab_ref.mean(0)).max() > 5.0  # they differed before


def test_macenko_augmentation_without_noise_rebuilds_the_image_and_with_it_is_seeded():
    img = two_stain(H, E, n=32, seed=6)[None]
    same = stain.macenko_augment(img, 1, seed=0, sigma1=0.0, sigma2=0.0)
    assert np.abs(same.astype(int) - img).mean() < 1.5
    state = np.random.get_state()[1].copy()
    a = stain.augment("macenko", np.repeat(img, 2, 0), 3, seed=[0, 1])
    assert np.array_equal(np.random.get_state()[1], state)  # numpy's global generator is left as it was
    assert a.shape == (6, 32, 32, 3) and not np.array_equal(a[0], a[1])
    assert np.array_equal(a, stain.augment("macenko", np.repeat(img, 2, 0), 3, seed=[0, 1]))
    assert not np.array_equal(a, stain.augment("macenko", np.repeat(img, 2, 0), 3, seed=[0, 2]))


def test_hed_augmentation_copies_each_patch_in_place_within_its_range():
    rng = np.random.default_rng(7)
    images = rng.integers(40, 230, (3, 8, 8, 3), dtype=np.uint8)
    out = stain.augment("hed", images, 4, seed=0)
    assert out.shape == (12, 8, 8, 3)
    hed_in, hed_out = stain.to_hed(images), stain.to_hed(out)
    for i in range(3):  # copy j of patch i: alpha in 1 +- sigma, beta in +- sigma, per stain
        for j in range(4):
            d = hed_out[4 * i + j] - hed_in[i]
            bound = stain.HED_SIGMA * (np.abs(hed_in[i]) + 1) + 0.02  # + uint8 rounding
            assert (np.abs(d) <= bound).all()
    assert np.array_equal(out, stain.augment("hed", images, 4, seed=0))


def test_unknown_methods_are_refused_by_name():
    with pytest.raises(MediFastError, match="stain augmentation 'vahadane' does not exist; choose from hed, macenko"):
        stain.augment("vahadane", np.zeros((1, 4, 4, 3), np.uint8), 1, 0)
    with pytest.raises(MediFastError, match="stain normalisation 'x' does not exist"):
        stain.normalise("x", np.zeros((1, 4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8))
