"""One evaluation entry: `compute_fid` gives the numbers the three pipelines it replaced gave (the CLI's,
the demo's and the benchmarks'), and one `to_uint8` gives the shipped generator's pixels everywhere."""
import numpy as np
import pandas as pd
import pytest
import torch

from medi_fast.eval.fid import compute_fid, frechet_distance, stats_to_fid


def _np_cov_fid(a, b):
    """The in-memory FID the demo and benchmarks used before: np.mean / np.cov, then stats_to_fid."""
    return stats_to_fid(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


@pytest.mark.parametrize("shift", [0.0, 50.0])
def test_frechet_distance_equals_the_np_cov_formula(shift):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 12)) + shift
    b = rng.normal(size=(200, 12)) * 1.3 + 0.2 + shift
    old = _np_cov_fid(a, b)
    new = frechet_distance(a, b)
    assert new == pytest.approx(old, rel=1e-9, abs=1e-12)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_compute_fid_per_group_equals_per_class_formula():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(300, 8)) + 0.3
    la, lb = rng.choice(["LUAD", "LUSC"], 400), rng.choice(["LUAD", "LUSC"], 300)
    t = compute_fid(a, b, real_labels=la, fake_labels=lb).set_index("group")
    for c in ("LUAD", "LUSC"):
        assert t.loc[c, "fid"] == pytest.approx(_np_cov_fid(a[la == c], b[lb == c]), rel=1e-9)
        assert t.loc[c, "n_real"] == (la == c).sum() and t.loc[c, "n_fake"] == (lb == c).sum()
    assert t.loc["mean", "fid"] == pytest.approx(t.loc[["LUAD", "LUSC"], "fid"].mean())
    assert t.loc["all", "fid"] == pytest.approx(_np_cov_fid(a, b), rel=1e-9)
    only = compute_fid(a, b, per=None, real_labels=la, fake_labels=lb)
    assert list(only["group"]) == ["all"] and only["fid"].iloc[0] == pytest.approx(t.loc["all", "fid"])


def test_compute_fid_on_images_builds_the_extractor_once(monkeypatch):
    from medi_fast.eval import features

    built = []
    real_get = features.get_extractor

    def counting(name, **kw):
        built.append(name)
        return real_get(name, **kw)

    monkeypatch.setattr(features, "get_extractor", counting)
    rng = np.random.default_rng(2)
    x, y = (rng.integers(0, 256, (80, 16, 16, 3), dtype=np.uint8) for _ in range(2))  # n > 48: full rank
    t = compute_fid(x, y, per=None, features="colour-texture")
    assert built == ["colour-texture"]
    ct = features.ColourTexture()
    assert t["fid"].iloc[0] == pytest.approx(_np_cov_fid(ct(x), ct(y)), rel=1e-9)
    compute_fid({"__all__": (np.zeros(2), np.eye(2), 5)}, {"__all__": (np.ones(2), np.eye(2), 5)}, per=None)
    assert built == ["colour-texture"]  # statistics in, no extractor built


def _old_demo_fid(index, x_real, syn, cohort, z, classes):
    """demo.evaluate's FID loop as it shipped before the one entry (frozen here as the reference)."""
    rows = []
    for name, (meta, xs) in syn.items():
        for c in classes:
            a = z(x_real[cohort & (index["class"].to_numpy() == c)])
            b = xs[meta["class"].to_numpy() == c]
            rows.append({"model": name, "class": c, "distance": _np_cov_fid(a, b)})
    return pd.DataFrame(rows)


def test_demo_distances_stay_what_they_were():
    from medi_fast.demo import stages as demo
    from medi_fast.eval.features import ColourTexture

    rng = np.random.default_rng(3)
    n = 240  # per class > 48 features in both sets, as in the demo (480 real, 160 synthetic): full-rank covariances
    index = pd.DataFrame({"class": np.tile(["LUAD", "LUSC"], n // 2),
                          "tissue_source_site": rng.choice(["S1", "S2", "S3", "S4", "S5", "S6"], n)})
    real = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    synthetic = {}
    for name in ("CLS", "MeDi"):
        meta = pd.DataFrame({"class": np.tile(["LUAD", "LUSC"], 60), "tissue_source_site": rng.choice(["S1", "S4"], 120)})
        synthetic[name] = (meta, rng.integers(0, 256, (120, 16, 16, 3), dtype=np.uint8))
    cfg = demo.DemoConfig(k=3, probe_repeats=1, setting="two-class")
    got = demo.evaluate(cfg, index, real, synthetic)["fid"]
    feat = ColourTexture()
    x_real = feat(real)
    cohort = ~np.isin(index["tissue_source_site"].to_numpy(), cfg.spec.test_sites)
    mu, sd = x_real[cohort].mean(0), x_real[cohort].std(0) + 1e-8
    z = lambda x: (x - mu) / sd  # noqa: E731
    syn = {k: (m, z(feat(im))) for k, (m, im) in synthetic.items()}
    want = _old_demo_fid(index, x_real, syn, cohort, z, cfg.spec.classes)
    pd.testing.assert_frame_equal(got[["model", "class"]], want[["model", "class"]])
    np.testing.assert_allclose(got["distance"], want["distance"], rtol=1e-9)
    # what the report prints (3 decimals) is identical
    assert [f"{v:.3f}" for v in got["distance"]] == [f"{v:.3f}" for v in want["distance"]]


def _shipped_to_uint8(x):
    """medi_fast.pixels.to_uint8 as shipped (frozen copy): diffusers' rounding."""
    x = (x.float() / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def _grid_of_floats():
    """Every float32 from just below -1 to just above 1 at the rounding boundaries of each level, plus a dense
    sweep: where two arithmetics of [-1, 1] -> 0..255 can disagree."""
    k = torch.arange(256, dtype=torch.float64)
    edges = torch.cat([(k + 0.5) / 127.5 - 1, k / 127.5 - 1]).float()
    near = torch.cat([torch.nextafter(edges, torch.tensor(-2.0)), edges, torch.nextafter(edges, torch.tensor(2.0))])
    sweep = torch.linspace(-1.2, 1.2, 3 * 2 ** 16)
    x = torch.cat([near, sweep])
    x = torch.cat([x, x.new_zeros((-len(x)) % 12)])
    return x.view(-1, 3, 2, 2)


def test_one_to_uint8_everywhere_with_the_shipped_arithmetic():
    from medi_fast.pixels import to_uint8

    x = _grid_of_floats()
    np.testing.assert_array_equal(to_uint8(x), _shipped_to_uint8(x))
    np.testing.assert_array_equal(to_uint8(x.double()), _shipped_to_uint8(x.double()))
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        for mod in ("solver_quality", "int8_quality"):
            m = importlib.import_module(mod)
            assert getattr(m, "to_uint8", to_uint8) is to_uint8
    finally:
        sys.path.pop(0)
    from medi_fast.engines import parity

    assert getattr(parity, "to_uint8", to_uint8) is to_uint8
