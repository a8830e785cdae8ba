"""Native TensorRT runtime for ``.engine``/``.plan`` files built by ``medi-fast export --tensorrt``.

Lifecycle: load (deserialize; check the sidecar's TensorRT version and GPU against
this machine) -> bind shapes (``set_input_shape`` per batch) -> infer (``execute_async_v3`` on a
torch CUDA stream with torch-allocated buffers).  The UNet call is captured once per batch size in a
CUDA graph and replayed (``cuda_graph=True``, the default): inputs are copied into that batch
size's buffers, so only the copies and the replay are launched per step, and a run that alternates
between its full batch and a smaller last one captures each once.  A graph keeps the addresses it
was captured with: each batch size has its own buffers for the backend's life, and the context's
own scratch memory is allocated once for the profile's largest shapes (TensorRT's default
``ExecutionContextAllocationStrategy.STATIC``), so an older graph stays valid after the context was
bound to another batch size.

The sidecar ``model.engine.json`` holds the .onnx metadata (vocabularies, spec, schedule, contract,
checkpoint hash), so reading a ModelInfo needs neither TensorRT nor a GPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MediFastError
from . import Backend, ModelInfo, cuda_device
from .contract import EPS, IOContract
from .onnx_info import parse_metadata

SIDECAR_FORMAT = "medi-fast-tensorrt"


def sidecar_path(engine_path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_sidecar(engine_path) -> dict:
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise MediFastError(f"engine {engine_path} does not exist; check the path")
    side = sidecar_path(engine_path)
    if not side.is_file():
        raise MediFastError(f"engine {engine_path.name} has no sidecar {side.name}; rebuild it with "
                            f"`medi-fast export CHECKPOINT --out {engine_path.parent} --tensorrt`")
    try:
        data = json.loads(side.read_text())
    except (ValueError, OSError) as e:
        raise MediFastError(f"sidecar {side} is corrupt ({e}); rebuild the engine with `medi-fast export --tensorrt`") from None
    if data.get("format") != SIDECAR_FORMAT or "metadata" not in data:
        raise MediFastError(f"{side} is not a medi-fast engine sidecar; rebuild the engine with `medi-fast export --tensorrt`")
    return data


def read_engine_info(path) -> ModelInfo:
    """READERS entry for .engine/.plan: the ModelInfo from the sidecar (no TensorRT needed)."""
    data = read_sidecar(path)
    info = parse_metadata(data["metadata"], Path(path), kind="tensorrt")
    info.sidecar = data
    return info


def check_compatible(sidecar: dict, *, tensorrt_version: str, gpu_name: str, compute_capability: str) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU, with the rebuild command.

    TensorRT engines are not portable: a serialized engine only deserializes with the exact
    TensorRT version that built it, and its kernels were selected for one GPU architecture.
    """
    rebuild = sidecar.get("rebuild_command") or "medi-fast export CHECKPOINT --out DIR --tensorrt"
    problems = []
    if sidecar.get("tensorrt_version") != tensorrt_version:
        problems.append(f"TensorRT {sidecar.get('tensorrt_version')} (this machine: {tensorrt_version})")
    if sidecar.get("compute_capability") != compute_capability or sidecar.get("gpu_name") != gpu_name:
        problems.append(f"GPU {sidecar.get('gpu_name')} sm {sidecar.get('compute_capability')} "
                        f"(this machine: {gpu_name} sm {compute_capability})")
    if problems:
        raise MediFastError(f"this engine was built for {' and '.join(problems)}; rebuild it here with `{rebuild}`")


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dt]


class TensorRTBackend(Backend):
    """TensorRT engine: execute_async_v3 with torch buffers; one CUDA graph per batch size."""

    def __init__(self, info: ModelInfo, device: str | None = None, cuda_graph: bool = True):
        import tensorrt as trt

        self.info = info
        self.contract: IOContract = info.contract
        self.device = cuda_device(device)  # set_device needs an index: "cuda" alone raises
        torch.cuda.set_device(self.device)
        major, minor = torch.cuda.get_device_capability(self.device)
        sidecar = info.sidecar or read_sidecar(info.path)
        check_compatible(sidecar, tensorrt_version=trt.__version__,
                         gpu_name=torch.cuda.get_device_name(self.device), compute_capability=f"{major}.{minor}")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(info.path).read_bytes())
        if self.engine is None:
            raise MediFastError(f"TensorRT could not deserialize {info.path.name} (corrupt file?); rebuild it with "
                                f"`{sidecar.get('rebuild_command', 'medi-fast export --tensorrt')}`")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.dtypes = {s.name: _torch_dtype(trt, self.engine.get_tensor_dtype(s.name))
                       for s in self.contract.inputs + self.contract.outputs}
        self.cuda_graph = bool(cuda_graph)
        self._batch = None  # the batch size the context is bound to
        self._bufs: dict[int, dict[str, torch.Tensor]] = {}  # batch size -> its buffers
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}  # batch size -> its captured graph

    @classmethod
    def available(cls):
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return False, "tensorrt is not installed (pip install 'medi-fast[gpu]')"
        if not torch.cuda.is_available():
            return False, "no CUDA GPU"
        return True, ""

    def _bind(self, batch: int) -> None:
        """Bind the context to ``batch``: input shapes and tensor addresses (buffers allocated on first use)."""
        self.contract.check_batch(batch)
        if batch not in self._bufs:
            self._bufs[batch] = {s.name: torch.empty(s.shape_for(batch), dtype=self.dtypes[s.name], device=self.device)
                                 for s in self.contract.inputs + self.contract.outputs}
        for s in self.contract.inputs:
            self.context.set_input_shape(s.name, s.shape_for(batch))
        for name, buf in self._bufs[batch].items():
            self.context.set_tensor_address(name, buf.data_ptr())
        self._batch = batch

    def _launch(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise MediFastError("TensorRT execution failed (see the TensorRT log above); rebuild the engine")

    def _capture(self, batch: int) -> None:
        # One eager run first: TensorRT allocates lazily on the first enqueue, which cannot be captured.
        self._launch()
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self._launch()
        self._graphs[batch] = graph

    @torch.inference_mode()
    def __call__(self, x, t, cond):
        batch = int(x.shape[0])
        if batch != self._batch:
            self._bind(batch)
        feeds = self.contract.torch_feeds(x, t, cond, self.device)
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        bufs = self._bufs[batch]
        with torch.cuda.stream(self.stream):
            for name, v in feeds.items():
                bufs[name].copy_(v.to(self.dtypes[name]), non_blocking=True)
            if self.cuda_graph:
                if batch not in self._graphs:
                    self._capture(batch)
                self._graphs[batch].replay()
            else:
                self._launch()
            eps = bufs[EPS].float().clone()  # (B, 3, H, W); a copy, the buffer is reused next step
        current.wait_stream(self.stream)
        return eps

    def close(self):
        self._graphs.clear()
        self._bufs.clear()
        self.context = self.engine = None
        torch.cuda.empty_cache()
