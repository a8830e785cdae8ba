"""PyTorch backends: eager fp32; on CUDA fp16/bf16 autocast with channels_last; torch.compile."""
from __future__ import annotations

import contextlib

import torch

from .. import checkpoint as ckpt_io
from ..errors import MediFastError
from . import Backend, ModelInfo, bf16_native, cpu_bf16_native


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
    tf32 = False  # fp32 on CUDA: TF32 off unless a subclass asks for it

    def __init__(self, info: ModelInfo, device: str | None = None, ema: bool = True):
        ck = info.checkpoint or ckpt_io.load(info.path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = ck.build(ema=ema).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._forward = model
        if self.compile:
            self._forward = torch.compile(model, mode=self.compile_mode, dynamic=False)

    @property
    def compile_mode(self) -> str:
        return "default"

    @contextlib.contextmanager
    def _fp32_mode(self):
        """fp32 arithmetic as the backend's name says: cuDNN runs fp32 convolutions in TF32 unless told
        not to (torch's default), an error of ~1e-3 relative that the fp32 reference must not have.
        Set around each call and restored after (the flags are process-wide)."""
        if self.dtype is not None or self.device.type != "cuda":
            yield
            return
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

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
            with self._fp32_mode():
                eps = self._forward(x, t.to(self.device), cond)
        out = eps.float().contiguous()
        if out is eps and self.compile and self.device.type == "cuda":
            out = out.clone()  # a CUDA-graph replay would overwrite the tensor it returned last time
        return out

    def close(self):
        self.model = self._forward = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class TorchTF32Backend(TorchBackend):
    """fp32 weights and activations; matmuls and convolutions in TF32 on the tensor cores (CUDA)."""

    tf32 = True
    available = classmethod(lambda cls: _cuda())


class TorchFP16Backend(TorchBackend):
    dtype = torch.float16
    channels_last = True
    available = classmethod(lambda cls: _cuda())


def _bf16_here() -> tuple[bool, str]:
    """bf16 where it is native: a CUDA GPU with bf16 units, or (without a GPU) a CPU with them."""
    if torch.cuda.is_available():
        if not bf16_native():
            return False, "this GPU has no bf16 units (compute capability < 8.0; bf16 would be emulated); use torch-fp16"
        return True, ""
    if not cpu_bf16_native():
        return False, ("this CPU has no bf16 units (avx512_bf16/amx_bf16 on x86-64, bf16 on Arm; bf16 would be "
                       "emulated, slower than fp32); use --backend torch")
    return True, ""


def cpu_bf16_rows(resolution: int) -> int:
    """The fixed rows per call of bf16 on a CPU: 16 at 32 px, 4 at 64 px, 1 from 128 px (about one
    32-px batch of 16 worth of pixels, so a small job's padding costs little)."""
    return max(1, 16 * 32 * 32 // (int(resolution) ** 2))


class TorchBF16Backend(TorchBackend):
    """bf16 autocast + channels_last.  On a CPU with bf16 units (oneDNN's bf16 convolutions: 2-3x
    fp32) it is what ``auto`` picks for a checkpoint, gated per model when it starts: its eps on a
    probe batch within ``BF16_REL`` of the same model in fp32 and finite, else ``AccuracyGateError``
    (``auto`` then falls back to fp32 saying why).  bf16 keeps 8 mantissa bits: ~1e-2 relative eps
    error on every model tried; DDIM images within a few grey levels of fp32's on a trained model
    (benchmarks/cpu_bf16_quality.py)."""

    dtype = torch.bfloat16
    channels_last = True
    available = classmethod(lambda cls: _bf16_here())
    gated_here = classmethod(lambda cls: not torch.cuda.is_available())  # the gate runs on a CPU

    def __init__(self, info, device=None, **kw):
        super().__init__(info, device=device, **kw)
        self.gate = None
        if self.device.type == "cpu":
            # oneDNN's bf16 kernels round differently for each batch shape (eps differs by ~1e-2 between
            # batch 8 and batch 1 on a Sapphire Rapids core, against ~1e-6 in fp32): every call runs in
            # chunks of one fixed number of rows, the last padded, so an image's result never depends on
            # the batch it came in (generate's --batch-size, a job's last batch, the API against the CLI).
            self.rows = cpu_bf16_rows(info.resolution)
            self.gate = self._check_gate(info)

    def __call__(self, x, t, cond):
        if self.device.type != "cpu":
            return super().__call__(x, t, cond)
        n, out = self.rows, []
        for s in range(0, x.shape[0], n):
            xs, ts, cs = x[s:s + n], t[s:s + n], {k: v[s:s + n] for k, v in cond.items()}
            m = xs.shape[0]
            if m < n:  # padding rows: copies of the last, computed and dropped
                def pad(v, k=n - m):
                    return torch.cat([v, v[-1:].expand(k, *v.shape[1:])])

                xs, ts, cs = pad(xs), pad(ts), {k: pad(v) for k, v in cs.items()}
            out.append(super().__call__(xs, ts, cs)[:m])
        return torch.cat(out)

    def _check_gate(self, info):
        from .accuracy import bf16_gate

        @torch.inference_mode()
        def fp32(x, t, cond):  # the same weights without autocast
            return self._forward(x, t, cond).float()

        return bf16_gate("torch-bf16", fp32, self, info)


COMPILE_MODES = ("reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs")


class TorchCompileBackend(TorchBackend):
    """torch.compile.  On CUDA: fp16 autocast + channels_last, mode ``reduce-overhead`` (inductor's
    kernels replayed as CUDA graphs).  fp16, not bf16: on an H200 the two ran at the same speed
    while fp16's eps error was 8x smaller (benchmarks/gpu.py).  ``max-autotune`` also benchmarks
    kernel choices: minutes of compilation per batch size (150 s for tiny-32 at one batch on an
    H200), so only on request (the option ``mode="max-autotune"``).  On a CPU: fp32, ``default``."""

    compile = True

    def __init__(self, info, device=None, mode: str | None = None, **kw):
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if mode is not None and mode not in COMPILE_MODES:
            raise MediFastError(f"torch-compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
        self._mode = mode or ("reduce-overhead" if dev.type == "cuda" else "default")
        if dev.type == "cuda":
            self.dtype = torch.float16
            self.channels_last = True
        super().__init__(info, device=device, **kw)
        self._batch = 0  # the largest batch compiled so far

    @property
    def compile_mode(self) -> str:
        return self._mode

    def __call__(self, x, t, cond):
        # dynamic=False compiles (and on CUDA records graphs) once per batch size: a job's smaller last
        # batch is padded to the largest one seen instead of compiling again (47 s for medi-128 on an
        # H200).  Each image's eps does not depend on the others in its batch, so the padding rows
        # (copies of the last one) are computed and dropped.
        n = x.shape[0]
        if n >= self._batch:
            self._batch = n
            return super().__call__(x, t, cond)
        pad = self._batch - n

        def padded(v):
            return torch.cat([v, v[-1:].expand(pad, *v.shape[1:])])

        return super().__call__(padded(x), padded(t), {k: padded(v) for k, v in cond.items()})[:n]
