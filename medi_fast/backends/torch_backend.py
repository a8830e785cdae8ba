"""PyTorch backends: eager fp32; on CUDA fp16/bf16 autocast with channels_last; torch.compile."""
from __future__ import annotations

import torch

from .. import checkpoint as ckpt_io
from . import Backend, ModelInfo, bf16_native


def read_checkpoint_info(path) -> ModelInfo:
    ck = ckpt_io.load(path)
    return ModelInfo(ck.path, "checkpoint", ck.spec, ck.schedule, ck.resolution, ck.preset, ck.hash,
                     ck.provenance, checkpoint=ck)


def _cuda() -> tuple[bool, str]:
    return (True, "") if torch.cuda.is_available() else (False, "no CUDA GPU")


class TorchBackend(Backend):
    """Eager PyTorch.  dtype fp32 (default), fp16 or bf16 (autocast, CUDA only)."""

    dtype: torch.dtype | None = None  # autocast dtype; None = fp32
    channels_last = False
    compile = False

    def __init__(self, info: ModelInfo, device: str | None = None, ema: bool = True):
        ck = info.checkpoint or ckpt_io.load(info.path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = ck.build(ema=ema).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._forward = model
        if self.compile:
            mode = "max-autotune" if self.device.type == "cuda" else "default"
            self._forward = torch.compile(model, mode=mode, dynamic=False)

    @torch.inference_mode()
    def __call__(self, x, t, cond):
        cond = {k: v.to(self.device, non_blocking=True) for k, v in cond.items()}
        x = x.to(self.device)
        if self.compile and not x.is_inference():
            # A sampler's first x_T comes from outside inference mode, every later x from inside: the
            # differing dispatch keys would make dynamo compile the graph a second time.
            x = x.clone()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is not None:
            with torch.autocast(self.device.type, dtype=self.dtype):
                eps = self._forward(x, t.to(self.device), cond)
        else:
            eps = self._forward(x, t.to(self.device), cond)
        return eps.float().contiguous()

    def close(self):
        self.model = self._forward = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class TorchFP16Backend(TorchBackend):
    dtype = torch.float16
    channels_last = True
    available = classmethod(lambda cls: _cuda())


def _cuda_bf16() -> tuple[bool, str]:
    ok, why = _cuda()
    if ok and not bf16_native():
        return False, "this GPU has no bf16 units (compute capability < 8.0; bf16 would be emulated); use torch-fp16"
    return ok, why


class TorchBF16Backend(TorchBackend):
    dtype = torch.bfloat16
    channels_last = True
    available = classmethod(lambda cls: _cuda_bf16())


class TorchCompileBackend(TorchBackend):
    compile = True

    def __init__(self, info, device=None, **kw):
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda":
            # bf16 where the GPU has bf16 units, fp16 (also autocast) where it would only emulate bf16
            self.dtype = torch.bfloat16 if bf16_native(dev) else torch.float16
            self.channels_last = True
        super().__init__(info, device=device, **kw)
