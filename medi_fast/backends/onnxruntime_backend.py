"""ONNX Runtime backends for exported .onnx graphs: ``ort-cpu``, ``ort-cuda``, ``ort-trt``.

All three take torch tensors and return eps as a float32 torch tensor on ``self.device``, so they
plug into the generic samplers.  Buffers follow the one IOContract.

- ort-cpu: intra-op threads = physical cores, ORT_ENABLE_ALL graph optimisation, sequential
  execution (benchmarks/backends.py measures the alternatives); the output numpy array becomes a
  torch tensor with ``torch.from_numpy`` (zero copy).
- ort-cuda: CUDA execution provider with IO binding onto torch-allocated CUDA tensors (no host
  round trip), optional CUDA graph (``cuda_graph=True``; one captured graph per batch size).
- ort-trt: TensorRT execution provider with engine and timing caches beside the model and the
  optimisation profile from the contract; CUDA provider as fallback for unsupported nodes.  The
  precision is the graph's: the fp16 graph (``model.fp16.onnx``, the one an export directory runs
  here, gated on this backend) is built with ``trt_fp16_enable``, the fp32 graph in fp32.  No CUDA
  graph: the provider captures one graph per session for fixed input shapes (the multi-graph
  ``gpu_graph_id`` run option is the CUDA provider's), and a run's last batch is often smaller.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import MediFastError
from . import Backend, ModelInfo, cuda_device
from .contract import EPS, IOContract

# What each GPU provider needs at run time, named in the one-line error when it does not load.
PROVIDER_LIBRARIES = {
    "CUDAExecutionProvider": ("the CUDA 13 and cuDNN 9 libraries (libcudart, libcublas, libcudnn)",
                              "install them (torch's CUDA 13 wheels bring nvidia-* wheels; onnxruntime-gpu 1.27+ is "
                              "built for CUDA 13) or use --backend ort-cpu"),
    "TensorrtExecutionProvider": ("TensorRT's libnvinfer (and the CUDA libraries)",
                                  "pip install 'medi-fast[gpu]' (TensorRT 10 for CUDA 13: onnxruntime-gpu 1.31's TensorRT "
                                  "provider links libnvinfer.so.10) or use --backend ort-cuda"),
}


def preload_tensorrt() -> str:
    """Import ``tensorrt`` so that its pip wheels' ``libnvinfer`` is loaded before ONNX Runtime's
    TensorRT provider looks for it ("" when it imported, else why not).

    The provider library finds ``libnvinfer`` through the dynamic loader, which does not search the
    pip wheels' folders; the ``tensorrt`` package loads them when imported.
    """
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return f"the tensorrt package does not import ({e}); pip install 'medi-fast[gpu]'"
    return ""


def physical_cores() -> int:
    """Physical cores usable by this process (hyper-threads share a core's FPUs, so they do not help)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((base / "physical_package_id").read_text().strip(), (base / "core_id").read_text().strip()))
        except OSError:
            return max(1, len(allowed))
    return max(1, len(cores))


def _providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def check_provider(session, requested: str, what: str) -> None:
    """Refuse a session where ONNX Runtime silently fell back from the ``requested`` provider.

    ``get_available_providers()`` lists the providers onnxruntime was built with, not those whose
    libraries load here; when ``libnvinfer`` or the CUDA libraries are missing, ORT logs a warning,
    registers the next provider in the list instead and runs on it.  ``session.get_providers()``
    lists what was really registered, first the one that gets the nodes.
    """
    got = list(session.get_providers())
    if not got or got[0] != requested:
        needs, fix = PROVIDER_LIBRARIES.get(requested, ("its libraries", "use --backend ort-cpu"))
        raise MediFastError(f"ONNX Runtime could not load {requested} for {what} (it fell back to "
                            f"{got[0] if got else 'nothing'}): {needs} did not load; {fix}")


_PROBES: dict[str, tuple[bool, str]] = {}


def provider_loads(provider: str) -> tuple[bool, str]:
    """(True, "") when ``provider`` really registers in a session on this machine.

    A one-node graph is enough: the provider's shared library is loaded when the session registers
    it.  For the TensorRT provider ``tensorrt`` is imported first (:func:`preload_tensorrt`), and a
    result is kept for the process only when that import worked: a probe that failed without it says
    nothing about the provider once ``tensorrt`` is importable.
    """
    if provider in _PROBES:
        return _PROBES[provider]
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return False, f"onnxruntime has no {provider} (install onnxruntime-gpu)"
    trt_provider = provider == "TensorrtExecutionProvider"
    preload_failed = preload_tensorrt() if trt_provider else ""
    result = _probe(provider)
    if preload_failed and not result[0]:
        return False, preload_failed
    if trt_provider and not result[0]:  # the provider loads only beside the TensorRT major it was linked against
        import tensorrt

        result = (False, f"{result[1]} (tensorrt {tensorrt.__version__} is installed; onnxruntime-gpu 1.31's TensorRT "
                         f"provider links TensorRT 10)")
    if not preload_failed:
        _PROBES[provider] = result
    return result


provider_loads.cache_clear = _PROBES.clear  # type: ignore[attr-defined]


def _probe(provider: str) -> tuple[bool, str]:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model.SerializeToString(), sess_options=so,
                                    providers=[provider, "CPUExecutionProvider"])
        check_provider(sess, provider, "a probe graph")
    except MediFastError as e:
        return False, str(e).split("): ", 1)[-1].split(";")[0]
    except Exception as e:  # onnxruntime's own error types
        return False, f"{provider} failed to start ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
    return True, ""


