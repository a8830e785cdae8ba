"""Images/s of each available runtime backend beside the reference-style loop, one run each.

Reference (the baseline every ratio is against, measured in the same run): diffusers'
DDIMScheduler + the eager fp32 UNet2DModel, batched, z_cond computed once, under inference_mode.
Candidates: the ``torch`` backend with medi-fast's DDIM; ``ort-cpu`` (default settings: threads =
physical cores, ORT_ENABLE_ALL, sequential) and its variants (1 thread, EXTENDED optimisation,
parallel executor, torch's sampler math on all cores); ``ort-cpu`` with the fast solvers at the same
number of steps; the ``openvino`` backend on the same .onnx when installed; on a GPU machine the CUDA ones.

    python benchmarks/backends.py                 # tiny-32 and small-64 at batch 16
    python benchmarks/backends.py --presets tiny-32 --steps 4 --batch 8
    python benchmarks/backends.py --presets tiny-32,small-64,medi-128 --steps 10,4,1 --batch 16,16,2

Prints one table and writes benchmarks/results/backends.json (with the machine description).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, compare, export_checkpoint, machine_info, random_checkpoint, write_results  # noqa: E402

from medi_fast.backends import BACKENDS, create, open_model, sampling_threads  # noqa: E402
from medi_fast.backends.onnxruntime_backend import physical_cores  # noqa: E402
from medi_fast.model import PRESETS  # noqa: E402
from medi_fast.samplers import get_sampler, timesteps_for  # noqa: E402
from medi_fast.schedule import Schedule  # noqa: E402

CLASSES = ["LUAD", "LUSC", "BRCA", "COAD"]
FAST_SOLVERS = ("dpmpp-2m-clip", "unipc-clip")  # the variants usable on the demo model (benchmarks/solver_quality.py)
SITES = ["05", "38", "44", "49"]
REFERENCE = "reference (diffusers DDIM + eager UNet)"  # the baseline every ratio is against


def reference_loop(model, x_T, cond, steps, schedule):
    """diffusers DDIMScheduler + eager UNet2DModel fp32, as the reference MeDi code samples."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**schedule.diffusers_config())
    sched.set_timesteps(steps)
    with torch.inference_mode():
        z = model.conditioner(cond)  # (B, d_t)
        x = x_T
        for t in sched.timesteps:
            eps = model.unet(x, t, class_labels=z).sample
            x = sched.step(eps, t, x).prev_sample
    return x


def sampler_loop(denoiser, x_T, cond, steps, schedule, solver="ddim"):
    """A medi-fast sampler as generate runs it (torch on one thread while a CPU runtime owns the cores)."""
    with torch.inference_mode(), sampling_threads(denoiser):
        return get_sampler(solver)(denoiser, x_T, timesteps_for(solver, schedule, steps), schedule, cond)


