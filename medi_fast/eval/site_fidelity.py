"""Site fidelity: does a metadata-conditioned model render the tissue source site's stain?

For every (class, site) the mean RGB of the generated patches and of the real ones.  A combination's
*site effect* is its mean minus its class's mean over the combinations that have both real and
generated patches (the ones the model was trained on), per channel: what the site adds to the class's
colour.  The slope of generated on real site effects says how much of the stain difference between
sites the model reproduces (1.0 = all of it, 0 = the site is ignored); the correlation says whether
it points the right way.  Combinations without real patches (never seen in training) keep their
generated colour in the table and take no part in the fit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import MediFastError

CHANNELS = ("R", "G", "B")


def _mean_rgb(images: np.ndarray) -> np.ndarray:
    return np.asarray(images).reshape(-1, 3).astype(float).mean(0) if len(images) else np.full(3, np.nan)


def site_colours(generated: np.ndarray, gen_class, gen_site, real: np.ndarray, real_class, real_site) -> pd.DataFrame:
    """Per (class, site) of the generated patches (first-seen order): counts and mean R, G, B of the generated
    and the real patches (NaN where no real patch has that combination).  Images are uint8 (N, H, W, 3)."""
    gen_class, gen_site = np.asarray(gen_class).astype(str), np.asarray(gen_site).astype(str)
    real_class, real_site = np.asarray(real_class).astype(str), np.asarray(real_site).astype(str)
    if len(generated) != len(gen_class) or len(real) != len(real_class):
        raise MediFastError("site colours: images and labels differ in length; pass one class and site per image")
    rows = []
    for c, s in dict.fromkeys(zip(gen_class, gen_site)):
        g = _mean_rgb(generated[(gen_class == c) & (gen_site == s)])
        sel = (real_class == c) & (real_site == s)
        r = _mean_rgb(real[sel])
        rows.append({"class": c, "site": s, "generated_patches": int(((gen_class == c) & (gen_site == s)).sum()),
                     "real_patches": int(sel.sum()), **{f"gen_{k}": v for k, v in zip(CHANNELS, g)},
                     **{f"real_{k}": v for k, v in zip(CHANNELS, r)}})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class SiteFidelity:
    table: pd.DataFrame    # site_colours(): every combination, absolute mean colours
    effects: pd.DataFrame  # the combinations with real patches, class-centred (site effects)
    correlation: float
    slope: float
    mean_abs_effect_generated: float  # grey levels
    mean_abs_effect_real: float
    # How far the trained combinations' mean colours lie from their common mean (class and site together),
    # generated and real, in grey levels: a generated spread far below the real one = washed-out colour.
    colour_spread_generated: float = float("nan")
    colour_spread_real: float = float("nan")

    def summary(self) -> dict:
        return {"correlation": self.correlation, "slope": self.slope,
                "mean_abs_effect_generated": self.mean_abs_effect_generated,
                "mean_abs_effect_real": self.mean_abs_effect_real, "combinations": len(self.effects),
                "colour_spread_generated": self.colour_spread_generated,
                "colour_spread_real": self.colour_spread_real}


def site_fidelity(table: pd.DataFrame) -> SiteFidelity:
    """Site effects of a site_colours() table and how well the generated ones follow the real ones."""
    seen = table[table["real_patches"] > 0].copy()
    if seen.empty:
        raise MediFastError("site fidelity: no (class, site) has both real and generated patches; pass the real "
                            "patches of the sites the model was trained on")
    spread = {k: float(np.abs(seen[[f"{k}_{c}" for c in CHANNELS]].to_numpy()
                              - seen[[f"{k}_{c}" for c in CHANNELS]].to_numpy().mean(0)).mean()) for k in ("gen", "real")}
    for k in ("gen", "real"):
        for c in CHANNELS:
            seen[f"{k}_{c}"] -= seen.groupby("class")[f"{k}_{c}"].transform("mean")
    g = seen[[f"gen_{c}" for c in CHANNELS]].to_numpy().ravel()
    r = seen[[f"real_{c}" for c in CHANNELS]].to_numpy().ravel()
    # One site per class leaves nothing to compare (every effect is 0): no fit rather than a warning.
    corr = float(np.corrcoef(g, r)[0, 1]) if r.std() > 0 and g.std() > 0 else float("nan")
    slope = float(np.polyfit(r, g, 1)[0]) if r.std() > 0 else float("nan")
    return SiteFidelity(table, seen.reset_index(drop=True), corr, slope, float(np.abs(g).mean()), float(np.abs(r).mean()),
                        spread["gen"], spread["real"])
