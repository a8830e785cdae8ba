"""Would int8 be worth shipping?  ONNX Runtime static int8 quantisation of the demo's MeDi model,
its speed beside the fp32 graph and what it does to the images.

    python benchmarks/int8_quality.py --checkpoint demo/runs/medi/checkpoints/best.pt [--steps 8]

The checkpoint is exported to ONNX (fp32) and quantised with ``onnxruntime.quantization``:
QOperator format, the convolutions only, weights int8 per channel, activations uint8 with ranges
calibrated on the inputs the model sees along DDIM trajectories of other seeds than the evaluated
ones.  Both graphs then generate the same images (same x_T, same DDIM steps) on ``ort-cpu``; the
candidates alternate for --repeats rounds.  Reported: the speed ratio, how far apart the two sets of
images are (RMS in [-1, 1] units and in grey levels), and each set's FID-style distance
(colour-texture features) to real synthetic-H&E patches of the same (class, site) combinations, with
the real-vs-real noise floor.  Needs a checkpoint trained on the built-in synthetic data (the demo's).

Writes benchmarks/results/int8_quality.json (with the machine description) and prints a summary.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from itertools import product
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, compare, write_results  # noqa: E402

from medi_fast import backends, checkpoint  # noqa: E402
from medi_fast.data.synth import render_patches  # noqa: E402
from medi_fast.engines.export import export_onnx  # noqa: E402
from medi_fast.eval.features import ColourTexture  # noqa: E402
from medi_fast.eval.fid import frechet_distance as frechet  # noqa: E402
from medi_fast.pixels import to_uint8  # noqa: E402
from medi_fast.samplers import get_sampler, timesteps_for  # noqa: E402


class _Recorder:
    """An ort-cpu denoiser that keeps every input it is called with (the calibration set)."""

    own_cpu_threads = True

    def __init__(self, inner):
        self.inner, self.device, self.feeds = inner, inner.device, []

    def __call__(self, x, t, cond):
        self.feeds.append(self.inner.contract.numpy_feeds(x, t, cond))
        return self.inner(x, t, cond)


def quantise(src: Path, dst: Path, feeds: list[dict]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    pre = dst.with_name("pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QOperator, op_types_to_quantize=["Conv"],
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a checkpoint trained on the built-in synthetic data")
    ap.add_argument("--steps", type=int, default=8, help="DDIM steps (8: the fewest within 5 %% of DDIM-100 on the demo)")
    ap.add_argument("--n-per-combo", type=int, default=16, help="evaluated images per (class, site) combination")
    ap.add_argument("--calib-images", type=int, default=32, help="images whose DDIM trajectories calibrate int8")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds, fp32 and int8 alternating")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    ckpt = checkpoint.load(args.checkpoint)
    spec, schedule, res = ckpt.spec, ckpt.schedule, ckpt.resolution
    attrs = {a.name: a for a in spec.attributes}
    combos = list(product(attrs["class"].vocab.names, attrs["tss"].vocab.names))
    labels = [c for c in combos for _ in range(args.n_per_combo)]
    n = len(labels)
    cond_all = spec.encode({"class": [c for c, _ in labels], "tss": [s for _, s in labels]}, n)
    x_T = torch.stack([torch.randn(3, res, res, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + i))
                       for i in range(n)])  # (N, 3, H, W)
    ddim, ts = get_sampler("ddim"), timesteps_for("ddim", schedule, args.steps)

    def generate(denoiser, x, cond) -> torch.Tensor:
        out = []
        with torch.inference_mode(), backends.sampling_threads(denoiser):
            for i in range(0, len(x), args.batch_size):
                out.append(ddim(denoiser, x[i:i + args.batch_size], ts, schedule,
                                {k: v[i:i + args.batch_size] for k, v in cond.items()}))
        return torch.cat(out)

    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_onnx(ckpt, Path(tmp) / "model.onnx")
        fp32 = backends.create("ort-cpu", backends.open_model(fp32_path))
        # calibration inputs: other seeds than the evaluated images, the same combinations
        g = torch.Generator().manual_seed(10_000_019 + args.seed)
        k = args.calib_images
        idx = torch.linspace(0, n - 1, k).long()
        recorder = _Recorder(fp32)
        generate(recorder, torch.randn(k, 3, res, res, generator=g), {name: v[idx] for name, v in cond_all.items()})
        t0 = time.perf_counter()
        int8_path = quantise(fp32_path, Path(tmp) / "model.int8.onnx", recorder.feeds)
        quant_s = time.perf_counter() - t0
        # the same I/O contract (read from the fp32 file's metadata), the int8 graph
        int8 = backends.create("ort-cpu", replace(backends.open_model(fp32_path), path=int8_path))

        candidates = {"fp32": fp32, "int8": int8}
        first = {k_: v[:args.batch_size] for k_, v in cond_all.items()}
        timings = alternate({name: (lambda d=den: generate(d, x_T, cond_all)) for name, den in candidates.items()},
                            args.repeats,  # warm-up: one batch each
                            warmup_fns={name: (lambda d=den: generate(d, x_T[:args.batch_size], first))
                                        for name, den in candidates.items()})
        outs, speed = timings.outputs, compare(timings.wall, "fp32")["int8"]

    feat = ColourTexture()
    real = [np.concatenate([render_patches(c, s, args.n_per_combo, res, seed=[args.seed, r, i])
                            for i, (c, s) in enumerate(combos)]) for r in (1, 2)]
    f_real = [feat(r) for r in real]
    a, b = outs["fp32"].clamp(-1, 1), outs["int8"].clamp(-1, 1)
    levels = np.abs(to_uint8(a).astype(int) - to_uint8(b).astype(int))
    result = {
        "n_images": n, "steps": args.steps, "quantise_s": round(quant_s, 1),
        "shipped": False,  # int8 changes the images (docs/engines.md)
        "fp32_s": min(timings.wall["fp32"]), "int8_s": speed["seconds"],
        "speedup_int8_vs_fp32": speed["ratio_best"], "speedup_per_round_median": speed["ratio_per_round_median"],
        "speedup_per_round_range": speed["ratio_per_round_range"],
        "rms_diff": float(((a - b) ** 2).mean().sqrt()), "mean_level_diff": float(levels.mean()),
        "pixels_over_8_levels": float((levels > 8).mean()),
        "dist_fp32": frechet(feat(to_uint8(a)), f_real[0]), "dist_int8": frechet(feat(to_uint8(b)), f_real[0]),
        "noise_floor": frechet(f_real[0], f_real[1]),
    }
    print(f"int8 vs fp32 on ort-cpu, DDIM-{args.steps}, {n} images: {result['speedup_int8_vs_fp32']:.2f}x "
          f"(same-round median {result['speedup_per_round_median']:.2f}x)")
    print(f"images: RMS difference {result['rms_diff']:.4f} ([-1, 1] units), mean {result['mean_level_diff']:.1f} grey "
          f"levels, {100 * result['pixels_over_8_levels']:.1f} % of values more than 8 levels apart")
    print(f"FID-style distance to real: fp32 {result['dist_fp32']:.3f}, int8 {result['dist_int8']:.3f} "
          f"(real-vs-real noise floor {result['noise_floor']:.3f})")
    path = write_results("int8_quality", [result], {
        "command": " ".join(["python", "benchmarks/int8_quality.py", *(argv or sys.argv[1:])]),
        "checkpoint": str(args.checkpoint), "checkpoint_hash": ckpt.hash,
        "onnxruntime": __import__("onnxruntime").__version__}, timing=timings)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
