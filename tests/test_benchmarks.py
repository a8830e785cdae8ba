"""Smoke runs of the benchmark scripts that the docs quote (tiny sizes; results go to a temp dir)."""
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *args, out: Path):
    env = {**os.environ, "MEDI_FAST_BENCH_RESULTS": str(out)}
    r = subprocess.run([sys.executable, str(BENCH / script), *args], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_backends_ort_profile_and_report_from_their_json(tmp_path):
    recorded = {p: p.stat().st_mtime_ns for p in (BENCH / "results").glob("*.json")}
    _run("backends.py", "--presets", "tiny-32", "--steps", "2", "--batch", "2", "--repeats", "2", "--no-compile",
         out=tmp_path)
    bk = json.loads((tmp_path / "backends.json").read_text())
    rows = {r["backend"]: r for r in bk["rows"]}
    ref = rows["reference (diffusers DDIM + eager UNet)"]
    assert ref["ratio_vs_reference"] == 1.0 and len(ref["seconds_per_round"]) == 2
    ort = next(r for k, r in rows.items() if k.startswith("ort-cpu (") and "ALL" in k)
    assert ort["max_abs_diff_vs_reference"] < 1e-3  # the same x0 as the reference loop
    assert any("torch sampler math" in k for k in rows)  # the hand-off's control row
    assert {r["sampler"] for r in rows.values()} >= {"ddim", "dpmpp-2m-clip", "unipc-clip"}
    ceiling = [r for r in bk["rows"] if r.get("derived")]  # the fp32 and the bf16 convolution rates
    assert [r["backend"].rsplit(" ", 1)[-1] for r in ceiling] == ["(fp32)", "(bf16)"]
    assert all(r["ratio_vs_reference"] > 0 for r in ceiling)
    assert 0 < ort["fraction_of_conv_rate"] and ort["conv_rate_kind"] == "fp32"
    # the script marks what medi-fast ships; the harness settings are in the file
    assert all(isinstance(r["shipped"], bool) for r in bk["rows"])
    assert not ref["shipped"] and not ceiling[0]["shipped"] and ort["shipped"]
    assert not any(r["shipped"] for k, r in rows.items() if "1 thread" in k or "torch sampler math" in k)
    assert bk["timing"]["rounds"] == 2 and bk["timing"]["clock"] == "perf_counter"
    lo, hi = ort["ratio_per_round_range"]
    assert lo <= ort["ratio_per_round_median"] <= hi

    _run("sampling_throughput.py", "--presets", "tiny-32", "--batch", "2", "--steps", "2", "--repeats", "1",
         out=tmp_path)
    st = {r["candidate"].split(" ")[0]: r for r in json.loads((tmp_path / "sampling_throughput.json").read_text())["rows"]}
    assert {"reference", "torch", "ort-cpu"} <= set(st) and all(r["images_per_s"] > 0 for r in st.values())
    assert not st["reference"]["shipped"] and st["ort-cpu"]["shipped"] and "ratio_per_round_median" in st["ort-cpu"]

    _run("ort_profile.py", "--presets", "tiny-32", "--batch", "2", "--calls", "1", out=tmp_path)
    prof = json.loads((tmp_path / "ort_profile.json").read_text())["rows"]
    assert abs(sum(r["share"] for r in prof) - 1) < 1e-6 and "Conv" in {r["op"] for r in prof}

    _run("run_all.py", "--report-only", out=tmp_path)
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## Sampling throughput per backend" in md and "ceiling" in md and "## Where ort-cpu spends" in md
    assert {p: p.stat().st_mtime_ns for p in (BENCH / "results").glob("*.json")} == recorded  # the repo's untouched


def test_results_md_is_what_run_all_writes_from_the_recorded_json(tmp_path):
    """RESULTS.md is generated, not edited: run_all --report-only on the recorded JSON files writes it again,
    every line but the date it was written."""
    import shutil

    for p in (BENCH / "results").glob("*.json"):
        shutil.copy(p, tmp_path / p.name)
    _run("run_all.py", "--report-only", out=tmp_path)
    written = (tmp_path / "RESULTS.md").read_text().splitlines()
    recorded = (BENCH / "RESULTS.md").read_text().splitlines()
    assert written[2].startswith("Written by `python benchmarks/run_all.py` on ")
    assert written[:2] + written[3:] == recorded[:2] + recorded[3:]
    assert (tmp_path / "summary.png").stat().st_size > 0


@pytest.mark.slow
def test_data_throughput_alternates_readers(tmp_path):
    _run("data_throughput.py", "--synth-n", "4", "--read-n", "8", "--repeats", "2", out=tmp_path)
    d = json.loads((tmp_path / "data_throughput.json").read_text())
    rows = {r["task"].split(" [")[0]: r for r in d["rows"]}
    base = rows["read: index (JPEG decode per item)"]
    assert base["vs_baseline"] == 1.0 and not base["shipped"] and d["timing"]["rounds"] == 2
    assert all(isinstance(r["shipped"], bool) for r in d["rows"])
    assert rows["read: pack ds[i] per item"]["shipped"] and rows["read: pack ds[i] per item"]["vs_baseline"] > 0


@pytest.mark.slow
def test_gpu_script_dry_run_and_its_report_section(tmp_path):
    """benchmarks/gpu.py end to end on CPU (tiny preset, CPU paths, training and a one-rank gloo DDP
    step), then run_all's report shows it."""
    out = _run("gpu.py", "--dry-run", "--repeats", "1", out=tmp_path)
    assert "gpu-dry-run.json" in out
    g = json.loads((tmp_path / "gpu-dry-run.json").read_text())
    assert g["dry_run"] is True and g["matmul"]["fp32"] > 0 and g["command"].startswith("python benchmarks/gpu.py")
    inference = [r for r in g["rows"] if r["section"] == "inference"]
    assert all(r["status"] == "ok" for r in inference), [r["status"] for r in inference]
    assert {r["path"] for r in inference} == {"fp32", "tf32", "ort-cpu"}
    assert {r["solver"] for r in inference} == {"ddim", "dpmpp-2m-clip", "unipc-clip"}
    assert all(r["images_per_s"] > 0 and r["batch"] == 2 and r["finite"] for r in inference)
    by_path = {r["path"]: r for r in inference if r["solver"] == "ddim"}
    # on a CPU the TF32 switch changes nothing: the same numbers as the fp32 reference, exactly
    assert by_path["tf32"]["eps_rel_err"] == 0.0 and by_path["tf32"]["image_max_levels"] == 0
    # ONNX Runtime against torch: an eps error at float32 rounding, images within a grey level or two
    assert 0 < by_path["ort-cpu"]["eps_rel_err"] < 1e-4 and by_path["ort-cpu"]["image_max_levels"] <= 2
    assert by_path["fp32"]["vs_fp32_eager"] == 1.0
    training = {r["precision"]: r for r in g["rows"] if r["section"] == "training"}
    assert set(training) == {"fp32", "bf16"} and all(r["status"] == "ok" and r["finite"] for r in training.values())
    (ddp,) = [r for r in g["rows"] if r["section"] == "ddp"]
    assert ddp["status"] == "ok" and ddp["check"] == "ddp (1 process, gloo)" and ddp["param_change_rel"] <= 1e-6
    _run("run_all.py", "--report-only", out=tmp_path)
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## GPU script dry run (CPU; not GPU figures)" in md and "| ort-cpu" in md and "steps_per_s" in md


def _gpu_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_gpu_script_records_a_failing_path_and_goes_on(tmp_path, monkeypatch):
    """One path that raises is a FAIL row with its error; the other paths, training and DDP still run,
    and the JSON is there."""
    gpu = _gpu_script()
    real_open = gpu.open_path

    def broken(p, files, work):
        if p.name == "tf32":
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nsecond line")
        return real_open(p, files, work)

    monkeypatch.setattr(gpu, "open_path", broken)
    out = tmp_path / "g.json"
    assert gpu.main(["--dry-run", "--repeats", "1", "--paths", "fp32,tf32", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    tf32 = [r for r in rows if r.get("path") == "tf32"]
    assert tf32 == [{**tf32[0], "status": "FAIL RuntimeError: CUDA error: an illegal memory access was encountered"}]
    assert {r["solver"] for r in rows if r.get("path") == "fp32"} == {"ddim", "dpmpp-2m-clip", "unipc-clip"}
    assert {r["section"] for r in rows} == {"inference", "training", "ddp"}


def test_gpu_script_within_its_budget_skips_and_says_so(tmp_path):
    """A budget too small for anything: every step is recorded as skipped with the time left, and the
    matmul rates and the JSON are there (a first run cut short still leaves its record)."""
    gpu = _gpu_script()
    out = tmp_path / "g.json"
    assert gpu.main(["--dry-run", "--budget-s", "0", "--json", str(out)]) == 0
    g = json.loads(out.read_text())
    assert g["matmul"]["fp32"] > 0 and g["rows"]
    assert all(r["status"].startswith("skipped: ") for r in g["rows"]), [r["status"] for r in g["rows"]]
    assert {r["section"] for r in g["rows"]} == {"inference", "training", "ddp"}


def test_demo_seeds_aggregates_and_resumes_from_finished_runs(tmp_path):
    """demo_seeds.py reuses a run whose demo_config.json is the variant's configuration (an interrupted
    benchmark resumes without rerunning), aggregates per variant, and run_all puts the table in RESULTS.md."""
    import importlib.util
    import shutil
    from dataclasses import replace

    spec = importlib.util.spec_from_file_location("demo_seeds", BENCH / "demo_seeds.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from medi_fast.demo import DemoConfig
    from medi_fast.demo.run import recorded_config

    assert bench.variant_config(bench.SHIPPED) == DemoConfig()  # the shipped variant is the demo's default
    # probe-only variants share the default's models (and its extra seeds); other models do not
    assert bench.same_models(bench.variant_config("ring4-1to1"), DemoConfig())
    assert not bench.same_models(bench.variant_config("two-class-epsilon-1to1"), DemoConfig())
    assert not bench.same_models(bench.variant_config("ring4-fp32"), DemoConfig())  # fp32 trains other models
    assert not bench.same_models(replace(DemoConfig(), prediction_type="epsilon"), DemoConfig())
    # a variant scored on fewer test sites: the mean of those sites' accuracies, the rest of the record as it was
    rec = {"seed": 0, "probe": {"MeDi": {"tss_bacc": 0.9, "runs": 5}},
           "probe_sites": {"MeDi": {"S5": 0.7, "S6": 1.0, "S7": 1.0}}}
    two = bench.scored_on(rec, ["S5", "S6"])
    assert two["probe"]["MeDi"] == {"tss_bacc": pytest.approx(0.85), "runs": 5} and rec["probe"]["MeDi"]["tss_bacc"] == 0.9
    work = tmp_path / "work"
    name = "two-class-epsilon-1to1"
    accs = {0: (0.60, 0.70, 0.80), 1: (0.64, 0.71, 0.86)}
    for seed, (real, cls, medi) in accs.items():
        cfg = replace(bench.variant_config(name), out=str(work / name / f"seed-{seed}"), seed=seed)
        d = Path(cfg.out)
        d.mkdir(parents=True)
        (d / "demo_config.json").write_text(json.dumps(recorded_config(cfg)))
        (d / "results.json").write_text(json.dumps({
            "seed": seed, "setting": "two-class", "quick": False, "seconds": 540.0,
            "probe": {a: {"tss_bacc": v, "tss_bacc_sem": 0.01, "runs": 5}
                      for a, v in (("no-synthetic", real), ("CLS", cls), ("MeDi", medi))},
            "fid_class_mean": {"CLS": 1.0, "MeDi": 2.0}, "fid_cell_mean": {"CLS": 60.0, "MeDi": 50.0},
            "cells_medi_closer": 5, "cells": 8, "site_correlation": 0.8, "site_slope": 0.4}))
    out = _run("demo_seeds.py", "--variants", name, "--seeds", "0,1", "--work", str(work), out=tmp_path)
    assert out.count("== reusing") == 2  # nothing was rerun
    ds = json.loads((tmp_path / "demo_seeds.json").read_text())
    rows = {r["measure"]: r for r in ds["rows"]}
    assert rows["MeDi"]["mean"] == pytest.approx(0.83) and rows["MeDi"]["sd"] == pytest.approx(0.0424, abs=1e-4)
    assert rows["MeDi - CLS"]["min"] == pytest.approx(0.10) and not any(r["shipped"] for r in ds["rows"])
    v = ds["variants"][name]
    assert (v["prediction_type"], v["probe_ratio"], v["k"], v["reevaluated"]) == ("epsilon", 1.0, 20, False)
    assert (work / name / "report.md").read_text().count("mean ± SD (2 seeds)") == 1
    _run("run_all.py", "--report-only", out=tmp_path)
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## The demo over seeds" in md and "0.830 ± 0.042" in md and f"| {name} " in md
    assert "| epsilon " in md and "k 20, 1:1" in md
    assert re.search(r"\| epsilon +\| fp32; ort-cpu +\|", md)  # runs that record no precision: before it had one
    # another variant run later keeps this one's recorded results, marked with when it ran
    when = ds["machine"]["time_utc"]
    for seed in (0, 1):
        cfg = replace(bench.variant_config("ring4"), out=str(work / "ring4" / f"seed-{seed}"), seed=seed)
        shutil.copytree(work / name / f"seed-{seed}", cfg.out)
        (Path(cfg.out) / "demo_config.json").write_text(json.dumps(recorded_config(cfg)))
        res = json.loads((Path(cfg.out) / "results.json").read_text())
        res["probe_sites"] = {a: {s: v["tss_bacc"] for s in cfg.spec.test_sites} for a, v in res["probe"].items()}
        (Path(cfg.out) / "results.json").write_text(json.dumps(res))
    _run("demo_seeds.py", "--variants", "ring4", "--default-seeds", "0,1", "--work", str(work), out=tmp_path)
    ds = json.loads((tmp_path / "demo_seeds.json").read_text())
    assert list(ds["variants"]) == ["ring4", "ring4 on S5, S6", name] and ds["variants"][name]["carried_from"]["time_utc"] == when
    assert ds["variants"][name]["stats"]["MeDi"]["mean"] == pytest.approx(0.83) and "carried_from" not in ds["variants"]["ring4"]
    _run("run_all.py", "--report-only", out=tmp_path)
    assert f"| {name} (run {when[:10]}, arms of then) " in (tmp_path / "RESULTS.md").read_text()


def test_clean_image_colour_by_noise_level_is_exact_where_the_noise_is_negligible(tmp_path):
    """site_fidelity.py --noise-levels: at t = 0 the estimate is the patch itself for any model (slope 1);
    at t = 999 an untrained model knows nothing of the colour (slope far from 1)."""
    import importlib.util

    import numpy as np

    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("site_fidelity_bench", BENCH / "site_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from _common import random_checkpoint

    _, ck = random_checkpoint("tiny-32", tmp_path, ["LUAD", "LUSC"], ["S1", "S2"])
    rng = np.random.default_rng(0)
    cells = [("LUAD", "S1"), ("LUAD", "S2"), ("LUSC", "S1"), ("LUSC", "S2")]
    real, labels = [], []
    for c, s in cells:
        colour = rng.integers(40, 220, 3)
        real += [np.clip(colour + rng.normal(0, 5, (32, 32, 3)), 0, 255).astype(np.uint8) for _ in range(3)]
        labels += [(c, s)] * 3
    rows = {r["t"]: r for r in mod.x0_colour_by_noise(ck, real, labels, [0, 999], seed=0)}
    assert rows[0]["slope"] == pytest.approx(1.0, abs=0.02) and rows[0]["correlation"] > 0.999
    assert abs(rows[999]["slope"] - 1.0) > 0.5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_clean_image_estimate_follows_the_models_prediction_type(tmp_path, monkeypatch, prediction_type):
    """An oracle that knows each cell's colour, answering in the checkpoint's parameterisation, gives slope 1
    at every noise level: the estimate converts v and x0 outputs as the samplers do."""
    import importlib.util
    from dataclasses import replace
    from types import SimpleNamespace

    import numpy as np
    import torch

    from medi_fast import checkpoint
    from medi_fast.schedule import Schedule

    spec = importlib.util.spec_from_file_location("site_fidelity_bench2", BENCH / "site_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.path.insert(0, str(BENCH))
    from _common import random_checkpoint

    _, path = random_checkpoint("tiny-32", tmp_path, ["LUAD", "LUSC"], ["S1", "S2"])
    real_ck = checkpoint.load(path)
    sched = Schedule(prediction_type=prediction_type)
    abar = sched.alphas_cumprod
    colours = {(c, s): torch.tensor(np.random.default_rng(i).uniform(-0.6, 0.6, 3), dtype=torch.float32)
               for i, (c, s) in enumerate([("LUAD", "S1"), ("LUAD", "S2"), ("LUSC", "S1"), ("LUSC", "S2")])}
    names = {a.name: list(a.vocab.names) for a in real_ck.spec.attributes}

    def oracle(x, t, cond):
        x0 = torch.stack([colours[(names["class"][int(ci)], names["tss"][int(si)])]
                          for ci, si in zip(cond["class"], cond["tss"])]).view(-1, 3, 1, 1).expand_as(x)
        a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        eps = (x - a * x0) / s
        return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]

    fake = SimpleNamespace(schedule=replace(real_ck.schedule, prediction_type=prediction_type), spec=real_ck.spec,
                           build=lambda ema=True: SimpleNamespace(eval=lambda: oracle))
    monkeypatch.setattr(checkpoint, "load", lambda p: fake)
    real, labels = [], []
    for cell, col in colours.items():
        img = ((col.numpy() + 1) * 127.5).round().astype(np.uint8)
        real += [np.broadcast_to(img, (16, 16, 3)).copy() for _ in range(2)]
        labels += [cell] * 2
    rows = mod.x0_colour_by_noise(path, real, labels, [999, 500], seed=0)
    assert all(r["slope"] == pytest.approx(1.0, abs=0.02) for r in rows), rows
