"""Generation on a local Ray instance (2 CPUs, shared by the module): same bytes as a local run,
resume, a killed actor, FID statistics, the streaming dataset, the CLI, and the error without Ray."""
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medi_fast import MediFastError, backends
from medi_fast import plan as plans
from medi_fast.generate import GenerateConfig, Generator

ray = pytest.importorskip("ray", reason="the [ray] extra (in [dev]) is not installed")
import medi_fast.ray as mray  # noqa: E402

pytestmark = pytest.mark.slow  # each test starts Ray actors (a process that imports torch): seconds each

STEPS = 4
ACTOR = "MapWorker(MapBatches(UnitWorker))"


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs for the whole module (starting one costs seconds)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


def _plan(ckpt, counts=(7, 6)):
    info = backends.open_model(ckpt)
    combos = pd.DataFrame({"class": ["LUAD", "LUSC"], "tss": ["05", "44"], "count": list(counts)})
    return info, plans.from_counts(info.spec, combos, seed=5)


def _local(ckpt, p, out, cfg, sinks=()):
    info = backends.open_model(ckpt)
    return Generator(info, backends.create("torch", info), cfg, sinks=sinks, progress=False).run(p, out)


def _files(root: Path) -> dict:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def _same_outputs(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    run_a, run_b = fa.pop("run.json"), fb.pop("run.json")  # records the model path: same here
    assert run_a == run_b
    assert [k for k in fa if fa[k] != fb[k]] == []


def test_ray_run_writes_the_bytes_of_a_local_run_and_resumes(local_ray, tiny_ckpt, tmp_path):
    info, p = _plan(tiny_ckpt)
    cfg = GenerateConfig(steps=STEPS, batch_size=4)
    _local(tiny_ckpt, p, tmp_path / "local", cfg)
    stats = mray.generate(tiny_ckpt, p, tmp_path / "ray", config=cfg, backend="torch", workers=2, progress=False)
    assert stats["generated"] == 13 and stats["skipped"] == 0
    _same_outputs(tmp_path / "local", tmp_path / "ray")
    assert len(pd.read_csv(tmp_path / "ray" / "manifest.csv")) == 13

    # Resume: lost files are made again (and only they), with the same bytes.
    lost = sorted((tmp_path / "ray").rglob("*.png"))[::4]
    for f in lost:
        f.unlink()
    again = mray.generate(tiny_ckpt, p, tmp_path / "ray", config=cfg, backend="torch", workers=2, progress=False)
    assert again["generated"] == len(lost) and again["skipped"] == 13 - len(lost)
    _same_outputs(tmp_path / "local", tmp_path / "ray")
    # Nothing left to do: no actor is started.
    done = mray.generate(tiny_ckpt, p, tmp_path / "ray", config=cfg, backend="torch", progress=False)
    assert done["generated"] == 0 and done["skipped"] == 13

    # A run directory made with other settings is refused, as locally.
    with pytest.raises(MediFastError, match="different"):
        mray.generate(tiny_ckpt, p, tmp_path / "ray", config=GenerateConfig(steps=STEPS + 1), backend="torch")


def test_tar_shards_on_ray_equal_a_local_run(local_ray, tiny_ckpt, tmp_path):
    info, p = _plan(tiny_ckpt)
    cfg = GenerateConfig(steps=STEPS, batch_size=4, format="tar")
    _local(tiny_ckpt, p, tmp_path / "local", cfg)
    mray.generate(tiny_ckpt, p, tmp_path / "ray", config=cfg, backend="torch", workers=2, progress=False)
    assert len(list((tmp_path / "ray" / "shards").glob("*.tar"))) == 1
    _same_outputs(tmp_path / "local", tmp_path / "ray")


def _pngs(out: Path) -> list[Path]:
    return [f for f in out.rglob("*.png") if not f.name.startswith(".medi-tmp-")]


def _actor_pids() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if ACTOR in (d / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the actor processes in /proc")
def test_a_killed_actor_is_retried_and_the_run_ends_with_exactly_the_planned_files(local_ray, tiny_ckpt, tmp_path):
    info, p = _plan(tiny_ckpt, counts=(20, 20))
    cfg = GenerateConfig(steps=24, batch_size=2)
    out = tmp_path / "ray"
    result, error = {}, []

    def run():
        try:
            result.update(mray.generate(tiny_ckpt, p, out, config=cfg, backend="torch", workers=2, progress=False))
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            error.append(e)

    t = threading.Thread(target=run)
    t.start()
    killed = None
    # Wait on the run's progress (an actor up, images written), not on the clock: on a loaded machine
    # actors start later, which only makes this take longer.
    while t.is_alive():
        pids = _actor_pids()
        if pids and len(_pngs(out)) >= 2:  # mid-run: some images are written, most are not
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    written_at_kill = len(_pngs(out))
    t.join(timeout=3600)  # a safety net against a hang only
    assert not t.is_alive(), "the Ray run did not end within an hour after its actor was killed"
    assert not error, error
    assert killed is not None and written_at_kill < 40, "the run ended before an actor could be killed"
    assert killed not in _actor_pids()
    files = _files(out)
    images = sorted(f for f in files if f.endswith(".png"))
    man = pd.read_csv(out / "manifest.csv", dtype=str)
    assert images == sorted(man["file"]) and len(images) == 40  # exactly the plan: none missing, none extra
    assert not [f for f in files if ".medi-tmp-" in f]
    _local(tiny_ckpt, p, tmp_path / "local", cfg)
    _same_outputs(tmp_path / "local", out)  # none truncated or different


def test_fid_stats_on_ray_equal_single_process_stats(local_ray, tiny_ckpt, tmp_path):
    from medi_fast.eval.features import ColourTexture
    from medi_fast.eval.fid import FIDStatsSink, load_stats

    info, p = _plan(tiny_ckpt)
    cfg = GenerateConfig(steps=STEPS, batch_size=4)
    sink = FIDStatsSink(tmp_path / "local.npz", extractor=ColourTexture())
    _local(tiny_ckpt, p, tmp_path / "local", cfg, sinks=[sink.add])
    sink.close()
    # statistics only, then images + statistics resumed over a half-finished directory
    mray.generate(tiny_ckpt, p, None, config=cfg, backend="torch", fid_stats=tmp_path / "ray.npz",
                  fid_features="colour-texture", workers=2, progress=False)
    # two whole batches of 4, so their images are those of the full run's first two batches
    half = plans.Plan(p.rows.iloc[:8].reset_index(drop=True), p.attributes)
    _local(tiny_ckpt, half, tmp_path / "resumed", cfg)
    (tmp_path / "resumed" / "run.json").unlink()  # the half plan's record; the full plan continues it
    (tmp_path / "resumed" / "manifest.csv").unlink()
    stats = mray.generate(tiny_ckpt, p, tmp_path / "resumed", config=cfg, backend="torch",
                          fid_stats=tmp_path / "resumed.npz", fid_features="colour-texture", workers=2,
                          progress=False)
    assert stats["skipped"] == 8 and stats["generated"] == 5
    want, name = load_stats(tmp_path / "local.npz")
    for path in (tmp_path / "ray.npz", tmp_path / "resumed.npz"):
        got, got_name = load_stats(path)
        assert got_name == name and sorted(got) == sorted(want), path
        for k in want:
            assert got[k][2] == want[k][2]
            np.testing.assert_allclose(got[k][0], want[k][0], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(got[k][1], want[k][1], rtol=1e-9, atol=1e-12)


def test_dataset_streams_images_and_labels_for_training(local_ray, tiny_ckpt):
    import medi_fast

    info, p = _plan(tiny_ckpt)
    cfg = GenerateConfig(steps=STEPS, batch_size=4)
    ds = mray.dataset(tiny_ckpt, p, config=cfg, backend="torch", workers=1)
    seen = {}
    for b in ds.select_columns(["image", "class_id", "tissue_source_site_id", "index"]).iter_torch_batches(batch_size=5):
        assert b["image"].dtype.is_floating_point is False and tuple(b["image"].shape[1:]) == (32, 32, 3)
        for img, c, t, i in zip(b["image"].numpy(), b["class_id"].tolist(), b["tissue_source_site_id"].tolist(),
                                b["index"].tolist()):
            seen[i] = (img, c, t)
    assert sorted(seen) == list(range(13))
    want = medi_fast.load(tiny_ckpt, backend="torch", steps=STEPS, batch_size=4).run(p)
    assert all(np.array_equal(seen[i][0], want[i]) for i in range(13))
    vocab = info.spec["class"].vocab
    assert [seen[i][1] for i in range(13)] == [vocab.id(c) for c in p.rows["class"]]


def test_cli_generate_ray_writes_the_bytes_of_the_local_command_with_the_users_threads(local_ray, run_cli,
                                                                                        tiny_ckpt, tmp_path,
                                                                                        monkeypatch):
    """The user's defaults: torch's own thread count (one per core), not the suite's one thread.  A
    convolution rounds differently on another thread count, so actors that ran on their one-CPU share
    wrote images a grey level off the local command's; they run with the command's counts."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    address = ray.get_runtime_context().gcs_address
    args = ["generate", tiny_ckpt, "--class", "LUAD", "--tss", "05", "--n", "24", "--steps", STEPS, "--seed", "11",
            "--backend", "torch", "--quiet"]
    r = run_cli(*args, "--out", tmp_path / "local")
    assert r.returncode == 0, r.stderr
    r = run_cli(*args, "--out", tmp_path / "ray", "--ray", address, "--ray-workers", "1")
    assert r.returncode == 0, r.stderr
    _same_outputs(tmp_path / "local", tmp_path / "ray")
    r = run_cli(*args, "--out", tmp_path / "x", "--ray", address, "--shard", "0/2")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "medi-fast: error: --shard and --ray do not combine; drop --shard (Ray spreads the plan over its workers)"]
    assert not (tmp_path / "x").exists()


def test_an_actor_takes_the_jobs_thread_counts(tiny_ckpt):
    """What makes Ray's bytes the local run's: the actor's torch runs on the driver's thread counts,
    whatever CPU share Ray gave it."""
    import torch

    from medi_fast.ray_generate import UnitWorker

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        UnitWorker(str(tiny_ckpt), "torch", {}, GenerateConfig(steps=1), threads=(2, torch.get_num_interop_threads()))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("extra, message", [
    (["--ray-workers", "0"], "--ray-workers must be a positive number of actors, got 0; drop it to let the pool "
                             "scale to the cluster"),
    (["--ray-workers", "-1"], "--ray-workers must be a positive number of actors, got -1; drop it to let the pool "
                              "scale to the cluster"),
    (["--ray-gpus-per-worker", "-1"], "--ray-gpus-per-worker must be a number of GPUs >= 0 (0: CPU actors; 0.5: two "
                                      "actors per GPU), got -1.0"),
    (["--ray", "nonexistent-xyz"], "--ray 'nonexistent-xyz' is not a Ray address; give auto, HOST:6379 or "
                                   "ray://HOST:10001, or --ray alone for a local instance"),
])
def test_bad_ray_options_are_refused_before_ray_starts(refused, tiny_ckpt, tmp_path, extra, message):
    out = tmp_path / "out"
    was = ray.is_initialized()
    line = refused(["generate", tiny_ckpt, "--class", "LUAD", "--tss", "05", "--n", "2", "--steps", "1",
                    "--out", out, *(["--ray"] if extra[0] != "--ray" else []), *extra])
    assert line == f"medi-fast: error: {message}"
    assert not out.exists() and ray.is_initialized() == was


def test_gpus_the_cluster_lacks_are_refused_before_anything_is_written(local_ray, refused, tiny_ckpt, tmp_path):
    if local_ray.cluster_resources().get("GPU", 0):
        pytest.skip("this machine's Ray has GPUs")
    out = tmp_path / "out"
    line = refused(["generate", tiny_ckpt, "--class", "LUAD", "--tss", "05", "--n", "2", "--steps", "1",
                    "--out", out, "--ray", "--ray-gpus-per-worker", "1"])
    assert line == ("medi-fast: error: --ray-gpus-per-worker 1: no node of the Ray cluster has 1 GPU(s) (the most on "
                    "one node: 0); use --ray-gpus-per-worker 0 for CPU actors, or join a cluster with GPUs")
    assert not out.exists()


@pytest.mark.parametrize("given, env, source", [(["--ray", "127.0.0.1:1"], None, ""),
                                                (["--ray"], "127.0.0.1:1", " (from $RAY_ADDRESS)")])
def test_an_unreachable_address_is_refused_at_once(run_cli, tiny_ckpt, tmp_path, monkeypatch, given, env, source):
    """Ray's client retries such an address until it is killed (also the $RAY_ADDRESS that --ray alone
    joins); the command asks the port first."""
    if env:
        monkeypatch.setenv("RAY_ADDRESS", env)
    r = run_cli("generate", tiny_ckpt, "--class", "LUAD", "--tss", "05", "--n", "2", "--out", tmp_path / "o", *given)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"medi-fast: error: cannot join the Ray cluster at '127.0.0.1:1'{source}: nothing answers at 127.0.0.1:1 "
        "(Connection refused); start it with `ray start --head`, or give auto, HOST:6379 or ray://HOST:10001, or "
        "--ray alone for a local instance"]
    assert not (tmp_path / "o").exists()


def test_without_ray_the_cli_says_how_to_install_it(run_cli, tiny_ckpt, tmp_path, monkeypatch):
    fake = tmp_path / "noray"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError('No module named ray', name='ray')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    r = run_cli("generate", tiny_ckpt, "--class", "LUAD", "--tss", "05", "--n", "2", "--out", tmp_path / "o", "--ray")
    assert r.returncode != 0
    assert r.stderr.strip() == ("medi-fast: error: --ray needs Ray Data, which is not installed; install it with "
                                "pip install 'medi-fast[ray]' (or pip install 'ray[data]')")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_an_error_raised_in_an_actor_reaches_the_user_as_one_line():
    from ray.exceptions import RayTaskError

    from medi_fast.ray_generate import _user_errors

    cause = MediFastError("cannot write x.png (permission denied); choose another --out or fix its permissions")
    in_actor = RayTaskError("MapWorker.submit", "Traceback (most recent call last): ...", cause).as_instanceof_cause()

    def batches():  # what Ray Data's iterator does: the actor's error, wrapped once more
        yield {"n": 1}
        raise RuntimeError("dataset execution failed") from in_actor

    it = _user_errors(batches())
    assert next(it) == {"n": 1}
    with pytest.raises(MediFastError) as e:
        next(it)
    assert type(e.value) is MediFastError and str(e.value) == str(cause)

    def other():
        raise RuntimeError("a bug")
        yield

    with pytest.raises(RuntimeError, match="a bug"):  # anything else is left alone
        list(_user_errors(other()))