def fp32_conv_peak(threads: int, repeats: int = 10) -> tuple[float, list]:
    """This machine's best fp32 convolution rate (GFLOP/s): ONNX Runtime (the fastest runtime here)
    on single 3x3 conv layers of the widths and sizes the presets use, batch 16, best of the shapes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rates = []
    for batch, ch, px in [(16, 64, 64), (16, 128, 32), (16, 256, 16)]:
        w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((ch, ch, 3, 3), np.float32) * 0.05, "w")
        shape = [batch, ch, px, px]
        graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [w])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8  # onnx writes its newest IR by default; ONNX Runtime may read only older ones
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(1).standard_normal(shape, np.float32)
        best = min(alternate({"conv": lambda: sess.run(None, {"x": x})}, repeats).wall["conv"])
        rates.append({"shape": shape, "gflop_s": round(2 * batch * ch * ch * 9 * px * px / best / 1e9, 1)})
    return max(r["gflop_s"] for r in rates), rates


def bf16_conv_peak(threads: int, repeats: int = 10) -> tuple[float, list]:
    """This machine's best bf16 convolution rate (GFLOP/s): torch (oneDNN) bf16 3x3 convolutions,
    channels_last, at the shapes ``fp32_conv_peak`` uses.  On a CPU without bf16 units torch emulates
    bf16 and this is far below the fp32 rate."""
    torch.set_num_threads(threads)
    rates = []
    for batch, ch, px in [(16, 64, 64), (16, 128, 32), (16, 256, 16)]:
        conv = torch.nn.Conv2d(ch, ch, 3, padding=1, bias=False).to(torch.bfloat16, memory_format=torch.channels_last)
        x = torch.randn(batch, ch, px, px).to(torch.bfloat16, memory_format=torch.channels_last)
        with torch.inference_mode():
            best = min(alternate({"conv": lambda: conv(x)}, repeats).wall["conv"])
        rates.append({"shape": [batch, ch, px, px], "gflop_s": round(2 * batch * ch * ch * 9 * px * px / best / 1e9, 1)})
    return max(r["gflop_s"] for r in rates), rates


def run(preset, steps, batch, tmp, repeats, compile_cpu=True):
    schedule = Schedule()
    model, ck_path = random_checkpoint(preset, tmp, CLASSES, SITES)
    info = open_model(export_checkpoint(ck_path, Path(tmp) / preset))
    res = model.resolution
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(batch, 3, res, res, generator=g)
    cond = model.spec.encode({"class": [CLASSES[i % 4] for i in range(batch)],
                              "tss": [SITES[(i // 4) % 4] for i in range(batch)]})

    # label -> (loop of n steps, shipped: is this a setting medi-fast uses?)
    loops = {REFERENCE: (lambda n: reference_loop(model, x_T, cond, n, schedule), False)}
    solver_of = {}  # label -> sampler, where not DDIM
    torch_backend = create("torch", open_model(ck_path), device="cpu")
    loops["torch (medi-fast DDIM, eager fp32)"] = (lambda n: sampler_loop(torch_backend, x_T, cond, n, schedule), True)
    if compile_cpu:  # inductor on the CPU (needs a C++ compiler); compiled during the untimed warm-up
        compiled = create("torch-compile", open_model(ck_path), device="cpu")
        loops["torch-compile (CPU, inductor, fp32)"] = (lambda n: sampler_loop(compiled, x_T, cond, n, schedule), True)
    cores = physical_cores()
    # the shipped default, then variants measured and not used (docs/engines.md says why)
    variants = {f"ort-cpu ({cores} threads, ALL, sequential)": ({}, True),
                "ort-cpu (1 thread)": ({"threads": 1}, False),
                "ort-cpu (EXTENDED optimisation)": ({"opt_level": "extended"}, False),
                "ort-cpu (parallel executor)": ({"sequential": False}, False)}
    for label, (opts, shipped) in variants.items():
        be = create("ort-cpu", info, **opts)
        loops[label] = ((lambda n, be=be: sampler_loop(be, x_T, cond, n, schedule)), shipped)
        if not opts:
            # the same session with the sampler's torch ops on all cores (no hand-off): the control row
            plain = (lambda be: lambda x, t, c: be(x, t, c))(be)  # a plain callable: sampling_threads leaves torch alone
            loops[f"ort-cpu (torch sampler math on {torch.get_num_threads()} threads)"] = (
                (lambda n, d=plain: sampler_loop(d, x_T, cond, n, schedule)), False)
            for name in FAST_SOLVERS:  # the same session, the same number of steps, another solver
                solver_of[f"ort-cpu + {name}"] = name
                loops[f"ort-cpu + {name}"] = ((lambda n, be=be, s=name: sampler_loop(be, x_T, cond, n, schedule, s)),
                                              True)
    if BACKENDS["openvino"].availability()[0]:
        # bf16 is a precision hint: CPUs without bf16 units run f32 (not offered as a setting)
        for prec, shipped in (("f32", True), ("bf16", False)):
            ov = create("openvino", info, precision=prec)
            loops[f"openvino CPU ({prec})"] = ((lambda n, d=ov: sampler_loop(d, x_T, cond, n, schedule)), shipped)
    for name in ("ort-cuda", "torch-fp16", "torch-bf16"):
        if BACKENDS[name].availability()[0]:
            be = create(name, info if name.startswith("ort") else open_model(ck_path))
            xd = x_T.to(be.device)
            cd = {k: v.to(be.device) for k, v in cond.items()}
            if be.device.type == "cuda":
                loops[name] = ((lambda n, be=be, xd=xd, cd=cd: (sampler_loop(be, xd, cd, n, schedule),
                                                                torch.cuda.synchronize())), True)
            else:  # torch-bf16 on a CPU with bf16 units (autocast, channels_last; gated when it started)
                loops[f"{name} (CPU autocast, channels_last)"] = (
                    (lambda n, be=be: sampler_loop(be, x_T, cond, n, schedule)), True)

    # untimed 1-step warm-up of each (allocations, kernel selection, torch.compile), then the rounds
    timings = alternate({k: (lambda f=f: f(steps)) for k, (f, _) in loops.items()}, repeats,
                        warmup_fns={k: (lambda f=f: f(1)) for k, (f, _) in loops.items()})
    ref_out = timings.outputs[REFERENCE]
    ref_out = ref_out[0] if isinstance(ref_out, tuple) else ref_out
    ref_best = min(timings.wall[REFERENCE])
    rows = []
    for label, c in compare(timings.wall, REFERENCE).items():
        out = timings.outputs[label]
        out = out[0] if isinstance(out, tuple) else out
        sec, lo, hi = c["seconds"], *c["ratio_per_round_range"]
        # another solver's x0 differs by its discretisation, not by the runtime: not compared
        err = float((out.float().cpu() - ref_out).abs().max()) if label not in solver_of else float("nan")
        rows.append({"preset": preset, "backend": label, "sampler": solver_of.get(label, "ddim"), "batch": batch,
                     "steps": steps, "shipped": loops[label][1], "seconds": round(sec, 3),
                     "seconds_per_round": [round(t, 3) for t in c["seconds_per_round"]],
                     "images_per_s": round(batch / sec, 3), "ratio_vs_reference": round(c["ratio_best"], 3),
                     "ratio_per_round_median": round(c["ratio_per_round_median"], 3),
                     "ratio_per_round_range": [round(lo, 3), round(hi, 3)],
                     "max_abs_diff_vs_reference": err})
        print(f"{preset:<9} {label:<46} {sec:>7.2f} s {batch / sec:>8.2f} img/s {c['ratio_best']:>6.2f}x  "
              f"(rounds: median {c['ratio_per_round_median']:.2f}x, {lo:.2f}-{hi:.2f})  "
              f"max|x0 - ref| {err:.2e}", flush=True)
    if not torch.cuda.is_available():
        # Every FLOP of the loop at the best fp32 (and bf16) conv rate measured on this machine: what a
        # runtime with direct convolutions would need to reach.  Not a backend; derived from measurements.
        gflop = steps * batch * PRESETS[preset].gflop_per_step
        peaks = {"fp32": fp32_conv_peak(physical_cores()), "bf16": bf16_conv_peak(physical_cores())}
        for row in rows:  # each candidate's share of the rate of its own arithmetic
            kind = "bf16" if "bf16" in row["backend"] else "fp32"
            row["fraction_of_conv_rate"] = round(gflop / row["seconds"] / peaks[kind][0], 3)
            row["conv_rate_kind"] = kind
        for kind, (peak, shapes) in peaks.items():
            sec = gflop / peak
            label = f"ceiling: all FLOPs at {peak:.0f} GFLOP/s ({kind})"
            rows.append({"preset": preset, "backend": label, "sampler": "ddim", "batch": batch, "steps": steps,
                         "shipped": False, "seconds": round(sec, 3), "images_per_s": round(batch / sec, 3),
                         "ratio_vs_reference": round(ref_best / sec, 3),
                         "derived": True, "conv_peak_shapes": shapes})
            print(f"{preset:<9} {label:<46} {sec:>7.2f} s {batch / sec:>8.2f} img/s {ref_best / sec:>6.2f}x  "
                  f"(derived: FLOPs per loop / the best {kind} 3x3-conv rate measured now)", flush=True)
    return rows, timings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny-32,small-64")
    ap.add_argument("--steps", default="10,4", help="DDIM steps per preset (comma list, same order)")
    ap.add_argument("--batch", default="16", help="batch per preset (comma list, same order)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds; each runs every candidate once in turn (best and same-round ratios reported)")
    ap.add_argument("--name", default="backends")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (inductor needs a C++ compiler)")
    args = ap.parse_args(argv)
    torch.set_num_threads(physical_cores())  # torch and ORT get the same cores
    presets = args.presets.split(",")
    steps = [int(s) for s in args.steps.split(",")]
    steps += [steps[-1]] * (len(presets) - len(steps))
    batches = [int(b) for b in str(args.batch).split(",")]
    batches += [batches[-1]] * (len(presets) - len(batches))
    rows = []
    print(f"{'preset':<9} {'backend':<42} {'time':>10} {'throughput':>15} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for preset, n, b in zip(presets, steps, batches):
            preset_rows, timings = run(preset, n, b, tmp, args.repeats, compile_cpu=not args.no_compile)
            rows += preset_rows
    path = write_results(args.name, rows, {"physical_cores": physical_cores(), "torch_threads": torch.get_num_threads(),
                                           "onnxruntime": __import__("onnxruntime").__version__,
                                           "command": " ".join(["python", "benchmarks/backends.py"] + sys.argv[1:])},
                         timing=timings)
    print(f"wrote {path}")
    return machine_info()


if __name__ == "__main__":
    main()
