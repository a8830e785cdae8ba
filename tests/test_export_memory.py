"""What an export holds in memory: the weights once, and the files byte for byte what torch's and
onnx's own writers give (engines/export.py: ``initializers_kept_out``, ``write_onnx``, ``check_onnx``)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from medi_fast import checkpoint  # noqa: E402
from medi_fast.backends.contract import IOContract  # noqa: E402
from medi_fast.cli import main  # noqa: E402
from medi_fast.engines import export  # noqa: E402
from medi_fast.engines.fp16 import convert_to_fp16  # noqa: E402
from medi_fast.errors import MediFastError  # noqa: E402
from medi_fast.model import build_model  # noqa: E402
from medi_fast.schedule import Schedule  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(5)
    model = build_model("tiny-32", classes=["LUAD", "LUSC"], metadata={"tss": ["05", "44"], "age": None})
    path = tmp_path_factory.mktemp("mem") / "ckpt.pt"
    checkpoint.save(checkpoint.from_model(model, Schedule(), preset="tiny-32"), path)
    return checkpoint.load(path)


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    return export.export_onnx(ckpt, tmp_path_factory.mktemp("mem") / "model.onnx")


def test_the_onnx_file_is_byte_for_byte_what_torchs_own_writer_gives(ckpt, exported, tmp_path):
    """The exporter run with its initializers kept out, and the file written tensor by tensor, give
    exactly the bytes of torch writing the weights itself and onnx.save_model (the old path)."""
    config = export.ExportConfig()
    model = ckpt.build().float().eval()
    export.use_constant_scale_attention(model)
    contract = IOContract.from_spec(ckpt.spec, ckpt.resolution, config.batch)
    plain = tmp_path / "plain.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(export.FoldedDenoiser(model).eval(), export.example_inputs(contract, ckpt.spec, 2),
                          str(plain), input_names=contract.input_names, output_names=contract.output_names,
                          dynamic_axes=contract.dynamic_axes(), opset_version=config.opset, do_constant_folding=True,
                          dynamo=False)
    reference = onnx.load(str(plain))
    assert len(reference.graph.initializer) > 10
    written = onnx.load(str(exported))
    export.set_metadata(reference, {p.key: p.value for p in written.metadata_props})
    assert exported.read_bytes() == reference.SerializeToString()


def test_write_onnx_writes_what_serialize_writes(exported, tmp_path):
    """Both the graph's own initializers and ones given as separate memory (the export's path),
    for the fp32 graph and the fp16 one (Cast nodes, fp16 initializers, value_info)."""
    fp32 = onnx.load(str(exported))
    for graph in (fp32, convert_to_fp16(onnx.load(str(exported)))):
        assert export.write_onnx(graph, tmp_path / "a.onnx").read_bytes() == graph.SerializeToString()
    kept = {}
    for t in fp32.graph.initializer:
        if len(t.raw_data) > export.LARGE_TENSOR:
            kept[t.name] = memoryview(t.raw_data)
            t.ClearField("raw_data")
    assert len(kept) > 5
    export.write_onnx(fp32, tmp_path / "b.onnx", kept)
    assert (tmp_path / "b.onnx").read_bytes() == exported.read_bytes()
    name = next(iter(kept))
    with pytest.raises(MediFastError, match=f"initializer {name} has 4 bytes for"):
        export.write_onnx(fp32, tmp_path / "c.onnx", {**kept, name: memoryview(b"\0" * 4)})


def test_the_checker_still_refuses_a_broken_graph(exported, tmp_path):
    """check_onnx reads the graph without its large tensors, and still runs the ONNX checker."""
    graph = onnx.load(str(exported))
    path = export.write_onnx(graph, tmp_path / "model.onnx")
    export.check_onnx(path, graph)
    graph.graph.node[3].op_type = "NoSuchOp"
    with pytest.raises(MediFastError, match="failed the ONNX checker .*NoSuchOp"):
        export.check_onnx(export.write_onnx(graph, path), graph)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_full_disk_while_writing_the_graph_leaves_nothing(ckpt, tmp_path, monkeypatch, capsys):
    """write_onnx is where the weights reach the disk now; a full disk there ends the export in one
    line and removes what it wrote."""
    real_write = export.write_onnx

    def disk_full(model, path, *args, **kwargs):
        real_write(model, path, *args, **kwargs)
        with open(path, "r+b") as f:  # what a full disk leaves: a truncated file, then ENOSPC
            f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(export, "write_onnx", disk_full)
    with pytest.raises(SystemExit) as e:
        main(["export", str(ckpt.path), "--out", str(tmp_path / "exp")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (f"medi-fast: error: disk full while writing {tmp_path / 'exp'}; free space or "
                                         "choose another --out, then rerun the same command to resume\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# Runs in a fresh interpreter: VmHWM is the process's peak resident memory, and writing 5 to
# /proc/self/clear_refs resets it, so each figure is the peak of one step above the memory before it.
MEASURE = r"""
import gc, json, sys
import onnx, torch
from medi_fast import checkpoint
from medi_fast.engines.export import export_onnx, save_checked
from medi_fast.model import Preset, build_model
from medi_fast.schedule import Schedule

def kib(key):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(key))

def growth(step):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = kib("VmRSS")
    step()
    return kib("VmHWM") - before

torch.manual_seed(0)
# wide and small: 166 MB of weights, whose copies dwarf the activations of tracing a 16 px batch of 2
preset = Preset("wide-16", 16, (256, 512), 1, 32)
model = build_model(preset, classes=["LUAD", "LUSC"], metadata={"tss": ["05", "44"]})
ckpt = checkpoint.from_model(model, Schedule(), preset="wide-16")
weights = sum(t.numel() * t.element_size() for t in ckpt.state_dict.values())
ckpt.state_dict = {}
out = sys.argv[1]
fig = {"weights": weights, "export": growth(lambda: export_onnx(ckpt, out + "/model.onnx", model=model))}
del model
graph = onnx.load(out + "/model.onnx")
fig["save"] = growth(lambda: save_checked(graph, out + "/again.onnx"))
print(json.dumps(fig))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_export_and_save_hold_the_weights_once(tmp_path):
    """Peak memory above the model's own weights W.  Before: torch's exporter held three more copies
    (its protobuf, the serialised string, Python's bytes: +3.3 W measured) and onnx.save_model plus
    the checker on the file two (+2.2 W); now each step stays under W."""
    r = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    fig = json.loads(r.stdout.strip().splitlines()[-1])
    assert fig["weights"] > 150e6
    assert fig["export"] < fig["weights"], fig
    assert fig["save"] < fig["weights"], fig
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "model.onnx").read_bytes()


def test_a_torch_whose_exporter_skips_the_hook_still_exports_the_same_file(ckpt, exported, tmp_path, monkeypatch):
    """The hook is a private binding of torch's exporter: where a torch does not call it as 2.14 does,
    nothing is captured and the export runs as torch always did (weights included): the same file."""
    import contextlib

    monkeypatch.setattr(export, "initializers_kept_out", lambda captured: contextlib.nullcontext(captured))
    again = export.export_onnx(ckpt, tmp_path / "model.onnx")
    assert again.read_bytes() == exported.read_bytes()
