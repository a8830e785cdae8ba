"""`medi-fast demo` end to end at toy size: every stage runs, the report holds what it promises, and the
output directory is guarded (no run mixes with another's files)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medi_fast.cli import main
from medi_fast.demo import COHORT, DemoConfig, run_demo
from medi_fast.errors import MediFastError


def toy(out) -> DemoConfig:
    return DemoConfig(out=str(out), n_per_combo=10, n_test_per_combo=6, render_resolution=32, preset="tiny-32",
                      train_steps=2, batch_size=4, sample_steps=2, sample_batch=16, n_synthetic_per_combo=3, k=4,
                      probe_repeats=1)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_demo(toy(out))


def test_report_and_outputs(demo_run):
    out, report = demo_run
    assert report == out / "report.html" and report.stat().st_size > 0
    md = (out / "report.md").read_text()
    for row in ("| no-synthetic |", "| CLS |", "| MeDi |"):
        assert row in md
    assert "## Timings" in md and "| total " in md
    for fig in ("coverage", "real", "medi", "cls"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 0
    # MeDi fills every class x cohort site, including the combinations absent from training.
    medi = pd.read_csv(out / "synthetic" / "medi" / "manifest.csv", dtype=str, keep_default_na=False)
    sites = sorted({s for ss in COHORT.values() for s in ss})
    combos = medi.groupby(["class", "tissue_source_site"]).size()
    assert len(combos) == 2 * len(sites) and (combos == 3).all()
    assert ("LUAD", "S4") in combos.index and ("LUSC", "S1") in combos.index
    # CLS makes the same number of images per class, without a site.
    cls = pd.read_csv(out / "synthetic" / "cls" / "manifest.csv", dtype=str, keep_default_na=False)
    assert cls.groupby("class").size().to_dict() == {"LUAD": 3 * len(sites), "LUSC": 3 * len(sites)}
    # The evaluation's real images are the pack's, in index order, equal to decoding the JPEGs.
    from medi_fast.data.imageio import load_patch
    from medi_fast.demo import _real

    index = pd.read_parquet(out / "index.parquet")
    real = _real(out)
    assert real.shape == (len(index), 32, 32, 3)
    for i in (0, len(index) // 2, len(index) - 1):
        assert np.array_equal(real[i], load_patch(index["path"].iloc[i], 32))
    # No training site of the probe's test sites leaks into the diffusion training split.
    train = pd.read_csv(out / "train.csv", dtype=str)
    assert not set(train["tissue_source_site"]) & {"S5", "S6"}


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


def test_overwrite_replaces_a_previous_run(tmp_path):
    out = tmp_path / "out"
    run_demo(toy(out))
    (out / "synthetic" / "medi" / "stale.png").write_bytes(b"x")
    run_demo(toy(out), overwrite=True)
    assert not (out / "synthetic" / "medi" / "stale.png").exists()
    assert (out / "report.html").exists()


def test_help_lists_every_option(capsys):
    main(["demo", "--help"])
    text = capsys.readouterr().out
    for opt in ("--out", "--quick", "--train-steps", "--seed", "--overwrite"):
        assert opt in text
