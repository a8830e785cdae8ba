import math
from pathlib import Path

import pytest
import torch

from medi_fast import MediFastError
from medi_fast.conditioning import ConditionSpec, Conditioner
from medi_fast.model import PRESETS, build_model, count_parameters
from medi_fast.vocab import TCGA_PROJECTS, Vocabulary, project_code


def test_all_32_tcga_projects_resolve_from_every_spelling():
    assert len(TCGA_PROJECTS) == 32
    for code, folder in TCGA_PROJECTS.items():
        for alias in (code, f"TCGA-{code}", folder, folder.lower(), folder.replace("_", " ")):
            assert project_code(alias) == code
    v = Vocabulary("class", ("LUAD", "LUSC"), tcga_aliases=True)
    assert v.id("Lung_squamous_cell_carcinoma") == 1 and v.id("TCGA-LUAD") == 0


def test_codes_are_strings_and_errors_suggest_the_closest():
    v = Vocabulary("tss", ("05", "44", "49"))
    assert v.id("05") == 0 and v.null_id == 3
    with pytest.raises(MediFastError, match=r"unknown tss '5' \(closest: '05'\)"):
        v.id("5")
    with pytest.raises(MediFastError, match="closest: 'LUAD'"):
        Vocabulary("class", ("LUAD", "LUSC"), tcga_aliases=True).id("LUADX")


def test_widths_must_sum_to_d_t_with_numbers_in_the_message():
    with pytest.raises(MediFastError, match=r"class 100 \+ tss 64 = 164 must equal .* d_t = 128"):
        ConditionSpec.build(128, ["A"], {"tss": ["1"]}, widths={"class": 100, "tss": 64})
    spec = ConditionSpec.build(128, ["A", "B"], {"tss": ["1", "2"], "race": ["x"]})
    # the reference 'concat' rule: floor(d_t / 3) each, the class gets the remainder
    assert [a.dim for a in spec.attributes] == [44, 42, 42] and sum(a.dim for a in spec.attributes) == 128
    with pytest.raises(MediFastError, match="does not match the UNet"):
        build_model("tiny-32", ConditionSpec.build(256, ["A"]))


def test_null_ids_and_continuous_age_and_roundtrip():
    spec = ConditionSpec.build(128, ["A", "B"], {"tss": ["1", "2"], "age": None})
    enc = spec.encode({"class": ["A", "B"], "tss": ["2", None], "age": [61, None]})
    assert enc["tss"].tolist() == [1, 2] and math.isnan(enc["age"][1].item())
    null = spec.null(3)
    assert null["class"].tolist() == [2, 2, 2]
    cond = Conditioner(spec)
    z = cond(enc)
    assert z.shape == (2, 128)
    # a missing age selects the learned null vector, a present one the sinusoidal encoding
    assert torch.equal(z[1, -spec["age"].dim:], cond.nulls["age"].detach())
    assert ConditionSpec.from_dict(spec.to_dict()) == spec


def test_metadata_on_a_class_only_model_is_refused():
    spec = ConditionSpec.build(128, ["LUAD"])
    with pytest.raises(MediFastError, match="class-only checkpoint; it takes no 'tss'"):
        spec.encode({"class": "LUAD", "tss": "05"})


@pytest.mark.parametrize("mode", ["concat", "additive", "linear"])
def test_conditioning_modes(mode):
    spec = ConditionSpec.build(64, ["A", "B"], {"tss": ["1", "2"]}, mode=mode)
    model = build_model("tiny-32", spec)
    eps = model(torch.randn(2, 3, 32, 32), torch.tensor([1, 999]), spec.encode({"class": "A", "tss": "1"}, 2))
    assert eps.shape == (2, 3, 32, 32) and torch.isfinite(eps).all()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_with_the_same_unet_for_cls_and_medi(preset):
    p = PRESETS[preset]
    with torch.device("meta"):
        medi = build_model(preset, classes=["A", "B"], metadata={"tss": ["1", "2", "3"]})
        cls = build_model(preset, classes=["A", "B"])
    assert count_parameters(medi.unet) == count_parameters(cls.unet)
    assert medi.unet.config.class_embed_type == "identity" and medi.resolution == p.resolution
    if preset == "medi-128":
        # the published UNet: six DownBlock2D levels, 128..1024 channels, ~415M parameters
        assert list(medi.unet.config.block_out_channels) == [128, 256, 512, 512, 1024, 1024]
        assert set(medi.unet.config.down_block_types) == {"DownBlock2D"}
        assert 410e6 < count_parameters(medi.unet) < 420e6


