"""The shortcut meter on constructed data where the answer is known."""
import numpy as np
import pandas as pd
import pytest

from medi_fast.eval.shortcut import entropy, mi_report, mutual_information, site_predictability


def table(counts: dict) -> pd.DataFrame:
    rows = [(c, s) for (c, s), n in counts.items() for _ in range(n)]
    return pd.DataFrame(rows, columns=["class", "tissue_source_site"])


def test_mutual_information_known_values():
    # site gives the class away (2 equiprobable classes): 1 bit
    full = table({("LUAD", "05"): 30, ("LUSC", "44"): 30})
    assert mutual_information(full["class"], full["tissue_source_site"]) == pytest.approx(1.0)
    # independent: 0 bits
    ind = table({("LUAD", "05"): 10, ("LUAD", "44"): 30, ("LUSC", "05"): 5, ("LUSC", "44"): 15})
    assert mutual_information(ind["class"], ind["tissue_source_site"]) == pytest.approx(0.0, abs=1e-12)
    # [[30, 10], [10, 30]]: 1 - H(0.25) bits
    part = table({("LUAD", "05"): 30, ("LUAD", "44"): 10, ("LUSC", "05"): 10, ("LUSC", "44"): 30})
    h = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))
    assert mutual_information(part["class"], part["tissue_source_site"]) == pytest.approx(1 - h, rel=1e-12)
    assert entropy(part["class"]) == pytest.approx(1.0)


def test_fill_missing_augmentation_drives_mi_to_the_computed_value():
    train = table({("LUAD", "05"): 30, ("LUSC", "44"): 30})
    fill = table({("LUAD", "44"): 30, ("LUSC", "05"): 30})  # the missing combinations
    same = table({("LUAD", "05"): 30, ("LUSC", "44"): 30})  # class-only model, training frequencies
    r = mi_report(train, {"MeDi": fill, "CLS": same}).set_index("training_set")
    assert r.loc["real", "mi_bits"] == pytest.approx(1.0)
    assert r.loc["real+MeDi", "mi_bits"] == pytest.approx(0.0, abs=1e-12)
    assert r.loc["real+CLS", "mi_bits"] == pytest.approx(1.0)
    assert r.loc["real+MeDi", "n"] == 120 and r.loc["real", "mi_fraction"] == pytest.approx(1.0)


def test_site_predictability_detects_a_site_stain_and_its_absence():
    rng = np.random.default_rng(0)
    meta = table({("LUAD", "05"): 30, ("LUAD", "44"): 30, ("LUAD", "49"): 30, ("LUSC", "05"): 40, ("LUSC", "44"): 40,
                  ("LUSC", "77"): 2})
    sites = meta["tissue_source_site"].to_numpy()
    x = rng.normal(size=(len(meta), 8))
    stained = x.copy()
    stained[:, 0] += np.where(meta["class"] == "LUAD", np.select([sites == "05", sites == "44"], [-4.0, 0.0], 4.0), 0)
    r = site_predictability(meta, stained, folds=5).set_index("class")
    assert r.loc["LUAD", "sites"] == 3 and r.loc["LUAD", "chance"] == pytest.approx(1 / 3)
    assert r.loc["LUAD", "site_balanced_accuracy"] > 0.9  # LUAD's sites are stained apart
    assert r.loc["LUSC", "sites"] == 2  # site 77 (2 patches) left out
    assert abs(r.loc["LUSC", "lift"]) < 0.2  # LUSC has no site signal: about chance
    one = site_predictability(meta[meta["tissue_source_site"] == "05"], stained[sites == "05"])
    assert one["site_balanced_accuracy"].isna().all()  # a single site cannot be predicted
