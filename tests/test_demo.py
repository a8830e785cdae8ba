"""`medi-fast demo` end to end at toy size: every stage runs, the report holds what it promises, and the
output directory is guarded (no run mixes with another's files)."""
from __future__ import annotations

import base64
import json
import io
import re
from dataclasses import replace
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medi_fast.cli import main
from medi_fast.demo import DemoConfig, run_demo
from medi_fast.demo import arms
from medi_fast.demo.stages import real_patches as _real_images
from medi_fast.errors import MediFastError


def toy(out) -> DemoConfig:
    return DemoConfig(out=str(out), n_per_combo=10, n_test_per_combo=6, render_resolution=32, preset="tiny-32",
                      train_steps=2, batch_size=4, sample_steps=2, sample_batch=16, n_synthetic_per_combo=3, k=4,
                      probe_ratio=2.0, probe_repeats=1)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_demo(toy(out))


def test_report_and_outputs(demo_run):
    out, report = demo_run
    assert report == out / "report.html" and report.stat().st_size > 0
    md = (out / "report.md").read_text()
    compared = [a.name for a in arms.for_config(toy(out))]
    for name in compared:  # the probe's table: a row per arm, the seconds to make its data beside its accuracy
        assert re.search(rf"^\| {re.escape(name)} +\| +\d+ \| .* \| +[\d.]+ \|$", md, re.M), name
    assert "## Timings" in md and "| total " in md
    for fig in ("coverage", "real", "medi", "cls", "medi-edit"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 0
    # MeDi fills every class x cohort site, including the combinations absent from training.
    medi = pd.read_csv(out / "synthetic" / "medi" / "manifest.csv", dtype=str, keep_default_na=False)
    spec = toy(out).spec
    sites = spec.sites
    combos = medi.groupby(["class", "tissue_source_site"]).size()
    assert len(combos) == len(spec.classes) * len(sites) and (combos == 3).all()
    assert ("LUAD", "S4") in combos.index and ("LUSC", "S1") in combos.index and ("DLBC", "S2") in combos.index
    train_combos = pd.read_csv(out / "train.csv", dtype=str).groupby(["gt_class", "tissue_source_site"]).size()
    assert not {("LUAD", "S4"), ("LUSC", "S1"), ("DLBC", "S2")} & set(train_combos.index)
    # CLS makes the same number of images per class, without a site.
    cls = pd.read_csv(out / "synthetic" / "cls" / "manifest.csv", dtype=str, keep_default_na=False)
    assert cls.groupby("class").size().to_dict() == {c: 3 * len(sites) for c in spec.classes}
    # The evaluation's real images are the pack's, in index order, equal to decoding the JPEGs.
    from medi_fast.data.imageio import load_patch

    index = pd.read_parquet(out / "index.parquet")
    real = _real_images(out)
    assert real.shape == (len(index), 32, 32, 3)
    for i in (0, len(index) // 2, len(index) - 1):
        assert np.array_equal(real[i], load_patch(index["path"].iloc[i], 32))
    # No training site of the probe's test sites leaks into the diffusion training split.
    train = pd.read_csv(out / "train.csv", dtype=str)
    assert not set(train["tissue_source_site"]) & set(spec.test_sites) and len(spec.test_sites) == 8
    # Every test site has every class, and each arm's TSS-averaged accuracy is the mean of its per-site ones.
    test = pd.read_csv(out / "test.csv", dtype=str)
    assert test.groupby("tissue_source_site")["gt_class"].nunique().to_dict() == {s: 4 for s in spec.test_sites}
    res = json.loads((out / "results.json").read_text())
    for arm, by_site in res["probe_sites"].items():
        assert list(by_site) == list(spec.test_sites)
        assert np.mean(list(by_site.values())) == pytest.approx(res["probe"][arm]["tss_bacc"], abs=1e-12)
    # Every arm of the registry, in its order; each one's cost is the seconds of its own stages in the timings
    # (those of the arms it builds on included).
    assert list(res["probe"]) == list(res["arm_seconds"]) == compared
    assert compared == ["no-synthetic", "CLS", "MeDi", "MeDi-edit", "HED-jitter", "Macenko-aug", "MeDi+HED",
                        "Macenko-norm", "Reinhard-norm", "CLS-oracle", "MeDi-oracle"]
    section = md.split("## Timings")[1]
    timings = {m[0]: float(m[1]) for m in re.findall(r"^\| (.+?) +\| +([\d.]+) \|$", section, re.M)}
    assert res["arm_seconds"]["no-synthetic"] == 0.0
    own = {a: sum(v for k, v in timings.items() if k.split(" ")[1:2] == [a]) for a in compared}
    for a in arms.for_config(toy(out)):
        stages_of = [k for k in timings if k.split(" ")[1:2] == [a.name]]
        assert len(stages_of) == {"CLS": 3, "MeDi": 3, "no-synthetic": 0}.get(a.name, 1), (a.name, stages_of)
        want = own[a.name] + sum(own[n] for n in a.recipe.needs)
        assert res["arm_seconds"][a.name] == pytest.approx(want, abs=0.2 * (1 + len(stages_of)))
    assert "Seconds to make each arm's probe training data" in md
    # The precision: bf16 training where the CPU has bf16 units; every synthetic folder made by auto's backend
    # (gated per model: ONNX Runtime's fp32 where the gate refuses bf16), all said in the report.
    from medi_fast.backends import available, cpu_bf16_native

    prec = res["precision"]
    assert prec["requested"] == "auto" and prec["training"] == ("bf16" if cpu_bf16_native() else "fp32")
    assert set(prec["generation"]) == {"medi", "cls", "medi-edit"}
    assert set(prec["generation"].values()) <= {available("onnx")[0], "ort-cpu"}
    assert f"prediction, in {prec['training']}), exported to ONNX, sampled with DDIM-2 on " in md
    # The headline names the best arm, every arm with its cost, and what the oracle arms say.
    assert "Best arm a user can make (the oracle arms aside): " in md and "Oracle arms (freshly rendered patches" in md


def test_out_must_be_new_or_overwritten(demo_run, tmp_path, capsys):
    out, _ = demo_run
    with pytest.raises(MediFastError, match="not empty; pass --overwrite"):
        run_demo(toy(out))
    assert (out / "report.html").exists()  # the refusal touched nothing
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(foreign), "--overwrite"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "thesis.tex" in err[0] and "another --out" in err[0]
    assert (foreign / "thesis.tex").exists()


class _Page(HTMLParser):
    """What a browser would show: tables, image sources, and the text outside any table."""

    def __init__(self):
        super().__init__()
        self.tags, self.images, self.text, self.depth = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.depth += tag == "table"
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        self.depth -= tag == "table"

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_is_a_page_not_markdown(demo_run):
    out, report = demo_run
    page = _Page()
    page.feed(report.read_text())
    tags = page.tags
    # Real tables: probe, site colours, FID-style, shortcut, timings, configuration; no preformatted Markdown.
    assert tags.count("table") >= 6 and "pre" not in tags
    assert tags.count("details") >= 6 and "summary" in tags
    text = "".join(page.text)
    assert not re.search(r"\|\s*:?-{3,}", text), "Markdown table syntax in the page"
    assert not re.search(r"^\s*\|.*\|\s*$", text, re.M), "Markdown table rows in the page"
    assert "MeDi" in text and "took" in text and "undertrained" not in text  # summary; not a --quick run
    # Every picture resolves: embedded PNGs that decode, or files beside the page.
    assert len(page.images) >= 7
    for src in page.images:
        if src.startswith("data:"):
            head, data = src.split(",", 1)
            assert head == "data:image/png;base64"
            img = Image.open(io.BytesIO(base64.b64decode(data)))
            img.load()
            assert img.size[0] > 50 and img.size[1] > 50
        else:
            assert (report.parent / src).is_file(), src
    # The Markdown report carries the same numbers as the page.
    md = (out / "report.md").read_text()
    for number in re.findall(r"\d\.\d{3} ± \d\.\d{3}", text):
        assert number in md
    for fig in ("probe", "site", "timings", "coverage", "real", "medi", "cls"):
        assert f"figures/{fig}.png" in md


def test_sample_grids_show_several_patches_per_cell_unsmoothed(demo_run):
    from medi_fast.demo import figures

    out, _ = demo_run
    index = pd.read_parquet(out / "index.parquet")
    real = np.asarray(Image.open(out / "figures" / "real.png").convert("RGB"))
    patches = _real_images(out)
    first = np.flatnonzero((index["class"] == "LUAD").to_numpy() & (index["tissue_source_site"] == "S1").to_numpy())
    s = 32 * figures._scale(32)
    # Second patch of the first cell (LUAD, S1), upscaled by repetition: exactly its pixels, no smoothing.
    x0, y0 = 70 + s + figures.GAP, 30
    tile = real[y0:y0 + s, x0:x0 + s]
    k = s // 32
    assert np.array_equal(tile, patches[first[1]].repeat(k, 0).repeat(k, 1))


def test_overwrite_replaces_a_previous_run(tmp_path):
    out = tmp_path / "out"
    run_demo(toy(out))
    (out / "synthetic" / "medi" / "stale.png").write_bytes(b"x")
    run_demo(replace(toy(out), quick=True), overwrite=True)
    assert not (out / "synthetic" / "medi" / "stale.png").exists()
    # A --quick run says at the top of both reports that its numbers are not the result.
    html_text = (out / "report.html").read_text()
    assert html_text.index("undertrained") < html_text.index("Linear probe")
    assert "undertrained" in (out / "report.md").read_text().split("## ")[0]


def test_help_lists_every_option(capsys):
    main(["demo", "--help"])
    text = capsys.readouterr().out
    for opt in ("--out", "--quick", "--train-steps", "--seed", "--precision", "--overwrite"):
        assert opt in text


def test_options_make_the_config(tmp_path, capsys):
    assert DemoConfig.from_options("o") == DemoConfig(out="o")
    quick = DemoConfig.from_options("o", quick=True, seed=3, train_steps=50)
    assert quick.quick and quick.seed == 3 and quick.train_steps == 50 and quick.n_per_combo < DemoConfig.n_per_combo
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "x"), "--train-steps", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--train-steps" in err[0]
    assert not (tmp_path / "x").exists()


def _record(seed, real, cls, medi, cells=(50.0, 60.0)):
    return {"seed": seed, "setting": "ring4", "quick": False, "seconds": 600.0,
            "probe": {a: {"tss_bacc": v, "tss_bacc_sem": 0.01, "runs": 5}
                      for a, v in (("no-synthetic", real), ("CLS", cls), ("MeDi", medi))},
            "fid_class_mean": {"CLS": 1.0, "MeDi": 2.0}, "fid_cell_mean": {"MeDi": cells[0], "CLS": cells[1]},
            "cells_medi_closer": 6, "cells": 8, "site_correlation": 0.9, "site_slope": 0.5}


def test_seed_aggregate_is_mean_and_sd_and_separation_needs_both():
    from medi_fast.demo.seeds import aggregate, verdict

    recs = [_record(0, 0.60, 0.70, 0.80), _record(1, 0.62, 0.72, 0.84), _record(2, 0.58, 0.71, 0.83)]
    agg = aggregate(recs)
    medi = np.array([0.80, 0.84, 0.83])
    assert agg["stats"]["MeDi"]["mean"] == pytest.approx(medi.mean())
    assert agg["stats"]["MeDi"]["sd"] == pytest.approx(medi.std(ddof=1))
    assert agg["stats"]["MeDi - CLS"]["min"] == pytest.approx(0.10)
    assert agg["medi_over_cls"] and agg["cls_over_real"] and agg["n"] == 3
    assert verdict(agg).startswith("MeDi beat CLS by more than the spread over seeds")
    assert agg["order"] == ["MeDi", "CLS", "no-synthetic"] and "Order: MeDi > CLS > no-synthetic (every arm" in verdict(agg)
    # CLS below real data alone, within the spread of MeDi: the order says which steps are separated.
    below = aggregate([_record(0, 0.84, 0.82, 0.88), _record(1, 0.85, 0.83, 0.90), _record(2, 0.84, 0.83, 0.89)])
    assert below["medi_over_cls"] and not below["cls_over_real"]
    assert "Order: MeDi > no-synthetic > CLS (every arm" in verdict(below)
    tie = aggregate([_record(0, 0.84, 0.83, 0.88), _record(1, 0.85, 0.86, 0.90), _record(2, 0.84, 0.83, 0.89)])
    assert "Order: MeDi > no-synthetic ≈ CLS (≈: not separated" in verdict(tie)
    # Ahead in every seed but inside the spread: said so, not claimed as separated.
    close = aggregate([_record(0, 0.5, 0.70, 0.71), _record(1, 0.5, 0.80, 0.81), _record(2, 0.5, 0.60, 0.62)])
    assert not close["medi_over_cls"] and close["medi_over_cls_every_seed"]
    assert "by less than the spread" in verdict(close)
    worse = aggregate([_record(0, 0.5, 0.70, 0.69), _record(1, 0.5, 0.80, 0.81)])
    assert verdict(worse).startswith("MeDi did not beat CLS in every seed")


def test_cell_labels_give_cls_disjoint_draws_of_medis_cell_size():
    from medi_fast.demo.stages import cell_labels

    cfg = DemoConfig(n_synthetic_per_combo=5, probe_ratio=1.0)
    spec = cfg.spec
    n = 5 * len(spec.sites)
    cls_meta = pd.DataFrame({"class": np.repeat(spec.classes, n), "tissue_source_site": "none"})
    medi_meta = pd.DataFrame([(c, s) for c in spec.classes for s in spec.sites for _ in range(5)],
                             columns=["class", "tissue_source_site"])
    labels = cell_labels(cfg, {"CLS": (cls_meta, None), "MeDi": (medi_meta, None)})
    assert list(labels["MeDi"][:5]) == [f"{spec.classes[0]}@{spec.sites[0]}"] * 5
    cls = pd.Series(labels["CLS"])
    for c, sites in spec.cohort.items():
        for s in sites:  # each trained cell: 5 CLS patches of its class, none shared with another cell
            pos = np.flatnonzero(cls == f"{c}@{s}")
            assert len(pos) == 5 and (cls_meta["class"].to_numpy()[pos] == c).all()
    assert (cls != "").sum() == 5 * sum(len(s) for s in spec.cohort.values())


@pytest.mark.slow
def test_seeds_run_once_per_seed_and_report_the_spread(tmp_path):
    from medi_fast.demo import run_seeds

    out = tmp_path / "seeds"
    report = run_seeds(toy(out), [0, 1])
    assert report == out / "report.html"
    for s in (0, 1):
        rec = json.loads((out / f"seed-{s}" / "results.json").read_text())
        assert rec["seed"] == s and list(rec["probe"]) == [a.name for a in arms.for_config(toy(out))]
        assert (out / f"seed-{s}" / "report.html").exists()
    agg = json.loads((out / "seeds.json").read_text())
    accs = [json.loads((out / f"seed-{s}" / "results.json").read_text())["probe"]["MeDi"]["tss_bacc"] for s in (0, 1)]
    assert agg["stats"]["MeDi"]["mean"] == pytest.approx(np.mean(accs))
    md = (out / "report.md").read_text()
    assert "mean ± SD (2 seeds)" in md and "seed-1/report.html" in md
    # per test site: each arm's mean over seeds, and the headline gap's range
    site = md.split("## Per unseen test site")[1]
    medi_s5 = np.mean([json.loads((out / f"seed-{s}" / "results.json").read_text())["probe_sites"]["MeDi"]["S5"]
                       for s in (0, 1)])
    assert re.search(rf"^\| MeDi +\| +{medi_s5:.3f} +\|", site, re.M) and "| MeDi - CLS (range over seeds)" in site
    assert "MeDi" in (out / "report.html").read_text()
    # The directory of a run over seeds can be overwritten by another.
    run_seeds(toy(out), [0, 2], overwrite=True)
    assert not (out / "seed-1").exists() and (out / "seed-2" / "results.json").exists()


@pytest.mark.parametrize("args, words", [
    (["--seeds", "0"], "two or more different seeds"),
    (["--seeds", "0,0"], "two or more different seeds"),
    (["--seeds", "0,x"], "comma-separated list of integers"),
    (["--seed", "1", "--seeds", "0,1"], "--seed and --seeds"),
    (["--seeds", "0,-1"], "--seeds must be in"),
    (["--setting", "ring5"], "closest"),
    (["--precision", "fp16"], "'fp16' is not one of"),
])
def test_bad_seed_and_setting_options_fail_in_one_line_before_output(tmp_path, capsys, args, words):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(out), *args])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_distill_stage_adds_the_students_arm(tmp_path):
    """demo --distill: the MeDi model is distilled (a tiny schedule here), the student generates with its
    own steps through ONNX Runtime, and its samples are a fourth arm of the probe and the distances."""
    out = tmp_path / "out"
    cfg = replace(toy(out), distill=True, distill_steps=2, distill_teacher_steps=4, distill_iters=2)
    run_demo(cfg)
    manifest = pd.read_csv(out / "synthetic" / "medi-student" / "manifest.csv", dtype=str, keep_default_na=False)
    assert set(manifest["steps"]) == {"2"} and set(manifest["sampler"]) == {"ddim"}  # its own steps, not the demo's
    assert (out / "runs" / "medi-student-2.pt").is_file()
    md = (out / "report.md").read_text()
    assert re.search(r"^\| MeDi-2-step +\|", md, re.M) and "distilled" in md
    rec = json.loads((out / "results.json").read_text())
    assert list(rec["probe"]) == [a.name for a in arms.for_config(cfg)] and "MeDi-2-step" in rec["probe"]


