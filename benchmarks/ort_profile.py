"""Where ort-cpu spends a UNet call: ONNX Runtime's profiler, time per operator type.

    python benchmarks/ort_profile.py                      # tiny-32 and small-64, batch 16, random weights
    python benchmarks/ort_profile.py --onnx engines/medi/model.onnx --batch 8

Builds each preset with random weights, exports it, runs --calls profiled calls after a warm-up
with the ort-cpu backend's session settings, and sums the kernel time per operator type (after
ONNX Runtime's graph optimisation: fused and layout-conversion nodes appear under their own names).
Writes benchmarks/results/ort_profile.json and prints one table per model.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import export_checkpoint, random_checkpoint, write_results  # noqa: E402

from medi_fast import backends  # noqa: E402
from medi_fast.backends.onnxruntime_backend import physical_cores  # noqa: E402


def profile(onnx_path: Path, batch: int, calls: int, tmp: Path) -> list[dict]:
    import onnxruntime as ort

    info = backends.open_model(onnx_path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = physical_cores()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / "ort")
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    res = info.resolution
    cond = {a.name: torch.arange(batch) % len(a.vocab.names) if a.vocab is not None else torch.full((batch,), 50.0)
            for a in info.spec.attributes}
    feeds = info.contract.numpy_feeds(torch.randn(batch, 3, res, res), torch.full((batch,), 500), cond)
    sess.run(None, feeds)  # warm-up (profiled too; dropped below)
    for _ in range(calls):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    first_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    per_op, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_end:
            per_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    total = sum(per_op.values())
    return [{"op": op, "share": us / total, "ms_per_call": us / calls / 1e3, "nodes": count[op] // calls}
            for op, us in per_op.most_common()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny-32,small-64")
    ap.add_argument("--onnx", help="profile this exported model instead of random-weight presets")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        models = {}
        if args.onnx:
            models[args.onnx] = Path(args.onnx)
        else:
            for preset in args.presets.split(","):
                _, ck = random_checkpoint(preset, tmp, ["LUAD", "LUSC"], ["05", "44"])
                models[preset] = export_checkpoint(ck, tmp / preset)
        for name, path in models.items():
            ops = profile(path, args.batch, args.calls, tmp)
            total = sum(o["ms_per_call"] for o in ops)
            print(f"\n{name}: batch {args.batch}, {total:.1f} ms of kernel time per call")
            for o in ops[:12]:
                print(f"  {o['op']:<24} {100 * o['share']:5.1f} %  {o['ms_per_call']:8.2f} ms  {o['nodes']:4d} nodes")
            rest = sum(o["share"] for o in ops[12:])
            print(f"  {'(other ops)':<24} {100 * rest:5.1f} %")
            rows += [{"model": name, "batch": args.batch, **o} for o in ops]
    print(f"wrote {write_results('ort_profile', rows, {'command': ' '.join(['python', 'benchmarks/ort_profile.py', *(argv or sys.argv[1:])])})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
