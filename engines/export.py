"""ONNX export with the Conditioner folded in.

The exported graph takes integer ids (one ``(B,)`` tensor per attribute) and returns eps; the
embedding tables are graph constants, so a batch job needs only the .onnx file.  Names, dtypes
and the dynamic batch axis come from the one IOContract (medi_fast.backends.contract).

Exporter: torch's TorchScript exporter (``dynamo=False``).  In torch 2.14 the dynamo exporter
fails on MeDiUNet: the Conditioner's ModuleDict key ``class`` is a Python keyword, which breaks
FX code generation (``self.m.conditioner.tables.class.weight``); the TorchScript path gives a
clean graph (GroupNorm as InstanceNormalization + affine, constants folded) with a dynamic batch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

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
    that also needs it builds it once.  Its weights are released once the graph is traced (moved
    to the meta device): the graph and the model never hold the weights together past the export,
    and the caller must not use the model afterwards.
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
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(wrapper, args, str(raw), input_names=contract.input_names,
                              output_names=contract.output_names, dynamic_axes=contract.dynamic_axes(),
                              opset_version=config.opset, do_constant_folding=True, dynamo=False)
        # the graph holds the weights now: release the model's before loading it (see the docstring)
        model.to("meta")
        del wrapper, model
        graph = onnx.load(str(raw))  # pulls external data back in if the exporter wrote any
        meta = onnx_info.metadata(
            ckpt.spec, ckpt.schedule, preset=ckpt.preset, checkpoint_hash=ckpt.hash, resolution=ckpt.resolution,
            contract=contract, precision="fp32", unet_config=ckpt.unet_config,
            provenance={**ckpt.provenance, "export": {"opset": config.opset, "torch": torch.__version__,
                                                      "onnx": onnx.__version__, "ema": config.ema}})
        set_metadata(graph, meta)
        save_checked(graph, tmpdir / out_path.name, config.external_data_threshold)
    return out_path


def set_metadata(graph, meta: dict[str, str]) -> None:
    del graph.metadata_props[:]
    for k, v in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = k, v


def weight_bytes(graph) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in graph.graph.initializer)


def save_checked(graph, path: Path, external_data_threshold: int = PROTOBUF_LIMIT) -> Path:
    """Save (external data above the threshold), then run the checker and strict shape inference."""
    import onnx

    path = Path(path)
    external = weight_bytes(graph) > external_data_threshold
    if external:
        onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(graph, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=False)
        inferred = onnx.shape_inference.infer_shapes(without_weights(graph), check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise MediFastError(f"the exported graph failed the ONNX checker ({str(e).splitlines()[0][:160]}); "
                            f"try --opset 18") from None
    out = inferred.graph.output[0].type.tensor_type.shape.dim
    if not out or out[0].dim_param != "batch":
        raise MediFastError("the exported graph lost its dynamic batch axis; report this with the checkpoint's preset")
    return path
