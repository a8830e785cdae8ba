"""Train/holdout split that leaves whole (site, gender, race) subpopulations unseen.

Published protocol (``strategy="published"``), per ``project_id``:
  1. key every record ``<tissue_source_site>_<gender>_<race>``, missing values written "Unknown";
  2. take the unique keys in order of first appearance in the file;
  3. the first floor(0.7 * n_keys) keys are train, the rest holdout;
then, over the whole cohort, every TSS that appears on both sides is moved entirely to holdout.
``strategy="random"`` shuffles each project's keys with ``seed`` first; ``by="tss"`` uses the TSS
alone as the key (whole sites held out).  Every split is checked for leakage (no slide, case or TSS
on both sides) and for every class being on both sides; the summary says both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import MediFastError, check_seed
from .clinical import SPLIT_KEY_MISSING, UNKNOWN, check_columns

STRATEGIES = ("published", "random")
BY = ("combo", "tss")
SPLIT_COLUMNS = ("project_id", "slide_submitter_id", "case_submitter_id", "tissue_source_site", "gender", "race")


@dataclass(frozen=True)
class SplitResult:
    train_df: pd.DataFrame
    holdout_df: pd.DataFrame
    summary: dict

    def text(self) -> str:
        return summary_text(self.summary)


def _key_part(values: pd.Series) -> pd.Series:
    v = values.astype(str)
    return v.where(~v.isin(SPLIT_KEY_MISSING), UNKNOWN)


def split_keys(df: pd.DataFrame, by: str = "combo") -> pd.Series:
    """The subpopulation key of every record: "<tss>_<gender>_<race>" (by="combo") or "<tss>"."""
    tss = _key_part(df["tissue_source_site"])
    if by == "tss":
        return tss
    return tss + "_" + _key_part(df["gender"]) + "_" + _key_part(df["race"])


def split_metadata(df: pd.DataFrame, strategy: str = "published", seed: int = 0, frac: float = 0.7,
                   by: str = "combo") -> SplitResult:
    """Split the records of ``df`` (read with ``dtype=str, keep_default_na=False``); see the module doc.

    Returns the input's rows (all columns, unchanged) on each side, and a summary dict.
    """
    if strategy not in STRATEGIES:
        raise MediFastError(f"unknown split strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if by not in BY:
        raise MediFastError(f"unknown --by {by!r}; choose one of {', '.join(BY)}")
    if strategy == "published" and (frac != 0.7 or by != "combo"):
        raise MediFastError("the published protocol is fixed (frac 0.7, by combo); use --strategy random to change "
                            "--frac or --by")
    check_seed(seed, bits=63)  # numpy refuses negative seeds; 63 bits as generate's --seed
    if not 0.0 < frac < 1.0:
        raise MediFastError(f"--frac {frac} must be strictly between 0 and 1 (the train share of keys)")
    check_columns(df, SPLIT_COLUMNS, "metadata")
    if len(df) == 0:
        raise MediFastError("metadata has no records; nothing to split")

    keys = split_keys(df, by)
    project = df["project_id"].astype(str).str.strip()
    rng = np.random.default_rng(seed)
    train_mask = np.zeros(len(df), bool)
    n_keys = {}
    for p in pd.unique(project):  # projects in order of first appearance (affects only the RNG stream)
        sel = (project == p).to_numpy()
        uniq = list(pd.unique(keys[sel]))  # order of first appearance in the file
        if strategy == "random":
            uniq = [uniq[i] for i in rng.permutation(len(uniq))]
        n_train = math.floor(frac * len(uniq))
        n_keys[p] = (n_train, len(uniq) - n_train)
        train_mask[sel] = keys[sel].isin(set(uniq[:n_train])).to_numpy()

    # A site on both sides would let its stain leak: move all of its records to holdout.
    tss = _key_part(df["tissue_source_site"])
    both = set(tss[train_mask]) & set(tss[~train_mask])
    moved = train_mask & tss.isin(both).to_numpy()
    # holdout = the held-out keys' records, then the moved sites' records (the published file's order)
    hold = pd.concat([df[~train_mask], df[moved]])
    train_mask &= ~moved
    train = df[train_mask]
    if len(train) == 0 or len(hold) == 0:
        side = "train" if len(train) == 0 else "holdout"
        raise MediFastError(f"the split leaves {side} empty ({len(df)} records, "
                            f"{sum(a + b for a, b in n_keys.values())} keys); use more data or another --frac")
    summary = _summary(df, train, hold, strategy, seed, frac, by, n_keys, sorted(both), int(moved.sum()))
    return SplitResult(train, hold, summary)


def _summary(df, train, hold, strategy, seed, frac, by, n_keys, moved_tss, n_moved) -> dict:
    def ids(d, col):
        return set(d[col].astype(str).str.strip())

    tss_t = set(_key_part(train["tissue_source_site"]))
    tss_h = set(_key_part(hold["tissue_source_site"]))
    leak = {"slides": sorted(ids(train, "slide_submitter_id") & ids(hold, "slide_submitter_id")),
            "cases": sorted(ids(train, "case_submitter_id") & ids(hold, "case_submitter_id")),
            "tss": sorted(tss_t & tss_h)}
    classes = list(pd.unique(df["project_id"].astype(str).str.strip()))
    ct, ch = ids(train, "project_id"), ids(hold, "project_id")
    return {
        "strategy": strategy, "seed": seed if strategy == "random" else None, "frac": frac, "by": by,
        "records": {"total": len(df), "train": len(train), "holdout": len(hold)},
        "keys": {"train": sum(a for a, _ in n_keys.values()), "holdout": sum(b for _, b in n_keys.values())},
        "tss_moved_to_holdout": len(moved_tss), "records_moved_to_holdout": n_moved,
        "classes": {"total": len(classes), "train": len(ct), "holdout": len(ch),
                    "missing_from_train": [c for c in classes if c not in ct],
                    "missing_from_holdout": [c for c in classes if c not in ch]},
        "leakage": {k: len(v) for k, v in leak.items()},
        "leakage_examples": {k: v[:5] for k, v in leak.items()},
        "no_leakage": not any(leak.values()),
        "all_classes_both_sides": len(ct) == len(ch) == len(classes),
        "per_class": {p: {"train": int((train["project_id"].str.strip() == p).sum()),
                          "holdout": int((hold["project_id"].str.strip() == p).sum())} for p in classes},
    }


def summary_text(s: dict) -> str:
    r, c = s["records"], s["classes"]
    lines = [
        f"split {s['strategy']} (by {s['by']}, frac {s['frac']}" + (f", seed {s['seed']})" if s["seed"] is not None
                                                                     else ")"),
        f"  records: {r['train']} train, {r['holdout']} holdout (of {r['total']})",
        f"  keys: {s['keys']['train']} train, {s['keys']['holdout']} holdout; {s['tss_moved_to_holdout']} TSS on "
        f"both sides moved to holdout ({s['records_moved_to_holdout']} records)",
        f"  classes: {c['train']} in train, {c['holdout']} in holdout (of {c['total']})",
        "  leakage: " + ("none (no slide, case or TSS on both sides)" if s["no_leakage"] else
                         ", ".join(f"{v} {k}" for k, v in s["leakage"].items()) + " on both sides"),
    ]
    if c["missing_from_train"]:
        lines.append(f"  WARNING: classes missing from train: {', '.join(c['missing_from_train'])}")
    if c["missing_from_holdout"]:
        lines.append(f"  WARNING: classes missing from holdout: {', '.join(c['missing_from_holdout'])}")
    return "\n".join(lines)


def write_split(result: SplitResult, out_dir) -> Path:
    """``out_dir/train.csv``, ``holdout.csv`` (the input rows, all columns, as read) and ``summary.json``."""
    import json

    from ..io import atomic_path, atomic_write_text, ensure_dir

    out_dir = ensure_dir(out_dir)
    for name, d in (("train.csv", result.train_df), ("holdout.csv", result.holdout_df)):
        with atomic_path(out_dir / name) as tmp:
            d.to_csv(tmp, index=False)
    atomic_write_text(out_dir / "summary.json", json.dumps(result.summary, indent=2) + "\n")
    return out_dir
