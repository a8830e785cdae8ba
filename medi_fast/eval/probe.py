"""The linear-probe protocol of the MeDi paper's Table 1, on precomputed embeddings.

One *run*: choose training sites (with ``one_site_per_class``, one site per class: the published
setting, where class and site coincide in training), draw ``k`` real patches per class from them,
optionally add ``ratio * k`` synthetic patches per class, fit ``LogisticRegression(class_weight=
"balanced")`` and score the real test set.  Every arm (no-synthetic, CLS, MeDi, ...) of a run uses the
SAME real draw, so arms are compared pairwise.  Runs cover every combination of training sites (or
``max_runs`` of them, sampled with ``seed``); results are mean +- standard error over runs.

Metrics: balanced accuracy (mean recall over classes); TSS-averaged balanced accuracy (for each test
site, the mean recall over the classes present at that site; then the mean over sites: a classifier
that reads the site instead of the tissue scores low here); Matthews correlation coefficient.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import MediFastError, suggest

TASKS = {"nsclc": ("LUAD", "LUSC"), "rcc": ("KIRC", "KIRP", "KICH"), "uterine": ("UCEC", "UCS")}
SITE = "tissue_source_site"
METRICS = ("balanced_accuracy", "tss_balanced_accuracy", "mcc")
NO_SYNTHETIC = "no-synthetic"
# run_probe's per-test-site balanced accuracy columns: "bacc@" + site code.
SITE_PREFIX = "bacc@"
# A synthetic set's column naming, for patches derived from real training patches (an augmented copy), the
# row of the real training set each came from: a run adds only those derived from the patches it drew.
SOURCE = "derived_from_train_row"


@dataclass(frozen=True)
class ProbeConfig:
    k: int = 20  # real patches per class: the paper's low-data setting
    ratio: float = 1.0  # synthetic:real per class; the paper's 1:1
    one_site_per_class: bool = False  # True is the published setting (each class from one site)
    max_runs: int | None = 50  # site combinations grow as a product over classes; sample this many
    runs_all_sites: int = 10  # without one_site_per_class, the runs are this many redraws of k patches
    seed: int = 0  # drives the site-combination sample and every patch draw
    C: float = 1.0  # sklearn's default inverse L2 strength; the paper does not tune it
    max_iter: int = 2000  # lbfgs converges well within this on 1024-d UNI embeddings

    def __post_init__(self):
        from ..errors import check_seed

        if int(self.k) < 1:
            raise MediFastError(f"--k must be >= 1 real patch per class, got {self.k}")
        if not (math.isfinite(self.ratio) and self.ratio >= 0):
            raise MediFastError(f"--ratio must be a finite number >= 0 (synthetic:real per class), got {self.ratio}")
        if self.max_runs is not None and int(self.max_runs) < 1:
            raise MediFastError(f"--max-runs must be >= 1 (or 0 on the command line: all), got {self.max_runs}")
        if not (math.isfinite(self.C) and self.C > 0):
            raise MediFastError(f"--C must be a finite number > 0 (the inverse regularisation strength), got {self.C}")
        check_seed(self.seed, bits=63)  # numpy refuses negative seeds; 63 bits as generate's --seed


def resolve_task(task: str) -> list[str]:
    """``nsclc|rcc|uterine`` or a comma-separated list of classes (at least two)."""
    from ..vocab import canonical_class, parse_list

    if task.lower() in TASKS:
        return list(TASKS[task.lower()])
    classes = []
    for c in parse_list(task):
        try:
            classes.append(canonical_class(c))
        except Exception:
            classes.append(c)
    twice = [c for i, c in enumerate(classes) if c in classes[:i]]
    if twice:
        raise MediFastError(f"--task names {twice[0]!r} twice; give each class once")
    if len(classes) < 2:
        raise MediFastError(f"--task {task!r} names fewer than two classes{suggest(task, TASKS)}; use nsclc, rcc, "
                            f"uterine or CLASS1,CLASS2,...")
    return classes


def site_balanced_accuracy(y_true, y_pred, sites) -> dict[str, float]:
    """Per site: the mean recall over the classes present at that site."""
    y_true, y_pred, sites = map(np.asarray, (y_true, y_pred, sites))
    out = {}
    for s in np.unique(sites):
        m = sites == s
        out[str(s)] = float(np.mean([np.mean(y_pred[m & (y_true == c)] == c) for c in np.unique(y_true[m])]))
    return out


def tss_balanced_accuracy(y_true, y_pred, sites) -> float:
    """Mean over sites of (mean recall over the classes present at that site)."""
    return float(np.mean(list(site_balanced_accuracy(y_true, y_pred, sites).values())))


def score(y_true, y_pred, sites) -> dict[str, float]:
    """METRICS, then each test site's balanced accuracy as ``SITE_PREFIX + site`` (their mean is the
    TSS-averaged one)."""
    from sklearn.metrics import balanced_accuracy_score, matthews_corrcoef

    by_site = site_balanced_accuracy(y_true, y_pred, sites)
    return {"balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "tss_balanced_accuracy": float(np.mean(list(by_site.values()))),
            "mcc": float(matthews_corrcoef(y_true, y_pred)),
            **{SITE_PREFIX + s: v for s, v in by_site.items()}}


def per_site(runs: pd.DataFrame) -> pd.DataFrame:
    """Per arm (rows, first-seen order) and test site (columns): the balanced accuracy, mean over runs."""
    cols = [c for c in runs.columns if c.startswith(SITE_PREFIX)]
    t = runs.groupby("arm", sort=False)[cols].mean()
    t.columns = [c[len(SITE_PREFIX):] for c in cols]
    return t


def site_combinations(meta: pd.DataFrame, classes, cfg: ProbeConfig) -> list[dict[str, tuple[str, ...]]]:
    """The training sites of each run: {class: sites}."""
    rng = np.random.default_rng(cfg.seed)
    counts = meta.groupby(["class", SITE]).size()
    options = {}
    for c in classes:
        if c not in counts.index.get_level_values(0):
            raise MediFastError(f"no real training patches of class {c}; check --real-train or --task")
        sites = counts.loc[c]
        ok = sorted(sites[sites >= cfg.k].index) if cfg.one_site_per_class else sorted(sites.index)
        if not ok:
            raise MediFastError(f"no training site has {cfg.k} patches of {c} (most: {int(sites.max())}); lower --k")
        options[c] = ok
    if not cfg.one_site_per_class:
        n = cfg.runs_all_sites if cfg.max_runs is None else min(cfg.max_runs, cfg.runs_all_sites)
        return [{c: tuple(options[c]) for c in classes} for _ in range(n)]
    total = math.prod(len(options[c]) for c in classes)
    if cfg.max_runs is None or total <= cfg.max_runs:
        combos = list(itertools.product(*(options[c] for c in classes)))
    else:  # sample distinct combinations without listing a huge product
        seen: set = set()
        while len(seen) < cfg.max_runs:
            seen.add(tuple(options[c][rng.integers(len(options[c]))] for c in classes))
        combos = sorted(seen)
    return [{c: (s,) for c, s in zip(classes, combo)} for combo in combos]


def _draw(meta: pd.DataFrame, classes, n: int, rng, sites=None, what: str = "real") -> np.ndarray:
    """Row positions: ``n`` per class (from ``sites[class]`` when given), without replacement."""
    picks = []
    for c in classes:
        m = meta["class"].to_numpy() == c
        if sites is not None:
            m &= meta[SITE].isin(sites[c]).to_numpy()
        pos = np.flatnonzero(m)
        if len(pos) < n:
            raise MediFastError(f"only {len(pos)} {what} patches of {c} for a draw of {n}; lower --k or --ratio, "
                                f"or generate more")
        picks.append(rng.choice(pos, size=n, replace=False))
    return np.concatenate(picks)


def _fit_predict(x, y, x_test, cfg: ProbeConfig) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(class_weight="balanced", C=cfg.C, max_iter=cfg.max_iter)
    return clf.fit(x, y).predict(x_test)


def _real_draws(meta: pd.DataFrame, classes, cfg: ProbeConfig):
    """Each run's (run, {class: sites}, row positions of its k real patches per class) over ``meta``
    (the real training pool, of ``classes`` only).  Every arm of a run trains on this draw."""
    for run, sites in enumerate(site_combinations(meta, classes, cfg)):
        yield run, sites, _draw(meta, classes, cfg.k, np.random.default_rng([cfg.seed, run]), sites)


def drawn_rows(train_meta: pd.DataFrame, classes, cfg: ProbeConfig = ProbeConfig()) -> np.ndarray:
    """The rows of ``train_meta`` (positions, sorted) that some run of :func:`run_probe` with ``cfg`` draws
    as its real patches: the only ones a synthetic set derived from real patches (SOURCE) needs to cover."""
    keep = train_meta["class"].isin(classes).to_numpy()
    rows = np.flatnonzero(keep)
    meta = train_meta[keep].reset_index(drop=True)
    return np.unique(np.concatenate([rows[real] for _, _, real in _real_draws(meta, classes, cfg)]))


def run_probe(train, test, synthetic: dict, classes, cfg: ProbeConfig = ProbeConfig()) -> pd.DataFrame:
    """``train``/``test``/each synthetic value: (metadata DataFrame with class [+ site], embeddings (N, D)).
    A synthetic set with a SOURCE column is drawn from the patches derived from the run's real draw only.
    Returns one row per (run, arm) with the run's sites and the three metrics."""
    (tr_meta, tr_x), (te_meta, te_x) = train, test
    for name, (meta, _) in [("real-train", train), ("real-test", test)]:
        for col in ("class", SITE):
            if col not in meta.columns:
                raise MediFastError(f"{name} embeddings have no {col!r} column; embed an index or manifest that has it")
    width = tr_x.shape[1:]
    for name, x in [("real-test", te_x)] + [(f"synthetic ({n})", x) for n, (_, x) in synthetic.items()]:
        if x.shape[1:] != width or len(width) != 1:
            raise MediFastError(f"{name} embeddings have shape {tuple(x.shape[1:])} per patch but real-train ones "
                                f"{tuple(width)}; embed every set with `medi-fast embed` and the same --extractor")
    keep = te_meta["class"].isin(classes).to_numpy()
    if not keep.any():
        raise MediFastError(f"the real test set has none of the classes {', '.join(classes)}; check --task")
    te_meta, te_x = te_meta[keep].reset_index(drop=True), te_x[keep]
    tr_keep = tr_meta["class"].isin(classes).to_numpy()
    tr_rows = np.flatnonzero(tr_keep)  # each kept row's position in `train`, which SOURCE refers to
    tr_meta, tr_x = tr_meta[tr_keep].reset_index(drop=True), tr_x[tr_keep]
    y_test, test_sites = te_meta["class"].to_numpy(), te_meta[SITE].to_numpy()
    n_syn = int(round(cfg.ratio * cfg.k))
    rows = []
    for run, sites, real in _real_draws(tr_meta, classes, cfg):
        x_real, y_real = tr_x[real], tr_meta["class"].to_numpy()[real]
        arms = {NO_SYNTHETIC: (x_real, y_real)}
        for name, (s_meta, s_x) in synthetic.items():
            if n_syn == 0:
                arms[name] = (x_real, y_real)
                continue
            cand = (np.flatnonzero(s_meta[SOURCE].isin(tr_rows[real]).to_numpy()) if SOURCE in s_meta.columns
                    else np.arange(len(s_meta)))
            pos = cand[_draw(s_meta.iloc[cand], classes, n_syn, np.random.default_rng([cfg.seed, run, 1]),
                             what=f"synthetic ({name})")]
            arms[name] = (np.concatenate([x_real, s_x[pos]]), np.concatenate([y_real, s_meta["class"].to_numpy()[pos]]))
        label = ";".join(f"{c}@{'+'.join(sites[c])}" for c in classes) if cfg.one_site_per_class else "all"
        for arm, (x, y) in arms.items():
            rows.append({"run": run, "sites": label, "arm": arm, **score(y_test, _fit_predict(x, y, te_x, cfg), test_sites)})
    return pd.DataFrame(rows)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per arm: mean and standard error of the mean of each metric over runs (SEM = sd / sqrt(n))."""
    out = []
    for arm in runs["arm"].unique():  # keep first-seen order: no-synthetic, then the synthetic sets
        r = runs[runs["arm"] == arm]
        row = {"arm": arm, "runs": len(r)}
        for m in METRICS:
            row[f"{m}_mean"] = float(r[m].mean())
            row[f"{m}_sem"] = float(r[m].std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0
        out.append(row)
    return pd.DataFrame(out)


def to_markdown(summary: pd.DataFrame, title: str = "") -> str:
    """Table-1-style markdown: one row per arm, ``mean ± sem`` per metric."""
    heads = {"balanced_accuracy": "Balanced acc.", "tss_balanced_accuracy": "TSS-avg. balanced acc.", "mcc": "MCC"}
    lines = ([f"**{title}**", ""] if title else []) + [
        "| Training data | runs | " + " | ".join(heads[m] for m in METRICS) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in METRICS) + " |"]
    for _, r in summary.iterrows():
        cells = [f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_sem']:.3f}" for m in METRICS]
        lines.append(f"| {r['arm']} | {int(r['runs'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def probe_table(real_train, real_test, synthetic: dict, task: str,
                cfg: ProbeConfig = ProbeConfig()) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The paper's Table 1 from embeddings of any encoder (``medi-fast probe``): real training pool, real
    test set and ``{name: synthetic}`` (files or (metadata, embeddings) pairs), ``task`` as
    :func:`resolve_task` takes it.  Returns (summary, every run, Table-1-style markdown)."""
    from .embeddings import as_embeddings

    classes = resolve_task(task)
    syn = {name: as_embeddings(x) for name, x in synthetic.items()}
    runs = run_probe(as_embeddings(real_train), as_embeddings(real_test), syn, classes, cfg)
    summary = summarise(runs)
    title = (f"{task}: {', '.join(classes)}; k={cfg.k} real/class, synthetic:real {cfg.ratio:g}:1, "
             f"{'one site per class' if cfg.one_site_per_class else 'all training sites'}")
    return summary, runs, to_markdown(summary, title)