def test_distill_option_reaches_the_config():
    assert DemoConfig.from_options("o", distill=True).distill and not DemoConfig.from_options("o").distill


def test_a_seed_from_medi_fast_toml_is_not_a_conflict_with_seeds(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "medi-fast.toml").write_text("[demo]\nseed = 3\n")
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "o"), "--seeds", "5"])
    err = capsys.readouterr().err
    assert "two or more different seeds" in err and "--seed and --seeds" not in err


def test_reevaluate_reads_back_the_run_exactly_and_changes_only_the_evaluation(demo_run, tmp_path):
    from medi_fast.demo.run import reevaluate

    out, _ = demo_run
    first = json.loads((out / "results.json").read_text())
    # the same settings, read back from disk: the numbers the run computed from its patches in memory
    again = json.loads(reevaluate(toy(tmp_path / "same"), out).parent.joinpath("results.json").read_text())
    assert again["probe"] == first["probe"] and again["fid_cell_mean"] == first["fid_cell_mean"]
    assert again["reevaluated_from"] == str(out) and again["seconds"] == first["seconds"]
    assert again["precision"] == first["precision"]  # what made the patches: the run's, not this process's
    # another probe ratio: the same patches, more of them in each probe run
    other = reevaluate(replace(toy(tmp_path / "ratio"), probe_ratio=1.0), out).parent
    assert json.loads((other / "demo_config.json").read_text())["probe_ratio"] == 1.0
    assert json.loads((other / "results.json").read_text())["fid_cell_mean"] == first["fid_cell_mean"]
    assert (other / "report.html").stat().st_size > 0 and not (other / "runs").exists()
    # anything that shapes the models or patches needs a new run
    with pytest.raises(MediFastError, match="made with other settings"):
        reevaluate(replace(toy(tmp_path / "steps"), train_steps=3), out)
    with pytest.raises(MediFastError, match="into itself"):
        reevaluate(toy(out), out)
    with pytest.raises(MediFastError, match="no finished demo run"):
        reevaluate(toy(tmp_path / "x"), tmp_path / "nothing")


