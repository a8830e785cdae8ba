"""Run the benchmark suite and write benchmarks/RESULTS.md (+ results/*.json, + results/summary.png).

    python benchmarks/run_all.py                               # every benchmark, then the report
    python benchmarks/run_all.py --only backends,flops         # some of them, then the report
    python benchmarks/run_all.py --report-only                 # the report from the recorded JSON files
    python benchmarks/run_all.py --demo-checkpoint demo_out/runs/medi/checkpoints/best.pt   # + solver quality, int8

Each benchmark is its own script (run one alone for more options) and writes
benchmarks/results/<name>.json with the machine, the date and its command line; the report is made
from those files only, so every figure in RESULTS.md says where it came from.  Ratios are always
between candidates measured in the same run of one script (these machines are shared and noisy).
Solver quality and int8 need a checkpoint trained on the built-in synthetic data (the demo's MeDi
model): without --demo-checkpoint their recorded results, if any, are reported with their own date.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, machine_info  # noqa: E402
from medi_fast.io import atomic_write_text  # noqa: E402

# name -> (script, arguments); the defaults fit a 2-core CPU in about 20 minutes altogether.
SUITE: dict[str, tuple[str, list[str]]] = {
    "flops": ("flops.py", []),
    "backends": ("backends.py", ["--presets", "tiny-32,small-64", "--steps", "10,4", "--batch", "16", "--repeats", "3"]),
    "sampling_throughput": ("sampling_throughput.py", []),
    "ort_profile": ("ort_profile.py", []),
    "generate_pipeline": ("generate_pipeline.py", ["--small", "1000", "--large", "20000"]),
    "training_throughput": ("training_throughput.py", []),
    "data_throughput": ("data_throughput.py", []),
    "solver_quality_demo": ("solver_quality.py", ["--n-per-combo", "8", "--name", "solver_quality_demo"]),
    "int8_quality": ("int8_quality.py", []),
    # the demo's cohort and every arm that needs no model (no training): ~1-2 minutes on 2 cores
    "demo_arms": ("demo_arms.py", []),
    # distils the demo model (16 -> 8, 4, 2, 1 steps) along a curve of iterations per halving, v and x0 students,
    # an x0 student from DDIM-64 and a consistency student on the DDIM-64 grid, and evaluates them beside the
    # teacher's DDIM at 16-64 steps (about 3 hours on 2 cores from scratch; students under --work are reused)
    "distill_quality": ("distill_quality.py", ["--iters-per-stage",
                                               "100,300,1000:4,3000:4:sample,6000:4:consistency:64,1500:4:sample:64",
                                               "--student-types", "v_prediction,sample", "--baseline-seeds", "1",
                                               "--reference-steps", "16,32,64"]),
    # a distillation iteration beside a training step of the same model: ~3 minutes on 2 cores
    "distill_throughput": ("distill_throughput.py", []),
    # edits of rendered patches against the renderer's exact counterfactual: ~10 minutes on 2 cores
    "edit_quality": ("edit_quality.py", ["--n", "4", "--steps", "10", "--strengths", "0.25,0.5,0.75"]),
    # bf16 on a CPU with bf16 units beside fp32 and the reference loop, medi-128 one call included
    "backends_bf16": ("backends.py", ["--presets", "tiny-32,small-64,medi-128", "--steps", "10,4,1",
                                      "--batch", "16,16,2", "--repeats", "3", "--no-compile", "--name",
                                      "backends_bf16"]),
    # the demo's MeDi model trained 700 steps in fp32 and in bf16 on the CPU: minutes per precision
    "cpu_bf16_training": ("cpu_bf16_training.py", []),
    # the demo model's DDIM-15 images through the bf16 paths against fp32, and the demo's measures on them
    "cpu_bf16_quality": ("cpu_bf16_quality.py", []),
    # the full demo in fp32 and at its default precision (bf16 where the CPU has it), in turn: ~10 minutes
    "demo_precision": ("demo_precision.py", []),
}
NEEDS_DEMO_MODEL = {"solver_quality_demo", "int8_quality", "distill_quality", "distill_throughput", "edit_quality",
                    "cpu_bf16_quality"}  # run only with --demo-checkpoint
PUBLISHED_STEPS = 100  # the published sampling protocol: DDIM-100


def run_suite(names: list[str], demo_checkpoint: str | None) -> dict[str, str]:
    status = {}
    for name in names:
        script, args = SUITE[name]
        if name in NEEDS_DEMO_MODEL:
            if not demo_checkpoint:
                status[name] = "not rerun (no --demo-checkpoint)"
                continue
            if name in ("distill_quality", "cpu_bf16_quality"):  # the demo's directory: index and pack beside runs/
                demo_dir = Path(demo_checkpoint).resolve().parents[3]
                args = args + ["--teacher", demo_checkpoint, "--index", str(demo_dir / "index.parquet")]
            elif name == "distill_throughput":
                args = args + ["--teacher", demo_checkpoint]
            else:
                args = args + ["--checkpoint", demo_checkpoint]
        cmd = [sys.executable, str(HERE / script), *args]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        status[name] = f"ran in {time.perf_counter() - t0:.0f} s" if rc == 0 else f"FAILED (exit {rc})"
        print(f"== {name}: {status[name]}", flush=True)
    return status


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _table(rows: list[dict], cols: list[str] | None = None, fmt: str = ".3g") -> str:
    import pandas as pd

    df = pd.DataFrame(rows)
    if cols:
        df = df[[c for c in cols if c in df.columns]]
    return df.to_markdown(index=False, floatfmt=fmt)


def _dist_by_steps(rows: list[dict]) -> str:
    """solver_quality's distances as one row per sampler, one column per step count (DDIM-100 apart)."""
    import pandas as pd

    df = pd.DataFrame([r for r in rows if not (r["sampler"] == "ddim" and r["steps"] == PUBLISHED_STEPS)])
    wide = df.pivot_table(index="sampler", columns="steps", values="dist", sort=False)
    wide.columns = [f"{c} steps" for c in wide.columns]
    return wide.reset_index().to_markdown(index=False, floatfmt=".4g")


def _provenance(d: dict) -> str:
    m = d.get("machine", {})
    load = m.get("load_avg_1_5_15")
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    t = d.get("timing")
    timing = (f"; timed by benchmarks/_common.alternate: {t['warmup_runs']} untimed warm-up run(s) of each, then "
              f"{t['rounds']} alternating rounds, clock {t['clock']}" if t else "")
    return (f"*{m.get('time_utc', '?')}; {m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores, "
            f"{m.get('mem_gib', '?')} GiB{gpu}; torch {m.get('torch', '?')}; load average "
            f"{load if load else '?'}; command `{d.get('command', '?')}`{timing}*")


