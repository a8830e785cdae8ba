"""Pack, datasets (index reader vs pack reader), split filtering, sampling weights."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from medi_fast.cli import main
from medi_fast.data.dataset import PatchDataset, open_dataset
from medi_fast.data.imageio import load_patch
from medi_fast.data.index import build_index, write_index
from medi_fast.data.pack import pack_index, read_pack
from medi_fast.data.sampling import sampling_weights
from medi_fast.data.synth import SynthConfig, render_dataset
from medi_fast.errors import MediFastError


@pytest.fixture(scope="module")
def synth_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig.confounded(n_per_combo=12, n_test_per_combo=6, patches_per_slide=3, resolution=48)
    render_dataset(cfg, root / "syn")
    df = build_index(root / "syn", root / "syn" / "clinical.csv")
    write_index(df, root / "index.parquet")
    return root


def test_pack_matches_the_index_reader_exactly(synth_index, tmp_path):
    out = pack_index(synth_index / "index.parquet", 32, tmp_path / "pack")
    meta, images, labels = read_pack(out)
    assert meta["layout"] == "NCHW" and meta["shape"] == [len(labels), 3, 32, 32] and images.dtype == np.uint8
    idx = pd.read_parquet(synth_index / "index.parquet")
    pd.testing.assert_frame_equal(labels, idx)
    for i in (0, 7, len(idx) - 1):
        assert np.array_equal(images[i], load_patch(idx["path"][i], 32).transpose(2, 0, 1))
    ds_pack = open_dataset(out)
    ds_idx = open_dataset(synth_index / "index.parquet", resolution=32)
    assert ds_pack.source == "pack" and ds_idx.source == "index"
    assert len(ds_pack) == len(ds_idx) == len(idx) and ds_pack.resolution == ds_idx.resolution == 32
    for i in (0, 5, len(idx) - 1):
        (xp, ip), (xi, ii) = ds_pack[i], ds_idx[i]
        assert xp.dtype == torch.uint8 and xp.shape == (3, 32, 32) and ip == ii == i
        assert torch.equal(xp, xi)
    sel = [9, 2, 2, 30]
    assert torch.equal(ds_pack.get_batch(sel), torch.stack([ds_pack[i][0] for i in sel]))
    assert torch.equal(ds_pack.get_batch(sel), ds_idx.get_batch(sel))


def test_index_dataset_defaults_to_native_resolution(synth_index):
    ds = open_dataset(synth_index / "index.parquet")
    assert ds.resolution == 48 and ds[0][0].shape == (3, 48, 48)


def test_split_csv_filters_rows(synth_index, tmp_path):
    from medi_fast.data.clinical import read_csv_str
    from medi_fast.data.split import split_metadata, write_split

    r = split_metadata(read_csv_str(synth_index / "syn" / "clinical.csv"), "random", seed=0, by="tss", frac=0.5)
    write_split(r, tmp_path / "split")
    pack = pack_index(synth_index / "index.parquet", 16, tmp_path / "pack")
    for source in (pack, synth_index / "index.parquet"):
        tr = open_dataset(source, split_csv=tmp_path / "split" / "train.csv", resolution=16)
        ho = open_dataset(source, split_csv=tmp_path / "split" / "holdout.csv", resolution=16)
        assert len(tr) + len(ho) == len(open_dataset(source, resolution=16))
        assert set(tr.table["slide_submitter_id"]) <= set(r.train_df["slide_submitter_id"])
        assert not set(tr.table["tissue_source_site"]) & set(ho.table["tissue_source_site"])
        # the pack dataset's row i is the pack row of that slide's patch
        full = open_dataset(source, resolution=16)
        pos = {p: k for k, p in enumerate(full.table["path"])}
        i = len(ho) - 1
        assert torch.equal(ho[i][0], full[pos[ho.table["path"][i]]][0])


def test_pack_errors(synth_index, tmp_path):
    out = pack_index(synth_index / "index.parquet", 16, tmp_path / "p")
    with pytest.raises(MediFastError, match="already exists"):
        pack_index(synth_index / "index.parquet", 16, out)
    pack_index(synth_index / "index.parquet", 16, out, overwrite=True)
    with pytest.raises(MediFastError, match="is 16 px, not 32"):
        open_dataset(out, resolution=32)
    with open(out / "images.u8", "r+b") as f:
        f.truncate(100)
    with pytest.raises(MediFastError, match="incomplete or corrupt"):
        open_dataset(out)
    with pytest.raises(MediFastError, match="not a pack"):
        open_dataset(tmp_path)
    with pytest.raises(MediFastError, match="does not exist"):
        open_dataset(tmp_path / "none.parquet")


def test_failed_pack_leaves_nothing(tmp_path, synth_index):
    df = pd.read_parquet(synth_index / "index.parquet")
    df.loc[3, "path"] = str(tmp_path / "gone.jpg")
    with pytest.raises(MediFastError, match="cannot decode image"):
        pack_index(df, 16, tmp_path / "pk")
    assert not (tmp_path / "pk").exists() and [p.name for p in tmp_path.iterdir()] == []


def test_cli_pack(synth_index, tmp_path, capsys):
    assert main(["data", "pack", str(synth_index / "index.parquet"), "--resolution", "24", "--out",
                 str(tmp_path / "pk")]) == 0
    assert "packed" in capsys.readouterr().out
    assert json.loads((tmp_path / "pk" / "pack.json").read_text())["resolution"] == 24
    with pytest.raises(SystemExit) as e:
        main(["data", "pack", str(tmp_path / "nope.parquet"), "--resolution", "24", "--out", str(tmp_path / "q")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_sampling_weights_balance_classes_and_combinations():
    t = pd.DataFrame({"class": ["A"] * 6 + ["B"] * 2, "tissue_source_site": ["1"] * 4 + ["2"] * 2 + ["1"] * 2})
    w = sampling_weights(t, "class")
    # the published trainer: 1 / count of the row's class, normalised to sum to 1
    ref = np.array([1 / 6] * 6 + [1 / 2] * 2)
    np.testing.assert_allclose(w, ref / ref.sum())
    assert np.isclose(w[:6].sum(), w[6:].sum())  # each class drawn equally often
    wc = sampling_weights(t, "combination")
    groups = t["class"] + "/" + t["tissue_source_site"]
    per = pd.Series(wc).groupby(groups.to_numpy()).sum()
    np.testing.assert_allclose(per.to_numpy(), 1 / 3)  # 3 (class, TSS) combinations, each 1/3
    np.testing.assert_allclose(sampling_weights(t, "uniform"), 1 / 8)
    with pytest.raises(MediFastError, match="unknown sampling mode"):
        sampling_weights(t, "nope")
    with pytest.raises(MediFastError, match="no column 'race'"):
        sampling_weights(t, "combination", columns=("class", "race"))


def test_weights_drive_a_sampler_to_balance(synth_index):
    ds = open_dataset(synth_index / "index.parquet")
    w = sampling_weights(ds.table, "combination")
    draws = torch.multinomial(torch.as_tensor(w), 60000, replacement=True, generator=torch.Generator().manual_seed(0))
    combo = (ds.table["class"] + "/" + ds.table["tissue_source_site"]).to_numpy()[draws.numpy()]
    share = pd.Series(combo).value_counts(normalize=True)
    np.testing.assert_allclose(share.to_numpy(), 1 / len(share), atol=0.01)


def test_patch_dataset_index_errors(synth_index):
    ds = open_dataset(synth_index / "index.parquet")
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert isinstance(ds, PatchDataset) and ds[-1][1] == len(ds) - 1
