"""What `medi-fast export CKPT` costs with a user's defaults: wall time and peak memory.

Creates a random checkpoint of the preset with `medi-fast init-checkpoint` (the weights do not
change the cost), then runs `medi-fast export ckpt.pt` exactly as a user types it, in a child
process whose peak resident memory is read with ``resource.getrusage(RUSAGE_CHILDREN)`` from a
fresh intermediate process (so the checkpoint's creation does not count).  Then the same export
once more, in-process in a fresh interpreter, for where the memory goes: each stage of
``engines.pipeline.export_checkpoint`` (and the two steps of the ONNX export) with its seconds, the
resident memory it started from and its peak (``VmHWM``, reset before each stage by writing 5 to
``/proc/self/clear_refs``; Linux only).  ``--baseline SRC`` runs that breakdown also for another
source tree of medi-fast (e.g. ``git archive`` of an older commit), side by side in the same run.
Writes ``results/export_cost.json`` with the machine (``lscpu``'s model name) and its load before
and after.

    python benchmarks/export_cost.py                 # medi-128, the published architecture
    python benchmarks/export_cost.py --preset tiny-32
    python benchmarks/export_cost.py --checkpoint ckpt.pt --baseline /tmp/medi-fast-before
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_results  # noqa: E402

# Runs in a fresh interpreter: its only child is the export, so RUSAGE_CHILDREN is the export's.
MEASURE = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": r.returncode, "wall_s": wall, "peak_rss_gib": ru.ru_maxrss / 2**20,
                  "cpu_s": ru.ru_utime + ru.ru_stime, "stdout": r.stdout, "stderr": r.stderr}))
"""


# Runs in a fresh interpreter: the export in-process, with each stage's peak resident memory.
STAGES = r"""
import functools, json, sys, time
import torch
from medi_fast import checkpoint
from medi_fast.engines import export, pipeline

def status(key):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(key))

rows, open_rows = [], []

def fold():  # the peak since the last reset belongs to every stage still running
    for row in open_rows:
        row["peak"] = max(row["peak"], status("VmHWM"))

def reset():
    fold()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

def wrap(owner, name, label):
    original = getattr(owner, name)

    @functools.wraps(original)
    def staged(*args, **kwargs):
        reset()
        row = {"stage": label, "depth": len(open_rows), "start": status("VmRSS"), "peak": 0, "t0": time.perf_counter()}
        rows.append(row)
        open_rows.append(row)
        try:
            return original(*args, **kwargs)
        finally:
            fold()
            open_rows.pop()
            row["seconds"] = time.perf_counter() - row.pop("t0")
            reset()

    setattr(owner, name, staged)

for owner, name, label in [(pipeline.ckpt_io, "load", "load the checkpoint"),
                           (checkpoint.Checkpoint, "build", "build the torch model"),
                           (pipeline, "torch_reference", "torch reference outputs (parity)"),
                           (pipeline, "export_onnx", "fp32 ONNX export"),
                           (torch.onnx, "export", "torch.onnx.export (TorchScript)"),
                           (export, "save_checked", "save_checked (write, check)"),
                           (pipeline, "compare", "parity on ONNX Runtime"),
                           (pipeline, "write_fp16_ungated", "fp16 graph (convert, write, check)")]:
    wrap(owner, name, label)
t0 = time.perf_counter()
pipeline.export_checkpoint(sys.argv[1], sys.argv[2])
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - t0, "peak": status("VmHWM"),
                  "peak_since_start": max(r["peak"] for r in rows)}))
"""


def stage_breakdown(ckpt: Path, out: Path, src: Path | None, label: str) -> list[dict]:
    """The per-stage rows of one in-process export of ``ckpt`` with the medi-fast this interpreter
    imports, or the sources at ``src``."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([sys.executable, "-c", STAGES, str(ckpt), str(out)], capture_output=True, text=True, env=env,
                       cwd=out.parent)
    if r.returncode != 0:
        raise SystemExit(f"the staged export with {src} failed: {r.stderr.strip().splitlines()[-1:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    return [{"code": label, "stage": "↳ " * row["depth"] + row["stage"], "seconds": round(row["seconds"], 1),
             "rss_at_start_gib": round(row["start"] / 2**30, 2), "peak_rss_gib": round(row["peak"] / 2**30, 2)}
            for row in got["rows"]]


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return machine_info().get("cpu", "unknown")
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medi-128")
    ap.add_argument("--checkpoint", type=Path, help="Export this checkpoint instead of a random one.")
    ap.add_argument("--baseline", type=Path, help="Also break down the export of the medi-fast sources at this path "
                                                  "(a checkout whose medi_fast/ imports; for a before/after).")
    ap.add_argument("--no-stages", action="store_true", help="Skip the per-stage breakdown (Linux's /proc).")
    args = ap.parse_args(argv)
    cli = [sys.executable, "-m", "medi_fast.cli"]
    with tempfile.TemporaryDirectory(prefix="export-cost-") as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint.resolve() if args.checkpoint else tmp / "ckpt.pt"
        if not args.checkpoint:
            subprocess.run([*cli, "init-checkpoint", "--preset", args.preset, "--classes", "LUAD,LUSC",
                            "--tss", "05,44,49", "--out", str(ckpt)], check=True, cwd=tmp, capture_output=True)
        load_before = uptime()
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        r = subprocess.run([sys.executable, "-c", MEASURE, *cli, "export", str(ckpt), "--out", str(tmp / "ckpt.export")],
                           capture_output=True, text=True, cwd=tmp, check=True)
        m = json.loads(r.stdout)
        files = {p.name: p.stat().st_size for p in sorted((tmp / "ckpt.export").iterdir())} if m["rc"] == 0 else {}
        stages = []
        if not args.no_stages:
            sources = [(None, "this checkout")] + ([(args.baseline.resolve(), "baseline")] if args.baseline else [])
            for src, label in sources:
                out = tmp / f"staged-{len(stages)}.export"
                stages += stage_breakdown(ckpt, out, src, label)
                shutil.rmtree(out, ignore_errors=True)
        load_after = uptime()
    row = {"preset": args.preset, "command": "medi-fast export ckpt.pt (defaults)", "rc": m["rc"],
           "wall_s": round(m["wall_s"], 1), "cpu_s": round(m["cpu_s"], 1), "peak_rss_gib": round(m["peak_rss_gib"], 2),
           "files": files, "output": m["stdout"].splitlines(), "error": m["stderr"].strip().splitlines()[-1:]}
    extra = {"lscpu_model_name": lscpu_model(), "started_utc": started, "uptime_before": load_before,
             "uptime_after": load_after, "note": "the machine may be shared: see uptime's load averages",
             "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "stages": stages,
             "baseline": str(args.baseline) if args.baseline else None}
    path = write_results("export_cost", [row], extra)
    print(json.dumps({k: row[k] for k in ("preset", "rc", "wall_s", "peak_rss_gib")}), "->", path)
    return path


if __name__ == "__main__":
    main()
