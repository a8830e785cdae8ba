"""The synthetic H&E set: layout, metadata, determinism, and that class = morphology, site = colour."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medi_fast.data.barcode import parse_barcode
from medi_fast.data.synth import CLASSES, SynthConfig, jpeg_bytes, render_dataset, render_patches, site_style
from medi_fast.errors import MediFastError


def test_confounded_config_has_one_train_site_per_class_and_full_test_sites():
    cfg = SynthConfig.confounded(classes=("LUAD", "LUSC"), train_sites=("A1", "A2"), test_sites=("B1", "B2", "B3"),
                                 n_per_combo=10, n_test_per_combo=4)
    assert cfg.combos[("LUAD", "A1")] == 10 and cfg.combos[("LUSC", "A2")] == 10
    assert ("LUAD", "A2") not in cfg.combos and ("LUSC", "A1") not in cfg.combos  # the shortcut
    for s in ("B1", "B2", "B3"):
        assert cfg.combos[("LUAD", s)] == cfg.combos[("LUSC", s)] == 4
    assert cfg.n_patches == 20 + 24
    assert set(cfg.train_combos) == {("LUAD", "A1"), ("LUSC", "A2")}


@pytest.mark.parametrize("kwargs, message", [
    (dict(classes=("NOPE",)), "not available"),
    (dict(sites=("S12",)), "two letters"),
    (dict(resolution=4), "out of range"),
    (dict(classes=("LUAD",), sites=("S1",), combos={("LUSC", "S1"): 3}), "not in classes"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(MediFastError, match=message):
        SynthConfig(**kwargs)


def test_confounded_rejects_overlapping_sites():
    with pytest.raises(MediFastError, match="overlap"):
        SynthConfig.confounded(train_sites=("S1", "S2"), test_sites=("S2", "S3"))


def test_aliases_resolve_to_project_codes():
    assert SynthConfig.full(classes=("Lung_adenocarcinoma", "TCGA-LUSC"), sites=("S1",)).classes == ("LUAD", "LUSC")


def test_render_dataset_layout_and_clinical_csv(tmp_path):
    cfg = SynthConfig.confounded(n_per_combo=10, n_test_per_combo=5, patches_per_slide=4, resolution=32)
    out = render_dataset(cfg, tmp_path / "syn")
    clin = pd.read_csv(out / "clinical.csv", dtype=str, keep_default_na=False)
    for col in ("project_id", "case_submitter_id", "slide_submitter_id", "tissue_source_site", "gender", "race",
                "age_at_index", "gt_class", "gt_site", "gt_role", "gt_stain_h", "gt_jpeg_quality"):
        assert col in clin.columns
    jpgs = sorted(out.glob("*/*/*.jpg"))
    assert len(jpgs) == cfg.n_patches
    assert clin["n_patches"].astype(int).sum() == cfg.n_patches
    assert clin["slide_submitter_id"].is_unique
    for row in clin.itertuples():
        b = parse_barcode(row.slide_submitter_id)
        assert b.tss == row.tissue_source_site == row.gt_site  # the barcode's TSS is the site code
        assert b.case == row.case_submitter_id
        assert row.project_id == "TCGA-" + row.gt_class
        assert row.gt_role == ("train" if (row.gt_class, row.gt_site) in cfg.train_combos else "test")
        folder = {"LUAD": "Lung_adenocarcinoma", "LUSC": "Lung_squamous_cell_carcinoma"}[row.gt_class]
        assert len(list((out / folder / row.slide_submitter_id).glob("*.jpg"))) == int(row.n_patches)
    assert (out / "synth.json").is_file()
    with pytest.raises(MediFastError, match="already exists"):
        render_dataset(cfg, out)


def test_same_seed_same_pixels_and_combos_independent():
    a = render_patches("LUSC", "S1", 3, 32, seed=7)
    b = render_patches("LUSC", "S1", 3, 32, seed=7)
    c = render_patches("LUSC", "S1", 3, 32, seed=8)
    assert a.dtype == np.uint8 and a.shape == (3, 32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert site_style("S1") == site_style("S1") and site_style("S1") != site_style("S2")


def test_failed_render_leaves_no_output(tmp_path, monkeypatch):
    import medi_fast.data.synth as synth

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(synth, "_write_jpeg", boom)
    with pytest.raises(RuntimeError):
        render_dataset(SynthConfig.full(n_per_combo=2, resolution=16), tmp_path / "x")
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []


def _decode(img, q):
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(jpeg_bytes(img, q))).convert("RGB"))


def _texture_features(img):
    """Grayscale, contrast-normalised texture: gradient histogram + radial power spectrum + local variance."""
    g = img.astype(np.float64).mean(-1)
    g = (g - g.mean()) / (g.std() + 1e-6)
    gy, gx = np.gradient(g)
    mag = np.hypot(gx, gy)
    feats = list(np.histogram(mag, bins=8, range=(0, 3), density=True)[0])
    p = np.abs(np.fft.fftshift(np.fft.fft2(g))) ** 2
    yy, xx = np.indices(p.shape) - np.array(p.shape)[:, None, None] // 2
    rad = np.hypot(yy, xx).astype(int)
    ring = np.bincount(rad.ravel(), p.ravel()) / np.maximum(np.bincount(rad.ravel()), 1)
    ring = ring[1:32] / ring[1:32].sum()
    feats += list(np.log(ring + 1e-9))
    feats += [np.mean(g > 1.0), np.mean(g < -1.0), np.mean(np.abs(g) < 0.3)]
    return feats


def _colour_features(img):
    x = img.reshape(-1, 3).astype(np.float64)
    return list(x.mean(0)) + list(x.std(0)) + list(np.percentile(x, [5, 95], axis=0).ravel())


def test_classifiers_recover_class_from_texture_and_site_from_colour():
    """What the set claims: texture (grayscale) predicts the class, even at a site never trained on;
    colour statistics predict the site.  Chance is 1/4 for class and 1/3 for site."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sites = ("S1", "S2", "S3")
    xs_t, xs_c, ys_cls, ys_site = [], [], [], []
    for ci, cls in enumerate(CLASSES):
        for si, site in enumerate(sites):
            q = site_style(site).jpeg_quality
            for img in render_patches(cls, site, 24, 64, seed=[ci, si]):
                img = _decode(img, q)
                xs_t.append(_texture_features(img))
                xs_c.append(_colour_features(img))
                ys_cls.append(ci)
                ys_site.append(si)
    xt, xc = np.array(xs_t), np.array(xs_c)
    ycls, ysite = np.array(ys_cls), np.array(ys_site)

    def fit_score(x, y, train):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        clf.fit(x[train], y[train])
        return clf.score(x[~train], y[~train])

    held_site = ysite == 2  # class from texture generalises to an unseen site
    acc_cls = fit_score(xt, ycls, ~held_site)
    half = (np.arange(len(ysite)) % 2 == 0)
    acc_site = fit_score(xc, ysite, half)
    print(f"texture->class accuracy at an unseen site {acc_cls:.3f} (chance 0.25); "
          f"colour->site accuracy {acc_site:.3f} (chance 0.33)")
    assert acc_cls >= 0.85
    assert acc_site >= 0.85


