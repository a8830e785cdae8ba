"""`data report`: coverage matrix numbers, files written, real-metadata figure."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from medi_fast.cli import main
from medi_fast.data.report import counts, coverage_matrix, write_report
from medi_fast.errors import MediFastError

REAL = Path(__file__).parents[2] / "shared/data/tcga_ut_slide_metadata.csv"


def _table():
    return pd.DataFrame({
        "class": ["LUAD", "LUAD", "LUAD", "LUSC", "LUSC"],
        "tissue_source_site": ["05", "05", "38", "05", "22"],
        "slide_submitter_id": ["s1", "s1", "s2", "s3", "s4"],
        "case_submitter_id": ["c1", "c1", "c2", "c3", "c4"],
        "gender": ["male", "male", "female", "Unknown", "female"],
        "race": ["white", "white", "asian", "Unknown", "white"],
    })


def test_coverage_matrix_counts_patches_and_slides():
    t = _table()
    m = coverage_matrix(t)
    assert list(m.index) == ["LUAD", "LUSC"] and list(m.columns) == ["05", "22", "38"]
    assert m.loc["LUAD", "05"] == 2 and m.loc["LUAD", "38"] == 1 and m.loc["LUSC", "38"] == 0
    assert int(m.to_numpy().sum()) == len(t)
    ms = coverage_matrix(t, "slides")
    assert ms.loc["LUAD", "05"] == 1 and int(ms.to_numpy().sum()) == 4
    c = counts(t)
    assert (c["patches"], c["slides"], c["classes"], c["tss"], c["class_tss_combinations"]) == (5, 4, 2, 3, 4)
    assert c["slides_per_gender"] == {"female": 2, "male": 1, "Unknown": 1}
    with pytest.raises(MediFastError, match="no column 'class'"):
        coverage_matrix(t.drop(columns=["class"]))


def test_write_report_files(tmp_path):
    write_report(_table(), tmp_path / "r")
    cov = pd.read_csv(tmp_path / "r/coverage.csv", dtype=str, index_col=0)
    assert list(cov.columns) == ["05", "22", "38"]  # TSS codes stay strings in the CSV header
    for png in ("coverage.png", "demographics.png"):
        with Image.open(tmp_path / "r" / png) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_report_on_real_metadata_counts(tmp_path):
    if not REAL.is_file():
        pytest.skip("real metadata absent")
    from medi_fast.data.clinical import read_clinical

    t = read_clinical(REAL)
    c = write_report(t, tmp_path / "real", unit="slides")
    assert (c["slides"], c["classes"], c["tss"]) == (8726, 32, 626)  # the published cohort: 32 types, 626 TSS, 8,726 records
    assert "'--" not in c["slides_per_race"] and "not reported" not in c["slides_per_race"]
    # 11 TCGA-UCS slides have an empty TSS cell: their barcode's "NA" is used, not "Unknown"
    cov = pd.read_csv(tmp_path / "real/coverage.csv", dtype=str, keep_default_na=False, index_col=0)
    assert "NA" in cov.columns and "Unknown" not in cov.columns and int(cov.loc["UCS", "NA"]) == 11


def test_cli_report(tmp_path, capsys):
    from medi_fast.data.index import write_index

    t = _table()
    t["path"] = "/x.jpg"
    t["project_id"] = "TCGA-" + t["class"]
    t["age_at_index"] = 50.0
    write_index(t, tmp_path / "i.parquet")
    assert main(["data", "report", str(tmp_path / "i.parquet"), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "5 patches, 4 slides" in out and (tmp_path / "rep/coverage.png").is_file()
    with pytest.raises(SystemExit) as e:
        main(["data", "report", str(tmp_path / "missing.parquet")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
