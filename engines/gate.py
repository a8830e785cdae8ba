"""The fp16 accuracy gate: a reduced-precision model is handed back only if it matches fp32.

Backend-agnostic: the gate compares two denoisers ``(x, t, cond) -> eps`` (engines/parity.py's
``check_denoiser``: relative eps error over a probe set of timesteps 0..999 and every id, NaN/inf
count, and the uint8 images after a DDIM run).  Above the bound it does not return a silently wrong
model: it asks the caller's builder for a candidate with more nodes pinned to fp32, stage by stage,
records which stage passed, and refuses in one line when none does.

Stages (cumulative; node sets computed on the fp32 ONNX graph, engines/fp16.py):

1. ``default``: normalisations, Softmax, every ancestor of Sin/Cos (what every fp16 build pins);
2. ``conditioning``: + every node that does not depend on the image (timestep and attribute
   embeddings, their MLPs): overflows there corrupt every step of every image;
3. ``matmul``: + MatMul/Gemm (attention products and linear layers).

Bounds: relative eps error <= 1e-2 (parity.FP16_REL) and DDIM images within 8 uint8 levels
(parity.IMAGE_LEVELS), no NaN/inf.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from medi_fast.errors import MediFastError

from .fp16 import conditioning_node_names, matmul_node_names
from .parity import FP16_REL, IMAGE_LEVELS, DenoiserCheck, check_denoiser

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
              rel_bound: float = FP16_REL, ddim_steps: int = 10, image_bound: int = IMAGE_LEVELS,
              what: str = "the fp16 model") -> GateResult:
    """The first stage whose candidate passes; ``build_candidate(stage)`` returns a denoiser.

    Candidates that fail are closed (when they have ``close``) before the next is built.
    """
    attempts: list[tuple[str, DenoiserCheck]] = []
    for stage in stages:
        candidate = build_candidate(stage)
        check = check_denoiser(reference, candidate, contract, spec, rel_bound=rel_bound, ddim_steps=ddim_steps,
                               image_bound=image_bound)
        attempts.append((stage, check))
        if check.ok:
            return GateResult(stage, check, candidate, attempts)
        if hasattr(candidate, "close"):
            candidate.close()
    last = attempts[-1][1].summary() if attempts else "no stage tried"
    raise MediFastError(f"{what} does not match fp32 even with {stages[-1] if stages else 'no'} layers pinned to fp32 "
                        f"({last}); use the fp32 model (drop --fp16) or report this with the checkpoint")


def write_fp16_gated(onnx_path, fp16_path, *, ddim_steps: int = 10, external_data_threshold: int | None = None,
                     stages=STAGES) -> GateResult:
    """fp16 copy of an exported .onnx through the gate, written atomically at ``fp16_path``.

    The reference is the fp32 graph on ONNX Runtime CPU; each candidate is the fp16 graph with the
    stage's extra nodes pinned, also on ONNX Runtime CPU.  Only the passing graph is written;
    its metadata records ``medi_fast.fp16_gate`` (stage and figures).
    """
    import json
    import shutil
    import tempfile

    import onnx

    from medi_fast import backends

    from .export import PROTOBUF_LIMIT, move_into_place, save_checked, set_metadata
    from .fp16 import convert_to_fp16

    onnx_path, fp16_path = Path(onnx_path), Path(fp16_path)
    fp32 = onnx.load(str(onnx_path))
    info = backends.open_model(onnx_path)
    reference = backends.create("ort-cpu", info)
    tmpdir = Path(tempfile.mkdtemp(prefix=".medi-tmp-fp16-", dir=fp16_path.parent))
    staged: dict[str, Path] = {}

    def build(stage: str):
        graph16 = convert_to_fp16(fp32, extra_fp32=stage_nodes(fp32.graph, stage))
        set_metadata(graph16, {**{p.key: p.value for p in fp32.metadata_props}, "medi_fast.precision": "fp16"})
        path = tmpdir / stage / fp16_path.name
        path.parent.mkdir()
        save_checked(graph16, path, external_data_threshold or PROTOBUF_LIMIT)
        staged[stage] = path
        return backends.create("ort-cpu", backends.open_model(path))

    try:
        result = fp16_gate(reference, build, info.contract, info.spec, stages=stages, ddim_steps=ddim_steps)
        result.candidate.close()
        path = staged[result.stage]
        final = onnx.load(str(path))
        meta = {p.key: p.value for p in final.metadata_props}
        meta["medi_fast.fp16_gate"] = json.dumps(result.to_dict())
        set_metadata(final, meta)
        save_checked(final, path, external_data_threshold or PROTOBUF_LIMIT)
        move_into_place(path, fp16_path)
        return result
    finally:
        reference.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
