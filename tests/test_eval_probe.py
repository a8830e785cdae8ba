"""The linear probe on constructed embeddings where the answer is known."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from medi_fast.errors import MediFastError
from medi_fast.eval.probe import (NO_SYNTHETIC, ProbeConfig, per_site, resolve_task, run_probe, site_balanced_accuracy,
                                  site_combinations, summarise, to_markdown, tss_balanced_accuracy)

CLASSES = ["LUAD", "LUSC"]


# Site "stains": S1 and S3 share a strong stain along dim 1 (+3), S2 and S4 the opposite (-3); dim 2 tells
# the sites of a pair apart.
STAIN = {"S1": (3.0, 1.0), "S2": (-3.0, 1.0), "S3": (3.0, -1.0), "S4": (-3.0, -1.0)}


def make_set(rng, pairs, n, class_gap=1.5):
    """Embeddings for the given (class, site) pairs, n each.  dim 0: weak class signal (+-1.5, unit
    noise); dims 1-2: the site's stain (almost noiseless); dims 3-5: noise."""
    metas, xs = [], []
    for c, s in pairs:
        x = rng.normal(size=(n, 6))
        x[:, 0] += class_gap * (1 if c == "LUAD" else -1)
        x[:, 1:3] = np.array(STAIN[s]) + 0.1 * x[:, 1:3]
        xs.append(x)
        metas.append(pd.DataFrame({"class": [c] * n, "tissue_source_site": [s] * n}))
    return pd.concat(metas, ignore_index=True), np.concatenate(xs)


@pytest.fixture(scope="module")
def shortcut_world():
    """Training: LUAD only at S1/S3, LUSC only at S2/S4 (site = class).  Test: the sites swapped.
    MeDi synthetic fills the missing combinations; CLS synthetic copies the training frequencies."""
    rng = np.random.default_rng(0)
    train = make_set(rng, [("LUAD", "S1"), ("LUAD", "S3"), ("LUSC", "S2"), ("LUSC", "S4")], 40)
    test = make_set(rng, [("LUAD", "S2"), ("LUAD", "S4"), ("LUSC", "S1"), ("LUSC", "S3")], 50)
    medi = make_set(rng, [(c, s) for c in CLASSES for s in ("S1", "S2", "S3", "S4")], 20)
    cls = make_set(rng, [("LUAD", "S1"), ("LUAD", "S3"), ("LUSC", "S2"), ("LUSC", "S4")], 40)
    return train, test, {"CLS": cls, "MeDi": medi}


def test_synthetic_that_fills_missing_sites_removes_the_shortcut(shortcut_world):
    train, test, syn = shortcut_world
    cfg = ProbeConfig(k=20, ratio=2.0, one_site_per_class=True, max_runs=None)
    runs = run_probe(train, test, syn, CLASSES, cfg)
    assert runs["run"].nunique() == 4  # 2 sites x 2 sites
    s = summarise(runs).set_index("arm")
    # Without synthetic data (and with CLS's site-confounded data), the probe reads the site: on swapped
    # test sites it is mostly wrong.  MeDi's fill-missing data makes the site useless, so the class wins.
    assert s.loc[NO_SYNTHETIC, "balanced_accuracy_mean"] < 0.3
    assert s.loc["CLS", "balanced_accuracy_mean"] < 0.3
    assert s.loc["MeDi", "balanced_accuracy_mean"] > 0.8
    assert s.loc["MeDi", "tss_balanced_accuracy_mean"] > 0.8 and s.loc["MeDi", "mcc_mean"] > 0.6
    assert s.loc[NO_SYNTHETIC, "mcc_mean"] < 0
    # SEM is the standard error over runs.
    r = runs[runs["arm"] == "MeDi"]["balanced_accuracy"]
    assert s.loc["MeDi", "balanced_accuracy_sem"] == pytest.approx(r.std(ddof=1) / np.sqrt(len(r)))
    md = to_markdown(summarise(runs), "nsclc")
    assert md.count("\n| ") == 5 and "± " in md and "TSS-avg. balanced acc." in md


def test_arms_share_the_real_draw_and_runs_are_reproducible(shortcut_world):
    train, test, syn = shortcut_world
    cfg = ProbeConfig(k=10, ratio=0.0, one_site_per_class=True, max_runs=3, seed=5)
    a = run_probe(train, test, syn, CLASSES, cfg)
    b = run_probe(train, test, syn, CLASSES, cfg)
    pd.testing.assert_frame_equal(a, b)
    assert a["run"].nunique() == 3
    # ratio 0: every arm is the same real draw, so the same scores.
    for _, g in a.groupby("run"):
        assert g["balanced_accuracy"].nunique() == 1


