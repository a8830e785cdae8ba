"""Distilled students vs the teacher's samplers at the same steps vs the teacher's DDIM-100, on the demo model.

    python benchmarks/distill_quality.py --teacher demo_out/runs/medi/checkpoints/best.pt \
        --index demo_out/index.parquet [--pack demo_out/pack] [--student student-1.pt]

Without --student it distils the teacher first (medi_fast.training.distill, down to the fewest of
--steps, keeping every stage's student), once per point of the --iters-per-stage curve (e.g.
``100,300,1000:4``: 100 and 300 iterations per halving down to the fewest steps, 1000 down to 4); with
--student it takes that run's stage students (``<student stem>.distill/stages/student-NNNN.pt``).  For each of --steps (1, 2, 4, 8) it generates the
same plan (every class x trained site, one seed per image, so every sampler starts from the same x_T)
with the student (its own DDIM-k), the teacher's DDIM-k and the teacher's --solver at k steps, plus the
teacher's DDIM-100, and measures, with the demo's own evaluation (medi_fast.demo.stages, imported):

* ``dist``: the FID-style colour-texture distance to the real cohort, per class, averaged; ``cell_dist``:
  the same per trained class x site cell, averaged (the demo's per-cell distance);
* ``site_slope`` / ``site_corr``: per-site stain fidelity (medi_fast.eval.site_fidelity), 1.0 = every
  site's stain difference reproduced;
* ``probe``: the demo protocol's linear probe (k real patches per class from confounded sites, tested
  on unseen sites), TSS-averaged balanced accuracy with these samples as the synthetic set;
* ``unet_calls`` per image and ``s``: wall time of the sampling in this run (torch eager fp32);
* ``pixel_std``, ``laplacian_rms`` (and ``laplacian_vs_ddim100``): contrast and high-frequency energy of the
  images, to tell blurred samples (below DDIM-100's) from noisy ones (above).

--student-types v_prediction,sample distils every curve point once per student parameterisation (x0 students
in --work/iters-N-sample); --baseline-seeds 1,2 adds DDIM-100 draws from other starting noise, whose distance
to the first DDIM-100's measures is the baseline's own spread.

"Within 5 % of DDIM-100": distance at most 1.05 x DDIM-100's.  ``meets_bounds``: a student that could replace
the teacher: per-cell distance within 5 % of DDIM-100's, stain slope at least 0.9 of its, probe at most
0.01 below its samples'.  Writes benchmarks/results/distill_quality.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

import medi_fast  # noqa: E402
from medi_fast import plan as plans  # noqa: E402

BASELINE_STEPS = 100
TOLERANCE = 0.05


def texture(images: np.ndarray) -> tuple[float, float]:
    """(pixel_std, laplacian_rms) of uint8 images (N, H, W, 3) in [0, 1] units: the per-image contrast, averaged,
    and the RMS of the 5-point Laplacian (high-frequency energy): whether a sampler's images are blurred (lower
    than DDIM-100's) or noisy (higher)."""
    im = images.astype(np.float32) / 255.0
    lap = (4 * im[:, 1:-1, 1:-1] - im[:, :-2, 1:-1] - im[:, 2:, 1:-1] - im[:, 1:-1, :-2] - im[:, 1:-1, 2:])
    return float(im.std(axis=(1, 2)).mean()), float(np.sqrt((lap ** 2).mean()))


def on_grid(teacher_steps: int, steps: int) -> bool:
    """Whether a consistency student of the DDIM-``teacher_steps`` grid can sample in ``steps`` steps."""
    from medi_fast.errors import MediFastError
    from medi_fast.training.distill import consistency_plan

    try:
        consistency_plan(teacher_steps, steps)
    except MediFastError:
        return False
    return True


def stage_students(student: Path) -> dict[int, Path]:
    stages = student.with_name(student.stem + ".distill") / "stages"
    found = {int(p.stem.split("-")[1]): p for p in sorted(stages.glob("student-*.pt"))}
    if not found:
        raise SystemExit(f"no stage students in {stages}; distil with medi-fast distill first or drop --student")
    return found


