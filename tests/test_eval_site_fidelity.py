"""The site-fidelity measure (shared by the demo report and benchmarks/site_fidelity.py) on patches of
known colour: the slope and correlation it reports are the ones built into the data."""
from __future__ import annotations

import numpy as np
import pytest

from medi_fast.errors import MediFastError
from medi_fast.eval.site_fidelity import site_colours, site_fidelity

# Real stain per (class, site); the "model" reproduces half of each site's deviation from its class mean.
REAL = {("A", "s1"): (200, 120, 160), ("A", "s2"): (180, 132, 172), ("B", "s2"): (150, 100, 140),
        ("B", "s3"): (170, 88, 152)}



def make():
    real, rc, rs, gen, gc, gs = [], [], [], [], [], []
    for c in ("A", "B"):
        members = {s: np.array(v, float) for (k, s), v in REAL.items() if k == c}
        centre = np.mean(list(members.values()), 0)
        for s, v in members.items():
            real.append(np.full((5, 4, 4, 3), v, np.uint8)), rc.extend([c] * 5), rs.extend([s] * 5)
            gen.append(np.full((3, 4, 4, 3), np.round(centre + 0.5 * (v - centre)), np.uint8))
            gc.extend([c] * 3), gs.extend([s] * 3)
    # A combination the model was never trained on: generated only.
    gen.append(np.full((3, 4, 4, 3), 77, np.uint8)), gc.extend(["A"] * 3), gs.extend(["s3"] * 3)
    return np.concatenate(gen), gc, gs, np.concatenate(real), rc, rs


def test_slope_and_correlation_are_the_built_in_ones():
    table = site_colours(*make())
    assert list(zip(table["class"], table["site"])) == [("A", "s1"), ("A", "s2"), ("B", "s2"), ("B", "s3"), ("A", "s3")]
    assert table.loc[0, ["real_R", "real_G", "real_B"]].tolist() == [200, 120, 160]
    assert table["real_patches"].tolist() == [5, 5, 5, 5, 0] and table["generated_patches"].tolist() == [3] * 5
    assert np.isnan(table.loc[4, "real_R"]) and table.loc[4, "gen_R"] == 77
    res = site_fidelity(table)
    assert len(res.effects) == 4  # the never-seen combination takes no part in the fit
    assert res.slope == pytest.approx(0.5) and res.correlation == pytest.approx(1.0)
    assert res.mean_abs_effect_generated == pytest.approx(0.5 * res.mean_abs_effect_real)
    # Site effects are relative to the class mean: A@s1 is 10 grey levels redder than class A's mean.
    assert res.effects.loc[0, "real_R"] == pytest.approx(10.0)
    # Colour spread: every trained combination's distance from the combinations' common mean colour.
    real = np.array(list(REAL.values()), float)
    assert res.colour_spread_real == pytest.approx(np.abs(real - real.mean(0)).mean())
    gen = res.table[res.table["real_patches"] > 0][["gen_R", "gen_G", "gen_B"]].to_numpy()
    assert res.colour_spread_generated == pytest.approx(np.abs(gen - gen.mean(0)).mean())
    # A washed-out model (every combination the same grey) has no spread at all.
    gen, gc, gs, real_im, rc, rs = make()
    flat = site_fidelity(site_colours(np.full_like(gen, 128), gc, gs, real_im, rc, rs))
    assert flat.colour_spread_generated == 0 and flat.colour_spread_real == res.colour_spread_real


def test_no_real_combination_is_an_error():
    gen, gc, gs, real, rc, rs = make()
    with pytest.raises(MediFastError, match="no \\(class, site\\) has both"):
        site_fidelity(site_colours(gen, gc, gs, real, ["Z"] * len(rc), rs))
    with pytest.raises(MediFastError, match="differ in length"):
        site_colours(gen, gc[:-1], gs, real, rc, rs)
