"""The torch backends' CUDA choices, found on the first H200 run and tested on the CPU: the fp32
backend is fp32 (TF32 off around its calls, restored after), `auto` prefers fp16 to bf16, the
compiled backend pads a smaller batch instead of compiling again, `auto` says when it leaves a GPU
idle, and doctor's one-rank DDP check."""
from __future__ import annotations

import pytest
import torch

from medi_fast import backends, checkpoint, doctor
from medi_fast.backends import BACKENDS, open_model
from medi_fast.backends.torch_backend import TorchBackend, TorchCompileBackend, TorchTF32Backend
from medi_fast.errors import MediFastError


@pytest.fixture
def ckpt(tiny_ckpt):
    """conftest's random tiny-32 checkpoint (tiny.pt: LUAD, LUSC x 05, 44, 49)."""
    return tiny_ckpt


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA 'present' with compute capability 9.0 (an H100/H200) for availability and ranking."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 1000, (n,), generator=g),
            {"class": torch.arange(n) % 2, "tss": (torch.arange(n) + 1) % 2})


def test_fp32_backend_turns_tf32_off_around_its_calls_and_restores_it(ckpt, monkeypatch):
    """cuDNN's default is TF32 for fp32 convolutions (~1e-3 relative error): the `torch` backend, the
    reference of every accuracy check, must run true fp32 on CUDA; `torch-tf32` asks for TF32."""
    info = open_model(ckpt)
    fp32, tf32 = TorchBackend(info, device="cpu"), TorchTF32Backend(info, device="cpu")
    seen = {}
    for b in (fp32, tf32):
        b.device = torch.device("cuda")  # what the flags are set for; the model itself stays on the CPU

        def record(x, t, cond, b=b):
            seen[b] = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            return torch.zeros_like(x)

        b._forward = record
    x, t, cond = _inputs(2)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # no real CUDA transfer
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        fp32(x, t, cond)
        tf32(x, t, cond)
        assert seen[fp32] == (False, False) and seen[tf32] == (True, True)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        tf32(x, t, cond)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_auto_prefers_fp16_to_bf16_on_a_gpu_with_both(ckpt, fake_cuda):
    info = open_model(ckpt)
    assert backends.resolve("auto", info) == "torch-fp16"
    assert BACKENDS["torch-fp16"].rank > BACKENDS["torch-bf16"].rank > BACKENDS["torch-tf32"].rank > BACKENDS["torch"].rank
    assert backends.resolve("torch-tf32", info) == "torch-tf32"


def test_tf32_backend_is_refused_without_a_gpu(ckpt):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(MediFastError, match="backend torch-tf32 is not available here: no CUDA GPU"):
        backends.resolve("torch-tf32", open_model(ckpt))


def test_compiled_backend_pads_a_smaller_batch_instead_of_compiling_again(ckpt):
    """A job's last batch is smaller: it runs through the graph of the largest batch (padded with
    copies of its last row, which are dropped), and each image's eps is what it is alone."""
    info = open_model(ckpt)
    compiled = TorchCompileBackend(info, device="cpu")
    eager = TorchBackend(info, device="cpu")
    batches = []

    def forward(x, t, cond):
        batches.append(x.shape[0])
        return eager.model(x, t, cond)

    compiled._forward = forward  # the graph's calls, without minutes of CPU compilation
    x, t, cond = _inputs(5)
    full = compiled(x[:4], t[:4], {k: v[:4] for k, v in cond.items()})
    tail = compiled(x[4:], t[4:], {k: v[4:] for k, v in cond.items()})
    assert batches == [4, 4] and full.shape[0] == 4 and tail.shape[0] == 1
    alone = eager(x[4:], t[4:], {k: v[4:] for k, v in cond.items()})
    torch.testing.assert_close(tail, alone, rtol=1e-5, atol=1e-5)
    compiled(x, t, cond)  # a larger batch than any before: compiled at its size
    assert batches == [4, 4, 5]


def test_compiled_backend_modes(ckpt):
    info = open_model(ckpt)
    assert TorchCompileBackend(info, device="cpu").compile_mode == "default"
    assert TorchCompileBackend(info, device="cpu", mode="max-autotune").compile_mode == "max-autotune"
    with pytest.raises(MediFastError, match="torch-compile mode 'fastest' is not one of reduce-overhead"):
        TorchCompileBackend(info, device="cpu", mode="fastest")


def test_auto_says_when_it_leaves_a_gpu_idle(ckpt, tmp_path, monkeypatch):
    """An export directory on a GPU machine without ONNX Runtime's GPU providers or TensorRT: `auto`
    runs the ONNX file on the CPU; the job warns in one line and names both ways to use the GPU."""
    pytest.importorskip("onnxruntime")
    from medi_fast.backends.contract import BatchRange
    from medi_fast.engines.export import ExportConfig, export_onnx

    onnx_path = export_onnx(checkpoint.load(ckpt), tmp_path / "model.onnx", ExportConfig(batch=BatchRange(1, 2, 4)))
    info = open_model(onnx_path)
    den = backends.create("auto", info)
    assert den.name in ("ort-cpu", "openvino-bf16")  # openvino-bf16 on a CPU with bf16 units
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backends.idle_gpu_warning("auto", den, info) is None  # no GPU: nothing left idle
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    msg = backends.idle_gpu_warning("auto", den, info)
    assert msg.startswith(f"{den.name} runs model.onnx on the CPU although this machine has a CUDA GPU")
    assert "pip install 'medi-fast[gpu]'" in msg and "medi-fast generate CKPT" in msg and "\n" not in msg
    assert backends.idle_gpu_warning("ort-cpu", den, info) is None  # asked for by name: no warning
    assert backends.idle_gpu_warning("auto", TorchBackend(open_model(ckpt), device="cpu"), open_model(ckpt)) is None


def test_one_rank_ddp_check_passes_and_catches_a_difference(monkeypatch):
    row = doctor.check_ddp_one_rank("cpu")
    assert row.path == "ddp (1 process, gloo)" and row.status == "ok", row.detail
    assert row.metrics["param_change_rel"] <= doctor.DDP_ONE_RANK_BOUND
    real = doctor._train_steps

    def drifting(device, variant, ddp_rank=None, **kw):
        loss, delta = real(device, variant, ddp_rank=ddp_rank, **kw)
        return loss, delta * (1.001 if ddp_rank is not None else 1.0)

    monkeypatch.setattr(doctor, "_train_steps", drifting)
    row = doctor.check_ddp_one_rank("cpu")
    assert row.status == "FAIL" and row.metrics["param_change_rel"] == pytest.approx(1e-3, rel=1e-2)