def test_same_config_is_the_recorded_configuration_exactly():
    from medi_fast.demo.run import recorded_config, same_config

    cfg = DemoConfig(out="a", setting="two-class")
    recorded = recorded_config(cfg)
    assert recorded["test_sites"] == ["S5", "S6"]
    assert same_config(recorded, replace(cfg, out="b"))  # where it was written is no setting
    assert not same_config(recorded, replace(cfg, prediction_type="epsilon"))
    assert same_config(recorded, replace(cfg, probe_ratio=1.0), ignore=("probe_ratio",))
    # a run recorded by a version without a field, or with one this version does not have, is never reused,
    # whatever value the field would have had
    for key in ("prediction_type", "probe_ratio", "distill", "test_sites"):
        old = {k: v for k, v in recorded.items() if k != key}
        assert not same_config(old, cfg) and not same_config(old, cfg, ignore=(key,))
    assert not same_config({**recorded, "future_field": 1}, cfg)
    # a setting's test sites are part of the configuration: ring4 recorded on two sites is another one
    ring4 = DemoConfig(out="a")
    assert len(recorded_config(ring4)["test_sites"]) == 8 and same_config(recorded_config(ring4), ring4)
    assert not same_config({**recorded_config(ring4), "test_sites": ["S5", "S6"]}, ring4)


