"""``medi-fast export`` as one library call: a checkpoint -> an export directory.

The directory holds everything this machine can run: ``model.onnx`` (fp32, conditioning folded in),
``model.fp16.onnx`` (fp16 with normalisations and the timestep/metadata encodings in fp32, through
the fp16 accuracy gate of ``engines/gate.py``),
``model.engine`` (+ sidecar) when TensorRT and a CUDA GPU are present, ``parity.json`` and
``export.json`` (the resolved settings and the files written).  What cannot be built here is
skipped with its reason; asking for it explicitly (``tensorrt=True``) fails before any work.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from medi_fast import checkpoint as ckpt_io
from medi_fast.backends.contract import IOContract
from medi_fast.errors import MediFastError
from medi_fast.io import atomic_write_text, ensure_dir

from .export import ExportConfig, export_onnx

EXPORT_RECORD = "export.json"


def default_out_dir(checkpoint) -> Path:
    """Where ``medi-fast export CKPT`` writes without ``--out``: ``CKPT_STEM.export/`` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".export")


@dataclass
class ExportResult:
    out_dir: Path
    onnx: Path
    fp16: Path | None = None
    engine: Path | None = None
    report: object = None  # engines.parity.ParityReport
    skipped: list[str] = field(default_factory=list)  # "what: why" for each part not built here
    seconds: float = 0.0

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.onnx, self.fp16, self.engine) if p is not None]


def tensorrt_unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot be built here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (pip install 'medi-fast[gpu]' on a CUDA machine)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU here (build the engine on the machine that will run it)"
    return None


def export_checkpoint(checkpoint, out_dir=None, *, config: ExportConfig = ExportConfig(), fp16: bool = True,
                      tensorrt: bool | None = None, optimization_level: int = 3, parity_steps: int = 10,
                      log: Callable[[str], None] = lambda _: None) -> ExportResult:
    """Export ``checkpoint`` into ``out_dir`` (default :func:`default_out_dir`).

    ``tensorrt``: True builds the engine or fails up front, False skips it, None builds it when
    TensorRT and a GPU are present and records why not otherwise.  Raises MediFastError when the
    parity check fails (the files stay for inspection, ``export.json`` says so).
    """
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(checkpoint)
    skipped: list[str] = []
    if tensorrt:  # fail before the slow part when the build cannot happen here
        from .tensorrt_build import check_can_build

        check_can_build()
    elif tensorrt is None:
        why = tensorrt_unavailable_reason()
        if why:
            skipped.append(f"TensorRT engine: {why}")
        tensorrt = why is None
    ck = ckpt_io.load(checkpoint)
    ensure_dir(out_dir)
    log(f"exporting {checkpoint} to {out_dir}/")
    t0 = time.perf_counter()
    result = ExportResult(out_dir, export_onnx(ck, out_dir / "model.onnx", config), skipped=skipped)
    log(f"wrote {result.onnx} ({result.onnx.stat().st_size / 1e6:.1f} MB, opset {config.opset}, "
        f"{time.perf_counter() - t0:.1f} s)")
    if fp16:
        from .gate import write_fp16_gated

        gate = write_fp16_gated(result.onnx, out_dir / "model.fp16.onnx", ddim_steps=parity_steps,
                                external_data_threshold=config.external_data_threshold)
        result.fp16 = out_dir / "model.fp16.onnx"
        if gate.stage != "default":
            log(f"fp16 gate: passed with the {gate.stage} layers also pinned to fp32")
        log(f"wrote {result.fp16} ({result.fp16.stat().st_size / 1e6:.1f} MB)")
    else:
        skipped.append("fp16 ONNX: --no-fp16")
    from .parity import run_parity

    contract = IOContract.from_spec(ck.spec, ck.resolution, config.batch)
    result.report = run_parity(ck.build(ema=config.ema), result.onnx, contract, fp16_path=result.fp16,
                               ddim_steps=parity_steps)
    atomic_write_text(out_dir / "parity.json", json.dumps(result.report.to_dict(), indent=2))
    if tensorrt and result.report.ok:
        from .tensorrt_build import BuildConfig, build_engine

        result.engine = build_engine(result.onnx, out_dir / "model.engine",
                                     BuildConfig(optimization_level=optimization_level),
                                     rebuild_command=f"medi-fast export {checkpoint} --out {out_dir} --tensorrt "
                                                     f"--batch {config.batch}")
        log(f"wrote {result.engine} (+ {result.engine.name}.json)")
    result.seconds = time.perf_counter() - t0
    record = {"checkpoint": str(checkpoint), "checkpoint_hash": ck.hash, "out": str(out_dir),
              "opset": config.opset, "batch": str(config.batch), "fp16": result.fp16 is not None,
              "tensorrt": result.engine is not None, "ema": config.ema, "optimization_level": optimization_level,
              "parity_steps": parity_steps, "parity_ok": result.report.ok,
              "files": [p.name for p in result.files], "skipped": skipped}
    atomic_write_text(out_dir / EXPORT_RECORD, json.dumps(record, indent=2))
    if not result.report.ok:
        bad = "; ".join(f"{r.check}: {r.value:.3g} > {r.threshold:.0e}" for r in result.report.rows if not r.ok)
        raise MediFastError(f"parity check failed ({bad}); the files in {out_dir} were written for inspection, "
                            f"do not deploy them")
    return result
