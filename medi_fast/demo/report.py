"""The demo's report: report.md (terminals, diffs) and report.html (a self-contained page: HTML tables,
pictures embedded as data URIs, foldable sections), both from the same tables and figures."""
from __future__ import annotations

import base64
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..eval.probe import SOURCE
from ..io import atomic_write_text
from . import arms, figures, stages, stain


# Two arms whose balanced accuracies at a test site differ by no more than this are level there.
LEVEL = 0.005


def verdict(probe: pd.DataFrame) -> tuple[bool, str]:
    """Did the headline comparison's arm (arms.HEADLINE) beat the other on the TSS-averaged balanced
    accuracy, beyond the standard errors?"""
    r = probe.set_index("arm")
    hi, lo, real = arms.HEADLINE.hi, arms.HEADLINE.lo, arms.REAL
    m, c, n = (r.loc[a, "tss_balanced_accuracy_mean"] for a in (hi, lo, real.name))
    se = float(np.hypot(r.loc[hi, "tss_balanced_accuracy_sem"], r.loc[lo, "tss_balanced_accuracy_sem"]))
    beat = bool(m - c > se)
    text = (f"{hi} {'beat' if beat else 'did not beat'} {lo} in this run: TSS-averaged balanced accuracy "
            f"{m:.3f} ({hi}) vs {c:.3f} ({lo}) vs {n:.3f} ({real.label}); difference {m - c:+.3f}, "
            f"combined standard error {se:.3f}.")
    return beat, text


