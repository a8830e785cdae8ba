"""What `medi-fast export CKPT` costs with a user's defaults: wall time and peak memory.

Creates a random checkpoint of the preset with `medi-fast init-checkpoint` (the weights do not
change the cost), then runs `medi-fast export ckpt.pt` exactly as a user types it, in a child
process whose peak resident memory is read with ``resource.getrusage(RUSAGE_CHILDREN)`` from a
fresh intermediate process (so the checkpoint's creation does not count).  Writes
``results/export_cost.json`` with the machine (``lscpu``'s model name) and its load before and after.

    python benchmarks/export_cost.py                 # medi-128, the published architecture
    python benchmarks/export_cost.py --preset tiny-32
"""
from __future__ import annotations

import argparse
import json
import os
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
        load_after = uptime()
        files = {p.name: p.stat().st_size for p in sorted((tmp / "ckpt.export").iterdir())} if m["rc"] == 0 else {}
    row = {"preset": args.preset, "command": "medi-fast export ckpt.pt (defaults)", "rc": m["rc"],
           "wall_s": round(m["wall_s"], 1), "cpu_s": round(m["cpu_s"], 1), "peak_rss_gib": round(m["peak_rss_gib"], 2),
           "files": files, "output": m["stdout"].splitlines(), "error": m["stderr"].strip().splitlines()[-1:]}
    extra = {"lscpu_model_name": lscpu_model(), "started_utc": started, "uptime_before": load_before,
             "uptime_after": load_after, "note": "the machine may be shared: see uptime's load averages",
             "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    path = write_results("export_cost", [row], extra)
    print(json.dumps({k: row[k] for k in ("preset", "rc", "wall_s", "peak_rss_gib")}), "->", path)
    return path


if __name__ == "__main__":
    main()
