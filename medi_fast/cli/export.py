"""``medi-fast export CKPT --out DIR``: checkpoint -> self-describing ONNX (and fp16, TensorRT) + parity report."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..errors import MediFastError


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory, e.g. engines/NAME (model.onnx, model.fp16.onnx, model.engine, parity.json).")
@click.option("--fp16", is_flag=True, help="Also write model.fp16.onnx (normalisation and timestep encoding in fp32).")
@click.option("--batch", "batch", default="1,16,64", show_default=True,
              help="MIN,OPT,MAX batch of the engine's optimisation profile (recorded in the graph; used by TensorRT).")
@click.option("--tensorrt", is_flag=True, help="Also build an FP16 TensorRT engine (needs tensorrt and a CUDA GPU).")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset: 18 or 19.")
@click.option("--optimization-level", default=3, show_default=True, type=click.IntRange(0, 5),
              help="TensorRT builder optimisation level (0 fastest build .. 5 most kernel search).")
@click.option("--parity-steps", default=10, show_default=True, type=click.IntRange(0, 1000),
              help="DDIM steps of the whole-run ORT-vs-torch parity check (0 skips it).")
@click.option("--no-ema", is_flag=True, help="Export the raw weights instead of the EMA weights.")
def export(checkpoint: Path, out_dir: Path, fp16: bool, batch: str, tensorrt: bool, opset: int,
           optimization_level: int, parity_steps: int, no_ema: bool):
    """Compile CHECKPOINT into an engine directory and print the parity report.

    The .onnx takes `sample (B,3,H,W)`, `timestep (B,)` and one id tensor per conditioning
    attribute, and carries vocabularies, ConditionSpec, schedule and checkpoint hash, so
    `medi-fast generate DIR/model.onnx --class LUAD --tss 05` needs no checkpoint.
    """
    from .. import checkpoint as ckpt_io
    from ..backends.contract import BatchRange, IOContract
    from ..engines.export import ExportConfig, export_onnx
    from ..engines.parity import run_parity
    from ..io import atomic_write_text, ensure_dir

    config = ExportConfig(opset=opset, batch=BatchRange.parse(batch), ema=not no_ema)
    if tensorrt:  # fail before the slow part when the build cannot happen here
        from ..engines.tensorrt_build import check_can_build

        check_can_build()
    ck = ckpt_io.load(checkpoint)
    ensure_dir(out_dir)
    t0 = time.perf_counter()
    onnx_path = export_onnx(ck, out_dir / "model.onnx", config)
    click.echo(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB, opset {opset}, "
               f"{time.perf_counter() - t0:.1f} s)")
    fp16_path = None
    if fp16:
        from ..engines.gate import write_fp16_gated

        gate = write_fp16_gated(onnx_path, out_dir / "model.fp16.onnx", ddim_steps=parity_steps,
                                external_data_threshold=config.external_data_threshold)
        fp16_path = out_dir / "model.fp16.onnx"
        if gate.stage != "default":
            click.echo(f"fp16 gate: passed with the {gate.stage} layers also pinned to fp32")
        click.echo(f"wrote {fp16_path} ({fp16_path.stat().st_size / 1e6:.1f} MB)")
    contract = IOContract.from_spec(ck.spec, ck.resolution, config.batch)
    report = run_parity(ck.build(ema=config.ema), onnx_path, contract, fp16_path=fp16_path, ddim_steps=parity_steps)
    click.echo(report.table())
    atomic_write_text(out_dir / "parity.json", json.dumps(report.to_dict(), indent=2))
    engine_path = None
    if tensorrt:
        from ..engines.tensorrt_build import BuildConfig, build_engine

        engine_path = build_engine(onnx_path, out_dir / "model.engine",
                                   BuildConfig(optimization_level=optimization_level),
                                   rebuild_command=f"medi-fast export {checkpoint} --out {out_dir} --tensorrt "
                                                   f"--batch {config.batch}")
        click.echo(f"wrote {engine_path} (+ {engine_path.name}.json)")
    resolved = {"checkpoint": str(checkpoint), "checkpoint_hash": ck.hash, "out": str(out_dir), "opset": opset,
                "batch": str(config.batch), "fp16": fp16, "tensorrt": tensorrt, "ema": config.ema,
                "optimization_level": optimization_level, "parity_steps": parity_steps,
                "files": [str(p.name) for p in (onnx_path, fp16_path, engine_path) if p is not None]}
    atomic_write_text(out_dir / "export.json", json.dumps(resolved, indent=2))
    if not report.ok:
        bad = "; ".join(f"{r.check}: {r.value:.3g} > {r.threshold:.0e}" for r in report.rows if not r.ok)
        raise MediFastError(f"parity check failed ({bad}); the files were written for inspection, do not deploy them")

