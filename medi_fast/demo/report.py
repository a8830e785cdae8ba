"""The demo's report: report.md (terminals, diffs) and report.html (a self-contained page: HTML tables,
pictures embedded as data URIs, foldable sections), both from the same tables and figures."""
from __future__ import annotations

import base64
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..io import atomic_write_text
from . import figures


# Two arms whose balanced accuracies at a test site differ by no more than this are level there.
LEVEL = 0.005


def verdict(probe: pd.DataFrame) -> tuple[bool, str]:
    """Did MeDi beat CLS on the TSS-averaged balanced accuracy, beyond the standard errors?"""
    r = probe.set_index("arm")
    m, c, n = (r.loc[a, "tss_balanced_accuracy_mean"] for a in ("MeDi", "CLS", "no-synthetic"))
    se = float(np.hypot(r.loc["MeDi", "tss_balanced_accuracy_sem"], r.loc["CLS", "tss_balanced_accuracy_sem"]))
    beat = bool(m - c > se)
    text = (f"MeDi {'beat' if beat else 'did not beat'} CLS in this run: TSS-averaged balanced accuracy "
            f"{m:.3f} (MeDi) vs {c:.3f} (CLS) vs {n:.3f} (no synthetic data); difference {m - c:+.3f}, "
            f"combined standard error {se:.3f}.")
    return beat, text


def probe_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The probe summary as shown: one row per arm, ``mean ± SEM`` per metric (as eval.probe.to_markdown)."""
    from ..eval.probe import METRICS

    heads = {"balanced_accuracy": "Balanced acc.", "tss_balanced_accuracy": "TSS-avg. balanced acc.", "mcc": "MCC"}
    return pd.DataFrame([{"Training data": r["arm"], "runs": int(r["runs"]),
                          **{heads[m]: f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_sem']:.3f}" for m in METRICS}}
                         for _, r in summary.iterrows()])


def student_line(cfg, results: dict, cells: pd.DataFrame) -> list[str]:
    """The headline's line for the distilled student of `demo --distill` (none without it)."""
    if not getattr(cfg, "distill", False) or "site_student" not in results:
        return []
    name = cfg.student_arm
    p = results["probe"].set_index("arm")
    site = results["site_student"]
    return [f"Distilled student ({name}: the MeDi model distilled from DDIM-{cfg.distill_teacher_steps} to "
            f"{cfg.distill_steps} DDIM steps, {cfg.distill_iters} iterations per stage; "
            f"{cfg.sample_steps / cfg.distill_steps:.1f}x fewer UNet calls than the demo's DDIM-{cfg.sample_steps}): "
            f"probe {p.loc[name, 'tss_balanced_accuracy_mean']:.3f} ± {p.loc[name, 'tss_balanced_accuracy_sem']:.3f} "
            f"(MeDi {p.loc['MeDi', 'tss_balanced_accuracy_mean']:.3f}); FID-style distance per cell "
            f"{cells[name].mean():.1f} (MeDi {cells['MeDi'].mean():.1f}); stain slope {site.slope:.2f} "
            f"(MeDi {results['site'].slope:.2f}). benchmarks/distill_quality.py measures longer distillations."]


def site_table(fidelity) -> pd.DataFrame:
    t = fidelity.table
    out = pd.DataFrame({"class": t["class"], "site": t["site"], "real patches": t["real_patches"]})
    for k, name in (("real", "real"), ("gen", "generated")):
        out[f"{name} RGB"] = [" / ".join("-" if np.isnan(v) else f"{v:.1f}" for v in row)
                              for row in t[[f"{k}_{c}" for c in figures.CHANNELS]].to_numpy()]
    return out


