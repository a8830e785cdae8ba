"""The content-keyed engine cache, with a stand-in builder (it must not care what builds the bytes):
reuse, rebuild on any key change, failure leaves nothing, two processes racing build once."""
from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from medi_fast.engines.cache import KEY_FILE, EngineCache, cache_key, key_fields
from medi_fast.errors import MediFastError

FP = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}


def _fields(onnx, **over):
    kw = {"fingerprint": FP, "precision": "fp16", "batch": "1,16,64", "options": {"optimization_level": 3}}
    kw.update(over)
    return key_fields(onnx, **kw)


class Builder:
    def __init__(self):
        self.calls = 0

    def __call__(self, path: Path):
        self.calls += 1
        path.write_bytes(b"engine %d" % self.calls)
        path.with_name(path.name + ".json").write_text("{}")


@pytest.fixture
def onnx(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"graph v1")
    return p


def test_a_matching_engine_is_reused(tmp_path, onnx):
    cache, build = EngineCache(tmp_path / "cache"), Builder()
    path, built = cache.get_or_build(_fields(onnx), build)
    assert built and path.read_bytes() == b"engine 1" and path.with_name("model.engine.json").is_file()
    again, built = cache.get_or_build(_fields(onnx), build)
    assert again == path and not built and build.calls == 1
    assert json.loads((path.parent / KEY_FILE).read_text())["gpu_name"] == "NVIDIA L4"


@pytest.mark.parametrize("change", ["content", "tensorrt", "gpu", "capability", "precision", "batch", "options"])
def test_any_change_of_the_key_builds_a_new_engine(tmp_path, onnx, change):
    cache, build = EngineCache(tmp_path / "cache"), Builder()
    first, _ = cache.get_or_build(_fields(onnx), build)
    over = {"tensorrt": {"fingerprint": {**FP, "tensorrt_version": "10.7.0"}},
            "gpu": {"fingerprint": {**FP, "gpu_name": "NVIDIA A100"}},
            "capability": {"fingerprint": {**FP, "compute_capability": "8.0"}},
            "precision": {"precision": "fp32"}, "batch": {"batch": "1,16,128"},
            "options": {"options": {"optimization_level": 5}}}.get(change, {})
    if change == "content":
        onnx.write_bytes(b"graph v2")
    second, built = cache.get_or_build(_fields(onnx, **over), build)
    assert built and second != first and build.calls == 2
    assert first.read_bytes() == b"engine 1"  # the other key's engine stays


def test_external_weights_are_part_of_the_content(tmp_path, onnx):
    a = cache_key(_fields(onnx))
    onnx.with_name("model.onnx.data").write_bytes(b"weights")
    assert cache_key(_fields(onnx)) != a


def test_a_corrupt_or_incomplete_entry_is_rebuilt(tmp_path, onnx):
    cache, build = EngineCache(tmp_path / "cache"), Builder()
    path, _ = cache.get_or_build(_fields(onnx), build)
    (path.parent / KEY_FILE).write_text("{broken")
    path2, built = cache.get_or_build(_fields(onnx), build)
    assert built and path2 == path and path.read_bytes() == b"engine 2"
    path.unlink()
    assert cache.get_or_build(_fields(onnx), build)[1]


def test_a_failing_build_leaves_nothing(tmp_path, onnx):
    cache = EngineCache(tmp_path / "cache")

    def broken(path):
        path.write_bytes(b"half")
        raise MediFastError("TensorRT could not build an engine; try a smaller --batch MAX")

    with pytest.raises(MediFastError, match="could not build"):
        cache.get_or_build(_fields(onnx), broken)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(MediFastError, match="wrote no model.engine"):
        cache.get_or_build(_fields(onnx), lambda p: None)
    assert cache.lookup(_fields(onnx)) is None


def _race(root, onnx, log, barrier, out):
    def slow_build(path):
        with open(log, "a") as f:
            f.write("build\n")
        time.sleep(1.0)  # long enough that the other process arrives mid-build
        path.write_bytes(b"engine")

    barrier.wait()
    path, built = EngineCache(root).get_or_build(_fields(Path(onnx)), slow_build)
    out.put((str(path), built))


def test_two_processes_racing_for_one_key_build_once(tmp_path, onnx):
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    log = tmp_path / "builds.log"
    procs = [ctx.Process(target=_race, args=(tmp_path / "cache", str(onnx), log, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    assert log.read_text() == "build\n"  # one build; the other process waited and reused it
    assert len({r[0] for r in results}) == 1 and sorted(r[1] for r in results) == [False, True]


def test_cached_engine_keys_on_this_machine_and_builds_with_the_real_builder_signature(tmp_path, monkeypatch,
                                                                                        tiny_ckpt):
    pytest.importorskip("onnx")
    from medi_fast import checkpoint
    from medi_fast.backends.contract import BatchRange
    from medi_fast.engines import tensorrt_build
    from medi_fast.engines.export import ExportConfig, export_onnx

    onnx_path = export_onnx(checkpoint.load(tiny_ckpt), tmp_path / "m" / "model.onnx",
                            ExportConfig(batch=BatchRange(1, 4, 8)))
    fingerprint = dict(FP)
    calls = []

    def fake_build(onnx_in, engine_out, config, rebuild_command=""):
        calls.append((Path(onnx_in), config))
        Path(engine_out).write_bytes(b"engine")
        return Path(engine_out)

    monkeypatch.setattr(tensorrt_build, "check_can_build", lambda *a: None)
    monkeypatch.setattr(tensorrt_build, "device_fingerprint", lambda: dict(fingerprint))
    monkeypatch.setattr(tensorrt_build, "build_engine", fake_build)
    a = tensorrt_build.cached_engine(onnx_path, tmp_path / "cache")
    assert tensorrt_build.cached_engine(onnx_path, tmp_path / "cache") == a and len(calls) == 1
    assert calls[0][1].timing_cache == str(tmp_path / "cache" / "timing.cache")
    fingerprint["gpu_name"] = "NVIDIA H100"
    assert tensorrt_build.cached_engine(onnx_path, tmp_path / "cache") != a and len(calls) == 2


def test_generate_onnx_with_tensorrt_fails_in_one_line_without_tensorrt(tiny_ckpt, tmp_path, run_cli):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed")
    except ImportError:
        pass
    from medi_fast import checkpoint
    from medi_fast.engines.export import export_onnx

    onnx_path = export_onnx(checkpoint.load(tiny_ckpt), tmp_path / "model.onnx")
    r = run_cli("generate", onnx_path, "--backend", "tensorrt", "--engine-cache", tmp_path / "c", "--class", "LUAD",
                "--tss", "05", "--n", "1", "--out", tmp_path / "out", "--quiet")
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "medi-fast: error: --backend tensorrt needs the tensorrt package and a CUDA GPU (pip install "
        "'medi-fast[gpu]'); use --backend auto to run the .onnx with ONNX Runtime"]
    assert not (tmp_path / "c").exists() and not (tmp_path / "out").exists()