def test_site_combinations():
    meta = pd.DataFrame({"class": ["LUAD"] * 6 + ["LUSC"] * 9,
                         "tissue_source_site": ["A"] * 3 + ["B"] * 2 + ["C"] + ["D"] * 3 + ["E"] * 3 + ["F"] * 3})
    one = site_combinations(meta, CLASSES, ProbeConfig(k=2, one_site_per_class=True, max_runs=None))
    assert len(one) == 2 * 3 and {c["LUAD"] for c in one} == {("A",), ("B",)}  # C has < k patches
    sampled = site_combinations(meta, CLASSES, ProbeConfig(k=2, one_site_per_class=True, max_runs=4))
    assert len(sampled) == 4 and len({tuple(sorted(c.items())) for c in sampled}) == 4
    alls = site_combinations(meta, CLASSES, ProbeConfig(k=2, max_runs=3))
    assert len(alls) == 3 and alls[0]["LUAD"] == ("A", "B", "C")
    with pytest.raises(MediFastError, match="lower --k"):
        site_combinations(meta, CLASSES, ProbeConfig(k=4, one_site_per_class=True))


def test_tss_balanced_accuracy_by_hand():
    y = np.array(["A", "A", "B", "B", "A", "A", "A"])
    p = np.array(["A", "B", "B", "B", "B", "B", "A"])
    s = np.array(["1", "1", "1", "1", "2", "2", "2"])
    # site 1: recall A = 1/2, recall B = 1 -> 0.75; site 2: only A, recall 1/3 -> mean 0.5417
    assert tss_balanced_accuracy(y, p, s) == pytest.approx((0.75 + 1 / 3) / 2)
    # one site: equals balanced accuracy
    assert tss_balanced_accuracy(y, p, np.zeros(7)) == pytest.approx(balanced_accuracy_score(y, p))
    assert site_balanced_accuracy(y, p, s) == pytest.approx({"1": 0.75, "2": 1 / 3})


def test_runs_carry_each_test_sites_accuracy_and_their_mean_is_the_tss_average(shortcut_world):
    train, test, syn = shortcut_world
    runs = run_probe(train, test, syn, CLASSES, ProbeConfig(k=10, ratio=1.0, one_site_per_class=True, max_runs=3))
    sites = sorted(test[0]["tissue_source_site"].unique())
    cols = [f"bacc@{s}" for s in sites]
    assert np.allclose(runs[cols].mean(axis=1), runs["tss_balanced_accuracy"])
    t = per_site(runs)
    assert list(t.index) == [NO_SYNTHETIC, "CLS", "MeDi"] and list(t.columns) == sites
    assert t.loc["MeDi", sites[0]] == pytest.approx(runs.loc[runs["arm"] == "MeDi", cols[0]].mean())
    # the per-site means average to the summary's TSS-averaged mean
    s = summarise(runs).set_index("arm")["tss_balanced_accuracy_mean"]
    assert np.allclose(t.mean(axis=1), s.loc[t.index])


def test_tasks():
    assert resolve_task("nsclc") == ["LUAD", "LUSC"]
    assert resolve_task("RCC") == ["KIRC", "KIRP", "KICH"]
    assert resolve_task("uterine") == ["UCEC", "UCS"]
    assert resolve_task("TCGA-LUAD,Lung_squamous_cell_carcinoma") == ["LUAD", "LUSC"]
    with pytest.raises(MediFastError, match="fewer than two classes"):
        resolve_task("nsclcx")


def test_drawn_rows_are_the_real_patches_the_runs_draw():
    """drawn_rows: a set derived (SOURCE) from those rows alone serves every run; without one of them a run
    that drew it finds too few patches."""
    from medi_fast.eval.probe import SOURCE, ProbeConfig, drawn_rows, run_probe

    rng = np.random.default_rng(0)
    train = pd.DataFrame({"class": ["A"] * 12 + ["B"] * 12 + ["C"] * 3,
                          "tissue_source_site": (["s1"] * 6 + ["s2"] * 6) * 2 + ["s3"] * 3})
    test = pd.DataFrame({"class": ["A", "B"] * 4, "tissue_source_site": ["t1"] * 8})
    cfg = ProbeConfig(k=3, ratio=1.0, one_site_per_class=True, max_runs=None, seed=4)
    rows = drawn_rows(train, ["A", "B"], cfg)
    assert len(rows) < 24 and set(train["class"].iloc[rows]) == {"A", "B"}  # class C is not a probe class
    x, xt = rng.normal(size=(len(train), 3)), rng.normal(size=(len(test), 3))

    def derived(keep):
        return pd.DataFrame({"class": train["class"].iloc[keep].to_numpy(), SOURCE: keep}), x[keep]

    runs = run_probe((train, x), (test, xt), {"aug": derived(rows)}, ["A", "B"], cfg)
    assert len(runs) == 2 * 4  # every site combination ran, with the derived arm
    with pytest.raises(MediFastError, match="only 2 synthetic"):
        run_probe((train, x), (test, xt), {"aug": derived(rows[1:])}, ["A", "B"], cfg)
