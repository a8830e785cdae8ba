"""The shortcut meter: measure the class-site shortcut instead of assuming it.

Two numbers (beyond the paper):

* **site predictability within each class**: cross-validated balanced accuracy of a linear
  classifier that predicts the tissue source site from the embeddings of ONE class's patches,
  next to chance (1 / number of sites).  Well above chance = the encoder sees the site's stain, so a
  downstream classifier can use it as a shortcut.
* **class-site mutual information** I(class; site) in bits of a training set (plug-in estimate from
  the contingency table), before and after adding synthetic rows.  0 bits = the site says nothing
  about the class (every class equally often at every site); H(class) bits = the site gives the
  class away.  Filling the missing (class, site) combinations should drive it towards 0.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import MediFastError

SITE = "tissue_source_site"


def mutual_information(a, b) -> float:
    """Plug-in I(A; B) in bits from paired labels: sum p(a,b) log2(p(a,b) / (p(a) p(b)))."""
    table = pd.crosstab(pd.Series(np.asarray(a), name="a"), pd.Series(np.asarray(b), name="b")).to_numpy(float)
    if table.sum() == 0:
        return 0.0
    p = table / table.sum()
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log2(p[nz] / (pa @ pb)[nz])))


def entropy(a) -> float:
    """H(A) in bits (the largest possible I(class; site))."""
    _, counts = np.unique(np.asarray(a), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def site_predictability(meta: pd.DataFrame, emb: np.ndarray, folds: int = 5, min_per_site: int = 5,
                        seed: int = 0) -> pd.DataFrame:
    """Per class: cross-validated balanced accuracy of site-from-embedding vs chance.  Sites with fewer
    than ``min_per_site`` patches of the class are left out; classes with < 2 such sites are listed
    with NaN (their site cannot be predicted because there is only one)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    for col in ("class", SITE):
        if col not in meta.columns:
            raise MediFastError(f"the embeddings have no {col!r} column; embed an index or manifest that has it")
    rows = []
    classes, sites = meta["class"].astype(str).to_numpy(), meta[SITE].astype(str).to_numpy()
    for c in sorted(set(classes)):
        m = classes == c
        s_counts = pd.Series(sites[m]).value_counts()
        usable = s_counts[s_counts >= min_per_site].index
        sel = m & np.isin(sites, usable)
        row = {"class": c, "n": int(sel.sum()), "sites": len(usable), "chance": np.nan,
               "site_balanced_accuracy": np.nan, "lift": np.nan}
        if len(usable) >= 2:
            k = int(min(folds, s_counts[usable].min()))
            clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
            pred = cross_val_predict(clf, emb[sel], sites[sel], cv=StratifiedKFold(k, shuffle=True, random_state=seed))
            bacc = float(balanced_accuracy_score(sites[sel], pred))
            row.update(chance=1.0 / len(usable), site_balanced_accuracy=bacc, lift=bacc - 1.0 / len(usable))
        rows.append(row)
    return pd.DataFrame(rows, columns=["class", "n", "sites", "chance", "site_balanced_accuracy", "lift"])


def mi_report(train: pd.DataFrame, synthetic: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """I(class; site) of the training set alone and with each synthetic set added (labels only)."""
    def row(name, df):
        return {"training_set": name, "n": len(df), "classes": df["class"].nunique(), "sites": df[SITE].nunique(),
                "mi_bits": mutual_information(df["class"].astype(str), df[SITE].astype(str)),
                "h_class_bits": entropy(df["class"].astype(str))}

    rows = [row("real", train)]
    for name, syn in (synthetic or {}).items():
        both = pd.concat([train[["class", SITE]].astype(str), syn[["class", SITE]].astype(str)], ignore_index=True)
        rows.append(row(f"real+{name}", both))
    out = pd.DataFrame(rows)
    out["mi_fraction"] = out["mi_bits"] / out["h_class_bits"].where(out["h_class_bits"] > 0)
    return out


def shortcut_report(embeddings, synthetic: dict | None = None, folds: int = 5, min_per_site: int = 5,
                    seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``medi-fast shortcut``: (site predictability per class of the real set and of each synthetic set,
    class-site mutual information before and after adding each synthetic set).  ``embeddings`` and the
    ``synthetic`` values are embeddings files or (metadata, embeddings) pairs."""
    from .embeddings import as_embeddings

    if folds < 2:
        raise MediFastError("--folds must be >= 2")
    meta, emb = as_embeddings(embeddings)
    sets = {"real": (meta, emb)} | {n: as_embeddings(x) for n, x in (synthetic or {}).items()}
    pred = pd.concat([site_predictability(m, e, folds, min_per_site, seed).assign(embeddings=n)
                      for n, (m, e) in sets.items()], ignore_index=True)
    mi = mi_report(meta, {n: m for n, (m, _) in sets.items() if n != "real"})
    return pred, mi