def test_a_probe_larger_than_the_synthetic_set_is_refused_up_front(tmp_path):
    with pytest.raises(MediFastError, match="probe draws 16 synthetic patches per class but the demo makes 12"):
        replace(toy(tmp_path / "o"), probe_ratio=4.0)
    assert not (tmp_path / "o").exists()


def test_the_registry_names_the_arms_in_order_and_the_student_only_with_distill():
    from medi_fast.eval.probe import NO_SYNTHETIC

    others = ["MeDi-edit", "HED-jitter", "Macenko-aug", "MeDi+HED", "Macenko-norm", "Reinhard-norm", "CLS-oracle",
              "MeDi-oracle"]
    assert [a.name for a in arms.for_config(DemoConfig())] == [NO_SYNTHETIC, "CLS", "MeDi", *others]
    with_student = arms.for_config(DemoConfig(distill=True, distill_steps=2))
    assert [a.name for a in with_student] == [NO_SYNTHETIC, "CLS", "MeDi", "MeDi-2-step", *others]
    student = with_student[3]
    assert student.recipe.needs == ("MeDi",) and student.recipe.per_site
    assert [a.recipe.per_site for a in with_student[:3]] == [False, False, True]
    # only the arms with a model train; MeDi + HED builds on MeDi's samples; the oracles render
    assert [a.name for a in with_student if a.recipe.trains] == ["CLS", "MeDi"]
    assert {a.name: a.recipe.needs for a in with_student if a.recipe.needs} == {
        "MeDi-2-step": ("MeDi",), "MeDi-edit": ("MeDi",), "MeDi+HED": ("MeDi",)}
    assert [a.name for a in with_student if a.recipe.per_site] == ["MeDi", "MeDi-2-step", "MeDi-edit", "MeDi-oracle"]
    # an arm's cost: its own stages and those of the arms it builds on (the student's teacher)
    assert arms.cost(with_student, {"CLS": 3.0, "MeDi": 10.0, "MeDi-2-step": 2.5, "MeDi+HED": 0.5, "HED-jitter": 0.25}
                     ) == {NO_SYNTHETIC: 0.0, "CLS": 3.0, "MeDi": 10.0, "MeDi-2-step": 12.5, "MeDi-edit": 10.0,
                           "HED-jitter": 0.2,
                           "Macenko-aug": 0.0, "MeDi+HED": 10.5, "Macenko-norm": 0.0, "Reinhard-norm": 0.0,
                           "CLS-oracle": 0.0, "MeDi-oracle": 0.0}
    assert arms.HEADLINE.column == "MeDi - CLS" and [g.key for g in arms.GAPS] == [
        "medi_over_cls", "cls_over_real", "medi_over_hed", "cls_oracle_over_real"]