def _session(path: Path, providers: list, threads: int | None = None, opt_level: str = "all",
             sequential: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[opt_level]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3  # warnings about unused initialisers etc. are noise for users
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException types
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise MediFastError(f"ONNX Runtime cannot load {path.name}: {first}; re-export it with `medi-fast export`") from None
    first_provider = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    check_provider(session, first_provider, path.name)
    return session


def cpu_only(device, backend: str) -> torch.device:
    """The CPU device of a CPU runtime; ``--device cuda`` is refused rather than ignored."""
    dev = torch.device(device or "cpu")
    if dev.type != "cpu":
        raise MediFastError(f"backend {backend} runs on the CPU, not {dev}; drop --device or choose a GPU backend "
                            f"(see `medi-fast backends`)")
    return dev


def _contract(info: ModelInfo) -> IOContract:
    contract = info.contract
    if contract is None:
        raise MediFastError(f"{info.path} has no I/O contract in its metadata; re-export it with `medi-fast export`")
    return contract


class OrtCPUBackend(Backend):
    """ONNX Runtime on CPU."""

    own_cpu_threads = True

    def __init__(self, info: ModelInfo, threads: int | None = None, opt_level: str = "all",
                 sequential: bool = True, device: str | None = None):
        self.info = info
        self.contract = _contract(info)
        self.device = cpu_only(device, "ort-cpu")
        self.threads = threads or physical_cores()
        self.session = _session(info.path, ["CPUExecutionProvider"], self.threads, opt_level, sequential)

    @classmethod
    def available(cls):
        try:
            ok = "CPUExecutionProvider" in _providers()
            return ok, "" if ok else "onnxruntime has no CPU provider"
        except ImportError:
            return False, "onnxruntime is not installed (pip install onnxruntime)"

    def __call__(self, x, t, cond):
        feeds = self.contract.numpy_feeds(x, t, cond)
        (eps,) = self.session.run([EPS], feeds)  # (B, 3, H, W) float32
        return torch.from_numpy(eps)

    def close(self):
        self.session = None


class OrtCUDABackend(Backend):
    """ONNX Runtime CUDA provider with IO binding onto torch CUDA tensors; optional CUDA graph."""

    provider = "CUDAExecutionProvider"

    def __init__(self, info: ModelInfo, device: str | None = None, cuda_graph: bool = False):
        self.info = info
        self.contract = _contract(info)
        self.device = cuda_device(device)
        self.cuda_graph = bool(cuda_graph)
        self.session = _session(info.path, self._providers())
        self._bufs: dict[int, dict[str, torch.Tensor]] = {}  # batch -> fixed buffers (needed by CUDA graphs)

    def _cuda_options(self) -> dict:
        opts = {"device_id": self.device.index}
        if self.cuda_graph:
            opts["enable_cuda_graph"] = "1"
        return opts

    def _providers(self) -> list:
        return [(self.provider, self._cuda_options())]

    @classmethod
    def available(cls):
        try:
            providers = _providers()
        except ImportError:
            return False, "onnxruntime-gpu is not installed (pip install 'medi-fast[gpu]')"
        if cls.provider not in providers:
            return False, f"onnxruntime has no {cls.provider} (install onnxruntime-gpu)"
        if not torch.cuda.is_available():
            return False, "no CUDA GPU"
        return provider_loads(cls.provider)  # built with it is not enough: its libraries must load

    def _buffers(self, batch: int) -> dict[str, torch.Tensor]:
        if batch not in self._bufs:
            self._bufs[batch] = {s.name: torch.empty(s.shape_for(batch), dtype=s.torch_dtype, device=self.device)
                                 for s in self.contract.inputs + self.contract.outputs}
        return self._bufs[batch]

    def __call__(self, x, t, cond):
        import onnxruntime as ort

        batch = int(x.shape[0])
        feeds = self.contract.torch_feeds(x, t, cond, self.device)
        bufs = self._buffers(batch)
        for name, v in feeds.items():
            bufs[name].copy_(v)
        binding = self.session.io_binding()
        for s in self.contract.inputs + self.contract.outputs:
            b = bufs[s.name]
            bind = binding.bind_input if s.name in feeds else binding.bind_output
            bind(s.name, "cuda", self.device.index, s.numpy_dtype, tuple(b.shape), b.data_ptr())
        run_options = ort.RunOptions()
        if self.cuda_graph:
            # One captured graph per batch size; addresses stay fixed because the buffers are cached.
            run_options.add_run_config_entry("gpu_graph_id", str(batch))
        # ORT launches on its own stream; make the copies above visible to it first.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding, run_options)
        return bufs[EPS].clone()

    def close(self):
        self.session = None
        self._bufs.clear()


class OrtTensorRTBackend(OrtCUDABackend):
    """ONNX Runtime TensorRT provider: the graph's precision, engines cached beside the model, timing
    cache, profile; no CUDA graph (see the module docstring)."""

    provider = "TensorrtExecutionProvider"

    def __init__(self, info: ModelInfo, device: str | None = None, cuda_graph: bool = False,
                 cache_dir: str | None = None):
        if cuda_graph:
            raise MediFastError("ort-trt cannot keep a CUDA graph per batch size: ONNX Runtime's TensorRT provider "
                                "captures one graph per session and needs fixed input shapes (gpu_graph_id is the CUDA "
                                "provider's); drop cuda_graph, or use --backend tensorrt (one graph per batch size) or "
                                "ort-cuda with cuda_graph=True")
        self.fp16 = info.extra.get("precision") == "fp16"
        self.cache_dir = Path(cache_dir or Path(info.path).parent / "ort-trt-cache")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        why = preload_tensorrt()
        if why:
            raise MediFastError(f"ort-trt needs TensorRT loaded before its provider starts: {why} or use --backend ort-cuda")
        super().__init__(info, device=device, cuda_graph=False)

    def _providers(self) -> list:
        def shapes(i: int) -> str:
            return ",".join(f"{n}:{'x'.join(map(str, p[i]))}" for n, p in self.contract.profile().items())

        trt_opts = {
            "device_id": self.device.index,
            # precision follows the graph: fp16 kernels for the fp16 graph (whose fp32 pins are casts), none for fp32
            "trt_fp16_enable": str(self.fp16),
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(self.cache_dir),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(self.cache_dir),
            "trt_builder_optimization_level": "3",
            "trt_profile_min_shapes": shapes(0),
            "trt_profile_opt_shapes": shapes(1),
            "trt_profile_max_shapes": shapes(2),
        }
        return [(self.provider, trt_opts), ("CUDAExecutionProvider", {"device_id": self.device.index})]

    def __call__(self, x, t, cond):
        self.contract.check_batch(int(x.shape[0]))
        return super().__call__(x, t, cond)
