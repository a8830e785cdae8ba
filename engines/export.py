"""ONNX export with the Conditioner folded in.

The exported graph takes integer ids (one ``(B,)`` tensor per attribute) and returns eps; the
embedding tables are graph constants, so a batch job needs only the .onnx file.  Names, dtypes
and the dynamic batch axis come from the one IOContract (medi_fast.backends.contract).

Exporter: torch's TorchScript exporter (``dynamo=False``).  In torch 2.14 the dynamo exporter
fails on MeDiUNet: the Conditioner's ModuleDict key ``class`` is a Python keyword, which breaks
FX code generation (``self.m.conditioner.tables.class.weight``); the TorchScript path gives a
clean graph (GroupNorm as InstanceNormalization + affine, constants folded) with a dynamic batch.

Memory: the weights are held once.  The exporter is run without its initializers
(:func:`initializers_kept_out`) and the file is written one tensor at a time straight from the
model's tensors (:func:`write_onnx`); the ONNX checker reads the written graph without its large
tensors (:func:`check_onnx`).  On medi-128 (1.55 GiB of fp32 weights) this keeps the export's peak
near the weights plus the runtime's own memory instead of four copies of the weights
(``benchmarks/RESULTS.md``, "What an export costs").
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from medi_fast.backends import onnx_info
from medi_fast.backends.contract import BatchRange, IOContract
from medi_fast.checkpoint import Checkpoint
from medi_fast.errors import MediFastError
from medi_fast.io import atomic_files

from .fp16 import without_weights

# ONNX protobufs cannot exceed 2 GiB; above this the weights go to a side file.
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2
# Initializers above this many bytes are written from their tensors' memory and checked as references
# (the threshold fp16.without_weights uses: shape constants below it keep their data).
LARGE_TENSOR = 4096
OPSETS = (17, 18, 19, 20)


@dataclass(frozen=True)
class ExportConfig:
    # 18: the first opset whose Resize/reduction ops TensorRT 10 and ONNX Runtime >= 1.17 both take
    # as exported; 19 also works (ints/strings in metadata only).  17 and 20 are accepted for
    # older/newer runtimes but not tested in CI.
    opset: int = 18
    batch: BatchRange = BatchRange()
    # EMA weights are what the published models generate with.
    ema: bool = True
    # Batch of the example input traced by the exporter; any value works (the axis is dynamic),
    # 2 avoids the exporter specialising size-1 broadcasts.
    trace_batch: int = 2
    external_data_threshold: int = PROTOBUF_LIMIT

    def __post_init__(self):
        if self.opset not in OPSETS:
            raise MediFastError(f"--opset {self.opset} is not supported; use 18 (default) or 19")


class ConstantScaleAttnProcessor:
    """diffusers self-attention written out with the softmax scale as a Python constant.

    diffusers' default processor calls ``F.scaled_dot_product_attention`` without ``scale``; the
    TorchScript exporter then computes 1/sqrt(head_dim) from the runtime shape (Shape -> Slice ->
    Cast -> Sqrt -> Div -> Sqrt).  ONNX Runtime places that shape arithmetic on the CPU and feeds
    its float result to GPU nodes, and a session with any host copy cannot capture a CUDA graph.
    Here the scale is ``attn.scale`` (a float fixed at construction), so the exported attention is
    MatMul -> Mul(constant) -> Softmax -> MatMul.  Same arithmetic as the default: eps parity with
    torch is unchanged (tests/test_engines_export.py).  Used only for export.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise MediFastError("export supports the UNet's self-attention only (no cross-attention or mask); "
                                "export a medi-fast preset")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.ndim == 4
        if image:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        heads = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)  # (B, N, inner)
        head_dim = attn.to_k.out_features // heads  # a Python int, not a traced shape

        def split(z):  # (B, N, inner) -> (B, heads, N, head_dim)
            return z.unflatten(-1, (heads, head_dim)).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        weights = torch.matmul(q, k.transpose(-1, -2)) * float(attn.scale)  # (B, heads, N, N)
        out = torch.matmul(weights.softmax(dim=-1), v)  # (B, heads, N, head_dim)
        hidden_states = out.transpose(1, 2).flatten(2).to(q.dtype)  # (B, N, inner)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if image:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_constant_scale_attention(model: nn.Module) -> int:
    """Give every diffusers Attention in ``model`` the ConstantScaleAttnProcessor; returns how many."""
    from diffusers.models.attention_processor import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for m in layers:
        m.set_processor(ConstantScaleAttnProcessor())
    return len(layers)