def probe_table(summary: pd.DataFrame, seconds: dict[str, float]) -> pd.DataFrame:
    """The probe summary as shown: one row per arm, ``mean ± SEM`` per metric (as eval.probe.to_markdown),
    and the seconds it took to make the arm's training data (arms.cost)."""
    from ..eval.probe import METRICS

    heads = {"balanced_accuracy": "Balanced acc.", "tss_balanced_accuracy": "TSS-avg. balanced acc.", "mcc": "MCC"}
    return pd.DataFrame([{"Training data": r["arm"], "runs": int(r["runs"]),
                          **{heads[m]: f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_sem']:.3f}" for m in METRICS},
                          "seconds to make": f"{seconds[r['arm']]:.1f}"}
                         for _, r in summary.iterrows()])


def ranking_line(probe: pd.DataFrame, seconds: dict[str, float]) -> str:
    """Every arm from best to worst TSS-averaged balanced accuracy, each with the seconds its training data
    took, and the winner's margin over the runner-up against their combined standard error."""
    r = probe.set_index("arm").sort_values("tss_balanced_accuracy_mean", ascending=False, kind="stable")
    m, e = r["tss_balanced_accuracy_mean"], r["tss_balanced_accuracy_sem"]
    # the oracle arms are the renderer itself, which no user has: the winner is among the others
    oracles = {a.name for a in arms.REGISTRY if isinstance(a.recipe, arms.Rendered)}
    first, second = [a for a in r.index if a not in oracles][:2]
    se = float(np.hypot(e[first], e[second]))
    return (f"Best arm a user can make (the oracle arms aside): {first}, {m[first] - m[second]:+.3f} over {second} "
            f"(combined standard error {se:.3f}). "
            "All arms, best first (TSS-averaged balanced accuracy; seconds to make the training data): "
            + ", ".join(f"{a} {m[a]:.3f} ({seconds[a]:.1f} s)" for a in r.index) + ".")


def oracle_line(probe: pd.DataFrame) -> str:
    """What the renderer's own patches say about class-only data below real data alone."""
    r = probe.set_index("arm")["tss_balanced_accuracy_mean"]
    real, cls = arms.REAL.name, arms.CLS.name
    oracle, medi_oracle = arms.CLS_ORACLE.name, arms.MEDI_ORACLE.name
    if r[cls] >= r[real]:
        why = f"{cls} is not below {real} in this run"
    elif r[oracle] < r[real]:
        why = (f"{oracle} falls below {real} too: class-only data that follows the cohort's class-site confound "
               "lowers the probe by the demo's design, however good the generator")
    else:
        why = (f"{oracle} is not below {real}: perfect class-only patches would not lower the probe, so {cls}'s "
               "deficit comes from the trained model's samples")
    return (f"Oracle arms (freshly rendered patches, the best each generator could make): {oracle} {r[oracle]:.3f}, "
            f"{medi_oracle} {r[medi_oracle]:.3f}, against {cls} {r[cls]:.3f} and {real} {r[real]:.3f}; {why}.")


def student_lines(cfg, results: dict, cells: pd.DataFrame) -> list[str]:
    """The headline's line for each distilled student (arms.DistilledSamples; `demo --distill`)."""
    p = results["probe"].set_index("arm")
    lines = []
    for arm in arms.for_config(cfg):
        if not isinstance(arm.recipe, arms.DistilledSamples):
            continue
        name, teacher = arm.name, arm.recipe.teacher
        lines.append(
            f"Distilled student ({name}: the {teacher} model distilled from DDIM-{cfg.distill_teacher_steps} to "
            f"{cfg.distill_steps} DDIM steps ({cfg.distill_prediction_type} student), {cfg.distill_iters} iterations per stage; "
            f"{cfg.sample_steps / cfg.distill_steps:.1f}x fewer UNet calls than the demo's DDIM-{cfg.sample_steps}): "
            f"probe {p.loc[name, 'tss_balanced_accuracy_mean']:.3f} ± {p.loc[name, 'tss_balanced_accuracy_sem']:.3f} "
            f"({teacher} {p.loc[teacher, 'tss_balanced_accuracy_mean']:.3f}); FID-style distance per cell "
            f"{cells[name].mean():.1f} ({teacher} {cells[teacher].mean():.1f}); stain slope "
            f"{results['site'][name].slope:.2f} ({teacher} {results['site'][teacher].slope:.2f}). "
            "benchmarks/distill_quality.py measures longer distillations.")
    return lines


def site_table(fidelity) -> pd.DataFrame:
    t = fidelity.table
    out = pd.DataFrame({"class": t["class"], "site": t["site"], "real patches": t["real_patches"]})
    for k, name in (("real", "real"), ("gen", "generated")):
        out[f"{name} RGB"] = [" / ".join("-" if np.isnan(v) else f"{v:.1f}" for v in row)
                              for row in t[[f"{k}_{c}" for c in figures.CHANNELS]].to_numpy()]
    return out


def grids(cfg) -> list[dict]:
    """The sample grids the report shows (arms with `grid`), those whose samples carry a site first: their
    picture's key, caption and alt text."""
    shown = sorted((a for a in arms.for_config(cfg) if a.grid), key=lambda a: not a.recipe.per_site)
    out = []
    for a in shown:
        red = "red: combinations absent from training"
        out.append({"key": a.recipe.folder, "alt": f"{a.name} samples",
                    "md": f"{a.name} ({red})" if a.recipe.per_site else f"{a.name} (no site control)",
                    "html": f"{a.name} (outlined in {red})" if a.recipe.per_site else f"{a.name} (no site control)"})
    for a in arms.for_config(cfg):
        if isinstance(a.recipe, arms.Edited):
            text = (f"{a.name}, counterfactuals: real patches of the probe's pool (first column) moved by `medi-fast "
                    f"edit` ({cfg.edit_method}, strength {cfg.edit_strength:g}) with the {a.recipe.model} model to "
                    "each cohort site, the same patch in the same place of every cell")
            out.append({"key": a.recipe.folder, "alt": f"{a.name} counterfactuals", "md": text, "html": text})
    return out


def _sections(cfg, index, results, timing, total, source=None) -> dict:
    """Every piece of text and every table, shared by the Markdown and the HTML report."""
    beat, text = verdict(results["probe"])
    hi, lo = arms.HEADLINE.hi, arms.HEADLINE.lo
    models = " and ".join(f"{a.label} {a.name}" for a in arms.for_config(cfg)
                          if isinstance(a.recipe, arms.ModelSamples))
    fid = results["fid"].pivot(index="class", columns="model", values="distance")
    fid.loc["mean"] = fid.mean()
    site = results["site"][hi]
    p = results["probe"].set_index("arm")
    mi = results["mi"][["training_set", "n", "mi_bits", "mi_fraction"]]
    bits = mi.set_index("training_set")["mi_bits"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    spec = cfg.spec
    sites, unseen = spec.sites, spec.unseen
    full_bits = round(float(np.log2(len(spec.classes))), 2)
    cells = results["fid_cells"].pivot_table(index=["class", "site"], columns="model", values="distance")
    closer = int((cells[hi] < cells[lo]).sum())
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
                f"{len(index)} real patches), `{cfg.preset}` UNets ({models}) trained "
                f"{cfg.train_steps} steps at {cfg.resolution} px on the CPU ({cfg.prediction_type} prediction"
                f"{_precision_text(results.get('precision'))}), exported to ONNX, sampled with DDIM-{cfg.sample_steps}"
                f"{_backends_text(results.get('precision'))}, and a linear probe trained "
                f"with and without their samples. Seed {cfg.seed}; "
                + (f"took {total / 60:.1f} min." if source is None else
                   f"these are the models and patches of the run in {source}, evaluated again here "
                   f"({total / 60:.1f} min).")),
        "beat": beat, "verdict": text, "full_bits": full_bits,
        "headline": [
            "Linear probe on unseen sites, TSS-averaged balanced accuracy: "
            + ", ".join(f"{a} {p.loc[a, 'tss_balanced_accuracy_mean']:.3f} ± {p.loc[a, 'tss_balanced_accuracy_sem']:.3f}"
                        for a in p.index) + f" ({int(p['runs'].iloc[0])} runs each).",
            ranking_line(results["probe"], results["arm_seconds"]), oracle_line(results["probe"]),
            f"Class-site mutual information of the probe's real pool: {bits['real']:.2f} bits, "
            f"{bits['real+' + hi]:.2f} bits with the {hi} samples added ({full_bits:g} bits = log2 of {len(spec.classes)} "
            "classes: the site gives the class away).",
            f"Site stain: {hi}'s per-site colour follows the real one with correlation {site.correlation:.2f} and "
            f"slope {site.slope:.2f} (1 = the full difference between sites).",
            f"FID-style distance to the real patches of each trained class x site cell (lower is closer): {hi} "
            f"{cells[hi].mean():.1f}, {lo} {cells[lo].mean():.1f} on average; {hi} closer in {closer} of "
            f"{len(cells)} cells. Per class, with every site pooled: "
            + ", ".join(f"{m} {fid.loc['mean', m]:.1f}" for m in fid.columns) + "."] + student_lines(cfg, results, cells),
        "features": ("Features are the `colour-texture` statistics (48-d, no weights; not UNI, not Inception): the "
                     "distance below is FID-style, not FID, and the probe reads stain and texture statistics."),
        "setup": (f"Setting `{spec.name}`: {spec.summary}. Probe: k = {cfg.probe_k} real patches per class from "
                  f"those sites (the stain gives the class away), tested on unseen sites {', '.join(spec.test_sites)}; "
                  f"synthetic:real {cfg.probe_ratio:g}:1 ({hi}: every class x site of {', '.join(sites)}, including the "
                  f"{len(unseen)} combinations never seen in training, "
                  f"{', '.join(f'{c}@{s}' for c, s in unseen[:4])}{', ...' if len(unseen) > 4 else ''}; "
                  f"{lo}: class only, so its stains follow the cohort's class-site confound). "
                  + "What a pathology user would do instead, and the renderer as a perfect generator: "
                  + "; ".join(f"{a.name}: {a.label}" for a in arms.for_config(cfg)
                              if isinstance(a.recipe, (arms.Edited, arms.StainAugmented, arms.StainNormalised, arms.Rendered)))
                  + f" (edits: every real patch a probe run draws, moved by `medi-fast edit` ({cfg.edit_method}, "
                  f"strength {cfg.edit_strength:g}, DDIM-{cfg.sample_steps}) to each of {', '.join(sites)}; "
                  f"augmentation: HED jitter alpha 1 ± {stain.HED_SIGMA:g}, beta ± {stain.HED_SIGMA:g} per stain; "
                  f"torchstain's Macenko augmentation ± {stain.MACENKO_SIGMA:g}; the augmented copies of the probe's "
                  "own real draw, as many as the synthetic arms add; normalisation: every real patch, train and "
                  "test, to a mosaic of the trained cells' patches)."),
        "cells_text": (f"A {lo} patch has no site: each trained cell is compared with a disjoint random draw of its class's "
                       f"{lo} patches, as many as {hi} made for the cell. A class's pooled distance favours a model that "
                       f"reproduces the cohort's class-site mixture; {hi} also renders the combinations absent from "
                       "training, which have no real counterpart in the pool."),
        "colour_text": (f"{hi}'s patches are closer to their cell than {lo}'s in {closer} of {len(cells)} trained cells. "
                        f"The trained cells' mean colours lie {site.colour_spread_generated:.1f} grey levels from their "
                        f"common mean in the {hi} patches, {site.colour_spread_real:.1f} in the real ones"
                        + (f": washed out. Models trained for {cfg.train_steps} steps have learned the texture of each "
                           "class but not yet the full colour of each class and site (benchmarks/site_fidelity.py "
                           "--noise-levels shows where: the model's estimate of the clean image at high noise)."
                           if site.colour_spread_generated < 0.5 * site.colour_spread_real else ".")),
        "fid_cells": cell_table,
        "probe": probe_table(results["probe"], results["arm_seconds"]),
        "probe_sites": by_site.reset_index().rename(columns={"arm": "Training data"}),
        "probe_sites_text": (f"Balanced accuracy per unseen test site (mean over the probe runs; their mean is the "
                             f"TSS-averaged accuracy). Of {by_site.shape[1]} sites: "
                             + "; ".join(compare(g.hi, g.lo) for g in arms.GAPS)
                             + f" (level: within {LEVEL:g}). Each site is a stain shift of its own, so the sites "
                             "disagree; their mean is the result."),
        "fid": fid,
        "mi": mi,
        "site": site_table(site),
        "site_text": (f"Per-site stain effect (a class x site's mean colour minus its class's mean, per channel) of "
                      f"the {hi} samples against the real patches, over {len(site.effects)} trained combinations: "
                      f"correlation {site.correlation:.3f}, slope {site.slope:.3f}; mean |effect| generated "
                      f"{site.mean_abs_effect_generated:.2f}, real {site.mean_abs_effect_real:.2f} grey levels. "
                      "The same measure as benchmarks/site_fidelity.py."),
        "timing": timing,
        "cost_text": ("Seconds to make each arm's probe training data (its own stages and those of the model it "
                      "builds on): " + ", ".join(f"{a} {v:.1f}" for a, v in results["arm_seconds"].items()) + "."),
        "grids": grids(cfg),
        "mi_arm": hi,
        "config": pd.DataFrame({"setting": list(vars(cfg)), "value": [str(v) for v in vars(cfg).values()]}),
    }


