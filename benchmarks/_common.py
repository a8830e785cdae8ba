"""Shared helpers for benchmark scripts: the timing harness (alternating rounds, same-round ratios), a
machine description, a JSON results writer, and a random checkpoint and its ONNX export."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

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


def write_results(name: str, rows: list[dict], extra: dict | None = None, timing: "Timings | None" = None) -> Path:
    """Write benchmarks/results/<name>.json with the rows, the machine and any extra fields.

    A script that compares alternatives passes its `Timings` (the harness settings go into the file)
    and marks every row ``shipped: true/false`` (is this the setting medi-fast uses?): the report
    picks its headline by that flag, never by a row's label."""
    if timing is not None:
        unmarked = [r for r in rows if not isinstance(r.get("shipped"), bool)]
        if unmarked:
            raise ValueError(f"{name}: {len(unmarked)} row(s) without a 'shipped' true/false field")
    from medi_fast.io import atomic_write_text

    path = RESULTS / f"{name}.json"
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "?"
    payload = {"name": name, "machine": machine_info(),
               "command": " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]]), "rows": rows,
               **({"timing": timing.describe()} if timing is not None else {}), **(extra or {})}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
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


# ---------------------------------------------------------------------------------------------------
# The timing harness every script that compares alternatives uses.  These machines are shared and
# noisy: a slow spell must hit every candidate, so the candidates run in alternating rounds (each
# round runs each once, the first one of a round rotating), all timed by one clock; ratios are
# reported best against best and as the median (and range) of the ratios within a round.


@dataclass
class Timings:
    """What `alternate` measured: seconds per round per candidate (wall clock, and process CPU time)."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    outputs: dict[str, Any]  # each candidate's output of the last round
    order: list[list[str]]  # the order the candidates ran in, per round
    clock: str
    warmup: int

    def describe(self) -> dict:
        """The harness settings, for the results JSON."""
        return {"rounds": len(self.order), "warmup_runs": self.warmup, "clock": self.clock,
                "order": "alternating rounds, each candidate once per round, the first one rotating"}


def alternate(candidates: Mapping[str, Callable[[], Any]], rounds: int, *, warmup: int = 1,
              warmup_fns: Mapping[str, Callable[[], Any]] | None = None,
              clock: Callable[[], float] = time.perf_counter,
              cpu_clock: Callable[[], float] = time.process_time) -> Timings:
    """Time ``candidates`` ({label: zero-argument callable}) in ``rounds`` alternating rounds.

    First ``warmup`` untimed calls of each (allocations, kernel selection, torch.compile; ``warmup_fns``
    replaces the candidate there, e.g. a 1-step version of a long loop), then every round runs each
    candidate once, starting one further along each round, so that neither a position in the round
    nor a slow spell of the machine favours one of them.  Wall time comes from ``clock`` (one clock
    for all), CPU time of this process from ``cpu_clock``."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    labels = list(candidates)
    for _ in range(warmup):
        for label in labels:
            (warmup_fns or candidates)[label]()
    wall = {label: [] for label in labels}
    cpu = {label: [] for label in labels}
    outputs, order = {}, []
    for r in range(rounds):
        this_round = labels[r % len(labels):] + labels[:r % len(labels)]
        order.append(this_round)
        for label in this_round:
            c0, t0 = cpu_clock(), clock()
            outputs[label] = candidates[label]()
            t1, c1 = clock(), cpu_clock()
            wall[label].append(t1 - t0)
            cpu[label].append(c1 - c0)
    return Timings(wall, cpu, outputs, order, getattr(clock, "__name__", str(clock)), warmup)


def compare(times: Mapping[str, Sequence[float]], baseline: str) -> dict[str, dict]:
    """Per candidate: its best round, and its speed against ``baseline`` (> 1: faster), best round
    against best round and as the median and range of the ratios within one round (same work per
    round assumed; scale by the work yourself where it differs)."""
    base = list(times[baseline])
    out = {}
    for label, ts in times.items():
        ts = list(ts)
        if len(ts) != len(base):
            raise ValueError(f"{label}: {len(ts)} rounds, the baseline has {len(base)}")
        if min(ts + base) <= 0:
            raise ValueError(f"{label}: a time <= 0 s; nothing to compare")
        per_round = sorted(b / t for b, t in zip(base, ts))
        out[label] = {"seconds": min(ts), "seconds_per_round": ts,
                      "ratio_best": min(base) / min(ts),
                      "ratio_per_round_median": statistics.median(per_round),
                      "ratio_per_round_range": [per_round[0], per_round[-1]]}
    return out


def within_noise(row: Mapping) -> bool:
    """True when the same-round ratios fall on both sides of 1: the difference is inside the noise."""
    lo, hi = row["ratio_per_round_range"]
    return lo <= 1.0 <= hi


def rounded(d: Mapping, digits: int = 4) -> dict:
    """``d`` with floats (also inside lists) rounded, for the JSON."""
    def r(v):
        if isinstance(v, float):
            return round(v, digits)
        if isinstance(v, list):
            return [r(x) for x in v]
        return v
    return {k: r(v) for k, v in d.items()}