# A curve point's student type: (method, what the student predicts).  "consistency": consistency distillation
# of a v student (one stage of ITERS iterations, sampled by the consistency sampler at any of --steps).
STUDENT_KINDS = {"v_prediction": ("progressive", "v_prediction"), "sample": ("progressive", "sample"),
                 "consistency": ("consistency", "v_prediction")}


def parse_curve(text: str, steps: list[int]) -> list[tuple[int, int, str | None, int | None]]:
    """--iters-per-stage "100,300,1000:4,3000:4:sample,1500:4:sample:64" -> [(100, fewest, None, None), ...,
    (1500, 4, "sample", 64)]: iterations per halving (consistency: in all), the fewest steps that distillation goes
    down to (default: the fewest of --steps), the student type of that point alone (default: each of
    --student-types; one of STUDENT_KINDS) and its first teacher's DDIM steps (default: --teacher-steps)."""
    out = []
    for item in text.split(","):
        iters, low, kind, first = (item.strip().split(":") + ["", "", ""])[:4]
        if kind and kind not in STUDENT_KINDS:
            raise SystemExit(f"curve point {item!r}: unknown student type {kind!r}; use one of {', '.join(STUDENT_KINDS)}")
        out.append((int(iters), int(low) if low else steps[0], kind or None, int(first) if first else None))
    return out


def work_name(iters: int, student_type: str, teacher_steps: int, default_teacher_steps: int) -> str:
    """iters-N[-TYPE][-fromM]: the students of the first curves keep the names they were made under."""
    return (f"iters-{iters}" + ("" if student_type == "v_prediction" else f"-{student_type}")
            + ("" if teacher_steps == default_teacher_steps else f"-from{teacher_steps}"))


