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
