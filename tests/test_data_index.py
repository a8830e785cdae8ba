"""The patch index: layout walk, barcode/TSS strings, metadata join, missing markers, problems, CLI errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medi_fast.cli import main
from medi_fast.data.barcode import parse_barcode, tss_of
from medi_fast.data.index import build_index, build_index_with_problems, read_index
from medi_fast.errors import MediFastError

SLIDES = [  # (folder, slide, gender, race, age)
    ("Lung_adenocarcinoma", "TCGA-05-4244-01Z-00-DX1", "male", "white", "70"),
    ("Lung_adenocarcinoma", "TCGA-05-4249-01Z-00-DX1", "'--", "'--", "'--"),
    ("LUSC", "TCGA-18-3406-01Z-00-DX1", "female", "not reported", "--"),
    ("LUSC", "TCGA-22-0940-01Z-00-DX2", "female", "Unknown", "66"),
    ("LUSC", "TCGA-NA-A4QV-01Z-00-DX1", "female", "white", "60"),  # TSS "NA", lost as empty in the CSV
]


def _tree(root, n=3, extra_slide=False):
    rng = np.random.default_rng(0)
    for folder, slide, *_ in SLIDES + ([("LUSC", "TCGA-99-0001-01Z-00-DX1")] if extra_slide else []):
        d = root / folder / slide
        d.mkdir(parents=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(d / f"{slide}_{k}.jpg")
    rows = [{"project_id": "TCGA-LUAD" if f.startswith("Lung_a") else "TCGA-LUSC", "case_submitter_id": s[:12],
             "slide_submitter_id": s,
             "tissue_source_site": "" if s[5:7] == "NA" else s[5:7], "gender": g, "race": r, "age_at_index": a,
             "other": "x"} for f, s, g, r, a in SLIDES]
    pd.DataFrame(rows).to_csv(root.parent / "clinical.csv", index=False)
    return root, root.parent / "clinical.csv"


def test_barcode_parsing_keeps_codes_as_strings():
    b = parse_barcode("TCGA-05-4244-01Z-00-DX1")
    assert (b.tss, b.participant, b.sample, b.portion, b.slide, b.case) == ("05", "4244", "01Z", "00", "DX1",
                                                                            "TCGA-05-4244")
    assert tss_of("TCGA-3B-A9HI-01Z-00-DX1_12.jpg") == "3B"
    assert tss_of("not-a-barcode") is None
    with pytest.raises(MediFastError, match="not a TCGA barcode"):
        parse_barcode("slide_1")


def test_index_columns_types_and_normalisation(tmp_path):
    root, clin = _tree(tmp_path / "data")
    df = build_index(root, clin)
    assert len(df) == 5 * 3
    for col in ("path", "class", "project_id", "slide_submitter_id", "case_submitter_id", "tissue_source_site",
                "gender", "race", "age_at_index"):
        assert col in df.columns
    assert set(df["tissue_source_site"]) == {"05", "18", "22", "NA"}  # leading zero kept; NA from the barcode
    assert df["age_at_index"].dtype == np.float64
    by_slide = df.drop_duplicates("slide_submitter_id").set_index("slide_submitter_id")
    assert by_slide.loc["TCGA-05-4244-01Z-00-DX1", "age_at_index"] == 70.0
    assert np.isnan(by_slide.loc["TCGA-05-4249-01Z-00-DX1", "age_at_index"])
    # '--, not reported, Unknown all become one value
    assert by_slide.loc["TCGA-05-4249-01Z-00-DX1", ["gender", "race"]].tolist() == ["Unknown", "Unknown"]
    assert by_slide.loc["TCGA-18-3406-01Z-00-DX1", "race"] == "Unknown"
    assert by_slide.loc["TCGA-22-0940-01Z-00-DX2", "race"] == "Unknown"
    assert set(df["class"]) == {"LUAD", "LUSC"}  # long folder names and codes both work
    assert all(p.startswith("/") for p in df["path"])  # absolute
    assert (df["width"] == 24).all()
    assert df.attrs["problems"].summary().startswith("0 undecodable")


def test_undecodable_listed_and_excluded_strict_fails(tmp_path):
    root, clin = _tree(tmp_path / "data")
    bad = root / "LUSC" / "TCGA-18-3406-01Z-00-DX1" / "TCGA-18-3406-01Z-00-DX1_1.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated JPEG
    (root / "LUSC" / "TCGA-18-3406-01Z-00-DX1" / "zzz.jpg").write_bytes(b"not an image")
    df, problems = build_index_with_problems(root, clin)
    assert len(df) == 15 - 1  # the truncated one dropped, the garbage one too
    assert sorted(p.rsplit("/", 1)[1] for p, _ in problems.undecodable) == ["TCGA-18-3406-01Z-00-DX1_1.jpg", "zzz.jpg"]
    assert str(bad.resolve()) not in set(df["path"])
    with pytest.raises(MediFastError, match="2 undecodable images"):
        build_index(root, clin, strict=True)


def test_slides_without_metadata_counted(tmp_path):
    root, clin = _tree(tmp_path / "data", extra_slide=True)
    df, problems = build_index_with_problems(root, clin)
    assert problems.slides_without_metadata == ["TCGA-99-0001-01Z-00-DX1"]
    assert problems.patches_without_metadata == 3
    assert "TCGA-99-0001-01Z-00-DX1" not in set(df["slide_submitter_id"])
    with pytest.raises(MediFastError, match="1 slides have no metadata"):
        build_index(root, clin, strict=True)


def _cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr()


def test_cli_errors_one_line_exit_2(tmp_path, capsys):
    root, clin = _tree(tmp_path / "data")
    code, out = _cli(["data", "index", str(tmp_path / "nope"), "--metadata", str(clin), "--out",
                      str(tmp_path / "i.parquet")], capsys)
    assert code == 2 and "data root" in out.err and "does not exist" in out.err and len(out.err.splitlines()) == 1
    df = pd.read_csv(clin, dtype=str, keep_default_na=False).drop(columns=["race"])
    df.to_csv(tmp_path / "norace.csv", index=False)
    code, out = _cli(["data", "index", str(root), "--metadata", str(tmp_path / "norace.csv"), "--out",
                      str(tmp_path / "i.parquet")], capsys)
    assert code == 2 and "no column 'race'" in out.err
    assert not (tmp_path / "i.parquet").exists()  # no partial output


def test_cli_index_writes_parquet_and_problem_list(tmp_path, capsys):
    root, clin = _tree(tmp_path / "data", extra_slide=True)
    bad = root / "LUSC" / "TCGA-18-3406-01Z-00-DX1" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "idx.parquet"
    assert main(["data", "index", str(root), "--metadata", str(clin), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "indexed 15 patches" in text and "1 undecodable" in text and "1 slides (3 patches) without metadata" in text
    df = read_index(out)
    assert all(isinstance(v, str) for v in df["tissue_source_site"]) and "05" in set(df["tissue_source_site"])
    probs = pd.read_csv(tmp_path / "idx.problems.csv")
    assert sorted(probs["problem"]) == ["no_metadata", "undecodable"]
    code, res = _cli(["data", "index", str(root), "--metadata", str(clin), "--out", str(out), "--strict", "--overwrite"],
                     capsys)
    assert code == 2 and "undecodable" in res.err
    code, res = _cli(["data", "index", str(root), "--metadata", str(clin), "--out", str(out)], capsys)
    assert code == 2 and "already exists; pass --overwrite" in res.err and len(res.err.splitlines()) == 1


def test_read_index_rejects_non_index(tmp_path):
    p = tmp_path / "x.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(p)
    with pytest.raises(MediFastError, match="not a medi-fast index"):
        read_index(p)
    (tmp_path / "y.parquet").write_text("nope")
    with pytest.raises(MediFastError, match="cannot read"):
        read_index(tmp_path / "y.parquet")
