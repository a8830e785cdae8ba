"""The demo over several seeds (`medi-fast demo --seeds 0,1,2`): each arm's result as mean and spread over
the seeds, and whether the arms are separated by more than that spread.

A seed changes everything random in a run: the rendered cohort, both models' training, their samples and
the probe's draws.  The spread over seeds is therefore the honest error bar of the demo's claim; the SEM
inside one run (over the probe's repeated draws) only covers the last of those.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..io import atomic_write_text
from .arms import GAPS, HEADLINE


def arm_names(records: list[dict]) -> list[str]:
    """The arms the runs compared, in the registry's order (as their results.json lists them)."""
    return list(records[0]["probe"])


def gaps(records: list[dict]) -> list:
    """The comparisons (arms.GAPS) whose two arms the runs compared: runs recorded before an arm existed
    answer the others."""
    names = set(arm_names(records))
    return [g for g in GAPS if g.hi in names and g.lo in names]


def arm_cost(records: list[dict]) -> dict[str, float]:
    """Each arm's mean seconds over the runs to make its training data (arms.cost), for the arms whose runs
    recorded it."""
    return {a: float(np.mean([r["arm_seconds"][a] for r in records]))
            for a in arm_names(records) if all(a in r.get("arm_seconds", {}) for r in records)}


def closer_column() -> str:
    """per_seed's column: in how many trained cells the headline arm's patches were the closer ones."""
    return f"cells {HEADLINE.hi} closer"


def per_seed(records: list[dict]) -> pd.DataFrame:
    """One row per seed: each arm's TSS-averaged balanced accuracy, the gaps (arms.GAPS), the per-cell
    distances of the headline's two arms, the headline arm's stain fidelity and the run time."""
    rows = []
    for r in records:
        p = r["probe"]
        rows.append({"seed": r["seed"], **{a: p[a]["tss_bacc"] for a in arm_names(records)},
                     **{g.column: p[g.hi]["tss_bacc"] - p[g.lo]["tss_bacc"] for g in gaps(records)},
                     **{f"cell distance {a}": r["fid_cell_mean"][a] for a in (HEADLINE.hi, HEADLINE.lo)},
                     closer_column(): f"{r['cells_medi_closer']}/{r['cells']}",
                     "stain slope": r["site_slope"], "stain correlation": r["site_correlation"],
                     f"colour spread {HEADLINE.hi}": r.get("colour_spread_generated", np.nan),
                     "colour spread real": r.get("colour_spread_real", np.nan),
                     "minutes": r["seconds"] / 60})
    return pd.DataFrame(rows)


def aggregate(records: list[dict]) -> dict:
    """Mean, SD (ddof 1) and range over seeds of every numeric column of :func:`per_seed`, and the verdicts:
    two arms are *separated* when their mean ± SD intervals over seeds do not overlap."""
    t = per_seed(records)
    num = t.drop(columns=["seed", closer_column()])
    stats = {c: {"mean": float(num[c].mean()), "sd": float(num[c].std(ddof=1)) if len(num) > 1 else 0.0,
                 "min": float(num[c].min()), "max": float(num[c].max())} for c in num.columns}

    def separated(hi, lo):
        return stats[hi]["mean"] - stats[hi]["sd"] > stats[lo]["mean"] + stats[lo]["sd"]

    ranked = sorted(arm_names(records), key=lambda a: -stats[a]["mean"])
    return {"seeds": [int(s) for s in t["seed"]], "n": len(t), "arms": arm_names(records), "stats": stats,
            **{g.key: separated(g.hi, g.lo) for g in gaps(records)},
            **{f"{g.key}_every_seed": bool((t[g.column] > 0).all()) for g in gaps(records)},
            "arm_seconds": arm_cost(records),
            # the arms from best to worst mean, and whether each is separated from the next
            "order": ranked, "order_separated": [separated(a, b) for a, b in zip(ranked, ranked[1:])]}


def per_site_rows(records: list[dict]) -> list[dict]:
    """Per arm, its balanced accuracy at each unseen test site (mean over seeds, formatted), then each gap's
    range over seeds per site; [] for runs recorded before the per-site accuracies were kept."""
    if not records or not all("probe_sites" in r for r in records):
        return []
    arms = arm_names(records)
    sites = list(records[0]["probe_sites"][arms[0]])
    at = lambda r, a, s: r["probe_sites"][a][s]  # noqa: E731
    rows = [{"": a, **{s: f"{sum(at(r, a, s) for r in records) / len(records):.3f}" for s in sites}} for a in arms]
    for hi, lo in ((g.hi, g.lo) for g in reversed(gaps(records))):  # each gap above the one it builds on
        rows.append({"": f"{hi} - {lo} (range over seeds)",
                     **{s: f"{min(at(r, hi, s) - at(r, lo, s) for r in records):+.2f} to "
                           f"{max(at(r, hi, s) - at(r, lo, s) for r in records):+.2f}" for s in sites}})
    return rows


def order_text(agg: dict) -> str:
    """The arms from best to worst, '>' where the next is separated by more than the spread, '≈' where not."""
    out = agg["order"][0]
    for arm, sep in zip(agg["order"][1:], agg["order_separated"]):
        out += (" > " if sep else " ≈ ") + arm
    return out


