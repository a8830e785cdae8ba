"""--plan ood: for each class, K sites absent from its training rows, seeded, listed in the plan file."""
from __future__ import annotations

import pandas as pd
import pytest

from medi_fast import plan as plans
from medi_fast.cli import main
from medi_fast.conditioning import ConditionSpec

SITES = ["05", "38", "44", "49", "A1", "B2"]


@pytest.fixture()
def train_csv(tmp_path):
    # LUAD seen at 05, 38; LUSC at 44, 49, A1; KIRC everywhere but A1
    rows = [("LUAD", "05"), ("LUAD", "38"), ("LUAD", "05"), ("LUSC", "44"), ("LUSC", "49"), ("LUSC", "A1")]
    rows += [("KIRC", s) for s in SITES if s != "A1"]
    path = tmp_path / "train.csv"
    pd.DataFrame(rows, columns=["class", "tissue_source_site"]).to_csv(path, index=False)
    return path


def spec():
    return ConditionSpec.build(64, ["KIRC", "LUAD", "LUSC"], {"tss": SITES + ["Unknown"]})


def test_ood_picks_unseen_sites_per_class_seeded(train_csv):
    p = plans.ood(spec(), [], train_csv, k=2, n_per_combo=3, seed=7)
    combos = p.combinations()
    seen = {"LUAD": {"05", "38"}, "LUSC": {"44", "49", "A1"}, "KIRC": set(SITES) - {"A1"}}
    for c, group in combos.groupby("class"):
        assert not set(group["tss"]) & seen[c]  # never a site the class was trained at
    assert combos.groupby("class").size().to_dict() == {"KIRC": 1, "LUAD": 2, "LUSC": 2}  # KIRC has one unseen site
    assert (combos["count"] == 3).all() and len(p) == 15
    again = plans.ood(spec(), [], train_csv, k=2, n_per_combo=3, seed=7).combinations()
    assert again.equals(combos)  # seeded
    draws = {tuple(plans.ood(spec(), ["LUAD"], train_csv, k=2, n_per_combo=1, seed=s).rows["tss"]) for s in range(20)}
    assert len(draws) > 1  # the seed changes the draw


def test_plan_ood_cli_writes_the_chosen_combinations(tmp_path, train_csv):
    ckpt = tmp_path / "m.pt"
    assert main(["init-checkpoint", "--classes", "KIRC,LUAD,LUSC", "--tss", ",".join(SITES), "--out", str(ckpt)]) == 0
    out = tmp_path / "ood.csv"
    assert main(["plan", "ood", "--model", str(ckpt), "--k", "2", "--sites-from", str(train_csv), "--seed", "7",
                 "--n-per-combo", "3", "--out", str(out)]) == 0
    written = pd.read_csv(out, dtype=str)
    expected = plans.ood(spec(), [], train_csv, k=2, n_per_combo=3, seed=7).combinations()
    assert list(zip(written["class"], written["tss"])) == list(zip(expected["class"], expected["tss"]))


def test_plan_ood_errors(tmp_path, train_csv, capsys):
    ckpt = tmp_path / "m.pt"
    assert main(["init-checkpoint", "--classes", "KIRC,LUAD,LUSC", "--tss", ",".join(SITES), "--out", str(ckpt)]) == 0
    for args, msg in [(["--sites-from", str(train_csv)], "needs --k"),
                      (["--k", "2"], "medi-fast: error: missing option '--sites-from'")]:
        with pytest.raises(SystemExit) as e:
            main(["plan", "ood", "--model", str(ckpt), "--out", str(tmp_path / "o.csv"), *args])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", str(ckpt), "--plan", "ood", "--k", "2", "--out", str(tmp_path / "g")])
    assert "--plan ood needs --sites-from" in capsys.readouterr().err
