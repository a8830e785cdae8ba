"""The evaluation commands end to end on small synthetic patches (no weights, no downloads)."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medi_fast.cli import main
from medi_fast.data.synth import render_patches
from medi_fast.eval.images import read_image_table


def write_set(root, pairs, n, seed, layout="manifest"):
    """PNG patches of (class, site) pairs under root; a manifest.csv like `generate` writes, or an index."""
    rows = []
    for j, (c, s) in enumerate(pairs):
        for i, img in enumerate(render_patches(c, s, n, resolution=32, seed=[seed, j])):
            rel = f"{c}/{s}/{c}_{s}_{i:04d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / rel)
            rows.append({"file": rel, "class": c, "tissue_source_site": s, "seed": i})
    df = pd.DataFrame(rows)
    if layout == "manifest":
        df.to_csv(root / "manifest.csv", index=False)
        return root / "manifest.csv"
    df.insert(0, "path", [str(root / f) for f in df.pop("file")])
    df.to_parquet(root / "index.parquet", index=False)
    return root / "index.parquet"


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    t = tmp_path_factory.mktemp("eval")
    for d in ("train", "test", "medi", "cls"):
        (t / d).mkdir()
    return {
        "train": write_set(t / "train", [("LUAD", "S1"), ("LUSC", "S2")], 8, 0, layout="index"),
        "test": write_set(t / "test", [("LUAD", "S2"), ("LUSC", "S1")], 6, 1),
        "medi": write_set(t / "medi", [(c, s) for c in ("LUAD", "LUSC") for s in ("S1", "S2")], 4, 2).parent,
        "cls": write_set(t / "cls", [("LUAD", "S1"), ("LUSC", "S2")], 8, 3),
        "root": t,
    }


def run(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_read_image_table_handles_index_manifest_and_folder(sets, tmp_path):
    idx, man = read_image_table(sets["train"]), read_image_table(sets["test"])
    assert len(idx) == 16 and len(man) == 12
    assert all(pd.io.common.file_exists(p) for p in man["path"])
    assert set(man["tissue_source_site"]) == {"S1", "S2"}
    (tmp_path / "Lung_adenocarcinoma" / "slide1").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "Lung_adenocarcinoma" / "slide1" / "a.png")
    folder = read_image_table(tmp_path)
    assert folder["class"].tolist() == ["LUAD"]  # long TCGA folder names become project codes


def test_fid_per_class_table_csv_and_saved_stats(sets, capsys, tmp_path):
    code, out, err = run(["fid", "--real", sets["train"], "--fake", sets["cls"], "--features", "colour-texture",
                          "--out-csv", tmp_path / "fid.csv", "--save-real-stats", tmp_path / "real.npz", "--quiet"],
                         capsys)
    assert code == 0, err
    t = pd.read_csv(tmp_path / "fid.csv").set_index("group")
    assert list(t.index) == ["LUAD", "LUSC", "mean", "all"]
    assert t.loc["mean", "fid"] == pytest.approx(t.loc[["LUAD", "LUSC"], "fid"].mean())
    assert "LUAD" in out and "mean" in out
    # Reusing the saved real statistics gives the same numbers; a set against itself scores 0.
    code, _, err = run(["fid", "--real", tmp_path / "real.npz", "--fake", sets["cls"], "--features", "colour-texture",
                        "--out-csv", tmp_path / "fid2.csv", "--quiet"], capsys)
    assert code == 0, err
    np.testing.assert_allclose(pd.read_csv(tmp_path / "fid2.csv")["fid"], t["fid"], rtol=1e-9)
    code, _, _ = run(["fid", "--real", sets["train"], "--fake", tmp_path / "real.npz", "--features",
                      "colour-texture", "--out-csv", tmp_path / "self.csv", "--quiet"], capsys)
    assert code == 0 and np.abs(pd.read_csv(tmp_path / "self.csv")["fid"]).max() < 1e-6


def test_fid_errors_are_one_line_with_exit_2(sets, capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("MEDI_FAST_INCEPTION_WEIGHTS", raising=False)
    code, out, err = run(["fid", "--real", sets["train"], "--fake", sets["cls"], "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--inception-weights" in err and "pt_inception" in err
    code, _, err = run(["fid", "--real", tmp_path / "nope", "--fake", sets["cls"]], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run(["fid", "--real", tmp_path / "real.npz", "--fake", sets["cls"], "--features", "colour-texture"],
                       capsys)
    assert code == 2 and "does not exist" in err


@pytest.fixture(scope="module")
def embeddings(sets):
    out = {}
    for name in ("train", "test", "medi", "cls"):
        out[name] = sets["root"] / f"{name}.parquet"
        try:
            main(["embed", "--images", str(sets[name]), "--extractor", "colour-texture", "--out", str(out[name]),
                  "--quiet"])
        except SystemExit as e:
            assert e.code == 0
    return out


def test_embed_writes_one_file_with_metadata(embeddings):
    from medi_fast.eval.embeddings import load_embeddings

    meta, emb = load_embeddings(embeddings["medi"])
    assert emb.shape == (16, 48) and {"path", "class", "tissue_source_site", "seed"} <= set(meta.columns)


def test_embed_with_a_small_random_vit(sets, capsys, tmp_path):
    from medi_fast.eval.embeddings import load_embeddings

    code, _, err = run(["embed", "--images", sets["test"], "--encoder", "vit_tiny_patch16_224", "--random-init",
                        "--image-size", "32", "--out", tmp_path / "e.npz", "--quiet"], capsys)
    assert code == 0, err
    meta, emb = load_embeddings(tmp_path / "e.npz")
    assert emb.shape == (12, 192) and list(meta["class"]).count("LUAD") == 6
    code, _, err = run(["embed", "--images", sets["test"], "--out", tmp_path / "e.csv"], capsys)
    assert code == 2 and ".parquet or .npz" in err
    code, _, err = run(["embed", "--images", sets["test"], "--out", tmp_path / "u.npz"], capsys)
    assert code == 2 and "--weights" in err


def test_probe_table_end_to_end(embeddings, capsys, tmp_path):
    code, out, err = run(["probe", "--real-train", embeddings["train"], "--real-test", embeddings["test"],
                          "--synthetic", f"CLS={embeddings['cls']}", "--synthetic", f"MeDi={embeddings['medi']}",
                          "--task", "nsclc", "--k", "4", "--one-site-per-class", "--max-runs", "3",
                          "--out-md", tmp_path / "t.md", "--out-csv", tmp_path / "t.csv", "--runs-csv",
                          tmp_path / "runs.csv"], capsys)
    assert code == 0, err
    s = pd.read_csv(tmp_path / "t.csv")
    assert s["arm"].tolist() == ["no-synthetic", "CLS", "MeDi"]
    assert ((s["balanced_accuracy_mean"] >= 0) & (s["balanced_accuracy_mean"] <= 1)).all()
    assert (tmp_path / "t.md").read_text() == out and "| MeDi |" in out
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 3  # one site combination x 3 arms
    code, _, err = run(["probe", "--real-train", embeddings["train"], "--real-test", embeddings["test"],
                        "--task", "nsclcc"], capsys)
    assert code == 2 and "--task" in err and err.count("\n") == 1
    code, _, err = run(["probe", "--real-train", embeddings["train"], "--real-test", embeddings["test"],
                        "--task", "nsclc", "--k", "50"], capsys)
    assert code == 2 and "lower --k" in err


def test_shortcut_report_end_to_end(embeddings, capsys, tmp_path):
    code, out, err = run(["shortcut", "--embeddings", embeddings["train"], "--synthetic", f"MeDi={embeddings['medi']}",
                          "--synthetic", f"CLS={embeddings['cls']}", "--min-per-site", "3", "--folds", "3",
                          "--out-csv", tmp_path / "s.csv"], capsys)
    assert code == 0, err
    t = pd.read_csv(tmp_path / "s.csv")
    mi = t[t["table"] == "mutual_information"].set_index("training_set")["mi_bits"]
    assert mi["real"] == pytest.approx(1.0)  # each class from its own site
    assert mi["real+CLS"] == pytest.approx(1.0)
    assert mi["real+MeDi"] < mi["real"]  # 8+4 vs 4 per combination: exact value below
    p = np.array([[12, 4], [4, 12]]) / 32
    expect = float((p * np.log2(p / (p.sum(1, keepdims=True) @ p.sum(0, keepdims=True)))).sum())
    assert mi["real+MeDi"] == pytest.approx(expect)
    pred = t[(t["table"] == "site_predictability") & (t["embeddings"] == "MeDi")]
    assert len(pred) == 2 and (pred["sites"] == 2).all()
    assert "Site predictability" in out and "mutual information" in out


def test_manifest_pointing_into_tar_shards(tmp_path):
    import io
    import tarfile

    from medi_fast.eval.images import iter_image_batches

    imgs = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar", "w") as tar:
        for i, im in enumerate(imgs):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:08d}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    pd.DataFrame({"file": [f"shards/shard-000000.tar#{i:08d}.png" for i in range(3)], "class": ["LUAD"] * 3,
                  "tissue_source_site": ["05"] * 3}).to_csv(tmp_path / "manifest.csv", index=False)
    table = read_image_table(tmp_path)
    back = np.concatenate(list(iter_image_batches(table["path"], batch_size=2)))
    np.testing.assert_array_equal(back, imgs)  # PNG is lossless: the exact pixels come back