def test_cli_synth_then_index_and_pack_a_split(tmp_path, capsys):
    from medi_fast.cli import main
    from medi_fast.data.dataset import open_dataset

    out = tmp_path / "syn"
    assert main(["data", "synth", "--out", str(out), "--classes", "LUAD,LUSC,KIRC", "--n-per-combo", "6",
                 "--n-test-per-combo", "3", "--resolution", "32", "--patches-per-slide", "3"]) == 0
    assert "rendered 36 patches (9 class x site combinations, 32 px)" in capsys.readouterr().out
    clin = pd.read_csv(out / "clinical.csv", dtype=str, keep_default_na=False)
    train = clin[clin["gt_role"] == "train"]
    assert sorted(zip(train["gt_class"], train["gt_site"])) == [("KIRC", "S3")] * 2 + [("LUAD", "S1")] * 2 + \
        [("LUSC", "S2")] * 2
    train.to_csv(tmp_path / "train.csv", index=False)
    assert main(["data", "index", str(out), "--metadata", str(out / "clinical.csv"), "--out",
                 str(tmp_path / "i.parquet")]) == 0
    assert main(["data", "pack", str(tmp_path / "i.parquet"), "--resolution", "16", "--split",
                 str(tmp_path / "train.csv"), "--out", str(tmp_path / "pk")]) == 0
    ds = open_dataset(tmp_path / "pk")
    assert len(ds) == 18 and set(ds.table["gt_role"]) == {"train"}
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--out", str(out)])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--out", str(tmp_path / "z"), "--classes", "LUAD,BRCA"])
    assert e.value.code == 2 and "'BRCA' is not available" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
