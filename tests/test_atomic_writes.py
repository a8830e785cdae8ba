"""medi_fast.io is the one home of temp-file-and-rename; the writers of files that belong together (an
ONNX graph and its weights, a TensorRT engine and its sidecar) go through it."""
import json
import os

import pytest

from medi_fast import io
from medi_fast.errors import MediFastError
from medi_fast.io import atomic_files, replace_together


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(io.TMP_MARK)]


def test_atomic_files_moves_every_file_written_and_leaves_no_temporary(tmp_path):
    a, b = tmp_path / "out" / "model.engine", tmp_path / "out" / "model.engine.json"
    with atomic_files(a, b) as tmp:
        (tmp / a.name).write_bytes(b"engine")
        (tmp / b.name).write_text("{}")
        (tmp / "scratch.bin").write_bytes(b"x")  # anything else written there is dropped
    assert a.read_bytes() == b"engine" and b.read_text() == "{}"
    assert sorted(p.name for p in a.parent.iterdir()) == [a.name, b.name]


def test_atomic_files_replaces_nothing_when_the_writer_fails(tmp_path):
    a, b = tmp_path / "model.engine", tmp_path / "model.engine.json"
    a.write_bytes(b"old engine")
    b.write_text("old sidecar")
    with pytest.raises(TypeError):
        with atomic_files(a, b) as tmp:
            (tmp / a.name).write_bytes(b"new engine")
            (tmp / b.name).write_text(json.dumps({"x": object()}))
    assert a.read_bytes() == b"old engine" and b.read_text() == "old sidecar"
    assert _leftovers(tmp_path) == []


def test_atomic_files_takes_files_of_one_directory(tmp_path):
    with pytest.raises(ValueError, match="one directory"):
        with atomic_files(tmp_path / "a", tmp_path / "sub" / "b"):
            pass


def test_replace_together_never_shows_a_new_file_beside_an_old_partner(tmp_path, monkeypatch):
    first, second = tmp_path / "model.onnx.data", tmp_path / "model.onnx"
    first.write_text("old weights")
    second.write_text("old graph")
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / first.name).write_text("new weights")
    (staged / second.name).write_text("new graph")
    seen = []
    real_replace = os.replace

    def watching_replace(src, dst):
        real_replace(src, dst)
        seen.append((first.read_text() if first.exists() else None, second.read_text() if second.exists() else None))

    monkeypatch.setattr(io.os, "replace", watching_replace)
    replace_together([(staged / first.name, first), (staged / second.name, second)])
    # after the first rename the old graph is already gone (a reader refuses a missing file)
    assert seen == [("new weights", None), ("new weights", "new graph")]


def test_an_engine_and_its_sidecar_are_written_together(tmp_path):
    from medi_fast.backends.tensorrt_backend import sidecar_path
    from medi_fast.engines.tensorrt_build import write_engine

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"old")
    sidecar_path(engine).write_text('{"old": true}')
    with pytest.raises(TypeError):  # a sidecar that cannot be written: the old pair stays whole
        write_engine(engine, b"new", {"bad": object()})
    assert engine.read_bytes() == b"old" and json.loads(sidecar_path(engine).read_text()) == {"old": True}
    write_engine(engine, b"new", {"format": 1})
    assert engine.read_bytes() == b"new" and json.loads(sidecar_path(engine).read_text()) == {"format": 1}
    assert _leftovers(tmp_path) == []


def test_an_unwritable_timing_cache_does_not_fail_the_build(tmp_path):
    from medi_fast.engines.tensorrt_build import save_timing_cache

    class Timing:
        def serialize(self):
            return b"timings"

    assert save_timing_cache(Timing(), tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").read_bytes() == b"timings"
    (tmp_path / "file").write_text("")
    assert not save_timing_cache(Timing(), tmp_path / "file" / "timing.cache")  # its folder is a file



def test_atomic_files_reports_a_full_disk_in_one_line_naming_the_folder(tmp_path):
    import errno

    with pytest.raises(MediFastError) as e:
        with atomic_files(tmp_path / "model.onnx.data", tmp_path / "model.onnx"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value) == (f"disk full while writing {tmp_path}; free space or choose another --out, then rerun "
                            f"the same command to resume")
    assert list(tmp_path.iterdir()) == []