def distil(args, iters: int, fewest: int, student_type: str = "v_prediction",
           teacher_steps: int | None = None) -> tuple[Path, float | None]:
    """The student of `iters` iterations per stage down to `fewest` steps (made once, under --work), and the
    seconds its distillation took by its own clock.  `student_type`: a STUDENT_KINDS key (v, the paper's
    choice and the default; "sample": x0 with truncated-SNR weighting; "consistency": consistency distillation).
    `teacher_steps`: the first teacher's DDIM steps (default --teacher-steps)."""
    from medi_fast.training.distill import distill

    teacher_steps = teacher_steps or args.teacher_steps
    method, prediction_type = STUDENT_KINDS[student_type]
    work = Path(args.work) / work_name(iters, student_type, teacher_steps, args.teacher_steps)
    work.mkdir(parents=True, exist_ok=True)
    student = work / f"student-{fewest}.pt"
    run = student.with_name(student.stem + ".distill")
    # --resume needs a checkpoint to continue from; a run killed before its first one starts afresh
    resume = any((run / "checkpoints").glob("step-*.state.pt"))
    if not student.exists():
        decay = args.consistency_ema_decay if method == "consistency" else args.ema_decay
        distill(teacher=args.teacher, steps=fewest, teacher_steps=teacher_steps, out=str(student),
                split=args.split, iters_per_stage=iters, batch_size=args.batch_size, lr=args.lr,
                ema_decay=decay, seed=args.seed, device="cpu", resume=resume, progress=False,
                prediction_type=prediction_type, method=method)
    metrics = run / "metrics.csv"
    secs = float(pd.read_csv(metrics)["elapsed_s"].iloc[-1]) if metrics.is_file() else None
    print(f"iters {iters}: distilled to {fewest} steps in {secs} s", flush=True)
    return student, secs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the demo's MeDi checkpoint")
    ap.add_argument("--index", required=True, help="the demo's index.parquet (real patches, the probe's pool and test)")
    ap.add_argument("--pack", help="the pack of --index at the model resolution (default: INDEX_DIR/pack)")
    ap.add_argument("--split", help="training split CSV for distilling (default: the teacher's)")
    ap.add_argument("--student", help="an already distilled student (its stage students are used); else distil")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "medi-fast-distill-quality"),
                    help="where new distillations are written (checkpoints stay out of the repository; reused)")
    ap.add_argument("--steps", default="1,2,4,8")
    ap.add_argument("--teacher-steps", type=int, default=16)
    ap.add_argument("--iters-per-stage", default="40",
                    help="iterations per halving, a comma-separated curve; ITERS:K distils that point only down to "
                         "K steps, ITERS:K:TYPE only for student type TYPE (e.g. 100,300,1000:4,3000:4:sample)")
    ap.add_argument("--baseline-seeds", default="",
                    help="comma-separated seeds of extra DDIM-100 draws (other starting noise): the baseline's own "
                         "spread by each measure, against which the 5 %% bound can be read")
    ap.add_argument("--reference-steps", default="",
                    help="comma-separated: the teacher's DDIM at these steps too (e.g. 16,32,64: the first teacher of a "
                         "distillation, whose quality its students learn to imitate)")
    ap.add_argument("--name", default="distill_quality", help="results name (benchmarks/results/NAME.json)")
    ap.add_argument("--student-types", default="v_prediction",
                    help="comma-separated: what each curve point's student is (v_prediction, sample: progressive "
                         "distillation; consistency: consistency distillation); each type distils the whole curve")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema-decay", type=float, default=0.99)
    ap.add_argument("--consistency-ema-decay", type=float, default=0.95,
                    help="EMA (and target network) decay of consistency students (Song et al. 2023, LCM)")
    ap.add_argument("--solver", default="dpmpp-2m-clip", help="the teacher's fast solver (best on the demo model)")
    ap.add_argument("--n-per-combo", type=int, default=24)
    ap.add_argument("--probe-repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--setting", help="the demo setting of --index (default: its demo_config.json's, else the demo's default)")
    args = ap.parse_args(argv)
    steps = sorted(int(s) for s in args.steps.split(","))

    t0 = time.perf_counter()
    curve = []  # (label, iters per stage, distillation seconds, {steps: stage student}, sampler, first teacher steps)
    if args.student:
        student = Path(args.student)
        metrics = student.with_name(student.stem + ".distill") / "metrics.csv"
        secs = float(pd.read_csv(metrics)["elapsed_s"].iloc[-1]) if metrics.is_file() else None
        config = metrics.with_name("config.json")
        iters = None
        if config.is_file():  # report the settings that student was distilled with, not this script's defaults
            c = json.loads(config.read_text())
            args.teacher_steps = c.get("resolved_teacher_steps", args.teacher_steps)
            iters, args.batch_size = c["iters_per_stage"], c["batch_size"]
            args.lr, args.ema_decay = c["lr"], c["ema_decay"]
        from medi_fast import checkpoint as ckpt_io

        sampler = ckpt_io.load(student).schedule.default_sampler or "ddim"  # a consistency student: its own sampler
        found = ({k: student for k in steps if on_grid(args.teacher_steps, k)} if sampler == "consistency"
                 else stage_students(student))
        curve.append((f"{iters} it" if iters else "given student", iters, secs, found, sampler, args.teacher_steps))
    else:
        types = [t.strip() for t in args.student_types.split(",") if t.strip()]
        unknown = [t for t in types if t not in STUDENT_KINDS]
        if unknown:
            raise SystemExit(f"--student-types: unknown {', '.join(unknown)}; use {', '.join(STUDENT_KINDS)}")
        points = parse_curve(args.iters_per_stage, steps)
        # untyped points once per --student-types entry; a typed point once, for its type
        todo = [(t, p) for t in types for p in points if p[2] is None] + [(p[2], p) for p in points if p[2]]
        for student_type, (iters, fewest, _, first) in todo:
            first = first or args.teacher_steps
            student, secs = distil(args, iters, fewest, student_type, first)
            label = (f"{iters} it" + ("" if student_type == "v_prediction" else f", {student_type}")
                     + ("" if first == args.teacher_steps else f", from DDIM-{first}"))
            if STUDENT_KINDS[student_type][0] == "consistency":  # one model, sampled at any step count on its grid
                curve.append((label, iters, secs, {k: student for k in steps if on_grid(first, k)}, "consistency",
                              first))
            else:
                curve.append((label, iters, secs, stage_students(student), "ddim", first))

    from medi_fast.data.pack import read_pack
    from medi_fast.demo.stages import DEFAULT_SETTING, DemoConfig, evaluate, measure_site_fidelity

    recorded = Path(args.index).parent / "demo_config.json"
    setting = args.setting or (json.loads(recorded.read_text())["setting"] if recorded.exists() else DEFAULT_SETTING)
    cfg = DemoConfig(probe_repeats=args.probe_repeats, seed=args.seed, setting=setting)
    index = pd.read_parquet(args.index)
    pack = Path(args.pack) if args.pack else Path(args.index).parent / "pack"
    real = np.ascontiguousarray(read_pack(pack)[1].transpose(0, 2, 3, 1))  # (N, R, R, 3), index order
    teacher = medi_fast.load(args.teacher, backend="torch", batch_size=64)
    spec = teacher.spec
    classes = list(spec["class"].vocab.names)
    sites = [s for s in spec["tss"].vocab.names if s != "Unknown"]
    combos = pd.DataFrame([(c, s, args.n_per_combo) for c in classes for s in sites], columns=["class", "tss", "count"])
    need = round(cfg.probe_ratio * cfg.probe_k)  # synthetic patches per class in one probe run
    if args.n_per_combo * len(sites) < need:
        raise SystemExit(f"--n-per-combo {args.n_per_combo} gives fewer than the probe's {need} synthetic patches per "
                         f"class; use at least {-(-need // len(sites))}")
    plan = plans.from_counts(spec, combos, args.seed)
    meta = pd.DataFrame({"class": plan.rows["class"].to_numpy(), "tissue_source_site": plan.rows["tss"].to_numpy()})

    runs = [("teacher", "ddim", BASELINE_STEPS, args.teacher, None, args.seed)]
    # DDIM-100 from other starting noise: how far a second draw of the baseline itself is from it by each measure
    runs += [("teacher", "ddim", BASELINE_STEPS, args.teacher, None, int(s))
             for s in args.baseline_seeds.split(",") if s.strip()]
    runs += [("teacher", "ddim", int(k), args.teacher, None, args.seed)
             for k in args.reference_steps.split(",") if k.strip()]
    for k in steps:
        runs += [("teacher", "ddim", k, args.teacher, None, args.seed),
                 ("teacher", args.solver, k, args.teacher, None, args.seed)]
        runs += [("student", sampler, k, str(found[k]), (label, iters, first), args.seed)
                 for label, iters, _, found, sampler, first in curve if k in found]
    synthetic, rows = {}, []
    for model, sampler, k, path, point, seed in runs:
        label, iters, first = point if point else (None, None, None)
        pipe = medi_fast.load(path, backend="torch", batch_size=64, steps=k, sampler=sampler)
        t = time.perf_counter()
        images = pipe.run(plan if seed == args.seed else plans.from_counts(spec, combos, seed))
        secs = time.perf_counter() - t
        name = (f"{model} {sampler}-{k}" + (f" ({label})" if label else "")
                + (f" (seed {seed})" if seed != args.seed else ""))
        synthetic[name] = (meta, images)
        site = measure_site_fidelity(cfg, index, real, (meta, images))
        pixel_std, laplacian_rms = texture(images)
        student_type = None if not label else ("consistency" if sampler == "consistency" else
                                               "sample" if ", sample" in label else "v_prediction")
        rows.append({"name": name, "model": model, "sampler": sampler, "steps": k, "iters_per_stage": iters,
                     "student_type": student_type, "first_teacher_steps": first, "seed": seed,
                     "unet_calls": k, "s": secs, "images_per_s": len(plan) / secs,
                     "site_slope": site.slope, "site_corr": site.correlation, "shipped": model == "student",
                     "pixel_std": pixel_std, "laplacian_rms": laplacian_rms,
                     "path": path})
        print(f"{name:34s} {secs:7.1f} s  site slope {site.slope:.3f}", flush=True)

    result = evaluate(cfg, index, real, synthetic)
    dist = result["fid"].groupby("model", sort=False)["distance"].mean()
    cells = result["fid_cells"].groupby("model", sort=False)["distance"].mean()
    probe = result["probe"].set_index("arm")
    for r in rows:
        r["dist"] = float(dist[r["name"]])
        r["cell_dist"] = float(cells[r["name"]])
        r["probe"] = float(probe.loc[r["name"], "tss_balanced_accuracy_mean"])
        r["probe_sem"] = float(probe.loc[r["name"], "tss_balanced_accuracy_sem"])
    base = rows[0]
    no_syn = probe.loc["no-synthetic"] if "no-synthetic" in probe.index else None
    for r in rows:
        r["dist_vs_ddim100"] = r["dist"] / base["dist"]
        r["cell_dist_vs_ddim100"] = r["cell_dist"] / base["cell_dist"]
        r["slope_vs_ddim100"] = r["site_slope"] / base["site_slope"]
        r["laplacian_vs_ddim100"] = r["laplacian_rms"] / base["laplacian_rms"]
        r["probe_minus_ddim100"] = r["probe"] - base["probe"]
        r["speedup_calls_vs_ddim100"] = BASELINE_STEPS / r["unet_calls"]
        r["speedup_wall_vs_ddim100"] = base["s"] / r["s"]
        # the bar a student must clear to replace the teacher (issue bounds): per-cell distance within 5 % of
        # DDIM-100's, at least 0.9 of its stain slope, probe at most 0.01 below its samples'
        r["meets_bounds"] = bool(r["cell_dist_vs_ddim100"] <= 1 + TOLERANCE and r["slope_vs_ddim100"] >= 0.9
                                 and r["probe_minus_ddim100"] >= -0.01)
    ok = [r["steps"] for r in rows if r["model"] == "student" and r["dist"] <= (1 + TOLERANCE) * base["dist"]]
    fewest = min(ok) if ok else None
    print("\n| model | iters | steps | cell dist / DDIM-100 | slope / DDIM-100 | probe - DDIM-100 | meets | img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} {r['sampler']} {r['student_type'] or ''} | {r['iters_per_stage'] or ''} | {r['steps']} | "
              f"{r['cell_dist_vs_ddim100']:.3f} | {r['slope_vs_ddim100']:.3f} | {r['probe_minus_ddim100']:+.3f} | "
              f"{r['meets_bounds']} | {r['images_per_s']:.1f} |")
    extra = {"teacher": args.teacher, "setting": setting, "n_images": len(plan),
             "curve": [{"iters_per_stage": iters, "label": label, "distill_seconds": secs, "student_steps": sorted(found),
                        "sampler": sampler, "first_teacher_steps": first}
                       for label, iters, secs, found, sampler, first in curve],
             "distill": {"teacher_steps": args.teacher_steps, "batch_size": args.batch_size, "lr": args.lr,
                         "ema_decay": args.ema_decay, "consistency_ema_decay": args.consistency_ema_decay},
             "fewest_student_steps_within_5pct": fewest,
             "probe_no_synthetic": None if no_syn is None else float(no_syn["tss_balanced_accuracy_mean"]),
             "probe_repeats": args.probe_repeats, "solver": args.solver,
             "total_seconds": time.perf_counter() - t0}
    path = write_results(args.name, rows, extra)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