def fewest_steps(sq: dict) -> dict:
    """Per sampler: the fewest steps within 5 % of DDIM-100's distance, as solver_quality.py recorded it."""
    return {name: None if steps is None else {"steps": steps, "speedup_vs_ddim100": PUBLISHED_STEPS / steps}
            for name, steps in sq["fewest_steps_within_5pct"].items()}


def _measured(bk: dict, preset: str) -> list[dict]:
    """The backends rows of one preset that are measurements (not the derived ceiling)."""
    return [r for r in bk["rows"] if r["preset"] == preset and not r.get("derived")]


def _shipped(bk: dict, preset: str) -> list[dict]:
    """Measured rows of the settings medi-fast uses, as the script that measured them marked them
    (``shipped: true``; the reference and the variants measured and dropped are ``false``)."""
    return [r for r in _measured(bk, preset) if r.get("shipped") is True]


def training_headline(tr: dict) -> str:
    """The training line of the summary: the ratio with its same-round spread, and whether it is noise."""
    r = next((r for r in tr["rows"] if r.get("shipped")), tr["rows"][-1])  # recordings before the flag: ours last
    threads = f", {tr['torch_threads']} torch thread(s)" if tr.get("torch_threads") else ""
    what = f"{tr['args']['preset']}, batch {tr['args']['batch_size']}, {tr.get('device', '?')}{threads}"
    if "ratio_per_round_range" not in r:
        return (f"* Training ({what}): the medi-fast trainer ran {r['ratio']:.2f}x the reference-style loop's "
                f"steps/s; one run each, no spread measured.")
    lo, hi = r["ratio_per_round_range"]
    spread = (f"same-round ratios {lo:.2f}-{hi:.2f}, median {r['ratio_per_round_median']:.2f}, "
              f"{len(r['seconds_per_round'])} rounds")
    if lo <= 1.0 <= hi:
        return (f"* Training ({what}): **no difference measured**: the medi-fast trainer's steps/s is within this "
                f"machine's noise of the reference-style loop's (best round against best {r['ratio']:.2f}x; {spread}).")
    return (f"* Training ({what}): the medi-fast trainer runs **{r['ratio']:.2f}x** the reference-style loop's "
            f"steps/s ({spread}).")