def test_no_arm_name_is_written_outside_the_registry():
    """The demo and its benchmarks name arms through medi_fast.demo.arms only: no string in their code (their
    docstrings aside) is an arm's name or a short label built on one ("MeDi - CLS", "cells MeDi closer")."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    names = {a.name for a in arms.REGISTRY} | {"MeDi-4-step"}
    word = re.compile(r"(^|[\s+(])(" + "|".join(re.escape(n) for n in names) + r")($|[\s)])")
    files = [p for p in (repo / "medi_fast" / "demo").glob("*.py") if p.name != "arms.py"]
    files += [repo / "benchmarks" / "run_all.py", repo / "benchmarks" / "demo_seeds.py"]
    found = []
    for path in files:
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                    and len(node.value) <= 40 and word.search(node.value)):
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not found, found


def test_seeds_summary_takes_every_arm_the_runs_compared():
    from medi_fast.demo.seeds import aggregate, per_seed, verdict

    recs = []
    for seed, (real, cls, medi, student) in enumerate([(0.6, 0.7, 0.8, 0.75), (0.62, 0.72, 0.84, 0.78)]):
        r = _record(seed, real, cls, medi)
        r["probe"]["MeDi-4-step"] = {"tss_bacc": student, "tss_bacc_sem": 0.01, "runs": 5}
        recs.append(r)
    t = per_seed(recs)
    assert list(t.columns[:5]) == ["seed", "no-synthetic", "CLS", "MeDi", "MeDi-4-step"]
    agg = aggregate(recs)
    assert agg["arms"] == ["no-synthetic", "CLS", "MeDi", "MeDi-4-step"]
    assert agg["order"] == ["MeDi", "MeDi-4-step", "CLS", "no-synthetic"]
    assert agg["stats"]["MeDi-4-step"]["mean"] == pytest.approx(0.765)
    assert "MeDi-4-step 0.765 ± " in verdict(agg) and verdict(agg).startswith("MeDi beat CLS")


def test_reevaluate_refuses_a_run_that_does_not_record_its_arms_costs(demo_run, tmp_path):
    import shutil

    from medi_fast.demo.run import reevaluate

    out, _ = demo_run
    source = tmp_path / "older"
    shutil.copytree(out, source)
    res = json.loads((source / "results.json").read_text())
    (source / "results.json").write_text(json.dumps({k: v for k, v in res.items() if k != "arm_seconds"}))
    with pytest.raises(MediFastError, match="does not record this version's arms and their seconds; run the demo "
                                            "afresh"):
        reevaluate(toy(tmp_path / "again"), source)
    assert not (tmp_path / "again").exists()
    # a recorded precision that is not what the demo writes (a backend that does not exist): refused too
    res["precision"]["generation"]["medi"] = "../../etc"
    (source / "results.json").write_text(json.dumps(res))
    with pytest.raises(MediFastError, match="records a damaged precision; run the demo afresh"):
        reevaluate(toy(tmp_path / "again"), source)
    assert not (tmp_path / "again").exists()


def test_augmented_copies_are_drawn_from_the_runs_own_real_draw_only(monkeypatch):
    """A synthetic set with a SOURCE column (the demo's stain-augmented copies of the probe's pool) adds
    only copies of the real patches the run drew, as many per class as any synthetic arm adds."""
    from medi_fast.eval import probe as P

    rows = 8
    train = pd.DataFrame({"class": ["A"] * rows + ["B"] * rows, "tissue_source_site": ["s1"] * rows + ["s2"] * rows})
    x = np.stack([np.arange(2 * rows), np.zeros(2 * rows)], 1).astype(float)  # feature 0: the row, 1: a copy?
    copies = train.loc[train.index.repeat(3)].reset_index(drop=True)
    copies[P.SOURCE] = np.repeat(np.arange(2 * rows), 3)
    x_copies = np.stack([copies[P.SOURCE].to_numpy(), np.ones(len(copies))], 1).astype(float)
    test = pd.DataFrame({"class": ["A", "B"] * 3, "tissue_source_site": ["t1"] * 6})
    x_test = np.stack([np.arange(6), np.zeros(6)], 1).astype(float)
    seen = []
    fit = P._fit_predict
    monkeypatch.setattr(P, "_fit_predict", lambda xs, y, xt, cfg: (seen.append(xs.copy()), fit(xs, y, xt, cfg))[1])
    for seed in range(4):
        seen.clear()
        P.run_probe((train, x), (test, x_test), {"aug": (copies, x_copies)}, ["A", "B"],
                    P.ProbeConfig(k=2, ratio=3.0, one_site_per_class=True, max_runs=None, seed=seed))
        real, aug = seen  # the run's arms: real alone, then real + copies
        drawn = sorted(real[:, 0])
        assert np.array_equal(aug[:4], real) and (aug[4:, 1] == 1).all() and len(aug) == 4 + 2 * 6
        assert sorted(aug[4:, 0]) == sorted(np.repeat(drawn, 3))  # three copies of each drawn patch, no other


def test_oracle_arms_render_fresh_patches_of_the_cohorts_sites(demo_run):
    from medi_fast.demo.stages import render_oracle

    out, _ = demo_run
    cfg = replace(toy(out), n_synthetic_per_combo=12)
    spec = cfg.spec
    meta, images = render_oracle(cfg, per_site=True)
    assert images.shape == (len(meta), 32, 32, 3) and images.dtype == np.uint8
    assert meta.groupby(["class", "tissue_source_site"]).size().to_dict() == {
        (c, s): 12 for c in spec.classes for s in spec.sites}
    cls_meta, _ = render_oracle(cfg, per_site=False)  # as many per class, at its cohort sites only
    assert cls_meta.groupby(["class", "tissue_source_site"]).size().to_dict() == {
        (c, s): 24 for c, sites in spec.cohort.items() for s in sites}
    index = pd.read_parquet(out / "index.parquet")
    real = _real_images(out)
    key = index["class"] + "@" + index["tissue_source_site"]
    ours = meta["class"] + "@" + meta["tissue_source_site"]
    for c, sites in spec.cohort.items():
        for s in sites:  # each trained cell's colour is its site's: nearer the real cell than the class elsewhere
            mine = images[(ours == f"{c}@{s}").to_numpy()].reshape(-1, 3).mean(0)
            dist = {t: np.abs(mine - real[(key == f"{c}@{t}").to_numpy()].reshape(-1, 3).mean(0)).sum()
                    for t in spec.sites + list(spec.test_sites) if (key == f"{c}@{t}").any()}
            assert min(dist, key=dist.get) == s, (c, s, dist)
    flat = {p.tobytes() for p in real}
    assert not any(p.tobytes() in flat for p in images)  # fresh: none is a cohort patch


def test_stain_normalisation_narrows_the_colour_gap_between_sites(demo_run):
    from medi_fast.demo.run import Timer

    out, _ = demo_run
    cfg = toy(out)
    index = pd.read_parquet(out / "index.parquet")
    ctx = arms.Context(cfg, out, Timer(), lambda m: None, total=1, index=index)
    real = ctx.real()
    site = index["tissue_source_site"].to_numpy()

    def spread(images):  # how far the sites' mean colours lie from their common mean
        means = np.stack([images[site == s].reshape(-1, 3).mean(0) for s in np.unique(site)])
        return float(np.abs(means - means.mean(0)).mean())

    for arm in (arms.MACENKO_NORM, arms.REINHARD_NORM):
        reference = arm.recipe.reference(cfg, index, real)
        assert reference.shape == (32, 32 * 4 * sum(len(s) for s in cfg.spec.cohort.values()), 3)
        view = arm.recipe.view(ctx)
        assert view.shape == real.shape and view.dtype == np.uint8
        assert spread(view) < 0.75 * spread(real), arm.name


def test_seeds_report_takes_every_registry_arm_with_its_cost_and_older_runs_without_them(tmp_path):
    from medi_fast.demo.seeds import aggregate, gaps, verdict, write_seeds_report

    names = [a.name for a in arms.for_config(DemoConfig())]
    recs = []
    for seed in range(3):
        r = _record(seed, 0.84, 0.83, 0.91)
        r["probe"] = {a: {"tss_bacc": 0.80 + 0.01 * i + 0.002 * seed, "tss_bacc_sem": 0.01, "runs": 5}
                      for i, a in enumerate(names)}
        r["arm_seconds"] = {a: float(i) for i, a in enumerate(names)}
        recs.append(r)
    agg = aggregate(recs)
    assert agg["arms"] == names and agg["order"] == names[::-1]
    assert [g.key for g in gaps(recs)] == [g.key for g in arms.GAPS]
    assert agg["arm_seconds"] == {a: float(i) for i, a in enumerate(names)}
    last = len(names) - 1  # MeDi-oracle, the last arm: 0.80 + 0.01 x its place + 0.002 x the mean seed
    assert f"MeDi-oracle {0.802 + 0.01 * last:.3f} ± 0.002 ({last} s)" in verdict(agg) and "seconds to make" in verdict(agg)
    write_seeds_report(tmp_path, DemoConfig(), recs)
    assert "CLS-oracle - no-synthetic" in (tmp_path / "report.md").read_text()
    # runs recorded before the stain and oracle arms: the comparisons they can answer, no cost
    old = [_record(s, 0.84, 0.83, 0.9 + 0.01 * s) for s in range(2)]
    assert [g.key for g in gaps(old)] == ["medi_over_cls", "cls_over_real"]
    assert aggregate(old)["arm_seconds"] == {} and "(" not in verdict(aggregate(old)).split(")")[1].split(";")[0]


def test_run_all_shows_every_arm_over_seeds_with_its_cost():
    """benchmarks/run_all.py's section over seeds takes the runs' arms and comparisons from the runs, each
    arm's seconds beside its accuracy."""
    import importlib.util
    import sys
    from pathlib import Path

    from medi_fast.demo.seeds import aggregate

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("run_all_for_demo", bench / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    names = [a.name for a in arms.for_config(DemoConfig())]
    recs = []
    for seed in range(2):
        r = _record(seed, 0.84, 0.83, 0.91)
        r["probe"] = {a: {"tss_bacc": 0.8 + 0.01 * i, "tss_bacc_sem": 0.01, "runs": 5} for i, a in enumerate(names)}
        r["probe_sites"] = {a: {"S5": 0.8 + 0.01 * i, "S6": 0.8 + 0.01 * i} for i, a in enumerate(names)}
        r["arm_seconds"] = {a: 2.0 * i for i, a in enumerate(names)}
        recs.append(r)
    agg = aggregate(recs)
    ds = {"machine": {}, "command": "x", "seeds": [0, 1], "default_seeds": [0, 1], "quick": False,
          "rows": [{"variant": "ring4", "shipped": True}],
          "variants": {"ring4": {**agg, "records": recs, "k": 10, "setting": "ring4", "prediction_type": "v",
                                 "probe_ratio": 4.0, "test_sites": ["S5", "S6"], "description": "d", "summary": "s"}}}
    head, md = run_all.demo_seeds_section(ds)
    text = "\n".join(head + md)
    assert f"MeDi-oracle {2 * (len(names) - 1)}" in text and "Seconds to make each arm's training data" in text
    assert "CLS-oracle - no-synthetic (range over seeds)" in text and all(f"| {a} " in text for a in names)
    assert "| fp32; ort-cpu " in text  # runs that record no precision were made before the demo had one
    for i, r in enumerate(recs):  # what each run recorded: its training precision, the backends of its folders
        r["precision"] = {"requested": "auto", "training": "bf16",
                          "generation": {"medi": "openvino-bf16", "cls": ["openvino-bf16", "ort-cpu"][i]}}
    assert run_all.precision_text(ds["variants"]["ring4"]) == "bf16; openvino-bf16, ort-cpu"
    recs[0]["precision"] = {"requested": "fp32", "training": "fp32", "generation": {"medi": "ort-cpu"}}
    del recs[1]["precision"]  # a run from before the demo had a precision: fp32 and ort-cpu, as seed 0's
    assert run_all.precision_text(ds["variants"]["ring4"]) == "fp32; ort-cpu"


def test_edited_arm_moves_each_drawn_real_patch_to_every_cohort_site_with_the_pipelines_edit(demo_run):
    """MeDi-edit: every real patch a probe run draws, once per cohort site, made by Pipeline.edit (the same
    images as editing one patch alone), derived from its pool row so the probe adds only the run's own."""
    from medi_fast.api import Pipeline
    from medi_fast.demo import stages
    from medi_fast.eval.probe import SOURCE

    out, _ = demo_run
    cfg = toy(out)
    edits = pd.read_csv(out / "synthetic" / "medi-edit" / "manifest.csv", dtype=str, keep_default_na=False)
    index = pd.read_parquet(out / "index.parquet")
    pool = stages.probe_pool(cfg, index)
    drawn = stages.probe_drawn(cfg, index)
    src = edits[SOURCE].astype(int).to_numpy()
    assert sorted(set(src)) == list(drawn) and len(drawn) >= cfg.probe_k * len(cfg.spec.classes)
    for r in drawn:  # each drawn patch once per cohort site, its class kept, its source site recorded
        mine = edits[src == r]
        assert sorted(mine["tissue_source_site"]) == cfg.spec.sites
        row = index[pool].iloc[r]
        assert set(mine["class"]) == {row["class"]} and set(mine["source_tissue_source_site"]) == {row["tissue_source_site"]}
    used = json.loads((out / "results.json").read_text())["precision"]["generation"]["medi-edit"]
    pipe = Pipeline.open(out / "engines" / "medi" / "model.onnx", backend=used, steps=cfg.sample_steps)
    real = _real_images(out)[pool]
    for i in (0, len(edits) - 1):
        one = pipe.edit(real[src[i]], tss=edits["tissue_source_site"][i], method=cfg.edit_method,
                        strength=cfg.edit_strength, source={"class": edits["class"][i],
                                                            "tss": edits["source_tissue_source_site"][i]})
        saved = np.asarray(__import__("PIL.Image").Image.open(out / "synthetic" / "medi-edit" / edits["file"][i]))
        assert np.array_equal(one[0], saved)


def test_reevaluating_edits_with_another_k_is_refused_in_one_line(demo_run, tmp_path):
    from medi_fast.demo.run import reevaluate

    out, _ = demo_run
    with pytest.raises(MediFastError, match="do not cover the real patches this probe draws .*run the demo afresh"):
        reevaluate(replace(toy(tmp_path / "again"), k=6, probe_ratio=1.0), out)
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("folder, column, value, words", [
    ("medi", "file", "../../index.parquet", "does not list its images as files inside"),
    ("medi-edit", "derived_from_train_row", "99999", "names source patches outside the probe's pool"),
    ("medi-edit", "derived_from_train_row", "x", "names source patches outside the probe's pool"),
])
def test_reevaluating_a_damaged_manifest_is_refused_in_one_line(demo_run, tmp_path, folder, column, value, words):
    """A run directory read back is checked like an option: no manifest entry leads outside its folder or
    names a source patch the pool does not have."""
    import shutil

    from medi_fast.demo.run import reevaluate

    out, _ = demo_run
    source = tmp_path / "damaged"
    shutil.copytree(out, source)
    manifest = source / "synthetic" / folder / "manifest.csv"
    m = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    m.loc[0, column] = value
    m.to_csv(manifest, index=False)
    with pytest.raises(MediFastError, match=words):
        reevaluate(toy(tmp_path / "again"), source)
    assert not (tmp_path / "again").exists()


def test_the_demos_precision_follows_the_cpu_and_bf16_is_refused_without_bf16_units(tmp_path, capsys, monkeypatch):
    from medi_fast import backends
    from medi_fast.demo import stages

    cfg = DemoConfig.from_options(str(tmp_path / "o"))
    assert cfg.precision == "auto" and DemoConfig.from_options("o", precision="fp32").precision == "fp32"
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(backends, "cpu_bf16_native", lambda cpuinfo=None, n=native: n)
        assert stages.training_precision(cfg) == want
        assert stages.train_config(cfg, tmp_path, "medi", "class,tss").precision == want
        assert stages.training_precision(replace(cfg, precision="fp32")) == "fp32"
    assert stages.generation_backend(cfg) == "auto" and stages.generation_backend(replace(cfg, precision="fp32")) == "ort-cpu"
    with pytest.raises(MediFastError, match="^the demo's precision must be one of auto, fp32, bf16, got 'fp16'$"):
        replace(cfg, precision="fp16")
    # --precision bf16 on a CPU without bf16 units: one line, nothing written (one run and --seeds alike)
    for extra in ([], ["--seeds", "0,1"]):
        out = tmp_path / f"bf16{len(extra)}"
        with pytest.raises(SystemExit) as e:
            main(["demo", "--out", str(out), "--precision", "bf16", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code != 0 and len(err) == 1 and not out.exists()
        assert err[0].startswith("medi-fast: error: --precision bf16: this CPU has no bf16 units"), err
        assert err[0].endswith("use --precision auto or fp32")
