"""The fp16 accuracy gate: a reduced-precision model is handed back only if it matches fp32.

Backend-agnostic: the gate compares two denoisers ``(x, t, cond) -> eps`` (``check_denoiser`` of
medi_fast/backends/accuracy.py: relative eps error over a probe set of timesteps 0..999 and every
id, NaN/inf count).  Above the bound it does not return a silently wrong model: it asks the
caller's builder for a candidate with more nodes pinned to fp32, stage by stage, records which
stage passed, and refuses in one line when none does.

It judges eps, not images after a DDIM run: eps error is what fp16 changes and is meaningful for
any weights, while a many-step run amplifies a 1e-3 eps difference chaotically for untrained
weights (17-21 uint8 levels on random tiny-32 checkpoints whose eps error is 1e-3) and so would
refuse models that are fine (docs/engines.md, "The fp16 accuracy gate").

It runs where the fp16 model runs with fp16 arithmetic: on a CUDA GPU (ONNX Runtime CUDA for the
fp16 graph, the TensorRT build for an engine).  ONNX Runtime's CPU provider has no fp16 kernels
for most ops and computes them in fp32 around casts, so a CPU figure would not be the GPU's; an
export on a machine without a GPU writes the default-stage graph marked as not yet gated, and the
runtime gates it the first time it is picked to run on a GPU (``backends.export_candidates``).

Stages (cumulative; node sets computed on the fp32 ONNX graph, engines/fp16.py):

1. ``default``: normalisations, Softmax, every ancestor of Sin/Cos (what every fp16 build pins);
2. ``conditioning``: + every node that does not depend on the image (timestep and attribute
   embeddings, their MLPs): overflows there corrupt every step of every image;
3. ``matmul``: + MatMul/Gemm (attention products and linear layers).

Bound: relative eps error <= 1e-2 (accuracy.FP16_REL), no NaN/inf.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from medi_fast.backends.accuracy import FP16_REL, DenoiserCheck, check_denoiser
from medi_fast.errors import MediFastError
from medi_fast.io import atomic_files

from .fp16 import conditioning_node_names, matmul_node_names

STAGES = ("default", "conditioning", "matmul")


def stage_nodes(graph, stage: str) -> set[str]:
    """Extra fp32 node names of ``stage`` (cumulative), beyond the default rule."""
    if stage not in STAGES:
        raise MediFastError(f"unknown fp16 gate stage {stage!r}; use one of {', '.join(STAGES)}")
    names: set[str] = set()
    if STAGES.index(stage) >= 1:
        names |= conditioning_node_names(graph)
    if STAGES.index(stage) >= 2:
        names |= matmul_node_names(graph)
    return names


@dataclass
class GateResult:
    stage: str  # the stage whose candidate passed
    check: DenoiserCheck
    candidate: object  # the passing denoiser (or whatever the builder returned)
    attempts: list[tuple[str, DenoiserCheck]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "ok": self.check.ok,
                "attempts": [{"stage": s, **c.to_dict()} for s, c in self.attempts]}


def fp16_gate(reference, build_candidate: Callable[[str], object], contract, spec, *, stages=STAGES,
              rel_bound: float = FP16_REL, what: str = "the fp16 model",
              instead: str = "export without it (--no-fp16)") -> GateResult:
    """The first stage whose candidate passes; ``build_candidate(stage)`` returns a denoiser.

    Candidates that fail are closed (when they have ``close``) before the next is built.
    """
    attempts: list[tuple[str, DenoiserCheck]] = []
    for stage in stages:
        candidate = build_candidate(stage)
        check = check_denoiser(reference, candidate, contract, spec, rel_bound=rel_bound)
        attempts.append((stage, check))
        if check.ok:
            return GateResult(stage, check, candidate, attempts)
        if hasattr(candidate, "close"):
            candidate.close()
    last = attempts[-1][1].summary() if attempts else "no stage tried"
    raise MediFastError(f"{what} does not match fp32 even with {stages[-1] if stages else 'no'} layers pinned to fp32 "
                        f"({last}); {instead} or report this with the checkpoint")


# Recorded in the fp16 graph's metadata (``medi_fast.fp16_gate``) when it was written without a gate.
PENDING = "not gated at export (no GPU there): gated on first use on a CUDA backend"


def native_fp16_backend() -> str | None:
    """The backend that runs an fp16 graph with fp16 arithmetic on this machine, or None."""
    from medi_fast import backends

    return "ort-cuda" if backends.BACKENDS["ort-cuda"].availability()[0] else None


def fp16_graph(onnx_path: Path, stage: str, gate: dict | None):
    """The fp16 version of the fp32 graph at ``onnx_path`` with ``stage``'s nodes pinned and its
    metadata set (loaded afresh and converted in place: one copy of the weights)."""
    import onnx

    from .export import set_metadata
    from .fp16 import convert_to_fp16

    fp32 = onnx.load(str(onnx_path))
    meta = {**{p.key: p.value for p in fp32.metadata_props}, "medi_fast.precision": "fp16"}
    graph16 = convert_to_fp16(fp32, extra_fp32=stage_nodes(fp32.graph, stage))
    del fp32
    if gate is not None:
        meta["medi_fast.fp16_gate"] = json.dumps(gate)
    set_metadata(graph16, meta)
    return graph16


def write_fp16_ungated(onnx_path, fp16_path, *, external_data_threshold: int | None = None) -> Path:
    """The default-stage fp16 copy of an exported .onnx, written atomically and marked as not yet
    gated (its metadata's ``medi_fast.fp16_gate`` holds ``ok: null`` and :data:`PENDING`)."""
    from .export import PROTOBUF_LIMIT, save_checked

    onnx_path, fp16_path = Path(onnx_path), Path(fp16_path)
    graph16 = fp16_graph(onnx_path, "default", {"stage": "default", "ok": None, "pending": PENDING})
    with atomic_files(fp16_path.with_name(fp16_path.name + ".data"), fp16_path) as tmpdir:
        save_checked(graph16, tmpdir / fp16_path.name, external_data_threshold or PROTOBUF_LIMIT)
        del graph16  # an fp16 copy of the weights: freed before the files are moved
    return fp16_path


def write_fp16_gated(onnx_path, fp16_path, *, backend: str, external_data_threshold: int | None = None,
                     stages=STAGES) -> GateResult:
    """fp16 copy of an exported .onnx through the gate, written atomically at ``fp16_path``.

    The reference is the fp32 graph and each candidate the fp16 graph with the stage's extra nodes
    pinned, both on ``backend`` (``native_fp16_backend()`` in an export; the tests use ``ort-cpu``,
    whose fp32-emulated figures still exercise the stages).  Only the passing graph is written;
    its metadata records ``medi_fast.fp16_gate`` (stage, backend and figures).
    """
    import onnx

    from medi_fast import backends

    from .export import PROTOBUF_LIMIT, save_checked, set_metadata

    onnx_path, fp16_path = Path(onnx_path), Path(fp16_path)
    info = backends.open_model(onnx_path)
    reference = backends.create(backend, info)
    try:
        # candidates in subfolders of the staging directory; only the passing graph is moved into place
        with atomic_files(fp16_path.with_name(fp16_path.name + ".data"), fp16_path) as tmpdir:
            staged: dict[str, Path] = {}

            def build(stage: str):
                path = tmpdir / stage / fp16_path.name
                path.parent.mkdir()
                save_checked(fp16_graph(onnx_path, stage, None), path, external_data_threshold or PROTOBUF_LIMIT)
                staged[stage] = path
                return backends.create(backend, backends.open_model(path))

            result = fp16_gate(reference, build, info.contract, info.spec, stages=stages)
            result.candidate.close()
            final = onnx.load(str(staged[result.stage]))
            meta = {p.key: p.value for p in final.metadata_props}
            meta["medi_fast.fp16_gate"] = json.dumps({**result.to_dict(), "backend": backend})
            set_metadata(final, meta)
            save_checked(final, tmpdir / fp16_path.name, external_data_threshold or PROTOBUF_LIMIT)
        return result
    finally:
        reference.close()
