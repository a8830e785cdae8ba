import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import medi_fast
from medi_fast import MediFastError, backends
from medi_fast import plan as plans
from medi_fast.generate import GenerateConfig, Generator
from medi_fast.guidance import classifier_free

STEPS = 8


def _gen(ckpt, **cfg):
    info = backends.open_model(ckpt)
    return Generator(info, backends.create("torch", info), GenerateConfig(steps=STEPS, **cfg), progress=False), info


def test_seeds_are_a_function_of_seed_and_index_only():
    s = plans.derive_seeds(7, np.arange(1000))
    assert len(set(s.tolist())) == 1000 and (s >= 0).all()
    assert np.array_equal(plans.derive_seeds(7, [5, 999]), s[[5, 999]])
    assert not np.array_equal(plans.derive_seeds(8, [5]), s[[5]])


def test_same_images_whatever_the_batch_size_and_shard(tiny_ckpt):
    pipe = medi_fast.load(tiny_ckpt, backend="torch", steps=STEPS)
    a = pipe.generate("LUAD", tss="05", n=6, seed=3, batch_size=6)
    b = pipe.generate("LUAD", tss="05", n=6, seed=3, batch_size=4)
    # Convolutions may round differently for another batch size: at most 1 level on a few pixels.
    assert a.shape == (6, 32, 32, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b).max() <= 1 and (a != b).mean() < 0.005
    p = plans.single(pipe.spec, {"class": "LUAD", "tss": "05"}, 6, seed=3)
    parts = [pipe.run(p.shard(i, 3), batch_size=6) for i in range(3)]
    assert np.abs(np.concatenate(parts).astype(int) - a).max() <= 1
    # a different seed gives different images; the same seed the same ones
    assert (pipe.generate("LUAD", tss="05", n=2, seed=4) != a[:2]).mean() > 0.5


def test_conditioning_changes_the_images(tiny_ckpt):
    pipe = medi_fast.load(tiny_ckpt, backend="torch", steps=STEPS)
    a = pipe.generate("LUAD", tss="05", n=2, seed=0).astype(int)
    b = pipe.generate("LUSC", tss="05", n=2, seed=0).astype(int)
    c = pipe.generate("LUAD", tss="49", n=2, seed=0).astype(int)
    assert np.abs(a - b).mean() > 0.5 and np.abs(a - c).mean() > 0.5


def test_guidance_scale_one_is_the_conditional_model_and_zero_the_unconditional(tiny_ckpt):
    info = backends.open_model(tiny_ckpt)
    den = backends.create("torch", info)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([10, 500, 990])
    cond = info.spec.encode({"class": ["LUAD", "LUSC", "LUAD"], "tss": ["05", "44", "49"]})
    assert torch.allclose(classifier_free(den, info.spec, 1.0)(x, t, cond), den(x, t, cond), atol=1e-5)
    assert torch.allclose(classifier_free(den, info.spec, 0.0)(x, t, cond), den(x, t, info.spec.null(3)), atol=1e-5)
    w = 3.0
    ref = den(x, t, info.spec.null(3)) + w * (den(x, t, cond) - den(x, t, info.spec.null(3)))
    assert torch.allclose(classifier_free(den, info.spec, w)(x, t, cond), ref, atol=1e-4)