def _sections(cfg, index, results, timing, total, source=None) -> dict:
    """Every piece of text and every table, shared by the Markdown and the HTML report."""
    beat, text = verdict(results["probe"])
    fid = results["fid"].pivot(index="class", columns="model", values="distance")
    fid.loc["mean"] = fid.mean()
    site = results["site"]
    p = results["probe"].set_index("arm")
    mi = results["mi"][["training_set", "n", "mi_bits", "mi_fraction"]]
    bits = mi.set_index("training_set")["mi_bits"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    spec = cfg.spec
    sites, unseen = spec.sites, spec.unseen
    full_bits = round(float(np.log2(len(spec.classes))), 2)
    cells = results["fid_cells"].pivot_table(index=["class", "site"], columns="model", values="distance")
    closer = int((cells["MeDi"] < cells["CLS"]).sum())
    cell_table = cells.reset_index()
    cell_table.loc[len(cell_table)] = ["mean", "", *cells.mean().to_numpy()]
    by_site = results["probe_sites"]

    def compare(a, b):  # "ahead at N, behind at M, level at L": level = within LEVEL of each other
        d = by_site.loc[a] - by_site.loc[b]
        return (f"{a} ahead of {b} at {int((d > LEVEL).sum())}, behind at {int((d < -LEVEL).sum())}, level at "
                f"{int((d.abs() <= LEVEL).sum())}")
    return {
        "quick": (f"This is a --quick smoke run: its models are undertrained ({cfg.train_steps} training steps, "
                  "smaller data) and its numbers are not the demo's result. Run `medi-fast demo` without --quick "
                  "for that.") if cfg.quick else "",
        "ran": (f"medi-fast {__version__}, {when}: a synthetic H&E cohort (setting `{spec.name}`: classes "
                f"{', '.join(spec.classes)}; "
                f"{len(index)} real patches), `{cfg.preset}` UNets (class-only CLS and class + site MeDi) trained "
                f"{cfg.train_steps} steps at {cfg.resolution} px on the CPU ({cfg.prediction_type} prediction), "
                f"exported to ONNX, sampled with ONNX Runtime (DDIM-{cfg.sample_steps}), and a linear probe trained "
                f"with and without their samples. Seed {cfg.seed}; "
                + (f"took {total / 60:.1f} min." if source is None else
                   f"these are the models and patches of the run in {source}, evaluated again here "
                   f"({total / 60:.1f} min).")),
        "beat": beat, "verdict": text, "full_bits": full_bits,
        "headline": [
            "Linear probe on unseen sites, TSS-averaged balanced accuracy: "
            + ", ".join(f"{a} {p.loc[a, 'tss_balanced_accuracy_mean']:.3f} ± {p.loc[a, 'tss_balanced_accuracy_sem']:.3f}"
                        for a in p.index) + f" ({int(p['runs'].iloc[0])} runs each).",
            f"Class-site mutual information of the probe's real pool: {bits['real']:.2f} bits, "
            f"{bits['real+MeDi']:.2f} bits with the MeDi samples added ({full_bits:g} bits = log2 of {len(spec.classes)} "
            "classes: the site gives the class away).",
            f"Site stain: MeDi's per-site colour follows the real one with correlation {site.correlation:.2f} and "
            f"slope {site.slope:.2f} (1 = the full difference between sites).",
            f"FID-style distance to the real patches of each trained class x site cell (lower is closer): MeDi "
            f"{cells['MeDi'].mean():.1f}, CLS {cells['CLS'].mean():.1f} on average; MeDi closer in {closer} of "
            f"{len(cells)} cells. Per class, with every site pooled: "
            + ", ".join(f"{m} {fid.loc['mean', m]:.1f}" for m in fid.columns) + "."] + student_line(cfg, results, cells),
        "features": ("Features are the `colour-texture` statistics (48-d, no weights; not UNI, not Inception): the "
                     "distance below is FID-style, not FID, and the probe reads stain and texture statistics."),
        "setup": (f"Setting `{spec.name}`: {spec.summary}. Probe: k = {cfg.probe_k} real patches per class from "
                  f"those sites (the stain gives the class away), tested on unseen sites {', '.join(spec.test_sites)}; "
                  f"synthetic:real {cfg.probe_ratio:g}:1 (MeDi: every class x site of {', '.join(sites)}, including the "
                  f"{len(unseen)} combinations never seen in training, "
                  f"{', '.join(f'{c}@{s}' for c, s in unseen[:4])}{', ...' if len(unseen) > 4 else ''}; "
                  "CLS: class only, so its stains follow the cohort's class-site confound)."),
        "cells_text": ("A CLS patch has no site: each trained cell is compared with a disjoint random draw of its class's "
                       "CLS patches, as many as MeDi made for the cell. A class's pooled distance favours a model that "
                       "reproduces the cohort's class-site mixture; MeDi also renders the combinations absent from "
                       "training, which have no real counterpart in the pool."),
        "colour_text": (f"MeDi's patches are closer to their cell than CLS's in {closer} of {len(cells)} trained cells. "
                        f"The trained cells' mean colours lie {site.colour_spread_generated:.1f} grey levels from their "
                        f"common mean in the MeDi patches, {site.colour_spread_real:.1f} in the real ones"
                        + (f": washed out. Models trained for {cfg.train_steps} steps have learned the texture of each "
                           "class but not yet the full colour of each class and site (benchmarks/site_fidelity.py "
                           "--noise-levels shows where: the model's estimate of the clean image at high noise)."
                           if site.colour_spread_generated < 0.5 * site.colour_spread_real else ".")),
        "fid_cells": cell_table,
        "probe": probe_table(results["probe"]),
        "probe_sites": by_site.reset_index().rename(columns={"arm": "Training data"}),
        "probe_sites_text": (f"Balanced accuracy per unseen test site (mean over the probe runs; their mean is the "
                             f"TSS-averaged accuracy). Of {by_site.shape[1]} sites: {compare('MeDi', 'CLS')}; "
                             f"{compare('CLS', 'no-synthetic')} (level: within {LEVEL:g}). Each site is a stain "
                             "shift of its own, so the sites disagree; their mean is the result."),
        "fid": fid,
        "mi": mi,
        "site": site_table(site),
        "site_text": (f"Per-site stain effect (a class x site's mean colour minus its class's mean, per channel) of "
                      f"the MeDi samples against the real patches, over {len(site.effects)} trained combinations: "
                      f"correlation {site.correlation:.3f}, slope {site.slope:.3f}; mean |effect| generated "
                      f"{site.mean_abs_effect_generated:.2f}, real {site.mean_abs_effect_real:.2f} grey levels. "
                      "The same measure as benchmarks/site_fidelity.py."),
        "timing": timing,
        "config": pd.DataFrame({"setting": list(vars(cfg)), "value": [str(v) for v in vars(cfg).values()]}),
        "probe_summary": results["probe"],
    }


def _markdown(s: dict, rel: dict) -> str:
    from ..eval.probe import to_markdown

    md = ["# medi-fast demo report\n"]
    if s["quick"]:
        md.append(f"> **{s['quick']}**\n")
    md += [f"{s['ran']}\n", f"**{s['verdict']}**\n", "\n".join(f"- {h}" for h in s["headline"]) + "\n",
           f"{s['features']}\n\n{s['setup']}\n",
           "## Linear probe (Table-1 style, mean ± SEM over runs)\n\n" + to_markdown(s["probe_summary"])
           + f"\n![probe]({rel['probe']})\n\n{s['probe_sites_text']}\n\n"
           + s["probe_sites"].to_markdown(index=False, floatfmt=".3f") + "\n",
           f"## Samples (classes x sites, {figures.PER_SIDE ** 2} per cell)\n\nReal:\n\n![real]({rel['real']})\n\n"
           f"MeDi (red: combinations absent from training):\n\n![medi]({rel['medi']})\n\n"
           f"CLS (no site control):\n\n![cls]({rel['cls']})\n",
           f"## Site stain, real vs generated\n\n{s['site_text']}\n\n![site]({rel['site']})\n\n"
           + s["site"].to_markdown(index=False) + "\n",
           "## FID-style distance to the real cohort (colour-texture features; lower is closer)\n\n"
           f"Per trained class x site cell. {s['cells_text']}\n\n{s['colour_text']}\n\n" + s["fid_cells"].to_markdown(index=False, floatfmt=".1f")
           + "\n\nPer class, every site pooled:\n\n" + s["fid"].to_markdown(floatfmt=".3f") + "\n",
           "## Shortcut meter\n\nClass-site mutual information of the probe's real pool (the patches its k per class "
           f"are drawn from), before and after adding the MeDi samples; {s['full_bits']:g} bits (log2 of the number of "
           "classes) = the site gives the class away.\n\n"
           + s["mi"].to_markdown(index=False, floatfmt=".3f") + "\n",
           f"## Data coverage (patches per class x site)\n\n![coverage]({rel['coverage']})\n",
           "## Timings\n\n" + s["timing"].to_markdown(index=False, floatfmt=".1f") + f"\n\n![timings]({rel['timings']})\n",
           "## Configuration\n\n" + s["config"].to_markdown(index=False) + "\n"]
    return "\n".join(md)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medi-fast demo report</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1320px;margin:1.5em auto;
 padding:0 1.5em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} .summary{background:#f6f8fa;border:1px solid #e1e4e8;border-radius:6px;padding:.6em 1.2em}
.warn{background:#fff4e5;border:2px solid #e69500;border-radius:6px;padding:.6em 1.2em;font-weight:bold}
.verdict{font-weight:bold;font-size:1.1em} .beat{color:#060} .nobeat{color:#a00}
details{border-top:1px solid #ddd;padding:.4em 0} summary{font-size:1.25em;font-weight:600;cursor:pointer;padding:.2em 0}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
th,td{padding:3px 10px;border-bottom:1px solid #e5e5e5;text-align:right} th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
img{max-width:100%} img.pixels{image-rendering:pixelated;max-width:none}
.scroll{overflow-x:auto} figure{margin:.6em 0} figcaption{font-size:.9em;color:#555}
</style></head><body>
<h1>medi-fast demo report</h1>
{% if s.quick %}<p class="warn">{{ s.quick }}</p>{% endif %}
<div class="summary">
<p>{{ s.ran }}</p>
<p class="verdict {{ 'beat' if s.beat else 'nobeat' }}">{{ s.verdict }}</p>
<ul>{% for h in s.headline %}<li>{{ h }}</li>{% endfor %}</ul>
<p>{{ s.features }}</p><p>{{ s.setup }}</p>
</div>
<details open><summary>Linear probe</summary>
<figure><img src="{{ img.probe }}" alt="probe accuracy per training set"><figcaption>Mean ± SEM over runs;
dotted: chance.</figcaption></figure>{{ tables.probe }}<p>{{ s.probe_sites_text }}</p>
<div class="scroll">{{ tables.probe_sites }}</div></details>
<details open><summary>Samples ({{ per_cell }} per class x site)</summary>
<h3>Real</h3><div class="scroll"><img class="pixels" src="{{ img.real }}" alt="real patches"></div>
<h3>MeDi (outlined in red: combinations absent from training)</h3>
<div class="scroll"><img class="pixels" src="{{ img.medi }}" alt="MeDi samples"></div>
<h3>CLS (no site control)</h3><div class="scroll"><img class="pixels" src="{{ img.cls }}" alt="CLS samples"></div>
</details>
<details open><summary>Site stain, real vs generated</summary><p>{{ s.site_text }}</p>
<figure><img src="{{ img.site }}" alt="site colours"></figure>{{ tables.site }}</details>
<details open><summary>FID-style distance</summary><p>Colour-texture features, synthetic vs the real cohort;
lower is closer. Per trained class x site cell: {{ s.cells_text }}</p><p>{{ s.colour_text }}</p>{{ tables.fid_cells }}
<p>Per class, every site pooled:</p>{{ tables.fid }}</details>
<details><summary>Shortcut meter</summary><p>Class-site mutual information of the probe's real pool, before and
after adding the MeDi samples; {{ s.full_bits }} bits (log2 of the number of classes) = the site gives the class
away.</p>{{ tables.mi }}</details>
<details><summary>Data coverage</summary><figure><img src="{{ img.coverage }}" alt="patches per class x site">
</figure></details>
<details><summary>Timings</summary><figure><img src="{{ img.timings }}" alt="seconds per stage"></figure>
{{ tables.timing }}</details>
<details><summary>Configuration</summary>{{ tables.config }}</details>
</body></html>
"""


def _html(s: dict, pics: dict) -> str:
    import jinja2
    from markupsafe import Markup

    def table(df, **kw):
        return df.to_html(float_format=lambda v: f"{v:.3f}", border=0, **kw)

    def data_uri(path):
        return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")

    tables = {"probe": table(s["probe"], index=False), "probe_sites": table(s["probe_sites"], index=False),
              "fid": table(s["fid"]),
              "fid_cells": s["fid_cells"].to_html(float_format=lambda v: f"{v:.1f}", border=0, index=False), "mi": table(s["mi"], index=False),
              "site": table(s["site"], index=False),
              "timing": s["timing"].to_html(float_format=lambda v: f"{v:.1f}", border=0, index=False),
              "config": table(s["config"], index=False)}
    page = jinja2.Environment(autoescape=True).from_string(PAGE)
    return page.render(s=s, img={k: data_uri(v) for k, v in pics.items()}, per_cell=figures.PER_SIDE ** 2,
                       tables={k: Markup(v) for k, v in tables.items()})


def write_report(out: Path, cfg, index: pd.DataFrame, real_images: np.ndarray, synthetic: dict, results: dict,
                 timings, started: float, source: Path | None = None) -> Path:
    """Draw the figures under out/figures and write report.md and report.html; returns report.html.
    `source`: the run whose patches were evaluated again (`run.reevaluate`), if not this one."""
    from ..data.report import coverage_matrix, plot_coverage

    fig = out / "figures"
    fig.mkdir(parents=True, exist_ok=True)
    spec = cfg.spec
    pics = figures.sample_grids(fig, index, real_images, synthetic, spec.cohort, spec.test_sites, spec.classes)
    pics["coverage"] = plot_coverage(coverage_matrix(index), fig / "coverage.png")
    pics["probe"] = figures.probe_chart(results["probe"], fig / "probe.png", chance=1 / len(spec.classes))
    pics["site"] = figures.site_chart(results["site"], fig / "site.png")
    total = time.perf_counter() - started
    timing = pd.DataFrame(list(timings) + [("total", total)], columns=["stage", "seconds"])
    pics["timings"] = figures.timings_chart(list(timings), total, fig / "timings.png")
    s = _sections(cfg, index, results, timing, total, source)
    rel = {k: Path(v).relative_to(out).as_posix() for k, v in pics.items()}
    atomic_write_text(out / "report.md", _markdown(s, rel))
    atomic_write_text(out / "report.html", _html(s, pics))
    return out / "report.html"
