"""FID statistics and distance: against scipy/numpy references, streaming, per class, npz round-trip."""
import numpy as np
import pandas as pd
import pytest
from scipy import linalg

from medi_fast.errors import MediFastError
from medi_fast.eval.features import ColourTexture
from medi_fast.eval.fid import (ALL, FIDStatsSink, RunningStats, features_to_stats, fid_table, images_to_features,
                                load_stats, save_stats, stats_to_fid)


def reference_fid(x, y):
    """The textbook formula with scipy's sqrtm, straight from the features."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("dim", [8, 64])
def test_frechet_distance_matches_scipy_reference(dim):
    rng = np.random.default_rng(dim)
    x = rng.normal(size=(500, dim)) @ rng.normal(size=(dim, dim))
    y = rng.normal(loc=0.3, size=(400, dim)) @ rng.normal(size=(dim, dim))
    s = features_to_stats(x)[ALL], features_to_stats(y)[ALL]
    ours = stats_to_fid(s[0][0], s[0][1], s[1][0], s[1][1])
    ref = reference_fid(x, y)
    assert ref > 1.0
    assert abs(ours - ref) / ref <= 1e-6


def test_fid_of_identical_sets_is_zero_and_of_shifted_mean_is_shift_squared():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6))
    st = features_to_stats(x)[ALL]
    assert abs(stats_to_fid(st[0], st[1], st[0], st[1])) < 1e-8
    shift = np.array([1.0, 2.0, 0, 0, 0, 0])
    st2 = features_to_stats(x + shift)[ALL]  # same covariance, mean moved: FID = |shift|^2
    assert stats_to_fid(st[0], st[1], st2[0], st2[1]) == pytest.approx(5.0, rel=1e-6)


def test_singular_covariance_is_handled_like_pytorch_fid():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 32))  # 10 samples in 32-d: rank-deficient covariance
    y = rng.normal(size=(10, 32))
    a, b = features_to_stats(x)[ALL], features_to_stats(y)[ALL]
    v = stats_to_fid(a[0], a[1], b[0], b[1])
    assert np.isfinite(v) and v > 0


def test_streaming_stats_equal_numpy_mean_and_cov_far_from_zero():
    rng = np.random.default_rng(3)
    x = 1e3 + rng.normal(size=(1000, 16)) * rng.uniform(0.1, 5, size=16)  # offset stresses precision
    rs = RunningStats()
    for i in range(0, 1000, 37):  # odd batch size
        rs.add(x[i:i + 37])
    assert rs.n == 1000
    np.testing.assert_allclose(rs.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rs.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_per_class_stats_and_average():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(600, 5))
    labels = np.array(["LUAD", "LUSC", "KIRC"])[rng.integers(0, 3, 600)]
    st = features_to_stats(feats, labels)
    assert set(st) == {ALL, "LUAD", "LUSC", "KIRC"}
    for c in ("LUAD", "LUSC", "KIRC"):
        np.testing.assert_allclose(st[c][0], feats[labels == c].mean(0), rtol=1e-12)
        np.testing.assert_allclose(st[c][1], np.cov(feats[labels == c], rowvar=False), rtol=1e-9)
        assert st[c][2] == (labels == c).sum()
    fake_feats = feats + np.where(labels[:, None] == "LUAD", 1.0, 0.0)  # only LUAD moves
    fk = features_to_stats(fake_feats, labels)
    t = fid_table(st, fk).set_index("group")
    assert t.loc["LUAD", "fid"] == pytest.approx(5.0, rel=1e-6)
    assert abs(t.loc["LUSC", "fid"]) < 1e-8 and abs(t.loc["KIRC", "fid"]) < 1e-8
    assert t.loc["mean", "fid"] == pytest.approx(np.mean(t.loc[["LUAD", "LUSC", "KIRC"], "fid"]))
    assert t.loc["mean", "n_real"] == 600


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    st = features_to_stats(rng.normal(size=(50, 4)), np.array(["A", "B"] * 25))
    p = save_stats(tmp_path / "s.npz", st, "colour-texture")
    back, name = load_stats(p)
    assert name == "colour-texture" and set(back) == set(st)
    for k in st:
        np.testing.assert_array_equal(back[k][0], st[k][0])
        np.testing.assert_array_equal(back[k][1], st[k][1])
        assert back[k][2] == st[k][2]
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(MediFastError, match="cannot read statistics"):
        load_stats(tmp_path / "bad.npz")


def test_fid_stats_sink_equals_batch_computation(tmp_path):
    rng = np.random.default_rng(6)
    imgs = rng.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    rows = pd.DataFrame({"class": ["LUAD"] * 20 + ["LUSC"] * 20}).sample(frac=1, random_state=0)
    imgs = imgs[rows.index.to_numpy()]
    rows = rows.reset_index(drop=True)
    sink = FIDStatsSink(tmp_path / "fake.npz", extractor=ColourTexture())
    for i in range(0, 40, 16):
        sink.add(imgs[i:i + 16], rows.iloc[i:i + 16])
    sink.close()
    back, name = load_stats(tmp_path / "fake.npz")
    ref = features_to_stats(images_to_features(imgs, ColourTexture()), rows["class"].to_numpy())
    assert name == "colour-texture" and set(back) == {ALL, "LUAD", "LUSC"}
    for k in ref:
        np.testing.assert_allclose(back[k][0], ref[k][0], rtol=1e-10)
        np.testing.assert_allclose(back[k][1], ref[k][1], rtol=1e-8, atol=1e-14)
    with pytest.raises(MediFastError, match=r"\.npz"):
        FIDStatsSink(tmp_path / "fake.txt", extractor=ColourTexture())


def test_colour_texture_features_see_stain_colour():
    rng = np.random.default_rng(7)
    base = rng.integers(60, 200, size=(8, 32, 32, 3)).astype(np.uint8)
    pinker = np.clip(base.astype(int) + [40, -20, 10], 0, 255).astype(np.uint8)
    f1, f2 = ColourTexture()(base), ColourTexture()(pinker)
    assert f1.shape == (8, 48) and np.isfinite(f1).all()
    np.testing.assert_allclose(f1[:, :3], base.reshape(8, -1, 3).mean(1) / 255, rtol=1e-12)  # first: RGB means
    assert (f2[:, 0] > f1[:, 0]).all() and (f2[:, 1] < f1[:, 1]).all()
