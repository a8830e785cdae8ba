"""bf16 generation on a CPU against fp32, on a trained model: how far its images move, and whether the demo's
measures notice.

    python benchmarks/cpu_bf16_quality.py --teacher demo_out/runs/medi/checkpoints/best.pt \
        --index demo_out/index.parquet [--pack demo_out/pack] [--seeds 0,1,2]

The same plan (every class x cohort site, --n-per-combo images each, one seed per image, so every path starts
from the same x_T) is generated with the demo's sampler (DDIM, --steps) through:

* ``ort-cpu`` (fp32; what the demo generated with before it used bf16): the reference, and the same path with
  the other --seeds (other starting noise): the *noise* of each measure, what a second draw of fp32 moves;
* ``openvino-bf16`` (the ONNX export in OpenVINO's bf16 precision) and ``torch-bf16`` (the checkpoint under
  CPU bf16 autocast): what ``auto`` picks on a CPU with bf16 units, for an ONNX file and a checkpoint.

Per path, with the demo's own evaluation (medi_fast.demo.stages, imported):

* grey levels against the reference's images of the same seed: max, mean, 99.9th percentile, and the
  fraction of pixels more than 8 levels off;
* ``cell_dist``: the demo's per-cell FID-style colour-texture distance (each trained class x site cell's
  patches to its real ones, averaged), ``site_slope`` (stain fidelity, 1 = every site's difference
  reproduced) and the demo's probe (TSS-averaged balanced accuracy with these patches as the synthetic set);
* ``images_per_s`` in this run (each path once, after a warm-up batch; the ratios are this run's).

``within_noise``: each of the bf16 path's |measure - reference| is at most the largest |measure - reference|
of the fp32 draws with other seeds.  Needs the ``openvino`` extra and a CPU with bf16 units (the script says
which path it skips and why).  Writes benchmarks/results/cpu_bf16_quality.json.
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
from medi_fast import backends  # noqa: E402
from medi_fast import plan as plans  # noqa: E402

LEVELS = 8  # "more than 8 grey levels off": accuracy.IMAGE_LEVELS, the fp32 paths' rounding allowance


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="a trained checkpoint: the demo's MeDi model")
    ap.add_argument("--index", required=True, help="the demo's index.parquet (real patches)")
    ap.add_argument("--pack", help="the pack of --index at the model resolution (default: INDEX_DIR/pack)")
    ap.add_argument("--steps", type=int, default=15, help="DDIM steps (the demo's)")
    ap.add_argument("--n-per-combo", type=int, default=40, help="images per class x site (the demo's)")
    ap.add_argument("--seeds", default="0,1,2", help="the first is compared; the others are fp32's noise")
    ap.add_argument("--probe-repeats", type=int, default=3)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "medi-fast-cpu-bf16-quality"),
                    help="where the ONNX export is written (reused)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]

    from medi_fast.data.pack import read_pack
    from medi_fast.demo.stages import DEFAULT_SETTING, DemoConfig, evaluate, export_model, measure_site_fidelity

    recorded = Path(args.index).parent / "demo_config.json"
    setting = json.loads(recorded.read_text())["setting"] if recorded.exists() else DEFAULT_SETTING
    cfg = DemoConfig(probe_repeats=args.probe_repeats, seed=seeds[0], setting=setting)
    index = pd.read_parquet(args.index)
    pack = Path(args.pack) if args.pack else Path(args.index).parent / "pack"
    real = np.ascontiguousarray(read_pack(pack)[1].transpose(0, 2, 3, 1))
    onnx = Path(args.work) / "engines" / "model" / "model.onnx"
    if not onnx.is_file():
        export_model(Path(args.teacher), Path(args.work), "model")

    spec = medi_fast.load(args.teacher, backend="torch").spec
    classes = list(spec["class"].vocab.names)
    sites = [s for s in spec["tss"].vocab.names if s != "Unknown"]
    combos = pd.DataFrame([(c, s, args.n_per_combo) for c in classes for s in sites], columns=["class", "tss", "count"])

    runs = [("ort-cpu", str(onnx), s) for s in seeds]
    skipped = {}
    for name, path in (("openvino-bf16", str(onnx)), ("torch-bf16", args.teacher)):
        ok, why = backends.BACKENDS[name].availability()
        if ok:
            runs.append((name, path, seeds[0]))
        else:
            skipped[name] = why
            print(f"skipping {name}: {why}", flush=True)

    synthetic, rows, images_of = {}, [], {}
    for backend, path, seed in runs:
        plan = plans.from_counts(spec, combos, seed)
        meta = pd.DataFrame({"class": plan.rows["class"].to_numpy(), "tissue_source_site": plan.rows["tss"].to_numpy()})
        pipe = medi_fast.load(path, backend=backend, batch_size=64, steps=args.steps, sampler="ddim")
        pipe.run(plans.from_counts(spec, combos.assign(count=1), seed))  # warm-up: sessions, oneDNN kernels
        t = time.perf_counter()
        images = pipe.run(plan)
        secs = time.perf_counter() - t
        name = f"{backend} seed {seed}"
        synthetic[name] = (meta, images)
        images_of[name] = images
        site = measure_site_fidelity(cfg, index, real, (meta, images))
        rows.append({"name": name, "backend": backend, "seed": seed, "gate": _gate(pipe), "s": secs,
                     "images_per_s": len(plan) / secs, "site_slope": site.slope})
        print(f"{name:24s} {secs:6.1f} s  site slope {site.slope:.3f}", flush=True)

    result = evaluate(cfg, index, real, synthetic)
    cells = result["fid_cells"].groupby("model", sort=False)["distance"].mean()
    probe = result["probe"].set_index("arm")
    ref = rows[0]
    ref_images = images_of[ref["name"]].astype(np.int16)
    for r in rows:
        r["cell_dist"] = float(cells[r["name"]])
        r["probe"] = float(probe.loc[r["name"], "tss_balanced_accuracy_mean"])
        if r["seed"] == ref["seed"]:
            diff = np.abs(images_of[r["name"]].astype(np.int16) - ref_images)
            r.update(max_levels=int(diff.max()), mean_levels=float(diff.mean()),
                     p999_levels=float(np.percentile(diff, 99.9)), frac_over_8=float((diff > LEVELS).mean()))
        r["speed_vs_ort_cpu"] = r["images_per_s"] / ref["images_per_s"]
    noise = {m: max((abs(r[m] - ref[m]) for r in rows if r["backend"] == "ort-cpu" and r is not ref), default=None)
             for m in ("cell_dist", "site_slope", "probe")}
    for r in rows:
        if r["backend"] != "ort-cpu":
            r["within_noise"] = bool(all(noise[m] is not None and abs(r[m] - ref[m]) <= noise[m] for m in noise))
    print("\n| path | seed | max / mean / p99.9 levels | > 8 levels | cell dist | slope | probe | img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lv = (f"{r['max_levels']} / {r['mean_levels']:.2f} / {r['p999_levels']:.0f}" if "max_levels" in r else "")
        over = f"{r['frac_over_8']:.2e}" if "frac_over_8" in r else ""
        print(f"| {r['backend']} | {r['seed']} | {lv} | {over} | {r['cell_dist']:.2f} | {r['site_slope']:.3f} | "
              f"{r['probe']:.3f} | {r['images_per_s']:.1f} |")
    print("fp32 noise (largest |other seed - reference|):", {k: round(v, 4) for k, v in noise.items() if v is not None})
    extra = {"teacher": args.teacher, "setting": setting, "steps": args.steps, "n_images": int(len(combos) * args.n_per_combo),
             "noise": noise, "skipped": skipped, "cpu_bf16_native": backends.cpu_bf16_native()}
    print("wrote", write_results("cpu_bf16_quality", rows, extra))
    return 0


def _gate(pipe) -> dict | None:
    """The accuracy gate's figures of the pipeline's backend, where it has one (bf16 on a CPU)."""
    gate = getattr(getattr(pipe, "denoiser", None), "gate", None)
    return None if gate is None else {k: v for k, v in gate.to_dict().items() if k in ("rel", "rel_bound", "nonfinite")}


if __name__ == "__main__":
    sys.exit(main())