def plot(backends: dict | None, sq: dict | None, path: Path) -> bool:
    """results/summary.png from the backends and solver-quality results; False when there are neither."""
    panels = [p for p in (backends, sq) if p]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    axes = list(axes[0])
    if backends:
        ax = axes.pop(0)
        rows = [r for r in backends["rows"] if not r.get("derived")]
        presets = list(dict.fromkeys(r["preset"] for r in rows))
        labels = list(dict.fromkeys(r["backend"] for r in rows))
        w = 0.8 / len(presets)
        for i, p in enumerate(presets):
            vals = {r["backend"]: r["ratio_vs_reference"] for r in rows if r["preset"] == p}
            ax.barh([j + i * w for j in range(len(labels))], [vals.get(lab, 0) for lab in labels], w, label=p)
        ax.set_yticks([j + w * (len(presets) - 1) / 2 for j in range(len(labels))], labels, fontsize=7)
        ax.axvline(1, color="k", lw=0.8)
        ax.axvline(2, color="grey", lw=0.8, ls=":", label="2x (the CPU goal)")
        ax.set_xlabel("images/s relative to the reference loop (same run, best round)")
        ax.invert_yaxis()
        ax.legend(fontsize=8)
        ax.set_title("Sampling throughput per backend (CPU)", fontsize=9)
    if sq:
        ax = axes.pop(0)
        rows = sq["rows"]
        base = next(r for r in rows if r["sampler"] == "ddim" and r["steps"] == PUBLISHED_STEPS)
        for name in dict.fromkeys(r["sampler"] for r in rows):
            pts = sorted((r["steps"], r["dist"]) for r in rows if r["sampler"] == name and r is not base)
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.axhline(base["dist"], color="k", lw=0.8, ls="--", label="DDIM-100")
        ax.axhline(1.05 * base["dist"], color="k", lw=0.5, ls=":", label="DDIM-100 + 5 %")
        ax.set_xlabel("solver steps")
        ax.set_yscale("log")
        ax.set_ylabel("FID-style distance (colour-texture, log scale)")
        ax.legend(fontsize=7)
        ax.set_title("Quality vs steps on the demo's MeDi model", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def gpu_sections() -> list[str]:
    """One section per results/gpu-<gpu>*.json written by benchmarks/gpu.py on a GPU, with its notes."""
    md = []
    for path in sorted(RESULTS.glob("gpu-*.json")):
        g = json.loads(path.read_text())
        title = f"## GPU: {g['gpu']}" if not g.get("dry_run") else "## GPU script dry run (CPU; not GPU figures)"
        if g.get("run"):
            title += f", {g['run']}"
        rates = ", ".join(f"{k} {v:.3g}" for k, v in g.get("matmul", {}).items() if isinstance(v, (int, float)))
        rows = g["rows"]
        ok = [r for r in rows if r.get("status") == "ok"]
        md += [title, "", _provenance(g), "",
               f"Matmul TFLOP/s of this device, measured in the same run (TF32 off unless named): {rates}. "
               "Errors are against fp32 eager with TF32 off, same inputs; images after DDIM-10 from the same noise; "
               "`extrapolated_from_steps`: the solvers' images/s from a timed DDIM segment of that many steps.", "",
               _table([r for r in ok if r["section"] == "inference"],
                      ["preset", "path", "solver", "steps", "batch", "images_per_s", "vs_fp32_eager",
                       "fraction_of_matmul_rate", "eps_rel_err", "image_max_levels", "first_call_s",
                       "torch_peak_gib", "device_used_gib", "extrapolated_from_steps"]), ""]
        training = [r for r in ok if r["section"] == "training"]
        if training:
            md += ["Training step (training/step.py, AdamW, one fixed batch):", "",
                   _table(training, ["preset", "precision", "batch", "steps_per_s", "images_per_s", "first_loss",
                                     "last_loss", "torch_peak_gib"]), ""]
        for r in (r for r in ok if r["section"] == "ddp"):
            what = r.get("check") or f"one-rank {r['backend']}"
            md += [f"DDP ({what}): a one-rank process group with the DistributedDataParallel wrapper; its "
                   f"parameter change differs from the unwrapped step by {r['param_change_rel']:.2g} (relative).", ""]
        missing = [f"{r['section']} {r.get('preset', '')} {r.get('path') or r.get('precision') or r.get('backend', '')} "
                   f"({r['status']})" for r in rows if r.get("status") != "ok"]
        if missing:
            md += ["Not measured: " + "; ".join(m.replace("  ", " ") for m in missing) + ".", ""]
        md += [f"* {note}" for note in g.get("notes", [])] + ([""] if g.get("notes") else [])
    return md


def precision_text(variant: dict) -> str:
    """"bf16; openvino-bf16": what a variant's runs trained in and generated with, as each recorded it.  Runs
    that do not record it were made before the demo had a precision: fp32 training, ONNX Runtime fp32."""
    before = {"training": "fp32", "generation": {"": "ort-cpu"}}
    recorded = [r.get("precision") if isinstance(r.get("precision"), dict) else before for r in variant["records"]]
    training = sorted({p["training"] for p in recorded})
    generation = sorted({b for p in recorded for b in (p.get("generation") or {}).values()})
    return f"{'/'.join(training)}; {', '.join(generation)}"


def demo_seeds_section(ds: dict) -> tuple[list[str], list[str]]:
    """The demo over seeds, per variant (benchmarks/demo_seeds.py): (summary lines, section lines)."""
    from medi_fast.demo.arms import HEADLINE
    from medi_fast.demo.seeds import aggregate, arm_names, order_text

    hi, lo, gap = HEADLINE.hi, HEADLINE.lo, HEADLINE.column
    rows, head = [], []
    for name, s in ds["variants"].items():
        st = s["stats"]
        arms = arm_names(s["records"])
        shipped = any(r["shipped"] for r in ds["rows"] if r["variant"] == name)
        sites = s["test_sites"]
        carried = s.get("carried_from")  # kept from an earlier run of demo_seeds.py, with the arms it had then
        rows.append({"variant": name + (" (the demo's default)" if shipped else "")
                     + (f" (run {str(carried.get('time_utc'))[:10]}, arms of then)" if carried else ""),
                     "models": s["prediction_type"], "precision (training; generation)": precision_text(s),
                     "probe": f"k {s['k']}, {s['probe_ratio']:g}:1",
                     "test sites": f"{len(sites)} ({sites[0]}-{sites[-1]})" if len(sites) > 2 else ", ".join(sites),
                     "seeds": ",".join(map(str, s["seeds"])),
                     **{a: f"{st[a]['mean']:.3f} ± {st[a]['sd']:.3f}" for a in arms},
                     f"{gap} (range)": f"{st[gap]['mean']:+.3f} ({st[gap]['min']:+.3f} to {st[gap]['max']:+.3f})",
                     "order (>: separated, ≈: not)": order_text(s),
                     f"cell distance {hi} / {lo}": f"{st[f'cell distance {hi}']['mean']:.1f} / "
                                                   f"{st[f'cell distance {lo}']['mean']:.1f}",
                     "stain slope": f"{st['stain slope']['mean']:.2f} ± {st['stain slope']['sd']:.2f}",
                     "minutes per run": f"{st['minutes']['mean']:.1f}"})
        if shipped:
            head.append(f"* The demo ({s['description']}; {s['n']} seeds): linear-probe TSS-averaged balanced "
                        "accuracy " + ", ".join(f"{a} **{st[a]['mean']:.3f} ± {st[a]['sd']:.3f}**" for a in arms)
                        + f" (mean ± SD over seeds); {gap} {st[gap]['mean']:+.3f} (per seed "
                        + ", ".join(f"{r['seed']}: {r['probe'][hi]['tss_bacc'] - r['probe'][lo]['tss_bacc']:+.3f}"
                                    for r in s["records"]) + f"). Order **{order_text(s)}** (>: separated by more "
                        "than the spread over seeds, ≈: not)."
                        + (" Seconds to make each arm's training data (mean over seeds): "
                           + ", ".join(f"{a} {v:.0f}" for a, v in s["arm_seconds"].items()) + "."
                           if s.get("arm_seconds") else ""))
            first = [r for r in s["records"] if r["seed"] in ds["seeds"]]
            if len(first) > 1 and len(first) < len(s["records"]):  # the seeds the variants share, on their own
                sub = aggregate(first)
                head.append(f"  Over seeds {', '.join(map(str, sub['seeds']))} alone: "
                            + ", ".join(f"{a} {sub['stats'][a]['mean']:.3f} ± {sub['stats'][a]['sd']:.3f}" for a in arms)
                            + f"; order {order_text(sub)}.")
    columns = list(dict.fromkeys(k for r in rows for k in r))  # arms a carried variant did not have: "-"
    rows = [{k: r.get(k, "-") for k in columns} for r in rows]
    held = [s for s in ds.get("default_seeds", []) if s not in ds["seeds"]]
    md = ["## The demo over seeds", "", _provenance(ds), "",
          "`medi-fast demo --setting S --seed N` per seed and variant of the demo: its default and the variants it "
          "was chosen over. "
          + (f"The default's models also ran on seed{'s' if len(held) > 1 else ''} {', '.join(map(str, held))}, "
             "beyond the seeds of the variants it is compared with. " if held else "")
          + "Each seed renders its own cohort, trains both "
          "models and draws its own probe runs; variants that differ only in the probe are evaluated on the same "
          "runs' patches. Accuracy: the linear probe's TSS-averaged balanced accuracy on the unseen test sites, "
          "mean ± SD over seeds. *Separated*: the mean ± SD intervals over seeds do not overlap. A variant "
          "\"on S5, S6\" is the variant above it scored on its first two test sites alone (the same probe runs; "
          "the test design every setting had before ring4 got eight). Models: what "
          "both UNets predict (epsilon or v). Precision: what the models trained in and the backend that made "
          "their patches, as the runs recorded them (`medi-fast demo --precision`; auto: bf16 where the CPU has "
          "bf16 units). Probe: k real patches per class and synthetic:real. Cell distance: "
          "the FID-style colour-texture distance of each model's patches to the real patches of each trained "
          f"class x site cell ({lo}: a draw of its class), mean over cells and seeds. Stain slope: how much of the "
          f"real difference between sites {hi}'s patches reproduce (1 = all). Minutes per run: each training "
          "run's wall time as it recorded it (results.json); runs made side by side or on a loaded machine take "
          "longer than alone.", "", _table(rows), ""]
    md += per_site_table(ds)
    for name in dict.fromkeys(s["setting"] for s in ds["variants"].values()):
        k = next(s for s in ds["variants"].values() if s["setting"] == name)
        md += [f"`{name}`: {k['summary']}.", ""]
    if ds.get("quick"):
        md += ["These are --quick runs (undertrained models): a smoke test of the script, not the demo's result.", ""]
    return head, md


def per_site_table(ds: dict) -> list[str]:
    """The default's probe per unseen test site: each arm's balanced accuracy (mean over seeds) and the gaps'
    range over seeds; empty for results recorded before the runs kept per-site accuracies."""
    name = next((r["variant"] for r in ds["rows"] if r["shipped"]), None)
    recs = ds["variants"].get(name, {}).get("records", []) if name else []
    if not recs or not all("probe_sites" in r for r in recs):
        return []
    from medi_fast.demo.seeds import per_site_rows

    rows = per_site_rows(recs)
    return [f"The demo's default per unseen test site ({len(recs)} seeds): balanced accuracy at each site, mean "
            "over seeds (the TSS-averaged accuracy above is the mean over sites), and the gaps' range over seeds. "
            "Each site is a stain shift of its own.", "", _table(rows), ""]


def demo_arms_section(da: dict) -> list[str]:
    """benchmarks/demo_arms.py: the demo's arms that need no trained model, with their cost."""
    return ["## The demo's arms without a model: stain augmentation, stain normalisation, the renderer", "",
            _provenance(da), "",
            f"The demo's full configuration (setting `{da['setting']}`, seed {da['seed']}), every arm whose training "
            "data needs no trained model, made with the arm's own recipe and probed as the demo probes: these are "
            "the accuracies `medi-fast demo` reports for these arms at this seed (the real draws and each arm's "
            "patches depend on the seed and the metadata alone). Seconds: to make the arm's training data from the "
            f"rendered cohort. The cohort took {da['data_seconds']:.0f} s to render and pack; the evaluation "
            f"{da['evaluate_seconds']:.0f} s with these arms and {da['evaluate_real_only_seconds']:.0f} s with real "
            f"data alone: these arms add {da['added_seconds']:.0f} s to a demo run on this machine at this load.", "",
            _table([{"arm": r["arm"], "training data": r["label"],
                     "TSS-avg. balanced acc.": f"{r['tss_bacc']:.3f} ± {r['tss_bacc_sem']:.3f}",
                     "runs": r["runs"], "seconds": f"{r['seconds']:.1f}"} for r in da["rows"]]), ""]


def _student_label(row: dict, teacher_steps=None) -> str:
    """"300 it" for a v-prediction student, "300 it, sample" for an x0 one (rows from before the type: v),
    "6000 it, consistency, from DDIM-64" for one whose first teacher is not the run's --teacher-steps."""
    kind = row.get("student_type") or "v_prediction"
    first = row.get("first_teacher_steps")
    return (f"{row['iters_per_stage']} it" + ("" if kind == "v_prediction" else f", {kind}")
            + ("" if first in (None, teacher_steps) else f", from DDIM-{first}"))


def distill_section(dq: dict) -> list[str]:
    """Distilled students vs the teacher's samplers at the same steps vs DDIM-100 (distill_quality.py): the
    students' quality along the curve of iterations per halving."""
    rows = dq["rows"]
    base = next(r for r in rows if r["model"] == "teacher" and r["steps"] == PUBLISHED_STEPS)
    d = dq.get("distill", {})
    curve = dq.get("curve", [])
    cd = (f" A consistency student's iterations are one stage on the teacher's DDIM-M grid (EMA and target network "
          f"{d['consistency_ema_decay']}); it is sampled by the consistency sampler at each step count."
          if any(c.get("sampler") == "consistency" for c in curve) and "consistency_ema_decay" in d else "")
    how = (f"distilled from DDIM-{d.get('teacher_steps')} (unless a point says otherwise) by halving, batch "
           f"{d.get('batch_size')}, lr {d.get('lr')}, EMA {d.get('ema_decay')}; iterations per halving: "
           + ", ".join(f"{c.get('label') or c['iters_per_stage']} (down to {min(c['student_steps'])} steps, "
                       + (f"{c['distill_seconds']:.0f} s)" if c.get("distill_seconds") else "time not recorded)")
                       for c in curve))
    label = lambda r: _student_label(r, d.get("teacher_steps"))  # noqa: E731
    students = [r for r in rows if r["model"] == "student"]
    met = [r for r in students if r["meets_bounds"]]
    four = [r for r in students if r["steps"] == 4]
    verdict = ("**" + (f"Students meeting every bound: {', '.join(r['name'] for r in met)}" if met else
                       "No student meets every bound") + ".** 4-step students along the curve (per-cell distance / "
               "DDIM-100's, stain slope / DDIM-100's, probe - DDIM-100's): "
               + "; ".join(f"{label(r)}: {r['cell_dist_vs_ddim100']:.2f}x, {r['slope_vs_ddim100']:.2f}, "
                           f"{r['probe_minus_ddim100']:+.3f}" for r in four) + ".")
    steps_here = {r["steps"] for r in students}
    refs = [r for r in rows if r["model"] == "teacher" and r["sampler"] == "ddim" and r["steps"] != PUBLISHED_STEPS
            and r["steps"] not in steps_here]
    if refs:  # the teacher's DDIM at a first teacher's steps: what its students learn to imitate
        verdict += (" The teacher's own DDIM at the steps a distillation starts from (the quality its students "
                    "imitate): " + "; ".join(f"DDIM-{r['steps']}: {r['cell_dist_vs_ddim100']:.2f}x, "
                                             f"{r['slope_vs_ddim100']:.2f}, {r['probe_minus_ddim100']:+.3f}"
                                             for r in refs) + ".")
    redraws = [r for r in rows if r["model"] == "teacher" and r["steps"] == PUBLISHED_STEPS and r is not base]
    if redraws:  # DDIM-100 from other starting noise: the baseline's own spread by the same measures
        verdict += (" DDIM-100 again from other starting noise (the measures' own spread): "
                    + "; ".join(f"{r['cell_dist_vs_ddim100']:.2f}x, {r['slope_vs_ddim100']:.2f}, "
                                f"{r['probe_minus_ddim100']:+.3f}" for r in redraws) + ".")
    return ["## Distilled students (progressive and consistency distillation, demo MeDi model)", "", _provenance(dq), "",
            f"{dq.get('n_images', '?')} images per setting (every class x cohort site), the same starting noise for "
            f"all; {how}.{cd} `cell_dist`: the demo's FID-style colour-texture distance to the real patches of each trained "
            "class x site cell, averaged (`dist`: per class); `site_slope`: per-site stain fidelity (1.0 = every site's "
            "stain difference reproduced); `probe`: the demo protocol's TSS-averaged balanced accuracy with these "
            f"samples as the synthetic set ({dq.get('probe_repeats', '?')} repeats; no synthetic data: "
            f"{dq.get('probe_no_synthetic') or float('nan'):.3f}); images/s: torch eager fp32 sampling in this run. "
            "The bounds a student must meet to replace the teacher: per-cell distance within 5 % of DDIM-100's, "
            "stain slope at least 0.9 of its, probe at most 0.01 below its samples'. "
            f"DDIM-100: cell distance {base['cell_dist']:.1f}, site slope {base['site_slope']:.3f}, probe "
            f"{base['probe']:.3f}.", "", verdict, "",
            _table(rows, ["model", "sampler", "student_type", "first_teacher_steps", "iters_per_stage", "steps", "cell_dist",
                          "cell_dist_vs_ddim100", "dist",
                          "site_slope", "slope_vs_ddim100", "probe", "probe_minus_ddim100", "laplacian_vs_ddim100",
                          "meets_bounds",
                          "images_per_s"]), ""]


def distill_throughput_section(dt: dict) -> list[str]:
    """benchmarks/distill_throughput.py: a distillation iteration beside a training step, same run."""
    m = dt["median_s"]
    return ["## What a distillation iteration costs", "", _provenance(dt), "",
            f"The demo's teacher model (`{dt['preset']}`, {dt['resolution']} px), batch {dt['batch_size']}: "
            f"`medi-fast train` steps, `medi-fast distill` iterations (one halving from DDIM-{dt['teacher_steps']}) "
            f"and the teacher's forward pass, alternated over {dt['rounds']} rounds of {dt['iters']}; seconds per "
            "step from each run's own metrics clock (start-up excluded), median over rounds. An iteration runs the "
            "teacher twice without gradients and one student optimiser step, so the arithmetic is (train step + 2 "
            f"forward passes) / train step = **{dt['arithmetic_over_train']:.2f}x**; measured "
            f"**{dt['distill_over_train']:.2f}x** (train {m['train']:.3f} s, distill {m['distill']:.3f} s, "
            f"forward {m['forward']:.3f} s).", ""]


def edit_section(eq: dict) -> list[str]:
    """benchmarks/edit_quality.py: `medi-fast edit` against the renderer's exact counterfactual, beside stain
    normalisation and the identity."""
    rows = eq["rows"]

    ident = {r["target"]: r for r in rows if r["method"] == "identity"}
    lines = []
    for target in ("trained", "unseen"):
        sel = [r for r in rows if r["target"] == target]
        if not sel or target not in ident:
            continue
        top_c = min(sel, key=lambda r: r["colour_error"])
        top_s = max(sel, key=lambda r: r["ssim"])

        def name(r):
            return r["method"] + (f" {r['strength']:g}" if r["method"] in ("sdedit", "inversion") else "")
        where = "the class was trained at" if target == "trained" else "the class was never trained at"
        lines.append(f"Target sites {where}: lowest colour error {name(top_c)} "
                     f"({top_c['colour_error']:.2f} grey levels; identity {ident[target]['colour_error']:.2f}), "
                     f"highest SSIM {name(top_s)} ({top_s['ssim']:.3f}; identity {ident[target]['ssim']:.3f}).")
    return ["## Editing real patches (`medi-fast edit`, demo MeDi model)", "", _provenance(eq), "",
            f"Patches of the demo's renderer moved from each class's first training site to every other cohort site "
            f"and compared with the same tissue rendered at the target site (the exact counterfactual): "
            f"{eq.get('n_per_pair', '?')} patches per (class, target), DDIM-{eq.get('steps', '?')} trajectories "
            f"(an edit runs the last steps x strength), model {eq.get('train_steps') or 'given'} training steps. "
            f"Macenko and Reinhard: torchstain, fitted on four other patches of the class at the target site. "
            f"`colour_error`: |mean colour - the truth's|, grey levels; SSIM on RGB.", "", *lines, "",
            _table(rows, ["method", "strength", "target", "images", "ssim", "ssim_sd", "colour_error",
                          "colour_error_sd"]), ""]


def backends_headline(bk: dict) -> list[str]:
    """Per preset: the best shipped CPU backend against the reference loop."""
    lines = []
    for p in dict.fromkeys(r["preset"] for r in bk["rows"]):
        best = max((r for r in _shipped(bk, p) if r.get("sampler", "ddim") == "ddim"),
                   key=lambda r: r["ratio_vs_reference"])
        ceiling = [r for r in bk["rows"] if r["preset"] == p and r.get("derived") and "bf16" not in r["backend"]]
        lines.append(f"* **{p}**, batch {best['batch']}: best CPU backend `{best['backend']}` at "
                     f"**{best['ratio_vs_reference']:.2f}x** the reference loop's images/s (DDIM, same steps"
                     + (f"; median of the same-round ratios {best['ratio_per_round_median']:.2f}x"
                        if "ratio_per_round_median" in best else "")
                     + (f"; an fp32 runtime running every FLOP at this machine's best conv rate would reach "
                        f"{ceiling[0]['ratio_vs_reference']:.2f}x" if ceiling else "") + ").")
    return lines


def cpu_bf16_headline(bf: dict | None, dp: dict | None) -> list[str]:
    """bf16 on this CPU (backends.py --name backends_bf16, demo_precision.py): the best bf16 path against the
    reference loop and torch eager fp32, and the demo's default against --precision fp32."""
    lines = []
    for p in dict.fromkeys(r["preset"] for r in (bf or {}).get("rows", [])):
        rows = [r for r in bf["rows"] if r["preset"] == p and not r.get("derived")]
        best = max((r for r in rows if "bf16" in r["backend"]), key=lambda r: r["ratio_vs_reference"], default=None)
        eager = next((r for r in rows if r["backend"].startswith("torch (")), None)
        if best is None or eager is None:
            continue
        lines.append(f"* bf16 on this CPU, **{p}** (batch {best['batch']}, {best['steps']} step(s)): `{best['backend']}` "
                     f"at **{best['ratio_vs_reference']:.2f}x** the reference loop, {eager['seconds'] / best['seconds']:.2f}x "
                     "torch eager fp32 (what `auto` runs for an ONNX file on a CPU with bf16 units; RESULTS.md, "
                     "\"bf16 on this CPU\").")
    rows = {r["precision"]: r for r in (dp or {}).get("rows", [])}
    if "fp32" in rows and "auto" in rows:
        a = rows["auto"]
        lines.append(f"* The demo at its default (`{a['training']}` training, `{a['generation']}` generation) "
                     f"**{a['speed_vs_fp32']:.2f}x** faster than `--precision fp32`: {a['seconds'] / 60:.1f} against "
                     f"{rows['fp32']['seconds'] / 60:.1f} min, one seed run after the other (its result over seven "
                     "seeds: \"The demo over seeds\", ring4 against ring4-fp32).")
    return lines


def matched_quality_headline(bk: dict, sq: dict) -> list[str]:
    """Per preset: the fastest backend x solver at the fewest steps within 5 % of DDIM-100 (derived)."""
    lines = []
    fast = {k: v for k, v in fewest_steps(sq).items() if v}
    for p in dict.fromkeys(r["preset"] for r in bk["rows"]):
        combos = []  # (derived speed-up, solver, steps, backend ratio, backend) per solver
        for name, v in fast.items():
            rows = [r for r in _shipped(bk, p) if r.get("sampler", "ddim") == name]
            if rows:
                best = max(rows, key=lambda r: r["ratio_vs_reference"])
                combos.append((best["ratio_vs_reference"] * v["speedup_vs_ddim100"], name, v["steps"],
                               best["ratio_vs_reference"], best["backend"]))
        if combos:
            total, name, steps, ratio, backend = max(combos)
            lines.append(f"* **{p}** at matched quality: `{backend}` with `{name}` at {steps} steps (the fewest "
                         f"within 5 % of DDIM-100 on the demo model): {ratio:.2f} x {PUBLISHED_STEPS / steps:.1f} "
                         f"= **{total:.1f}x** the reference DDIM-100 loop (derived: backend ratio with that "
                         "solver x step ratio; sampling cost is linear in the steps).")
    return lines


def generate_headline(gp: dict) -> str:
    return (f"* `generate` with PNG writing runs at **{gp['overlap']['efficiency']:.2f}** of pure sampling "
            f"speed; peak memory for n = {gp['memory'][1]['n']:,} is **{gp['memory_ratio']:.3f}x** that for "
            f"n = {gp['memory'][0]['n']:,}.")


def cpu_bf16_section(bk: dict) -> list[str]:
    """benchmarks/backends.py on a CPU with bf16 units (--name backends_bf16): the bf16 rows beside fp32."""
    return ["## bf16 on this CPU", "", _provenance(bk), "",
            "The same harness as the section above (reference loop, alternating rounds), with `torch-bf16` on the "
            "CPU (autocast, channels_last, fixed chunks of rows) and OpenVINO's bf16 hint (`openvino-bf16`) beside "
            "the fp32 candidates: what `auto` runs for a checkpoint and an ONNX file on a CPU with bf16 units "
            "(docs/engines.md, \"bf16 on a CPU\"); medi-128 is one UNet call at batch 2. "
            "`fraction_of_conv_rate`: each row's share of this machine's best fp32 or bf16 3x3-convolution rate, "
            "measured in the same run (the `ceiling` rows).", "",
            _table(bk["rows"], ["preset", "backend", "batch", "steps", "seconds", "images_per_s", "ratio_vs_reference",
                                "ratio_per_round_median", "fraction_of_conv_rate", "max_abs_diff_vs_reference"]), ""]


def cpu_bf16_training_section(tr: dict) -> list[str]:
    """benchmarks/cpu_bf16_training.py: the demo's model trained in fp32 and bf16 on the CPU."""
    rows = [{k: v for k, v in r.items() if k != "curve"} for r in tr["rows"]]
    return ["## Training in bf16 on this CPU", "", _provenance(tr), "",
            "The demo's MeDi model (demo-32, its data, settings and seed) trained once per precision, in turn; the "
            "loss logged every 25 steps and compared point by point.", "", _table(rows), ""]


def cpu_bf16_quality_section(q: dict) -> list[str]:
    """benchmarks/cpu_bf16_quality.py: the bf16 paths' images and the demo's measures against fp32's noise."""
    noise = q.get("noise") or {}
    cols = ["backend", "seed", "max_levels", "mean_levels", "p999_levels", "frac_over_8", "cell_dist", "site_slope",
            "probe", "images_per_s", "speed_vs_ort_cpu", "within_noise"]
    rows = [{c: r.get(c) for c in cols} for r in q["rows"]]
    return ["## bf16 generation on this CPU, on the demo model", "", _provenance(q), "",
            f"The demo's site-conditioned model ({q['setting']}), DDIM-{q['steps']}, {q['n_images']} images (every class x cohort "
            "site), each path from the same starting noise; `ort-cpu` (fp32) is the reference, its rows with other "
            "seeds are fp32's noise (a second draw). Levels: |image - reference's| in grey levels over every pixel; "
            "`frac_over_8`: the share of pixels more than 8 levels off. `cell_dist`, `site_slope`, `probe`: the "
            "demo's per-cell FID-style distance, stain slope and linear probe on each path's patches. "
            "`within_noise`: every measure's difference to the reference at most fp32's own across seeds ("
            + ", ".join(f"{k} {v:.3g}" for k, v in noise.items() if v is not None) + ").", "",
            _table(rows), ""]


def demo_precision_section(dp: dict) -> list[str]:
    """benchmarks/demo_precision.py: the full demo in fp32 and at its default precision, in one run."""
    return ["## The demo in fp32 and in bf16", "", _provenance(dp), "",
            f"`medi-fast demo --seed {dp['seed']}` with `--precision fp32` and at its default (auto: bf16 training and "
            "generation where the CPU has bf16 units), in turn, each afresh. `seconds`: each run's wall time; "
            "`train_s_*`: each model's 700 training steps by the trainer's clock; `arm_s`: the seconds to make an "
            "arm's training data (arms of 5 s or more); `probe`: one seed's accuracies (the result over seeds: the "
            "section \"The demo over seeds\", ring4 against ring4-fp32).", "", _table(dp["rows"]), ""]


def backends_section(bk: dict) -> list[str]:
    """benchmarks/backends.py: images/s per backend against the reference loop."""
    return ["## Sampling throughput per backend", "", _provenance(bk), "",
            "Reference = diffusers `DDIMScheduler` + the eager fp32 `UNet2DModel` (what the published code "
            "runs), the conditioning embedded once. Every candidate runs the same batch, steps and starting "
            "noise; `max_abs_diff` is the largest difference of the final x0 to the reference's. Each candidate "
            "has one untimed warm-up (for torch.compile: the compilation), then every round runs each candidate "
            "once in turn" + (", the first one rotating from round to round" if "timing" in bk else "") + "; "
            "`seconds` is the best round, `ratio_vs_reference` best against best, "
            "`ratio_per_round_median` the median of the ratios within a round. The `ceiling` row is derived, "
            "not a backend: the loop's FLOPs at the best fp32 (and bf16) 3x3-convolution rate measured on this "
            "machine in the same run; `fraction_of_conv_rate` is each candidate's share of the rate of its own "
            "arithmetic (bf16 rows against the bf16 rate). `ort-cpu + <solver>` rows run another solver for the same number of steps (no "
            "x0 comparison: the solvers solve differently).", "",
            "`shipped` marks the settings medi-fast uses (set by backends.py); the others are the reference, "
            "the variants measured and not used, and the derived ceiling.", "",
            _table(bk["rows"], ["preset", "backend", "sampler", "shipped", "batch", "steps", "seconds",
                                "images_per_s",
                                "ratio_vs_reference", "ratio_per_round_median", "fraction_of_conv_rate",
                                "max_abs_diff_vs_reference"]), ""]


def sampling_section(st: dict) -> list[str]:
    """benchmarks/sampling_throughput.py: generate's sampling path beside the reference loop."""
    return ["## generate's sampling path vs the reference loop", "", _provenance(st), "",
            "`sample_rows` on a backend (per-sample seeded noise, medi-fast DDIM, uint8 conversion: "
            "all that `generate` does but write files) beside the reference loop, in alternating rounds; "
            + ("`seconds` is the best round, `ratio_vs_reference` best against best, `ratio_per_round_median` the "
               "median of the ratios within a round." if "timing" in st else
               "`ratio_vs_reference` is the ratio of the medians (recorded before the shared harness)."), "",
            _table(st["rows"], ["preset", "candidate", "shipped", "batch", "steps", "median_s", "seconds",
                                "images_per_s", "ratio_vs_reference", "ratio_per_round_median"]), ""]


def solver_section(sq: dict) -> list[str]:
    """benchmarks/solver_quality.py: distance to real patches per solver and step count."""
    few = fewest_steps(sq)
    base = next(r for r in sq["rows"] if r["sampler"] == "ddim" and r["steps"] == PUBLISHED_STEPS)
    return ["## Solver quality vs steps (demo MeDi model)", "", _provenance(sq), "",
            f"{sq.get('n_images', '?')} images per solver setting, the same starting noise for all; `dist` = "
            "Frechet distance of colour-texture features to real synthetic-H&E patches of the same (class, "
            f"site) combinations (real-vs-real noise floor {sq.get('noise_floor', float('nan')):.3f}); "
            "`rmse_ref` = RMS pixel difference to a 200-step reference solution of the same ODE. DDIM-100 "
            f"dist {base['dist']:.3f}.", "",
            "Fewest steps within 5 % of DDIM-100's distance: "
            + ", ".join(f"{k} {v['steps'] if v else 'none of those tried'}" for k, v in few.items()) + ".", "",
            "`dist` by sampler and steps:", "", _dist_by_steps(sq["rows"]), "",
            _table(sq["rows"], ["sampler", "steps", "dist", "rmse_ref", "s"]), ""]


def ort_profile_section(prof: dict) -> list[str]:
    """benchmarks/ort_profile.py: ONNX Runtime's kernel time per operator type."""
    return ["## Where ort-cpu spends a UNet call", "", _provenance(prof), "",
            "ONNX Runtime's profiler, kernel time per operator type after graph optimisation (random weights); "
            "the operators above 1 %.", "",
            _table([r for r in prof["rows"] if r["share"] >= 0.01], ["model", "batch", "op", "share", "ms_per_call",
                                                                     "nodes"]), ""]


def int8_section(q8: dict) -> list[str]:
    """benchmarks/int8_quality.py: int8 static quantisation's speed and what it does to the images."""
    r = q8["rows"][0]
    return ["## int8 (ONNX Runtime static quantisation) on the demo MeDi model: measured, not shipped", "",
            _provenance(q8), "",
            f"Convolutions int8 (weights per channel, activations calibrated on DDIM trajectories of other seeds), "
            f"the same {r['n_images']} starting noises, DDIM-{r['steps']}, ort-cpu: int8 runs "
            f"**{r['speedup_int8_vs_fp32']:.2f}x** the fp32 graph (same-round median "
            f"{r['speedup_per_round_median']:.2f}x) but changes the images: RMS difference {r['rms_diff']:.3f} "
            f"([-1, 1] units), {r['mean_level_diff']:.1f} grey levels on average, "
            f"{100 * r['pixels_over_8_levels']:.0f} % of values more than 8 levels apart. FID-style distance to "
            f"real: fp32 {r['dist_fp32']:.3f}, int8 {r['dist_int8']:.3f} (noise floor {r['noise_floor']:.3f}).", ""]


def generate_section(gp: dict) -> list[str]:
    """benchmarks/generate_pipeline.py: I/O overlap and peak memory of `generate`."""
    return ["## generate: I/O overlap and peak memory", "", _provenance(gp), "",
            "Overlap: the same Generator without an output directory (pure sampling) and writing PNGs "
            "(alternating, medians). Memory: `medi-fast generate` in a fresh process per n, peak RSS.", "",
            _table([gp["overlap"]]), "", _table(gp["memory"]), ""]


def training_section(tr: dict) -> list[str]:
    """benchmarks/training_throughput.py: the trainer's steps/s beside a reference-style loop."""
    return ["## Training throughput", "", _provenance(tr), "",
            "Each loop runs from a fresh start twice per round (a short and a long run, alternating with the "
            "other loop's); its time for the timed steps is the difference within the round, so the fixed "
            "costs of a run (model build, loader start, final checkpoint) cancel. `ratio` is best against "
            "best, `ratio_per_round_median` and `ratio_per_round_range` over the same-round ratios.", "",
            _table(tr["rows"], ["loop", "shipped", "steps", "seconds", "seconds_per_round", "steps_per_s",
                                "images_per_s", "ratio", "ratio_per_round_median", "ratio_per_round_range"]), ""]


def data_section(data: dict) -> list[str]:
    """benchmarks/data_throughput.py."""
    return ["## Data throughput", "", _provenance(data), "", _table(data["rows"]), ""]


def ray_section(ray: dict) -> list[str]:
    """benchmarks/ray_scaling.py: generate in one process against generate --ray with 1 and 2 actors."""
    sm = ray["summary"]
    return ["## generate on Ray", "", _provenance(ray), "",
            "The same plan through `generate` in one process and through `generate --ray` with 1 and 2 CPU "
            "actors, rounds alternated. \"Whole run\" includes starting the actors (each imports torch and "
            "opens the model); \"steady\" is measured from the written files' timestamps after the first "
            "batch. Ratios are medians of the same-round ratios.", "",
            _table(ray["rows"], ["candidate", "workers", "n", "steps", "images_per_s", "steady_images_per_s",
                                 "ratio_whole_run_vs_local_x1", "ratio_steady_vs_local_x1"]), "",
            f"Overhead of 1 Ray actor against 1 process: {sm['overhead_steady_pct_ray_x1']:+.1f} % once running, "
            f"{sm['overhead_whole_run_pct_ray_x1']:+.1f} % over the whole run including actor start-up. "
            f"2 actors over 1: {sm['ray_x2_over_ray_x1_steady']:.2f}x steady, "
            f"{sm['ray_x2_over_ray_x1_whole_run']:.2f}x whole run (2 cores shared with the driver). The `command` "
            "rows are `medi-fast generate` and `medi-fast generate --ray` as a user runs them (fresh processes, "
            "start-up included); both wrote the same bytes.", ""]


def export_section(ec: dict) -> list[str]:
    """benchmarks/export_cost.py: what `medi-fast export` with the user's defaults costs on this machine."""
    return ["## What an export costs", "", _provenance(ec), "",
            "`medi-fast export` of a random checkpoint with the user's defaults, in a child process: wall time, "
            "CPU time and peak resident memory of the process and its children (the load averages before and "
            f"after: `{ec.get('uptime_before', '?').split('load average: ')[-1]}`, "
            f"`{ec.get('uptime_after', '?').split('load average: ')[-1]}`).", "",
            _table(ec["rows"], ["preset", "command", "rc", "wall_s", "cpu_s", "peak_rss_gib"]), ""] + (
        ["Where the memory goes: the same export once more in-process, stage by stage (↳: a step "
         "inside the stage above it), with the resident memory each started from and its peak (VmHWM, reset "
         "before each stage)" + (f"; `baseline` is the medi-fast at `{ec['baseline']}`, run side by side"
                                 if ec.get("baseline") else "") + ".", "",
         _table(ec["stages"], ["code", "stage", "seconds", "rss_at_start_gib", "peak_rss_gib"], ".2f"), ""]
        if ec.get("stages") else [])


def flops_section(flops: dict) -> list[str]:
    """benchmarks/flops.py."""
    return ["## FLOPs per step per preset", "", _provenance(flops), "",
            "Counted with torch's FlopCounterMode on one forward pass (a multiply-add = 2 FLOPs).", "",
            _table(flops["rows"]), ""]


def report(status: dict[str, str]) -> Path:
    """RESULTS.md from the recorded JSON files: the summary, then one section per benchmark that has results."""
    r = {name: _load(name) for name in ("flops", "backends", "generate_pipeline", "training_throughput",
                                        "data_throughput", "solver_quality_demo", "sampling_throughput",
                                        "int8_quality", "ort_profile", "distill_quality", "demo_seeds",
                                        "ray_scaling", "export_cost", "edit_quality", "backends_bf16",
                                        "cpu_bf16_training", "demo_arms", "distill_throughput",
                                        "cpu_bf16_quality", "demo_precision")}
    bk, sq, gp, tr, ds = (r[n] for n in ("backends", "solver_quality_demo", "generate_pipeline",
                                         "training_throughput", "demo_seeds"))
    md = ["# Benchmark results", "",
          f"Written by `python benchmarks/run_all.py` on {machine_info()['time_utc']}. Every section names the "
          "machine, date and command of the run it comes from; ratios compare candidates measured side by side in "
          "that one run. Rerun a section with its command; rerun everything with `python benchmarks/run_all.py`.", ""]
    if status:
        md += ["This invocation: " + "; ".join(f"{k} {v}" for k, v in status.items()) + ".", ""]

    ds_head, ds_md = demo_seeds_section(ds) if ds else ([], [])
    headline = ((backends_headline(bk) if bk else []) + (matched_quality_headline(bk, sq) if sq and bk else [])
                + ([generate_headline(gp)] if gp else []) + ([training_headline(tr)] if tr else [])
                + cpu_bf16_headline(r["backends_bf16"], r["demo_precision"]) + ds_head)
    if headline:
        md += ["## Summary", "", *headline, ""]
    if plot(bk, sq, RESULTS / "summary.png"):
        md += ["![summary](results/summary.png)", ""]
    # the sections in the order RESULTS.md shows them: (benchmark, section function)
    for name, section in (("backends", backends_section), ("sampling_throughput", sampling_section),
                          ("solver_quality_demo", solver_section), ("distill_quality", distill_section),
                          ("distill_throughput", distill_throughput_section),
                          ("ort_profile", ort_profile_section), ("int8_quality", int8_section),
                          ("generate_pipeline", generate_section), ("training_throughput", training_section),
                          ("data_throughput", data_section), ("export_cost", export_section),
                          ("edit_quality", edit_section), ("backends_bf16", cpu_bf16_section),
                          ("cpu_bf16_training", cpu_bf16_training_section),
                          ("cpu_bf16_quality", cpu_bf16_quality_section), ("demo_precision", demo_precision_section)):
        if r[name]:
            md += section(r[name])
    md += ds_md
    if r["demo_arms"]:
        md += demo_arms_section(r["demo_arms"])
    if r["ray_scaling"]:
        md += ray_section(r["ray_scaling"])
    md += gpu_sections()
    if r["flops"]:
        md += flops_section(r["flops"])
    path = HERE / "RESULTS.md" if RESULTS == HERE / "results" else RESULTS / "RESULTS.md"
    atomic_write_text(path, "\n".join(md))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=f"comma list of: {', '.join(SUITE)}")
    ap.add_argument("--skip", default="", help="comma list of benchmarks to leave out")
    ap.add_argument("--report-only", action="store_true", help="write RESULTS.md from the recorded JSON only")
    ap.add_argument("--demo-checkpoint", help="the demo's MeDi checkpoint, for the solver-quality benchmark")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(SUITE)
    unknown = [n for n in names + [s for s in args.skip.split(",") if s] if n not in SUITE]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SUITE)}")
    names = [n for n in names if n not in args.skip.split(",")]
    status = {} if args.report_only else run_suite(names, args.demo_checkpoint)
    path = report(status)
    print(f"wrote {path}")
    return 1 if any(v.startswith("FAILED") for v in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
