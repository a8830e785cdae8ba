"""`medi-fast demo` end to end at toy size: every stage runs, the report holds what it promises, and the
output directory is guarded (no run mixes with another's files)."""
from __future__ import annotations

import base64
import io
import re
from dataclasses import replace
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medi_fast.cli import main
from medi_fast.demo import COHORT, DemoConfig, run_demo
from medi_fast.demo.stages import _real as _real_images
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

    index = pd.read_parquet(out / "index.parquet")
    real = _real_images(out)
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
    for opt in ("--out", "--quick", "--train-steps", "--seed", "--overwrite"):
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
