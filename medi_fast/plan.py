"""Plans: the list of samples to make, one row each: (index, class, metadata..., seed).

Strategies build plans: a single combination; rows of a CSV (one row per combination with a
count); ``match-train`` (the class and site frequencies of a training index: the paper's FID
experiment); ``fill-missing`` (uniform over every class x site combination: the paper's
downstream experiment); ``ood`` (for each class, K sites absent from its training rows, chosen with
a seeded generator: the reference code's OOD sampling).  Seeds come from (base seed, index) alone, so sample ``i`` is the same
image whatever the batch size, the shard or the backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .conditioning import CATEGORICAL, ConditionSpec, column_for
from .errors import MediFastError

COUNT_COLUMNS = ("count", "n")
STRATEGIES = ("match-train", "fill-missing", "ood")

_MASK64 = (1 << 64) - 1
# Base seeds are 0 .. 2**63-1: derive_seeds would fold larger or negative ones onto these (2**64 is 0).
SEED_BITS = 63


def derive_seeds(base_seed: int, indices) -> np.ndarray:
    """splitmix64(base_seed, index) -> 63-bit per-sample seeds (a pure function of both)."""
    from .errors import check_seed

    check_seed(base_seed, bits=SEED_BITS)  # every caller (plan strategies, the Python API) passes here
    idx = np.asarray(indices, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (np.uint64(int(base_seed) & _MASK64) * np.uint64(0x9E3779B97F4A7C15)) ^ (idx + np.uint64(0x632BE59BD9B4E019))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)


@dataclass
class Plan:
    """``rows``: columns index, <attribute names in spec order>, seed."""

    rows: pd.DataFrame
    attributes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def shard(self, i: int, n: int) -> "Plan":
        """Shard ``i`` of ``n``: a contiguous block of rows (deterministic, disjoint, covering)."""
        if not (n >= 1 and 0 <= i < n):
            raise MediFastError(f"--shard {i}/{n} is invalid; use I/N with 0 <= I < N")
        bounds = np.linspace(0, len(self.rows), n + 1).round().astype(int)
        return Plan(self.rows.iloc[bounds[i]:bounds[i + 1]].reset_index(drop=True), self.attributes)

    def combinations(self) -> pd.DataFrame:
        """One row per combination with its count (the CSV form a plan is written in)."""
        cols = list(self.attributes)
        return self.rows.groupby(cols, sort=False, dropna=False).size().reset_index(name="count")

    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(pd.util.hash_pandas_object(self.rows, index=False).values.tobytes()).hexdigest()[:16]


def _canonical(spec: ConditionSpec, name: str, values: Sequence) -> list:
    """Validate values against the vocabulary (clear error up front) and spell them canonically."""
    a = spec[name]
    if a.kind == CATEGORICAL:
        return [None if v is None else a.vocab.names[a.vocab.id(v)] for v in values]
    out = []
    for v in values:
        try:
            out.append(math.nan if v is None or v == "" else float(v))
        except (TypeError, ValueError):
            raise MediFastError(f"{name} must be a number, got {v!r}") from None
    return out


def from_counts(spec: ConditionSpec, combos: pd.DataFrame, seed: int) -> Plan:
    """Expand (combination, count) rows into a plan; combination columns named by attribute."""
    missing = [n for n in spec.names if n not in combos.columns]
    if "class" in missing:
        raise MediFastError("the plan has no 'class' column; give one class per row")
    if combos["class"].map(lambda v: v is None or (isinstance(v, float) and math.isnan(v)) or v == "").any():
        raise MediFastError("a row of the plan has no class; give one class per row (metadata may be empty: "
                            "'unknown')")
    try:
        counts = np.array([int(c) for c in combos["count"]], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise MediFastError("plan counts must be whole numbers below 2**63; give a smaller --n or count") from None
    if (counts < 0).any():
        raise MediFastError("plan counts must be >= 0")
    total = int(counts.astype(object).sum())  # exact: an int64 sum could wrap around
    if total <= 0:
        raise MediFastError("the plan asks for 0 images; give a positive --n or count")
    from .resources import check_rows

    # index, seed and one pointer per attribute, about four copies while the plan is built and written.
    check_rows(total, 4 * 8 * (2 + len(spec.names)))
    rows = {}
    for name in spec.names:
        vals = combos[name].tolist() if name in combos.columns else [None] * len(combos)
        vals = [None if (isinstance(v, float) and math.isnan(v) and spec[name].kind == CATEGORICAL) else v for v in vals]
        rows[name] = np.repeat(np.array(_canonical(spec, name, vals), dtype=object), counts)
    df = pd.DataFrame(rows)
    df.insert(0, "index", np.arange(len(df), dtype=np.int64))
    df["seed"] = derive_seeds(seed, df["index"].to_numpy())
    return Plan(df, tuple(spec.names))


def single(spec: ConditionSpec, values: Mapping[str, object], n: int, seed: int = 0) -> Plan:
    """``n`` samples of one combination, e.g. {'class': 'LUAD', 'tss': '05'}."""
    if int(n) <= 0:
        raise MediFastError(f"--n must be a positive number of images, got {n}")
    if values.get("class") is None:
        raise MediFastError("--class is required (or give --plan)")
    spec.encode(values)  # validates names (e.g. --tss on a class-only checkpoint) and values
    combo = {name: [values.get(name)] for name in spec.names}
    return from_counts(spec, pd.DataFrame({**combo, "count": [int(n)]}), seed)


def read_combinations(path, spec: ConditionSpec) -> pd.DataFrame:
    """A plan CSV: columns class, metadata (by attribute name, e.g. tss, or data column, e.g.
    tissue_source_site), and a count column (count or n)."""
    from .io import require_file

    path = require_file(path, "plan file", "give a plan CSV or a strategy (match-train, fill-missing)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise MediFastError(f"plan file {path} is not a readable CSV ({' '.join(str(e).split())[:160]}); "
                            f"fix it or write one with `medi-fast plan`") from None
    for name in spec.names:
        col = column_for(name)
        if name not in df.columns and col in df.columns:
            df = df.rename(columns={col: name})
    count_col = next((c for c in COUNT_COLUMNS if c in df.columns), None)
    if count_col is None:
        raise MediFastError(f"plan file {path} has no count column; add a 'count' column (images per row)")
    try:
        df["count"] = df[count_col].astype(int)
    except ValueError:
        raise MediFastError(f"plan file {path}: column {count_col!r} must hold whole numbers") from None
    except OverflowError:
        raise MediFastError(f"plan file {path}: a count in column {count_col!r} is too large (at most 2**63-1, "
                            f"and the plan must fit in memory); give smaller counts") from None
    extra = [c for c in df.columns if c not in spec.names and c not in COUNT_COLUMNS]
    if extra:
        raise MediFastError(f"plan file {path} has columns {extra} the model is not conditioned on; "
                            f"it takes {', '.join(spec.names)}")
    for name in spec.names:
        if name in df.columns:
            df[name] = df[name].map(lambda v: None if v == "" else v)
    return df


def from_csv(spec: ConditionSpec, path, seed: int = 0) -> Plan:
    return from_counts(spec, read_combinations(path, spec), seed)


def _read_table(path) -> pd.DataFrame:
    from .data.clinical import read_csv_str
    from .io import require_file

    path = require_file(path, "--sites-from", "give a training index (.parquet) or split CSV")
    if path.suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise MediFastError(f"cannot read {path} as parquet ({type(e).__name__}); give a training index "
                                f"(.parquet) or split CSV") from None
    else:
        df = read_csv_str(path)
    if "class" not in df.columns and "project_id" in df.columns:
        from .vocab import canonical_class

        df = df.assign(**{"class": df["project_id"].map(canonical_class)})
    return df


def _largest_remainder(weights: np.ndarray, n: int) -> np.ndarray:
    quota = weights / weights.sum() * n
    counts = np.floor(quota).astype(int)
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def match_train(spec: ConditionSpec, index_path, n: int | None = None, seed: int = 0) -> Plan:
    """Same class and site frequencies as the training index (the paper's FID protocol).

    Conditioning values come from the index rows (metadata the model does not take is ignored);
    ``n`` defaults to the number of rows, else counts are scaled by largest remainder.
    """
    df = _read_table(index_path)
    cols = {name: column_for(name) for name in spec.names}
    missing = [c for c in cols.values() if c not in df.columns]
    if missing:
        raise MediFastError(f"{index_path} has no column {missing[0]!r}, which the model is conditioned on")
    combos = df[list(cols.values())].rename(columns={v: k for k, v in cols.items()})
    combos = combos.groupby(list(cols), sort=False, dropna=False).size().reset_index(name="count")
    if n is not None:
        if n <= 0:
            raise MediFastError(f"--n must be positive, got {n}")
        from .resources import check_rows

        check_rows(int(n), 4 * 8 * (2 + len(spec.names)))
        combos["count"] = _largest_remainder(combos["count"].to_numpy(float), int(n))
        combos = combos[combos["count"] > 0]
    return from_counts(spec, combos.reset_index(drop=True), seed)


def fill_missing(spec: ConditionSpec, classes: Sequence[str], sites_from, n_per_combo: int, seed: int = 0,
                 attribute: str = "tss") -> Plan:
    """Uniform over every class x site combination of the sites in ``sites_from`` (a split CSV or index)."""
    if attribute not in spec:
        raise MediFastError(f"fill-missing needs a model conditioned on {attribute!r}; this one takes "
                            f"{', '.join(spec.names)}")
    if n_per_combo <= 0:
        raise MediFastError(f"--n-per-combo must be positive, got {n_per_combo}")
    df = _read_table(sites_from)
    col = column_for(attribute)
    if col not in df.columns:
        raise MediFastError(f"{sites_from} has no column {col!r}")
    sites = list(dict.fromkeys(df[col].astype(str)))
    classes = list(classes) or list(spec.class_vocab.names)
    grid = pd.DataFrame([(c, s) for c in classes for s in sites], columns=["class", attribute])
    grid["count"] = int(n_per_combo)
    return from_counts(spec, grid, seed)


def ood(spec: ConditionSpec, classes: Sequence[str], sites_from, k: int, n_per_combo: int, seed: int = 0,
        attribute: str = "tss") -> Plan:
    """For each class, ``k`` sites of ``sites_from`` where that class has no rows (out of distribution).

    Candidates are the table's sites the model knows (not "Unknown"), in order of first appearance;
    ``k`` of them are drawn without replacement by numpy's generator seeded with ``seed``, so the
    same command picks the same combinations.  A class absent from fewer than ``k`` sites gets all
    of them.  The plan's combinations (``Plan.combinations``) list what was chosen.
    """
    if attribute not in spec:
        raise MediFastError(f"the ood plan needs a model conditioned on {attribute!r}; this one takes "
                            f"{', '.join(spec.names)}")
    if k is None or int(k) <= 0:
        raise MediFastError(f"--plan ood needs --k, a positive number of unseen sites per class (got {k})")
    if n_per_combo <= 0:
        raise MediFastError(f"--n-per-combo must be positive, got {n_per_combo}")
    df = _read_table(sites_from)
    col = column_for(attribute)
    for needed in ("class", col):
        if needed not in df.columns:
            raise MediFastError(f"{sites_from} has no column {needed!r}; give the training index or split CSV")
    vocab, class_vocab = spec[attribute].vocab, spec.class_vocab

    def known(vocabulary, value):
        try:
            return vocabulary.names[vocabulary.id(value)]
        except MediFastError:
            return None

    sites = [known(vocab, s) for s in dict.fromkeys(df[col].astype(str))]
    candidates = [s for s in dict.fromkeys(sites) if s is not None and s != "Unknown"]
    seen: dict[str, set] = {}
    for c, s in zip(df["class"].astype(str), df[col].astype(str)):
        seen.setdefault(known(class_vocab, c), set()).add(known(vocab, s))
    rng = np.random.default_rng(int(seed))
    chosen = []
    for c in (list(classes) or list(class_vocab.names)):
        name = class_vocab.names[class_vocab.id(c)]
        absent = [s for s in candidates if s not in seen.get(name, set())]
        picks = rng.choice(len(absent), size=min(int(k), len(absent)), replace=False) if absent else []
        chosen += [(name, absent[i]) for i in sorted(int(i) for i in picks)]
    if not chosen:
        raise MediFastError(f"every class of the plan has rows at every site of {sites_from}; there is no unseen "
                            f"class x site combination to generate")
    grid = pd.DataFrame(chosen, columns=["class", attribute])
    grid["count"] = int(n_per_combo)
    return from_counts(spec, grid, seed)


def unique_classes(spec: ConditionSpec, classes: Sequence[str]) -> list[str]:
    """``--classes`` in the model's spelling; a class named twice (also as ``LUAD`` and ``TCGA-LUAD``)
    is refused rather than given twice its combinations."""
    names = _canonical(spec, "class", list(classes))
    twice = [c for i, c in enumerate(names) if c in names[:i]]
    if twice:
        raise MediFastError(f"--classes names {twice[0]!r} twice; give each class once")
    return names


def build(spec: ConditionSpec, *, plan: str | None = None, values: Mapping[str, object] | None = None,
          n: int | None = None, seed: int = 0, sites_from=None, classes: Sequence[str] = (),
          n_per_combo: int | None = None, k: int | None = None) -> Plan:
    """The plan a ``generate``/``plan`` command asks for.

    ``plan``: None (one combination: ``values`` with at least ``class``), a strategy name from
    :data:`STRATEGIES`, or the path of a plan CSV.
    """
    from .errors import check_seed

    check_seed(seed, bits=SEED_BITS)  # before any file is read (derive_seeds checks it again)
    values = dict(values or {})
    if k is not None and plan != "ood":
        raise MediFastError("--k applies to --plan ood only; drop it or add --plan ood")
    if sites_from is not None and plan not in STRATEGIES:
        raise MediFastError(f"--sites-from applies to --plan {' or '.join(STRATEGIES)} only; drop it or give --plan")
    if n is not None and n <= 0:
        raise MediFastError(f"--n must be a positive number of images, got {n}")
    if plan is None:
        if classes or n_per_combo is not None:
            raise MediFastError("--classes and --n-per-combo apply to --plan strategies only; give one --class and "
                                "--n, or --plan fill-missing")
        if "class" not in values:
            raise MediFastError("give --class (and metadata such as --tss), or --plan")
        return single(spec, values, n if n is not None else 1, seed)
    if values:
        raise MediFastError("--plan already says which combinations to make; drop --class/--tss/--meta")
    if plan in STRATEGIES and not sites_from:
        what = {"match-train": "TRAINING_INDEX (parquet or split CSV)",
                "fill-missing": "SPLIT_CSV_OR_INDEX (the sites to fill)",
                "ood": "TRAINING_INDEX_OR_SPLIT_CSV (where each class was seen)"}[plan]
        raise MediFastError(f"--plan {plan} needs --sites-from {what}")
    if plan == "match-train":
        return match_train(spec, sites_from, n, seed)
    per_combo = n_per_combo if n_per_combo is not None else (n or 1)
    if plan == "fill-missing":
        return fill_missing(spec, unique_classes(spec, classes), sites_from, per_combo, seed)
    if plan == "ood":
        return ood(spec, unique_classes(spec, classes), sites_from, k, per_combo, seed)
    if n is not None:
        raise MediFastError("--n does not apply to a plan CSV (its count column says how many)")
    return from_csv(spec, plan, seed)


def default_out_dir(plan: Plan, strategy: str | None, root: str = "synth") -> Path:
    """A predictable output directory for ``generate`` without ``--out``.

    One combination: ``synth/<class>_<attr>-<value>...`` from the model's canonical names (so
    ``--class TCGA-LUAD`` and ``--class LUAD`` share it); a strategy: ``synth/<strategy>``; a plan
    CSV: ``synth/plan-<file stem>``.
    """
    import re

    def clean(v) -> str:
        return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(v)).strip("-") or "x"

    if strategy is None:
        first = plan.rows.iloc[0]
        parts = [clean(first["class"])]
        parts += [f"{clean(a)}-{clean(first[a])}" for a in plan.attributes[1:]
                  if first[a] is not None and not (isinstance(first[a], float) and math.isnan(first[a]))]
        name = "_".join(parts)
    elif strategy in STRATEGIES:
        name = strategy
    else:
        name = "plan-" + clean(Path(strategy).stem)
    return Path(root) / name
