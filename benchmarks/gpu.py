"""Everything the GPU rows of RESULTS.md need, in one command for whoever has a GPU.

    python benchmarks/gpu.py               # on a GPU machine: medi-128, batch 64 and 128, every GPU backend
    python benchmarks/gpu.py --dry-run     # tiny preset, CPU backends: checks the script end to end anywhere

Per preset (random weights; speed does not depend on them), backend and batch: images/s of a DDIM
run (100 steps, the published protocol) and of the fast solvers (dpmpp-2m-clip, unipc-clip at 20
steps), each after one untimed warm-up (engine build, CUDA-graph capture, compilation), best of
``--repeats`` rounds with the backends alternating inside each round; peak GPU memory per backend;
and the GPU's own bf16 matmul rate (TFLOP/s of an N x N x N product), the ceiling to read them against.
Writes ``results/gpu-<gpu>.json`` (``gpu-dry-run.json`` with --dry-run); ``run_all.py`` shows the rows
in RESULTS.md when such a file exists.  Nothing here is a claim until someone runs it on a GPU.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import random_checkpoint, write_results  # noqa: E402

GPU_BACKENDS = ("torch-fp16", "torch-bf16", "torch-compile", "ort-cuda", "ort-trt", "tensorrt")
CPU_BACKENDS = ("torch", "ort-cpu")
SOLVERS = (("ddim", 100), ("dpmpp-2m-clip", 20), ("unipc-clip", 20))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """TFLOP/s of an n x n x n matmul (2 n^3 FLOPs), best of ``repeats``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def open_backend(name: str, files: dict, workdir: Path):
    from medi_fast import backends

    if name == "tensorrt":
        from medi_fast.engines.tensorrt_build import cached_engine

        return backends.create(name, backends.open_model(cached_engine(files["onnx"], workdir / "engines")))
    kind = "checkpoint" if name.startswith("torch") else "onnx"
    return backends.create(name, backends.open_model(files[kind]))


def time_run(denoiser, info, solver: str, steps: int, batch: int) -> float:
    from medi_fast.backends import sampling_threads
    from medi_fast.samplers import get_sampler, timesteps_for

    dev = getattr(denoiser, "device", torch.device("cpu"))
    x = torch.randn(batch, 3, info.resolution, info.resolution, device=dev)
    cond = {k: v.to(dev) for k, v in info.spec.null(batch).items()}
    ts = timesteps_for(solver, info.schedule, steps)
    with sampling_threads(denoiser), torch.no_grad():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        get_sampler(solver)(denoiser, x, ts, info.schedule, cond)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny-32, CPU backends, 2 steps: the script end to end")
    ap.add_argument("--presets", default="medi-128")
    ap.add_argument("--batches", default="64,128")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--matmul", type=int, default=8192, help="N of the bf16 N x N x N matmul")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("benchmarks/gpu.py needs a CUDA GPU; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    presets = ["tiny-32"] if args.dry_run else args.presets.split(",")
    batches = [2] if args.dry_run else [int(b) for b in args.batches.split(",")]
    solvers = [(s, 2) for s, _ in SOLVERS] if args.dry_run else list(SOLVERS)
    names = CPU_BACKENDS if args.dry_run else GPU_BACKENDS
    device = torch.device("cuda" if cuda else "cpu")
    gpu = torch.cuda.get_device_name(0) if cuda else "dry-run"

    from medi_fast import backends
    from medi_fast.backends.contract import BatchRange
    from medi_fast.engines.export import ExportConfig, export_onnx

    rows, memory = [], []
    rate = matmul_rate(256 if args.dry_run else args.matmul, torch.bfloat16 if cuda else torch.float32, device)
    with tempfile.TemporaryDirectory(prefix="medi-gpu-bench-") as tmp:
        work = Path(tmp)
        for preset in presets:
            _, ck = random_checkpoint(preset, work, ["LUAD", "LUSC"], ["05", "44"])
            from medi_fast import checkpoint

            onnx_path = export_onnx(checkpoint.load(ck), work / preset / "model.onnx",
                                    ExportConfig(batch=BatchRange(1, min(batches), max(batches))))
            files = {"checkpoint": ck, "onnx": onnx_path}
            info = backends.open_model(onnx_path)
            opened = {}
            for name in names:
                ok, why = backends.BACKENDS[name].availability()
                if not ok:
                    rows.append({"preset": preset, "backend": name, "status": f"absent: {why}"})
                    continue
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                opened[name] = open_backend(name, files, work)
            for batch in batches:
                for solver, steps in solvers:
                    best = {n: float("inf") for n in opened}
                    for n, den in opened.items():  # warm-up: builds, captures, compiles
                        time_run(den, info, solver, 1 if solver == "ddim" else 2, batch)
                    for _ in range(args.repeats):  # backends alternate within each round
                        for n, den in opened.items():
                            best[n] = min(best[n], time_run(den, info, solver, steps, batch))
                    for n, s in best.items():
                        rows.append({"preset": preset, "backend": n, "status": "ok", "solver": solver, "steps": steps,
                                     "batch": batch, "seconds": s, "images_per_s": batch / s})
            if cuda:
                memory.append({"preset": preset, "peak_gib_all_backends": torch.cuda.max_memory_allocated() / 2**30})
            for den in opened.values():
                den.close()
    path = write_results(f"gpu-{slug(gpu)}", rows, {"gpu": gpu, "dry_run": args.dry_run, "memory": memory,
                                                     "matmul": {"dtype": "bf16" if cuda else "fp32", "tflops": rate}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