def test_resolution_must_fit_the_preset():
    with pytest.raises(MediFastError, match="not divisible"):
        build_model("small-64", classes=["A"], resolution=36)


UNSAFE = {"": "is empty", " ": "is empty", ".": "relative path component", "..": "relative path component",
          "a/b": "path separator", "..\\x": "path separator", "a\x00b": "control", "a\nb": "control",
          "x" * 129: "129 characters long"}


@pytest.mark.parametrize("name", list(UNSAFE), ids=["empty", "blank", "dot", "dotdot", "slash", "backslash", "nul",
                                                     "newline", "long"])
def test_names_that_are_not_one_path_component_are_refused_wherever_a_vocabulary_is_built(name):
    from medi_fast.vocab import UnsafeName

    with pytest.raises(UnsafeName, match=f"tss value .* {UNSAFE[name]}"):
        Vocabulary("tss", ("05", name))
    with pytest.raises(UnsafeName, match=UNSAFE[name]):
        Vocabulary.from_dict({"name": "class", "names": [name, "LUAD"]})
    with pytest.raises(UnsafeName, match=f"attribute name .* {UNSAFE[name]}"):
        ConditionSpec.build(128, ["A"], {name: ["1"]})
    with pytest.raises(UnsafeName, match=f"attribute name .* {UNSAFE[name]}"):
        ConditionSpec.build(128, ["A"], {name: None})  # a continuous attribute has no vocabulary to check it


def test_attribute_names_cannot_hold_a_dot():
    from medi_fast.vocab import UnsafeName

    # the value may (an ICD code), the attribute name may not: it keys the model's embedding tables
    assert Vocabulary("icd_10_code", ("C50.919",)).names == ("C50.919",)
    with pytest.raises(UnsafeName, match=r"attribute name 'a\.b' contains a '\.'"):
        ConditionSpec.build(128, ["A"], {"a.b": ["1"]})


TCGA_CSV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tcga_ut_slide_metadata.csv"


@pytest.mark.skipif(not TCGA_CSV.is_file(), reason="../shared/data/tcga_ut_slide_metadata.csv is absent")
def test_every_real_tcga_name_is_a_safe_name():
    import pandas as pd

    table = pd.read_csv(TCGA_CSV, dtype=str)
    for column in ("project_id", "tissue_source_site", "gender", "race", "ethnicity", "age_at_index"):
        v = Vocabulary.from_values(column, table[column].fillna("Unknown"))
        assert len(v) == table[column].fillna("Unknown").str.strip().nunique()
    assert Vocabulary("race", ("BLACK OR AFRICAN AMERICAN", "white")).id("BLACK OR AFRICAN AMERICAN") == 0
    classes = Vocabulary("class", tuple(TCGA_PROJECTS.values()), tcga_aliases=True)
    assert classes.id("TCGA-LUAD") == classes.id("LUAD") == classes.names.index("Lung_adenocarcinoma")
    assert Vocabulary("tss", ("05", "3B")).id("05") == 0


@pytest.mark.parametrize("args,expected", [
    (["--classes", "..,LUSC"], "--classes value '..' is a relative path component"),
    (["--classes", "LUAD,LUSC", "--tss", "..,05"], "--tss value '..' is a relative path component"),
    (["--classes", "LUAD", "--meta", "..=a,b"], "--meta name '..' is a relative path component"),
    (["--classes", "LUAD", "--meta", "race=white,a\\b"], "--meta race value 'a\\\\b' contains a path separator"),
    (["--classes", "LUAD", "--meta", "site.code=a,b"], "--meta name 'site.code' contains a '.'"),
])
def test_init_checkpoint_refuses_unsafe_names_in_one_line(tmp_path, capsys, args, expected):
    from medi_fast.cli import main

    out = tmp_path / "m.pt"
    with pytest.raises(SystemExit) as e:
        main(["init-checkpoint", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("medi-fast: error: ") and expected in err[0], err
    assert not list(tmp_path.iterdir())
