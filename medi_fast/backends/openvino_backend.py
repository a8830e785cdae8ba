"""OpenVINO CPU backend for exported .onnx graphs (optional extra: pip install 'medi-fast[openvino]').

Reads the same .onnx as ort-cpu (OpenVINO converts it at load time), fp32 inference precision so
results match the torch model to ~1e-4, latency hint (one request, all cores on one batch).
"""
from __future__ import annotations

import torch

from ..errors import MediFastError
from . import Backend, ModelInfo
from .contract import IOContract


class OpenVINOBackend(Backend):
    own_cpu_threads = True

    def __init__(self, info: ModelInfo, precision: str = "f32", device: str | None = None):
        import openvino as ov

        from .onnxruntime_backend import cpu_only

        self.info = info
        self.contract: IOContract = info.contract
        self.device = cpu_only(device, "openvino")
        try:
            self.compiled = ov.Core().compile_model(str(info.path), "CPU", {
                "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision})
        except RuntimeError as e:
            raise MediFastError(f"OpenVINO cannot load {info.path.name}: {str(e).splitlines()[0][:200]}; "
                                f"use --backend ort-cpu") from None
        self.request = self.compiled.create_infer_request()

    @classmethod
    def available(cls):
        try:
            import openvino  # noqa: F401
        except ImportError:
            return False, "openvino is not installed (pip install 'medi-fast[openvino]')"
        return True, ""

    def __call__(self, x, t, cond):
        self.request.infer(self.contract.numpy_feeds(x, t, cond))
        # copy: the request's output buffer is overwritten by the next call
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())  # (B, 3, H, W)

    def close(self):
        self.request = self.compiled = None


class OpenVINOBF16Backend(OpenVINOBackend):
    """OpenVINO with its bf16 inference precision, on a CPU with bf16 units (AMX/AVX512-BF16 kernels:
    5.3x the reference loop for one medi-128 call, 2.2x torch-bf16, in benchmarks/backends.py's bf16
    run).  What ``auto`` picks for an ONNX file on such a CPU when the extra is installed, gated per
    model when it starts against ONNX Runtime's fp32 on the same file (``auto`` falls back to ort-cpu
    when the gate fails, saying why).  An image's result does not depend on its batch (tested bit for
    bit)."""

    gated_here = classmethod(lambda cls: True)

    def __init__(self, info: ModelInfo, device: str | None = None):
        super().__init__(info, precision="bf16", device=device)
        from . import accuracy
        from .onnxruntime_backend import OrtCPUBackend

        reference = OrtCPUBackend(info)
        try:
            self.gate = accuracy.bf16_gate("openvino-bf16", reference, self, info, accuracy.OPENVINO_BF16_REL)
        finally:
            reference.close()

    @classmethod
    def available(cls):
        from . import cpu_bf16_native

        ok, why = super().available()
        if ok and not cpu_bf16_native():
            return False, ("this CPU has no bf16 units (avx512_bf16/amx_bf16 on x86-64, bf16 on Arm); "
                           "use --backend openvino or ort-cpu")
        return ok, why