def host_float_nodes(graph) -> list:
    """Nodes computing floating-point values from tensor shapes alone (ONNX graph check).

    A tensor is shape-derived when it comes from Shape/Size, or from a node whose every input is
    shape-derived or constant.  ONNX Runtime keeps such small shape computations on the CPU; integer
    ones feed Reshape/Expand shape inputs (read on the host anyway), but a float one feeds GPU
    arithmetic through a host-to-device copy, which rules out CUDA-graph capture.
    """
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    constant = {i.name for i in graph.initializer}
    shaped: set[str] = set()
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in list(graph.value_info) + list(graph.output)}
    flagged = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        ins = [i for i in node.input if i]
        if node.op_type == "Constant":
            constant.update(node.output)
            continue
        if node.op_type == "ConstantOfShape":
            # reads the shape on the host and fills a device tensor with a constant: a GPU kernel
            continue
        derived = node.op_type in ("Shape", "Size") or (
            ins and all(i in shaped or i in constant for i in ins) and any(i in shaped for i in ins))
        if not derived:
            continue
        shaped.update(node.output)
        out_float = any(elem.get(o) in floats for o in node.output)
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            out_float = out_float or to in floats
        if out_float:
            flagged.append(node)
    return flagged


class FoldedDenoiser(nn.Module):
    """eps = MeDiUNet(sample, timestep, {attr: ids}) with positional id inputs, in spec order."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.names = list(model.spec.names)

    def forward(self, sample, timestep, *ids):  # (B,3,H,W) float32, (B,) int64, (B,) ids...
        return self.model(sample, timestep, dict(zip(self.names, ids)))  # (B, 3, H, W)


def example_inputs(contract: IOContract, spec, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs that follow the contract: valid ids (null included), timesteps over [0, 1000)."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(contract.tensor("sample").shape_for(batch), generator=g),
           torch.randint(0, 1000, (batch,), generator=g)]
    for a in spec.attributes:
        if a.vocab is not None:
            out.append(torch.randint(0, len(a.vocab) + 1, (batch,), generator=g))
        else:
            out.append(torch.rand(batch, generator=g) * 90)
    return tuple(out)


def export_onnx(ckpt: Checkpoint, out_path, config: ExportConfig = ExportConfig(), *, model=None) -> Path:
    """Write ``out_path`` (.onnx, fp32) atomically, checked and self-describing; returns the path.

    ``model``: the checkpoint's model already built (with ``config.ema``'s weights), so a caller
    that also needs it builds it once.  Its weights are written straight from its tensors and then
    released (moved to the meta device): the caller must not use the model afterwards.
    """
    import onnx

    out_path = Path(out_path)
    model = (model if model is not None else ckpt.build(ema=config.ema)).float().eval()
    use_constant_scale_attention(model)  # no shape-derived float math in the graph
    contract = IOContract.from_spec(ckpt.spec, ckpt.resolution, config.batch)
    wrapper = FoldedDenoiser(model).eval()
    args = example_inputs(contract, ckpt.spec, config.trace_batch)
    with atomic_files(out_path.with_name(out_path.name + ".data"), out_path) as tmpdir:
        raw = tmpdir / "raw.onnx"
        captured: dict[str, torch.Tensor] = {}
        with warnings.catch_warnings(), torch.no_grad(), initializers_kept_out(captured):
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(wrapper, args, str(raw), input_names=contract.input_names,
                              output_names=contract.output_names, dynamic_axes=contract.dynamic_axes(),
                              opset_version=config.opset, do_constant_folding=True, dynamo=False)
        if captured:
            graph, data = with_initializers(onnx.load(str(raw)), captured)
        else:  # a torch whose exporter does not call the hook wrote the weights itself: the same file,
            graph, data = onnx.load(str(raw)), {}  # with the exporter's copies of the weights in memory
        meta = onnx_info.metadata(
            ckpt.spec, ckpt.schedule, preset=ckpt.preset, checkpoint_hash=ckpt.hash, resolution=ckpt.resolution,
            contract=contract, precision="fp32", unet_config=ckpt.unet_config,
            provenance={**ckpt.provenance, "export": {"opset": config.opset, "torch": torch.__version__,
                                                      "onnx": onnx.__version__, "ema": config.ema}})
        set_metadata(graph, meta)
        save_checked(graph, tmpdir / out_path.name, config.external_data_threshold, data=data)
        # the file holds the weights now: release the model's (see the docstring)
        del data, captured, wrapper
        model.to("meta")
    return out_path


@contextlib.contextmanager
def initializers_kept_out(captured: dict):
    """Within this block torch's TorchScript exporter writes its graph without initializers;
    ``captured`` receives them (name -> tensor: the model's parameters and the constants it folded).

    Why: the exporter copies every weight into a C++ ModelProto, serialises that into a string and
    copies the string into Python bytes, so with the model's own tensors four copies of the weights
    are alive at once (7 GiB for medi-128).  Given no initializers it lists them as graph inputs
    instead; :func:`with_initializers` turns those back into initializers, in the same order and with
    the same bytes.  The hook is the binding ``torch._C.Graph._export_onnx`` that the exporter calls
    with the initializers as its first argument (checked on torch 2.14); the exporter has no public
    switch for it.  A torch that calls it otherwise (or not at all) exports as it always did, weights
    included, and ``captured`` stays empty.  It replaces a class attribute for the duration of the
    block, so two exports must not run in threads of one process at once.
    """
    cls = torch._C.Graph
    original = cls._export_onnx

    def export_without_initializers(graph, *args, **kwargs):
        if args and isinstance(args[0], dict):  # the signature checked on torch 2.14; any other is left alone
            captured.update(args[0])
            args = ({}, *args[1:])
        return original(graph, *args, **kwargs)

    cls._export_onnx = export_without_initializers
    try:
        yield captured
    finally:
        cls._export_onnx = original


def with_initializers(graph, tensors: Mapping[str, torch.Tensor]):
    """``graph`` (written by :func:`initializers_kept_out`) with each graph input named in ``tensors``
    turned into an initializer, as torch writes it (dims, data type, name, little-endian raw data).

    Returns ``(graph, data)``: initializers above :data:`LARGE_TENSOR` bytes are left without their
    bytes, which ``data`` holds by name as views of the tensors' memory (no copy) for
    :func:`write_onnx`.
    """
    import numpy as np
    from onnx import ValueInfoProto, helper

    g = graph.graph
    keep = []
    data: dict[str, memoryview] = {}
    for vi in g.input:
        t = tensors.get(vi.name)
        if t is None:
            kept = ValueInfoProto()
            kept.CopyFrom(vi)
            keep.append(kept)
            continue
        arr = t.detach().cpu().contiguous().numpy()
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)  # ONNX raw data is little-endian
        init = g.initializer.add()
        init.dims.extend(arr.shape)
        init.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        init.name = vi.name
        if arr.nbytes > LARGE_TENSOR:
            data[vi.name] = memoryview(arr.reshape(-1).view(np.uint8))
        else:
            init.raw_data = arr.tobytes()
    del g.input[:]
    g.input.extend(keep)
    return graph, data


def set_metadata(graph, meta: dict[str, str]) -> None:
    del graph.metadata_props[:]
    for k, v in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = k, v


def weight_bytes(graph, data: Mapping[str, memoryview] | None = None) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in graph.graph.initializer) + sum(
        len(d) for d in (data or {}).values())


def save_checked(graph, path: Path, external_data_threshold: int = PROTOBUF_LIMIT, *,
                 data: Mapping[str, memoryview] | None = None) -> Path:
    """Strict shape inference, then save (external data above the threshold), then the checker.

    ``data``: the bytes of initializers that ``graph`` holds without them, by name (see
    :func:`with_initializers`).  Neither step copies the weights: shape inference and the checker
    read the graph without its large tensors, and a single-file graph is written one tensor at a
    time (:func:`write_onnx`).
    """
    import onnx

    path = Path(path)
    data = data or {}
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(graph), check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as e:
        raise _checker_failed(e) from None
    out = inferred.graph.output[0].type.tensor_type.shape.dim
    if not out or out[0].dim_param != "batch":
        raise MediFastError("the exported graph lost its dynamic batch axis; report this with the checkpoint's preset")
    del inferred
    if weight_bytes(graph, data) > external_data_threshold:
        for t in graph.graph.initializer:  # a graph this large is written by onnx's external-data writer
            if t.name in data:
                t.raw_data = data[t.name].tobytes()
        onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        check_onnx(path)
    else:
        write_onnx(graph, path, data)
        check_onnx(path, graph)
    return path


def _checker_failed(e: Exception) -> MediFastError:
    return MediFastError(f"the exported graph failed the ONNX checker ({str(e).splitlines()[0][:160]}); "
                         f"try --opset 18")


def check_onnx(path: Path, graph=None) -> None:
    """The ONNX checker on the graph saved at ``path``.

    With ``graph`` (what was written there), the checker reads ``graph`` with its large
    initializers as references to ``path`` rather than the whole file: parsing a 1.6 GB file costs
    twice its size in memory.  The references are to the file just written (the checker requires a
    regular file); their byte counts were checked by :func:`write_onnx`.
    """
    import onnx

    path = Path(path)
    target = path
    if graph is not None:
        skel = without_weights(graph, LARGE_TENSOR)
        for t in skel.graph.initializer:
            if not _has_data(t):
                t.data_location = onnx.TensorProto.EXTERNAL
                entry = t.external_data.add()
                entry.key, entry.value = "location", path.name
        target = path.with_name(path.name + ".check.onnx")
        onnx.save_model(skel, str(target))
    try:
        onnx.checker.check_model(str(target), full_check=False)
    except onnx.checker.ValidationError as e:
        raise _checker_failed(e) from None
    finally:
        if target != path:
            target.unlink(missing_ok=True)


def _has_data(t) -> bool:
    return (t.HasField("raw_data") or t.data_location == 1 or bool(t.float_data) or bool(t.int32_data)
            or bool(t.int64_data) or bool(t.double_data) or bool(t.uint64_data) or bool(t.string_data))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(message, field: str) -> bytes:
    """The wire key of a length-delimited field (wire type 2)."""
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | 2)


def _around(message, field: str) -> tuple[bytes, bytes]:
    """The serialisation of ``message``'s fields numbered below and above ``field`` (left out).

    Protobuf writes known fields in field-number order, so ``before + field + after`` is what
    ``SerializeToString`` writes (tests/test_engines_export.py compares the two byte for byte).
    """
    number = message.DESCRIPTOR.fields_by_name[field].number
    before, after = type(message)(), type(message)()
    for fd, value in message.ListFields():
        if fd.number == number:
            continue
        dst = before if fd.number < number else after
        if hasattr(value, "extend"):  # a repeated field
            getattr(dst, fd.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # a message
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)
    return before.SerializeToString(), after.SerializeToString()


def write_onnx(model, path, data: Mapping[str, memoryview] | None = None) -> Path:
    """Write ``model`` to ``path`` as one .onnx file, the bytes ``onnx.save_model`` writes, one
    initializer at a time.

    Why not ``onnx.save_model``: it serialises the whole model into one buffer and copies that into
    Python bytes, two more copies of the weights beside the model's own (3.1 GB on medi-128).
    No library streams a protobuf message, so the framing of the three nested messages on the
    path to the weights (model -> graph -> initializer -> raw data) is written here; every other
    byte comes from protobuf.  ``data``: the raw bytes of initializers that ``model`` holds
    without them, by name (written from this memory, not copied).
    """
    import numpy as np
    from onnx import helper

    path, data = Path(path), data or {}
    g = model.graph
    parts = []  # per initializer: (its serialisation or None, its fields around raw_data, raw data)
    for t in g.initializer:
        if t.name in data:
            raw = data[t.name]
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            want = int(np.prod(t.dims, dtype=np.int64)) * itemsize
            if len(raw) != want:
                raise MediFastError(f"initializer {t.name} has {len(raw)} bytes for {want}; report this with the "
                                    f"checkpoint's preset")
            before, after = _around(t, "raw_data")
            size = len(before) + len(_key(t, "raw_data")) + len(_varint(len(raw))) + len(raw) + len(after)
            parts.append((t, size, (before, raw, after)))
        else:
            parts.append((t, t.ByteSize(), None))
    init_key = _key(g, "initializer")
    g_before, g_after = _around(g, "initializer")
    g_size = len(g_before) + sum(len(init_key) + len(_varint(size)) + size for _, size, _ in parts) + len(g_after)
    m_before, m_after = _around(model, "graph")
    with open(path, "wb") as f:
        f.write(m_before + _key(model, "graph") + _varint(g_size) + g_before)
        for t, size, split in parts:
            f.write(init_key + _varint(size))
            if split is None:
                f.write(t.SerializeToString())
            else:
                before, raw, after = split
                f.write(before + _key(t, "raw_data") + _varint(len(raw)))
                f.write(raw)
                f.write(after)
        f.write(g_after + m_after)
    return path