def test_folder_output_manifest_and_resume_after_partial_loss(tiny_ckpt, tmp_path):
    gen, info = _gen(tiny_ckpt, batch_size=4)
    p = plans.from_counts(info.spec, pd.DataFrame({"class": ["LUAD", "LUSC"], "tss": ["05", "44"], "count": [3, 2]}), 0)
    out = tmp_path / "out"
    stats = gen.run(p, out)
    assert stats["generated"] == 5
    man = pd.read_csv(out / "manifest.csv", dtype=str)
    assert list(man.columns[:3]) == ["file", "class", "tissue_source_site"]
    assert man["tissue_source_site"].tolist() == ["05", "05", "05", "44", "44"]
    assert (man["checkpoint_hash"] == info.model_hash).all() and man["steps"].eq(str(STEPS)).all()
    first = {f: (out / f).read_bytes() for f in man["file"]}
    assert all(f.startswith(("LUAD/05/", "LUSC/44/")) for f in first)
    pixels = {f: np.asarray(Image.open(out / f)).astype(int) for f in man["file"]}
    # lose two files, leave a stale temporary file as a SIGKILL would: a rerun redoes exactly those
    (out / man["file"][1]).unlink()
    (out / man["file"][4]).unlink()
    (out / "LUAD" / "05" / ".medi-tmp-dead-x.png").write_bytes(b"partial")
    stats = gen.run(p, out)
    assert stats == {**stats, "generated": 2, "skipped": 3}
    # untouched files are not rewritten; redone ones equal the originals (<= 1 level: other batch grouping)
    assert all((out / f).read_bytes() == first[f] for f in man["file"][[0, 2, 3]])
    assert all(np.abs(np.asarray(Image.open(out / f)) - pixels[f]).max() <= 1 for f in man["file"])
    assert not list(out.rglob(".medi-tmp-*"))


def test_a_run_dir_refuses_different_settings(tiny_ckpt, tmp_path):
    gen, info = _gen(tiny_ckpt)
    p = plans.single(info.spec, {"class": "LUAD", "tss": "05"}, 2)
    gen.run(p, tmp_path)
    other, _ = _gen(tiny_ckpt, eta=0.5)
    with pytest.raises(MediFastError, match="different config"):
        other.run(p, tmp_path)


def test_tar_shards_and_sinks(tiny_ckpt, tmp_path):
    gen, info = _gen(tiny_ckpt, format="tar", batch_size=3)
    seen = []
    gen.sinks.append(lambda images, rows: seen.append((images.copy(), rows["index"].tolist())))
    p = plans.single(info.spec, {"class": "LUSC", "tss": "44"}, 5, seed=2)
    gen.run(p, tmp_path)
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        names = tar.getnames()
        img = np.asarray(Image.open(tar.extractfile("00000003.png")))
    assert names[:2] == ["00000000.png", "00000000.json"] and len(names) == 10
    assert np.array_equal(img, np.concatenate([s[0] for s in seen])[3])
    man = pd.read_csv(tmp_path / "manifest.csv")
    assert man["file"][3] == "shards/shard-000000.tar#00000003.png"


