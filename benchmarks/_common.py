"""Shared helpers for benchmark scripts: a machine description and a JSON results writer."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

# where results/*.json (and run_all's RESULTS.md) go; MEDI_FAST_BENCH_RESULTS redirects them (the tests' smoke runs)
RESULTS = Path(os.environ.get("MEDI_FAST_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine_info() -> dict:
    """CPU, cores, memory, load (the machine may be shared), library versions, GPU if any."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        info["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    for mod in ("numpy", "torch", "PIL", "pandas"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing library is just not listed
            pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return info


def write_results(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Write benchmarks/results/<name>.json with the rows, the machine and any extra fields."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    import sys

    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "?"
    payload = {"name": name, "machine": machine_info(),
               "command": " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]]), "rows": rows, **(extra or {})}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def random_checkpoint(preset: str, tmp, classes, sites):
    """``preset`` with random weights (torch seed 0) saved as ``tmp/<preset>.pt``: (model, path)."""
    import torch

    from medi_fast import checkpoint
    from medi_fast.model import build_model
    from medi_fast.schedule import Schedule

    torch.manual_seed(0)
    model = build_model(preset, classes=list(classes), metadata={"tss": list(sites)}).eval()
    path = checkpoint.save(checkpoint.from_model(model, Schedule(), preset=preset), Path(tmp) / f"{preset}.pt")
    return model, path


def export_checkpoint(path, out_dir) -> Path:
    """The checkpoint at ``path`` exported to ``out_dir/model.onnx`` (fp32, the project's exporter)."""
    from medi_fast import checkpoint
    from medi_fast.engines.export import export_onnx

    return export_onnx(checkpoint.load(path), Path(out_dir) / "model.onnx")
