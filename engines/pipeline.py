"""``medi-fast export`` as one library call: a checkpoint -> an export directory.

The directory holds everything this machine can run: ``model.onnx`` (fp32, conditioning folded in),
``model.fp16.onnx`` (fp16 with normalisations and the timestep/metadata encodings in fp32, through
the fp16 accuracy gate of ``engines/gate.py`` where a GPU runs it, marked for a gate on first GPU
use where none does),
``model.engine`` (+ sidecar) when TensorRT and a CUDA GPU are present, ``parity.json`` and
``export.json`` (the resolved settings and the files written; written last, it marks the
directory complete).  What cannot be built here is
skipped with its reason; asking for it explicitly (``tensorrt=True``) fails before any work.
"""
from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from medi_fast import checkpoint as ckpt_io
from medi_fast.backends.contract import IOContract
from medi_fast.backends import EXPORT_RECORD
from medi_fast.errors import MediFastError
from medi_fast.io import atomic_write_text, check_writable_dir, ensure_dir

from .export import ExportConfig, export_onnx
from .gate import PENDING, native_fp16_backend, write_fp16_gated, write_fp16_ungated
from .parity import PARITY_STEPS, compare, torch_reference

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
                      tensorrt: bool | None = None, optimization_level: int = 3, parity_steps: int = PARITY_STEPS,
                      log: Callable[[str], None] = lambda _: None) -> ExportResult:
    """Export ``checkpoint`` into ``out_dir`` (default :func:`default_out_dir`).

    ``tensorrt``: True builds the engine or fails up front, False skips it, None builds it when
    TensorRT and a GPU are present and records why not otherwise.  Raises MediFastError when the
    parity check fails (the files stay for inspection, ``export.json`` says so).

    ``export.json`` is removed first and written last: a directory without it is an export that
    did not finish, and the runtime refuses it (``backends.check_export_dir``).  Any other failure
    (a full disk, Ctrl-C, a refused fp16 gate) removes what this call wrote: a directory it created
    disappears.
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
    check_writable_dir(out_dir)
    created = not out_dir.exists()
    before = set(out_dir.iterdir()) if not created else set()
    ensure_dir(out_dir)
    try:
        (out_dir / EXPORT_RECORD).unlink(missing_ok=True)  # from here on the directory is incomplete
        return _export(ck, checkpoint, out_dir, config, fp16, tensorrt, optimization_level, parity_steps,
                       skipped, log)
    except ParityFailed as e:  # the files stay for inspection; export.json records the failure
        raise MediFastError(str(e)) from None
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            for p in set(out_dir.iterdir()) - before:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        raise


class ParityFailed(Exception):
    """The graph was written but misses a parity threshold (kept for inspection)."""


def _export(ck, checkpoint: Path, out_dir: Path, config: ExportConfig, fp16: bool, tensorrt: bool,
            optimization_level: int, parity_steps: int, skipped: list[str], log) -> ExportResult:
    log(f"exporting {checkpoint} to {out_dir}/")
    t0 = time.perf_counter()
    contract = IOContract.from_spec(ck.spec, ck.resolution, config.batch)
    # One copy of the weights at a time: the torch model is built once, the checkpoint's tensors are
    # dropped, the torch outputs the parity check needs are computed before the ONNX export, and the
    # model is freed before any ONNX Runtime session or fp16 copy holds the weights again.
    model = ck.build(ema=config.ema).float().eval()
    ck.state_dict, ck.ema_state_dict = {}, None
    gc.collect()
    reference = torch_reference(model, contract, ddim_steps=parity_steps)
    result = ExportResult(out_dir, export_onnx(ck, out_dir / "model.onnx", config, model=model), skipped=skipped)
    del model
    gc.collect()
    log(f"wrote {result.onnx} ({result.onnx.stat().st_size / 1e6:.1f} MB, opset {config.opset}, "
        f"{time.perf_counter() - t0:.1f} s)")
    result.report = compare(reference, result.onnx, contract)
    atomic_write_text(out_dir / "parity.json", json.dumps(result.report.to_dict(), indent=2))
    fp32_line = f"fp32 ONNX checked against the checkpoint: max eps error {result.report.rows[0].value:.2g}"
    gate_record: dict | None = None
    if fp16:
        result.fp16 = out_dir / "model.fp16.onnx"
        backend = native_fp16_backend()
        if backend is None:
            write_fp16_ungated(result.onnx, result.fp16, external_data_threshold=config.external_data_threshold)
            gate_record = {"ok": None, "pending": PENDING}
            log(f"fp16 graph written, gated on first GPU use (no GPU here to run fp16 arithmetic); {fp32_line}")
        else:
            gate = write_fp16_gated(result.onnx, result.fp16, backend=backend,
                                    external_data_threshold=config.external_data_threshold)
            gate_record = {**gate.to_dict(), "backend": backend}
            log(f"fp16 graph gated on {backend}: {gate.check.summary()}, stage {gate.stage}; {fp32_line}")
        log(f"wrote {result.fp16} ({result.fp16.stat().st_size / 1e6:.1f} MB)")
    else:
        skipped.append("fp16 ONNX: --no-fp16")
        log(f"{fp32_line}")
    if tensorrt and result.report.ok:
        from .tensorrt_build import BuildConfig, build_engine

        result.engine = build_engine(result.onnx, out_dir / "model.engine",
                                     BuildConfig(optimization_level=optimization_level), fp16_onnx=result.fp16,
                                     rebuild_command=f"medi-fast export {checkpoint} --out {out_dir} --tensorrt "
                                                     f"--batch {config.batch}")
        log(f"wrote {result.engine} (+ {result.engine.name}.json)")
    result.seconds = time.perf_counter() - t0
    record = {"checkpoint": str(checkpoint), "checkpoint_hash": ck.hash, "out": str(out_dir),
              "opset": config.opset, "batch": str(config.batch), "fp16": result.fp16 is not None,
              "fp16_gate": gate_record, "tensorrt": result.engine is not None, "ema": config.ema,
              "optimization_level": optimization_level, "parity_steps": parity_steps,
              "parity_ok": result.report.ok, "files": [p.name for p in result.files], "skipped": skipped}
    atomic_write_text(out_dir / EXPORT_RECORD, json.dumps(record, indent=2))
    if not result.report.ok:
        bad = "; ".join(f"{r.check}: {r.value:.3g} > {r.threshold:.0e}" for r in result.report.rows if not r.ok)
        raise ParityFailed(f"parity check failed ({bad}); the files in {out_dir} were written for inspection, "
                           f"do not deploy them")
    return result