def test_plan_strategies(tiny_ckpt, tmp_path):
    info = backends.open_model(tiny_ckpt)
    train = pd.DataFrame({"class": ["LUAD"] * 3 + ["LUSC"], "tissue_source_site": ["05", "05", "44", "49"]})
    train.to_csv(tmp_path / "train.csv", index=False)
    m = plans.match_train(info.spec, tmp_path / "train.csv")
    assert m.combinations()["count"].tolist() == [2, 1, 1] and len(m) == 4
    assert plans.match_train(info.spec, tmp_path / "train.csv", n=8).combinations()["count"].tolist() == [4, 2, 2]
    f = plans.fill_missing(info.spec, ["LUAD", "LUSC"], tmp_path / "train.csv", 2)
    combos = f.combinations()
    assert len(combos) == 6 and (combos["count"] == 2).all()
    pd.DataFrame({"class": ["TCGA-LUSC"], "tissue_source_site": ["49"], "count": [3]}).to_csv(tmp_path / "p.csv", index=False)
    assert plans.from_csv(info.spec, tmp_path / "p.csv").rows["class"].tolist() == ["LUSC"] * 3
    pd.DataFrame({"class": ["LUSC"], "tss": ["9"], "count": [3]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(MediFastError, match="unknown tss '9'"):
        plans.from_csv(info.spec, tmp_path / "bad.csv")


def test_iterable_dataset_streams_labelled_images(tiny_ckpt):
    pipe = medi_fast.load(tiny_ckpt, backend="torch", steps=STEPS, batch_size=2)
    ds = pipe.dataset({"class": "LUSC", "tss": "49"}, n=3, seed=5)
    items = list(torch.utils.data.DataLoader(ds, batch_size=None))
    assert len(items) == 3
    img, labels = items[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
    assert labels["class"] == "LUSC" and labels["tissue_source_site"] == "49"
    ref = pipe.generate("LUSC", tss="49", n=3, seed=5)
    assert np.abs(torch.stack([i for i, _ in items]).permute(0, 2, 3, 1).numpy().astype(int) - ref).max() <= 1


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_without_loss_or_temp_files(tiny_ckpt, tmp_path):
    cmd = [sys.executable, "-m", "medi_fast.cli", "generate", str(tiny_ckpt), "--class", "LUAD", "--tss", "44",
           "--n", "40", "--steps", "4", "--batch-size", "2", "--quiet", "--workers", "1"]
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Wait on the run's progress, not on the clock: a loaded machine only makes this take longer.
    while proc.poll() is None and len([p for p in out.rglob("*.png") if not p.name.startswith(".medi-tmp-")]) < 6:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # a write in flight at the kill is a temporary file: the rerun must remove it, not keep it
    done_before = {p.name: p.read_bytes() for p in out.rglob("*.png") if not p.name.startswith(".medi-tmp-")}
    assert 6 <= len(done_before) < 40 and not (out / "manifest.csv").exists()
    assert subprocess.run(cmd + ["--out", str(out)], capture_output=True).returncode == 0
    ref = tmp_path / "ref"
    assert subprocess.run(cmd + ["--out", str(ref)], capture_output=True).returncode == 0
    after = {p.name: p.read_bytes() for p in out.rglob("*.png")}
    assert len(after) == 40 and all(after[k] == v for k, v in done_before.items())
    same = sum(after[p.name] == p.read_bytes() for p in ref.rglob("*.png"))
    assert same >= 36  # resumed batches are grouped differently: <= 1 level on rare pixels
    assert not list(out.rglob(".medi-tmp-*"))
    assert len(pd.read_csv(out / "manifest.csv")) == 40


def test_fid_stats_sink_sees_resumed_images_too(tiny_ckpt, tmp_path):
    """Statistics streamed while generating equal those of a resumed run that read the images back."""
    from medi_fast.eval.features import ColourTexture
    from medi_fast.eval.fid import FIDStatsSink, load_stats

    gen, info = _gen(tiny_ckpt, batch_size=4)
    p = plans.from_counts(info.spec, pd.DataFrame({"class": ["LUAD", "LUSC"], "tss": ["05", "44"], "count": [3, 3]}), 0)
    first = FIDStatsSink(tmp_path / "a.npz", extractor=ColourTexture())
    gen.sinks = [first.add]
    gen.run(p, tmp_path / "out")
    first.close()
    again = FIDStatsSink(tmp_path / "b.npz", extractor=ColourTexture())
    gen.sinks = [again.add]
    assert gen.run(p, tmp_path / "out")["generated"] == 0  # everything read back from disk
    again.close()
    (a, _), (b, _) = load_stats(tmp_path / "a.npz"), load_stats(tmp_path / "b.npz")
    assert set(a) == set(b) and {"LUAD", "LUSC"} <= set(a)
    for k in a:
        assert np.allclose(a[k][0], b[k][0]) and np.allclose(a[k][1], b[k][1]) and a[k][2] == b[k][2]


class _RecordingDenoiser:
    """Wraps a backend and records torch's thread count at every call."""

    def __init__(self, inner, own_cpu_threads):
        self.inner, self.own_cpu_threads, self.seen = inner, own_cpu_threads, []
        self.device = inner.device

    def __call__(self, x, t, cond):
        self.seen.append(torch.get_num_threads())
        return self.inner(x, t, cond)


@pytest.mark.parametrize("own", [True, False])
def test_torch_runs_on_one_thread_while_a_cpu_runtime_owns_the_cores(tiny_ckpt, own):
    """sample_rows hands the cores to runtimes with their own pool (ort-cpu, openvino), restores the
    thread count afterwards (also after a failure), and the images do not change."""
    from medi_fast.backends.onnxruntime_backend import OrtCPUBackend
    from medi_fast.backends.openvino_backend import OpenVINOBackend
    from medi_fast.generate import sample_rows

    assert OrtCPUBackend.own_cpu_threads and OpenVINOBackend.own_cpu_threads
    assert not backends.create("torch", backends.open_model(tiny_ckpt)).own_cpu_threads
    info = backends.open_model(tiny_ckpt)
    rows = plans.single(info.spec, {"class": "LUAD", "tss": "05"}, 3, seed=1).rows
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plain = sample_rows(backends.create("torch", info), info, rows, GenerateConfig(steps=3))
        den = _RecordingDenoiser(backends.create("torch", info), own_cpu_threads=own)
        images = sample_rows(den, info, rows, GenerateConfig(steps=3))
        assert den.seen == ([1] * 3 if own else [2] * 3)
        assert torch.get_num_threads() == 2
        assert np.array_equal(images, plain)

        def boom(x, t, cond):
            raise RuntimeError("runtime failed")
        boom.own_cpu_threads, boom.device = own, torch.device("cpu")
        with pytest.raises(RuntimeError, match="runtime failed"):
            sample_rows(boom, info, rows, GenerateConfig(steps=3))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_overlapping_loops_in_two_threads_restore_the_thread_count_once_both_end():
    import threading

    class Owner:
        own_cpu_threads = True

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():  # enters first, leaves first
        with backends.sampling_threads(Owner()):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():  # enters while a runs, leaves after a
        a_in.wait(5)
        with backends.sampling_threads(Owner()):
            b_in.set()
            a_out.wait(5)
            seen["after_a_left"] = torch.get_num_threads()
    try:
        threads = [threading.Thread(target=f) for f in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert seen["after_a_left"] == 1  # b still sampling: torch stays on one thread
        assert torch.get_num_threads() == 2  # both done: the count from before the first one
    finally:
        torch.set_num_threads(before)


def test_writer_refuses_a_path_that_resolves_outside_out(tmp_path):
    from medi_fast.writers import FolderWriter

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    writer = FolderWriter(out, ("class", "tss"))
    image = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    inside = pd.DataFrame({"class": ["LUAD"], "tss": ["05"], "index": [0]})
    writer.write(image, inside)
    assert (out / "LUAD" / "05" / "LUAD_05_00000000.png").is_file()
    # names that climb out of --out (a model file that slipped past its vocabulary check)
    climbing = pd.DataFrame({"class": [".."], "tss": [".."], "index": [1]})
    for call in (lambda: writer.pending(climbing), lambda: writer.write(image, climbing)):
        with pytest.raises(MediFastError, match="resolves outside the output directory"):
            call()
    # a link inside --out that points elsewhere
    (out / "LUSC").symlink_to(elsewhere, target_is_directory=True)
    linked = pd.DataFrame({"class": ["LUSC"], "tss": ["05"], "index": [2]})
    with pytest.raises(MediFastError, match="resolves outside the output directory"):
        writer.write(image, linked)
    assert not list(elsewhere.iterdir()) and not list(tmp_path.glob("*.png"))


def test_generate_refuses_a_model_whose_names_lead_outside_out_path(tmp_path, capsys, monkeypatch):
    import medi_fast.conditioning
    import medi_fast.vocab
    from medi_fast import checkpoint
    from medi_fast.cli import main
    from medi_fast.model import build_model
    from medi_fast.schedule import Schedule

    with monkeypatch.context() as m:  # a file made elsewhere: its hash matches, its names climb out
        for module in (medi_fast.vocab, medi_fast.conditioning):
            m.setattr(module, "check_name", lambda name, *a, **k: name, raising=False)
        model = build_model("tiny-32", classes=["..", "LUSC"], metadata={"tss": ["..", "05"]})
        bad = checkpoint.save(checkpoint.from_model(model, Schedule()), tmp_path / "bad.pt")
    out = tmp_path / "a" / "b"
    with pytest.raises(SystemExit) as e:
        main(["generate", str(bad), "--class", "..", "--tss", "..", "--n", "1", "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "is corrupt or unsafe: its class value '..'" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


@pytest.mark.parametrize("extra, message", [
    (["--tss", "05", "--meta", "tss=44"],
     "--tss 05 and --meta tss=44 give tss twice with different values; give it once"),
    (["--meta", "tss=05", "--meta", "tss=44"],
     "--meta tss=05 and --meta tss=44 give tss twice with different values; give it once"),
    (["--tss", "05", "--meta", "class=LUSC"],
     "--class LUAD and --meta class=LUSC give the class twice with different values; give it once"),
    (["--tss", "05", "--sampler", ""],  # was taken for the default
     "unknown sampler ''; choose from ddim, dpmpp-2m, unipc, dpmpp-2m-clip, unipc-clip, consistency"),
    (["--tss", "05", "--shard", "0/1000000000000"],
     "--shard 0/1000000000000 cuts a plan of 3 image(s) into 1000000000000 shards; use at most 3 shards (N <= 3)"),
])
def test_generate_refuses_conflicting_values_and_impossible_shards(refused, tiny_ckpt, tmp_path, extra, message):
    out = tmp_path / "out"
    line = refused(["generate", tiny_ckpt, "--class", "LUAD", "--n", "3", "--steps", "2", "--out", out,
                    *extra])
    assert line == f"medi-fast: error: {message}"
    assert not out.exists()


def test_the_same_value_given_twice_is_not_a_conflict(capsys, tiny_ckpt, tmp_path):
    from medi_fast.cli import main

    main(["generate", str(tiny_ckpt), "--class", "LUAD", "--tss", "05", "--meta", "tss=05", "--n", "1", "--steps", "1",
          "--out", str(tmp_path / "o"), "--quiet"])
    assert pd.read_csv(tmp_path / "o" / "manifest.csv", dtype=str)["tissue_source_site"].tolist() == ["05"]


def test_an_output_from_medi_fast_toml_says_where_it_came_from(capsys, tiny_ckpt, tmp_path):
    from medi_fast.cli import main

    (tmp_path / "medi-fast.toml").write_text('[generate]\nout = "from-toml"\n')  # the tests run in tmp_path
    main(["generate", str(tiny_ckpt), "--class", "LUAD", "--tss", "05", "--n", "1", "--steps", "1", "--quiet"])
    lines = capsys.readouterr().err.splitlines()
    assert "output from-toml (medi-fast.toml [generate] out)" in lines, lines
    main(["generate", str(tiny_ckpt), "--class", "LUAD", "--tss", "05", "--n", "1", "--steps", "1", "--quiet",
          "--out", "typed"])
    assert "output typed (--out)" in capsys.readouterr().err.splitlines()
    assert len(list((tmp_path / "from-toml").rglob("*.png"))) == 1


def test_run_job_is_the_local_generator_and_reports_before_writing(tiny_ckpt, tmp_path):
    """The job function writes what the Generator writes, says what it will do before the first byte,
    and a refused job leaves nothing behind."""
    from medi_fast.generate import FIDStats, check_shard
    from medi_fast.job import run_job

    gen, info = _gen(tiny_ckpt, batch_size=2)
    p = plans.single(info.spec, {"class": "LUSC", "tss": "49"}, 5, seed=4)
    gen.run(p, tmp_path / "generator")
    seen = []

    def on_start(job):
        seen.append((job.backend, job.images, job.out, job.on_ray, (tmp_path / "job").exists()))

    stats = run_job(tiny_ckpt, p, tmp_path / "job", GenerateConfig(steps=STEPS, batch_size=2), backend="torch",
                    progress=False, on_start=on_start)
    assert seen == [("torch", 5, tmp_path / "job", False, False)]
    assert stats["generated"] == 5 and stats["backend"] == "torch"
    for f in (tmp_path / "generator").rglob("*"):
        if f.is_file() and f.name != "run.json":
            assert (tmp_path / "job" / f.relative_to(tmp_path / "generator")).read_bytes() == f.read_bytes(), f
    with pytest.raises(MediFastError, match="--shard 0/6 cuts a plan of 5 image"):
        run_job(tiny_ckpt, p, tmp_path / "refused", GenerateConfig(steps=STEPS), backend="torch", shard=(0, 6))
    with pytest.raises(MediFastError, match="--fid-stats x.txt must end in .npz"):
        run_job(tiny_ckpt, p, tmp_path / "refused", GenerateConfig(steps=STEPS), backend="torch",
                fid=FIDStats(Path("x.txt")))
    assert not (tmp_path / "refused").exists()
    check_shard((4, 5), 5)  # as many shards as images: one each
