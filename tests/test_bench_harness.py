"""The benchmark harness (benchmarks/_common.py) with fake candidates and a fake clock: the order the
candidates run in, what is timed, the ratio arithmetic, the shipped flag and the report's use of it."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common  # noqa: E402
import run_all  # noqa: E402


class FakeClock:
    """A clock that only moves when a fake candidate 'works'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def scripted(clock, calls, label, durations):
    """A candidate that takes durations[i] seconds on its i-th call and records the call."""
    it = iter(durations)

    def fn():
        calls.append(label)
        clock.now += next(it)
        return f"{label} out {len(calls)}"
    return fn


def test_alternate_warms_up_rotates_and_times_each_round():
    clock, cpu, calls = FakeClock(), FakeClock(), []
    # first value of each: the warm-up call (untimed), then rounds 1..3
    cands = {"a": scripted(clock, calls, "a", [100, 2.0, 3.0, 2.5]),
             "b": scripted(clock, calls, "b", [100, 1.0, 1.5, 1.0]),
             "c": scripted(clock, calls, "c", [100, 4.0, 4.0, 5.0])}
    t = _common.alternate(cands, 3, clock=clock, cpu_clock=cpu)
    assert calls == ["a", "b", "c",  # warm-up, in order
                     "a", "b", "c", "b", "c", "a", "c", "a", "b"]  # the first one rotates each round
    assert t.order == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert t.wall == {"a": [2.0, 3.0, 2.5], "b": [1.0, 1.5, 1.0], "c": [4.0, 4.0, 5.0]}  # warm-up not timed
    assert t.cpu == {"a": [0.0] * 3, "b": [0.0] * 3, "c": [0.0] * 3}
    assert t.outputs["c"] == "c out 10"  # the last round's output
    assert t.describe()["rounds"] == 3 and t.describe()["warmup_runs"] == 1


def test_alternate_uses_the_warmup_functions_and_no_warmup():
    clock, calls = FakeClock(), []
    cands = {"a": scripted(clock, calls, "a", [1.0]), "b": scripted(clock, calls, "b", [2.0])}
    short = {"a": lambda: calls.append("a-short"), "b": lambda: calls.append("b-short")}
    t = _common.alternate(cands, 1, warmup_fns=short, clock=clock)
    assert calls == ["a-short", "b-short", "a", "b"]
    assert t.wall == {"a": [1.0], "b": [2.0]}
    calls.clear()
    _common.alternate({"a": scripted(clock, calls, "a", [1.0])}, 1, warmup=0, clock=clock)
    assert calls == ["a"]
    with pytest.raises(ValueError):
        _common.alternate(cands, 0)


def test_compare_best_and_same_round_ratios():
    times = {"ref": [2.0, 4.0, 3.0], "fast": [1.0, 1.0, 2.0], "slow": [4.0, 4.0, 4.0]}
    c = _common.compare(times, "ref")
    assert c["ref"]["ratio_best"] == 1.0 and c["ref"]["ratio_per_round_range"] == [1.0, 1.0]
    # best against best: 2.0 / 1.0; same-round ratios 2, 4, 1.5 -> median 2, range 1.5-4
    assert c["fast"]["ratio_best"] == 2.0
    assert c["fast"]["ratio_per_round_median"] == 2.0
    assert c["fast"]["ratio_per_round_range"] == [1.5, 4.0]
    assert c["fast"]["seconds"] == 1.0 and c["fast"]["seconds_per_round"] == [1.0, 1.0, 2.0]
    # slower than the reference: ratios below 1 (0.5, 1.0, 0.75)
    assert c["slow"]["ratio_best"] == 0.5 and c["slow"]["ratio_per_round_median"] == 0.75
    assert _common.within_noise(c["slow"])  # 0.5-1.0 touches 1
    assert not _common.within_noise(c["fast"])
    assert _common.within_noise({"ratio_per_round_range": [0.9, 1.2]})
    with pytest.raises(ValueError, match="rounds"):
        _common.compare({"ref": [1.0, 2.0], "x": [1.0]}, "ref")
    with pytest.raises(ValueError, match="<= 0"):
        _common.compare({"ref": [1.0], "x": [0.0]}, "ref")


def test_write_results_records_the_harness_and_requires_shipped(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    clock = FakeClock()
    t = _common.alternate({"a": scripted(clock, [], "a", [0, 1.0])}, 1, clock=clock)
    with pytest.raises(ValueError, match="shipped"):
        _common.write_results("x", [{"a": 1}], timing=t)
    assert not (tmp_path / "x.json").exists()
    path = _common.write_results("x", [{"a": 1, "shipped": False}], timing=t)
    d = json.loads(path.read_text())
    assert d["timing"]["rounds"] == 1 and "alternating" in d["timing"]["order"]
    assert _common.alternate({"a": lambda: None}, 1).describe()["clock"] == "perf_counter"  # the default clock
    assert d["rows"] == [{"a": 1, "shipped": False}] and "cpu_count" in d["machine"]


def test_report_picks_shipped_rows_by_flag_and_says_when_training_is_noise():
    bk = {"rows": [{"preset": "p", "backend": "reference", "ratio_vs_reference": 1.0, "shipped": False},
                   {"preset": "p", "backend": "ort-cpu (fast)", "ratio_vs_reference": 1.5, "shipped": True},
                   {"preset": "p", "backend": "ort-cpu (1 thread)", "ratio_vs_reference": 3.0, "shipped": False},
                   {"preset": "p", "backend": "ceiling", "ratio_vs_reference": 4.0, "derived": True, "shipped": False},
                   {"preset": "p", "backend": "unmarked", "ratio_vs_reference": 5.0}]}
    assert [r["backend"] for r in run_all._shipped(bk, "p")] == ["ort-cpu (fast)"]

    def tr(lo, hi):
        return {"args": {"preset": "tiny-32", "batch_size": 32}, "device": "cpu",
                "rows": [{"loop": "ref", "shipped": False, "ratio": 1.0},
                         {"loop": "ours", "shipped": True, "ratio": 1.21, "ratio_per_round_median": 1.1,
                          "ratio_per_round_range": [lo, hi], "seconds_per_round": [1, 1, 1]}]}
    noisy = run_all.training_headline(tr(0.9, 1.3))
    assert "no difference measured" in noisy and "0.90-1.30" in noisy and "1.21x" in noisy
    clear = run_all.training_headline(tr(1.1, 1.3))
    assert "**1.21x**" in clear and "noise" not in clear
