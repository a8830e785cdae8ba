"""fp16 ONNX graph with normalisation and the timestep encoding kept in fp32.

Why our own pass: onnxconverter-common 1.16's ``convert_float_to_float16`` leaves the exporter's
``Cast(to=FLOAT)`` nodes typed float while retyping their outputs (ORT refuses the graph), and with
``Cast`` on its block list it does not terminate on this graph.  The rule here is short:

- Kept in fp32 ("blocked"): normalisation (InstanceNormalization = the exported GroupNorm,
  GroupNormalization, LayerNormalization, ReduceMean / Pow / Sqrt chains of decomposed norms),
  Softmax, and every node upstream of Sin/Cos (the sinusoidal timestep and continuous-attribute
  encodings: fp16 cannot even represent t * freq near 1000 to within 0.5, so sin() of it is noise).
- Everything else computes in fp16: float32 initializers and Constant values become fp16,
  ``Cast(to=FLOAT)`` becomes ``Cast(to=FLOAT16)``.
- Where a tensor's producer and consumer disagree, one Cast is inserted (shared by consumers).
- Graph inputs and outputs keep their contract dtypes (float32 sample in, float32 eps out).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

BLOCKED_OPS = frozenset({"InstanceNormalization", "GroupNormalization", "LayerNormalization", "ReduceMean",
                         "Pow", "Sqrt", "Softmax", "Sin", "Cos"})
# (op, input index) pairs that ONNX types as float32 whatever the data type (Resize roi/scales).
FLOAT32_INPUTS = frozenset({("Resize", 1), ("Resize", 2)})


def _fp32_nodes(graph) -> set[int]:
    """Indices of nodes that stay fp32: blocked ops plus every ancestor of a Sin/Cos."""
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output}
    keep = {i for i, n in enumerate(graph.node) if n.op_type in BLOCKED_OPS}
    stack = [i for i, n in enumerate(graph.node) if n.op_type in ("Sin", "Cos")]
    while stack:
        for name in graph.node[stack.pop()].input:
            j = producer.get(name)
            if j is not None and j not in keep:
                keep.add(j)
                stack.append(j)
    return keep


def fp32_node_names(graph) -> set[str]:
    """Names of the nodes the fp16 graph keeps in fp32: the TensorRT build pins the same set."""
    return {graph.node[i].name for i in _fp32_nodes(graph) if graph.node[i].name}


def conditioning_node_names(graph, image_input: str = "sample") -> set[str]:
    """Nodes that do not depend on the image input: the timestep and conditioning path (embedding
    tables, sinusoidal encodings, their MLPs).  Small, and the first extra set the fp16 gate pins."""
    downstream = {image_input}
    names = set()
    for node in graph.node:  # topological order
        if any(i in downstream for i in node.input):
            downstream.update(node.output)
        elif node.name:
            names.add(node.name)
    return names


def matmul_node_names(graph) -> set[str]:
    """MatMul/Gemm nodes (attention products, linear layers): the gate's last extra set."""
    return {n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.name}


def without_weights(model, min_bytes: int = 4096):
    """A copy of ``model`` whose large initializers have types and dims but no bytes.

    ONNX shape inference serialises the whole model and returns a new one: on medi-128 that is two
    more copies of 1.6 GB (and above 2 GB it cannot serialise at all).  Types and dims are all it
    reads from large initializers; small ones (shape constants it does read) keep their data.
    A new message rather than clearing fields in place: protobuf's arena keeps a cleared field's
    bytes until the whole message is freed.
    """
    import onnx

    skel = onnx.ModelProto()
    skel.ir_version = model.ir_version
    skel.opset_import.extend(model.opset_import)
    skel.functions.extend(model.functions)
    g, src = skel.graph, model.graph
    g.name = src.name
    for part in ("node", "input", "output", "value_info"):
        getattr(g, part).extend(getattr(src, part))
    for init in src.initializer:
        if init.ByteSize() > min_bytes:
            t = g.initializer.add()
            t.name, t.data_type = init.name, init.data_type
            t.dims.extend(init.dims)
        else:
            g.initializer.append(init)
    return skel