def verdict(agg: dict) -> str:
    s = agg["stats"]
    hi, lo = HEADLINE.hi, HEADLINE.lo
    gap = s[HEADLINE.column]
    if agg[HEADLINE.key]:
        head = f"{hi} beat {lo} by more than the spread over seeds"
    elif agg[f"{HEADLINE.key}_every_seed"]:
        head = f"{hi} beat {lo} in every seed, but by less than the spread over seeds"
    else:
        head = f"{hi} did not beat {lo} in every seed"
    sep = all(agg["order_separated"])
    cost = agg.get("arm_seconds", {})
    arms = ", ".join(f"{a} {s[a]['mean']:.3f} ± {s[a]['sd']:.3f}" + (f" ({cost[a]:.0f} s)" if a in cost else "")
                     for a in agg["arms"])
    return (f"{head}: TSS-averaged balanced accuracy (mean ± SD over {agg['n']} seeds"
            + ("; in brackets the mean seconds to make the arm's training data" if cost else "")
            + f") {arms}; {HEADLINE.column} "
            f"{gap['mean']:+.3f} ± {gap['sd']:.3f} (range {gap['min']:+.3f} to {gap['max']:+.3f}). Order: "
            f"{order_text(agg)} ({'every arm separated from the next' if sep else '≈: not separated'} by more than "
            "the spread over seeds).")


def write_seeds_report(out: Path, cfg, records: list[dict]) -> Path:
    """OUT/seeds.json, OUT/report.md and OUT/report.html for a run over seeds; returns report.html."""
    out = Path(out)
    agg = aggregate(records)
    t = per_seed(records)
    s = agg["stats"]
    summary = pd.DataFrame([{"seed": f"mean ± SD ({agg['n']} seeds)",
                             **{c: f"{s[c]['mean']:.3f} ± {s[c]['sd']:.3f}" for c in s if c != "minutes"},
                             closer_column(): "", "minutes": f"{s['minutes']['mean']:.1f}"}])
    shown = pd.concat([t.astype(object).map(lambda v: f"{v:.3f}" if isinstance(v, float) else v), summary],
                      ignore_index=True)
    shown["minutes"] = [f"{float(v):.1f}" for v in shown["minutes"]]
    atomic_write_text(out / "seeds.json", json.dumps({"setting": cfg.setting, "quick": cfg.quick,
                                                      "records": records, **agg}, indent=2) + "\n")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    quick = ("This is a --quick smoke run: its models are undertrained and its numbers are not the demo's "
             "result.") if cfg.quick else ""
    text = verdict(agg)
    ran = (f"medi-fast {__version__}, {when}: the demo (setting `{cfg.setting}`) once per seed "
           f"{', '.join(map(str, agg['seeds']))}; each seed renders its own cohort, trains both models and "
           "draws its own probe runs. Each run's full report is in its seed-S folder.")
    hi, lo = HEADLINE.hi, HEADLINE.lo
    cells = (f"FID-style distance per trained class x site cell (mean over cells): {hi} "
             f"{s[f'cell distance {hi}']['mean']:.1f} ± {s[f'cell distance {hi}']['sd']:.1f}, {lo} "
             f"{s[f'cell distance {lo}']['mean']:.1f} ± {s[f'cell distance {lo}']['sd']:.1f}; {hi}'s stain slope "
             f"{s['stain slope']['mean']:.2f} ± {s['stain slope']['sd']:.2f} (1 = the full difference between sites).")
    sites = pd.DataFrame(per_site_rows(records))
    sites_head = ("## Per unseen test site (balanced accuracy, mean over seeds; the gaps' range over seeds)\n"
                  if len(sites) else "")
    md = "\n".join(["# medi-fast demo report: several seeds\n", *([f"> **{quick}**\n"] if quick else []),
                    f"{ran}\n", f"**{text}**\n", f"{cells}\n",
                    "## Per seed (TSS-averaged balanced accuracy of the linear probe on unseen sites)\n",
                    shown.to_markdown(index=False), "",
                    *([sites_head, sites.to_markdown(index=False), ""] if len(sites) else []),
                    *[f"- [seed {r['seed']}](seed-{r['seed']}/report.html)" for r in records], ""])
    atomic_write_text(out / "report.md", md)
    import html

    page = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>medi-fast demo report: seeds"
            "</title><style>body{font-family:system-ui,sans-serif;max-width:1320px;margin:1.5em auto;padding:0 1.5em}"
            "table{border-collapse:collapse}th,td{padding:3px 10px;border-bottom:1px solid #e5e5e5;text-align:right}"
            ".warn{background:#fff4e5;border:2px solid #e69500;padding:.6em;font-weight:bold}</style></head><body>"
            "<h1>medi-fast demo report: several seeds</h1>"
            + (f"<p class=\"warn\">{html.escape(quick)}</p>" if quick else "")
            + f"<p>{html.escape(ran)}</p><p><b>{html.escape(text)}</b></p><p>{html.escape(cells)}</p>"
            + shown.to_html(index=False, border=0)
            + (f"<h2>{html.escape(sites_head.lstrip('# ').strip())}</h2>" + sites.to_html(index=False, border=0)
               if len(sites) else "")
            + "<ul>" + "".join(f"<li><a href=\"seed-{r['seed']}/report.html\">seed {r['seed']}</a></li>"
                               for r in records) + "</ul></body></html>\n")
    atomic_write_text(out / "report.html", page)
    return out / "report.html"