def _markdown(s: dict, rel: dict) -> str:
    md = ["# medi-fast demo report\n"]
    if s["quick"]:
        md.append(f"> **{s['quick']}**\n")
    md += [f"{s['ran']}\n", f"**{s['verdict']}**\n", "\n".join(f"- {h}" for h in s["headline"]) + "\n",
           f"{s['features']}\n\n{s['setup']}\n",
           "## Linear probe (Table-1 style, mean ± SEM over runs; seconds to make each arm's training data)\n\n"
           + s["probe"].to_markdown(index=False, colalign=("left",) + ("right",) * (s["probe"].shape[1] - 1))
           + f"\n\n![probe]({rel['probe']})\n\n{s['probe_sites_text']}\n\n"
           + s["probe_sites"].to_markdown(index=False, floatfmt=".3f") + "\n",
           f"## Samples (classes x sites, {figures.PER_SIDE ** 2} per cell)\n\nReal:\n\n![real]({rel['real']})\n\n"
           + "".join(f"{g['md']}:\n\n![{g['key']}]({rel[g['key']]})\n\n" for g in s["grids"])[:-1],
           f"## Site stain, real vs generated\n\n{s['site_text']}\n\n![site]({rel['site']})\n\n"
           + s["site"].to_markdown(index=False) + "\n",
           "## FID-style distance to the real cohort (colour-texture features; lower is closer)\n\n"
           f"Per trained class x site cell. {s['cells_text']}\n\n{s['colour_text']}\n\n" + s["fid_cells"].to_markdown(index=False, floatfmt=".1f")
           + "\n\nPer class, every site pooled:\n\n" + s["fid"].to_markdown(floatfmt=".3f") + "\n",
           "## Shortcut meter\n\nClass-site mutual information of the probe's real pool (the patches its k per class "
           f"are drawn from), before and after adding the {s['mi_arm']} samples; {s['full_bits']:g} bits (log2 of the number of "
           "classes) = the site gives the class away.\n\n"
           + s["mi"].to_markdown(index=False, floatfmt=".3f") + "\n",
           f"## Data coverage (patches per class x site)\n\n![coverage]({rel['coverage']})\n",
           "## Timings\n\n" + s["timing"].to_markdown(index=False, floatfmt=".1f") + f"\n\n{s['cost_text']}\n\n"
           f"![timings]({rel['timings']})\n",
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
{% for g in s.grids %}<h3>{{ g.html }}</h3>
<div class="scroll"><img class="pixels" src="{{ img[g.key] }}" alt="{{ g.alt }}"></div>
{% endfor %}</details>
<details open><summary>Site stain, real vs generated</summary><p>{{ s.site_text }}</p>
<figure><img src="{{ img.site }}" alt="site colours"></figure>{{ tables.site }}</details>
<details open><summary>FID-style distance</summary><p>Colour-texture features, synthetic vs the real cohort;
lower is closer. Per trained class x site cell: {{ s.cells_text }}</p><p>{{ s.colour_text }}</p>{{ tables.fid_cells }}
<p>Per class, every site pooled:</p>{{ tables.fid }}</details>
<details><summary>Shortcut meter</summary><p>Class-site mutual information of the probe's real pool, before and
after adding the {{ s.mi_arm }} samples; {{ s.full_bits }} bits (log2 of the number of classes) = the site gives the class
away.</p>{{ tables.mi }}</details>
<details><summary>Data coverage</summary><figure><img src="{{ img.coverage }}" alt="patches per class x site">
</figure></details>
<details><summary>Timings</summary><figure><img src="{{ img.timings }}" alt="seconds per stage"></figure>
{{ tables.timing }}<p>{{ s.cost_text }}</p></details>
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


def _precision_text(precision: dict | None) -> str:
    """", in bf16" (or fp32) as the run recorded its training precision; "" for a run that did not."""
    return f", in {precision['training']}" if isinstance(precision, dict) and precision.get("training") else ""


def _backends_text(precision: dict | None) -> str:
    """" on openvino-bf16" (the backends that made the synthetic patches, as the run recorded them)."""
    used = precision.get("generation") if isinstance(precision, dict) else None
    names = sorted(set(used.values())) if isinstance(used, dict) and used else []
    return f" on {', '.join(map(str, names))}" if names else ""


def write_report(out: Path, cfg, index: pd.DataFrame, real_images: np.ndarray, synthetic: dict, results: dict,
                 timings, started: float, source: Path | None = None) -> Path:
    """Draw the figures under out/figures and write report.md and report.html; returns report.html.
    `source`: the run whose patches were evaluated again (`run.reevaluate`), if not this one."""
    from ..data.report import coverage_matrix, plot_coverage

    fig = out / "figures"
    fig.mkdir(parents=True, exist_ok=True)
    spec = cfg.spec
    compared = arms.for_config(cfg)
    pics = figures.sample_grids(fig, index, real_images, synthetic, spec.cohort, spec.test_sites, spec.classes,
                                [a for a in compared if a.grid])
    pics["coverage"] = plot_coverage(coverage_matrix(index), fig / "coverage.png")
    pics["probe"] = figures.probe_chart(results["probe"], {a.name: a.colour for a in compared}, fig / "probe.png",
                                        chance=1 / len(spec.classes))
    pool = real_images[stages.probe_pool(cfg, index)]
    for a in compared:
        if isinstance(a.recipe, arms.Edited):
            meta, images = synthetic[a.name]
            pics[a.recipe.folder] = figures.counterfactual_grid(fig / f"{a.recipe.folder}.png", pool, meta, images,
                                                                SOURCE, spec.classes, spec.sites)
    hi = arms.HEADLINE.hi
    pics["site"] = figures.site_chart(results["site"][hi], hi, fig / "site.png")
    total = time.perf_counter() - started
    timing = pd.DataFrame(list(timings) + [("total", total)], columns=["stage", "seconds"])
    pics["timings"] = figures.timings_chart(list(timings), total, fig / "timings.png")
    s = _sections(cfg, index, results, timing, total, source)
    rel = {k: Path(v).relative_to(out).as_posix() for k, v in pics.items()}
    atomic_write_text(out / "report.md", _markdown(s, rel))
    atomic_write_text(out / "report.html", _html(s, pics))
    return out / "report.html"
