"""``medi-fast export CKPT``: checkpoint -> export directory (ONNX fp32 + fp16, TensorRT where possible) + parity report."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (model.onnx, model.fp16.onnx, model.engine, parity.json, export.json).  "
                   "Default: CKPT_STEM.export/ beside the checkpoint.")
@click.option("--fp16/--no-fp16", default=True, show_default=True,
              help="Also write model.fp16.onnx (normalisations and timestep/metadata encodings in fp32), for "
                   "GPUs: gated against fp32 here when a CUDA GPU is present, otherwise on first GPU use.")
@click.option("--batch", "batch", default="1,16,64", show_default=True,
              help="MIN,OPT,MAX batch of the engine's optimisation profile (recorded in the graph; used by TensorRT).")
@click.option("--tensorrt/--no-tensorrt", default=None,
              help="Build the FP16 TensorRT engine (needs tensorrt and a CUDA GPU).  Default: build it when both "
                   "are present, otherwise say why it was skipped.")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset: 18 or 19.")
@click.option("--optimization-level", default=3, show_default=True, type=click.IntRange(0, 5),
              help="TensorRT builder optimisation level (0 fastest build .. 5 most kernel search).")
@click.option("--parity-steps", default=2, show_default=True, type=click.IntRange(0, 1000),
              help="DDIM steps of the short ORT-vs-torch sampling run, batch 2, reported (0 skips it).")
@click.option("--no-ema", is_flag=True, help="Export the raw weights instead of the EMA weights.")
def export(checkpoint: Path, out_dir: Path | None, fp16: bool, batch: str, tensorrt: bool | None, opset: int,
           optimization_level: int, parity_steps: int, no_ema: bool):
    """Compile CHECKPOINT into an export directory and print the parity report.

    The .onnx takes `sample (B,3,H,W)`, `timestep (B,)` and one id tensor per conditioning
    attribute, and carries vocabularies, ConditionSpec, schedule and checkpoint hash, so
    `medi-fast generate DIR --class LUAD --tss 05` needs no checkpoint.  The directory becomes this
    directory's default model (`medi-fast info` shows it).
    """
    from ..backends.contract import BatchRange
    from ..defaults import record_export
    from ..engines.export import ExportConfig
    from ..engines.pipeline import default_out_dir, export_checkpoint

    out_dir = out_dir if out_dir is not None else default_out_dir(checkpoint)
    config = ExportConfig(opset=opset, batch=BatchRange.parse(batch), ema=not no_ema)
    result = export_checkpoint(checkpoint, out_dir, config=config, fp16=fp16, tensorrt=tensorrt,
                               optimization_level=optimization_level, parity_steps=parity_steps, log=click.echo)
    click.echo(result.report.table())
    for line in result.skipped:
        click.echo(f"skipped {line}")
    state = record_export(out_dir)
    click.echo(f"{out_dir} is now the default model here ({state}); `medi-fast generate --class ...` uses it")