def infer_shapes_light(model, **kwargs):
    """``onnx.shape_inference.infer_shapes`` that puts the inferred value_info into ``model`` itself
    without copying its weights (:func:`without_weights`); returns ``model``."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(without_weights(model), **kwargs)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def convert_to_fp16(model, extra_fp32: set[str] = frozenset()):
    """The fp16 version of a float32 ONNX model (see the module docstring for the rule).

    Converts in place, so the weights are held once: ``model`` becomes the fp16 graph (reload the
    fp32 graph for another conversion).  ``extra_fp32``: names of further nodes to keep in fp32 (the fp16
    gate's fallback stages).
    """
    from onnx import TensorProto, helper, numpy_helper

    model = infer_shapes_light(model)
    g = model.graph
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    elem = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        elem[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        elem[init.name] = init.data_type
    keep32 = _fp32_nodes(g) | {i for i, n in enumerate(g.node) if n.name in extra_fp32}

    # 1. precision each float tensor is produced in
    produced: dict[str, int] = {vi.name: F32 for vi in g.input if elem.get(vi.name) == F32}
    inits = {init.name: init for init in g.initializer}
    for i, node in enumerate(g.node):
        half = i not in keep32
        if node.op_type == "Cast":
            to = helper.get_attribute_value(next(a for a in node.attribute if a.name == "to"))
            if to == F32 and half:
                for a in node.attribute:
                    if a.name == "to":
                        a.i = F16
                produced[node.output[0]] = F16
            elif to == F32:
                produced[node.output[0]] = F32
            continue
        if node.op_type == "Constant" and half:
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == F32:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
                    produced[node.output[0]] = F16
            continue
        for out in node.output:
            if elem.get(out) == F32:
                produced[out] = F16 if half else F32

    # 2. initializers: an fp16 copy for fp16 consumers, the original for fp32 ones
    needed: dict[str, set[int]] = defaultdict(set)
    for i, node in enumerate(g.node):
        for k, name in enumerate(node.input):
            if name in inits and inits[name].data_type == F32:
                fixed32 = (node.op_type, k) in FLOAT32_INPUTS
                needed[name].add(F32 if (i in keep32 or fixed32) else F16)
    renamed: dict[tuple[str, int], str] = {}
    for name, precisions in needed.items():
        if F16 in precisions:
            arr = numpy_helper.to_array(inits[name]).astype(np.float16)
            new = name if precisions == {F16} else name + "__fp16"
            t = numpy_helper.from_array(arr, new)
            if new == name:
                inits[name].CopyFrom(t)
            else:
                g.initializer.append(t)
            renamed[(name, F16)] = new
            produced[new] = F16
        if F32 in precisions:
            renamed[(name, F32)] = name
            produced[name] = F32

    # 3. rewire inputs, inserting one Cast per (tensor, precision) where they disagree
    casts: dict[tuple[str, int], str] = {}
    new_nodes = []
    for i, node in enumerate(g.node):
        for k, name in enumerate(node.input):
            if name not in produced or node.op_type == "Cast" or node.op_type == "Shape":
                continue
            want = F32 if (i in keep32 or (node.op_type, k) in FLOAT32_INPUTS) else F16
            if (name, want) in renamed:
                node.input[k] = renamed[(name, want)]
                continue
            if produced[name] == want:
                continue
            key = (name, want)
            if key not in casts:
                casts[key] = f"{name}__to{'16' if want == F16 else '32'}"
                new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=want,
                                                  name=f"fp16cast_{len(casts)}"))
            node.input[k] = casts[key]
        new_nodes.append(node)

    # 4. outputs keep their float32 contract
    for out in g.output:
        if produced.get(out.name) == F16:
            inner = out.name + "__fp16"
            for n in new_nodes:
                n.output[:] = [inner if o == out.name else o for o in n.output]
                n.input[:] = [inner if x == out.name else x for x in n.input]
            new_nodes.append(helper.make_node("Cast", [inner], [out.name], to=F32, name=f"fp16cast_out_{out.name}"))
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    return infer_shapes_light(model, check_type=True, strict_mode=True)
