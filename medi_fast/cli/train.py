"""``medi-fast train`` and ``medi-fast import-medi``.

``train``'s options are generated from TrainConfig's fields (one option per field, same name with
dashes), so the CLI and the config file can never drift apart.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import click


HELP = {
    "data": "Training data: an index (parquet) or a pack built with `medi-fast data`.",
    "split": "Split CSV (e.g. DIR/train.csv) selecting the training slides.",
    "condition": "Conditioning attributes, class first: 'class' (CLS baseline), 'class,tss' (MeDi), any metadata "
                 "column; 'age' is continuous.",
    "preset": "Model preset: tiny-32, small-64, medi-128 (the published UNet).",
    "resolution": "Training resolution in px (default: the preset's).",
    "prediction-type": "What the UNet predicts: epsilon (published), v_prediction (learns the stain colour at "
                       "high noise in short runs) or sample (x0).",
    "batch-size": "Images per GPU per micro-batch. Effective batch = batch-size x GPUs x grad-accum.",
    "lr": "Peak learning rate (AdamW).",
    "steps": "Optimiser steps in total.",
    "out": "Run directory (config, metrics, grids, checkpoints).",
    "warmup": "Linear warm-up: a fraction of --steps (0.01 = 1 %) or, if >= 1, a number of steps; cosine after.",
    "adam-beta1": "AdamW beta1.",
    "adam-beta2": "AdamW beta2.",
    "weight-decay": "AdamW weight decay.",
    "adam-eps": "AdamW epsilon.",
    "grad-clip": "Clip the global gradient norm to this value.",
    "ema-decay": "Maximum EMA decay.",
    "ema-warmup": "EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power, capped at --ema-decay.",
    "ema-inv-gamma": "EMA warm-up inv_gamma.",
    "ema-power": "EMA warm-up power.",
    "sampling": "Row sampling: class (class-balanced, published), combination (balanced over class x "
                "conditioning values), uniform.",
    "cond-drop": "Probability of replacing each attribute by its null id (classifier-free guidance training).",
    "grad-accum": "Micro-batches per optimiser step (gradient accumulation).",
    "precision": "auto (bf16 on capable GPUs, fp32 on CPU), fp32, bf16 or fp16 autocast.",
    "channels-last": "channels_last memory format on CUDA.",
    "compile": "torch.compile the model (slow start, faster steps).",
    "workers": "Data-loader worker processes (0: load in the main process).",
    "seed": "Seed for weights, data order, timesteps and noise.",
    "checkpoint-every": "Write a checkpoint + resume state every k steps.",
    "keep-last": "Keep this many recent checkpoints (plus best.pt).",
    "log-every": "Write metrics every k steps (loss = mean over those steps).",
    "grid-every": "Save a sample grid (rows classes x columns sites) every k steps; 0 disables.",
    "grid-steps": "DDIM steps for the sample grids.",
    "grid-rows": "Classes (rows) in the sample grid.",
    "grid-cols": "Sites (columns) in the sample grid.",
    "resume": "Continue the run in --out exactly from its newest checkpoint.",
    "device": "auto, cpu, cuda or cuda:N.",
}


def _train_options(func):
    from ..training.config import TrainConfig

    defaults = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    for f in reversed(dataclasses.fields(TrainConfig)):
        flag = f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kind = hints[f.name]
        if kind is bool:
            opt = click.option(f"--{flag}/--no-{flag}", f.name, default=None, help=f"{HELP[flag]} [default: {default}]")
        else:
            base = {int: int, float: float}.get(typing.get_args(kind)[0] if typing.get_args(kind) else kind, str)
            opt = click.option(f"--{flag}", f.name, type=base, default=None,
                               help=f"{HELP[flag]} [default: {default}]")
        func = opt(func)
    return func


@click.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="A TrainConfig JSON (e.g. a run's config.json); options given on the command line override it.")
@_train_options
def train(config_file, **options):
    """Train a CLS (--condition class) or MeDi (--condition class,tss) UNet.

    Runs alone or under `torchrun --nproc-per-node N` (DistributedDataParallel, one process per GPU).
    """
    from ..training.config import TrainConfig
    from ..training.loop import train as run

    given = {k: v for k, v in options.items() if v is not None}
    base = {}
    if config_file is not None:
        base = TrainConfig.read(config_file).to_dict()
    elif given.get("resume") and (Path(given.get("out", TrainConfig.out)) / "config.json").is_file():
        base = TrainConfig.read(Path(given.get("out", TrainConfig.out)) / "config.json").to_dict()
    cfg = TrainConfig.from_dict({**base, **given})
    summary = run(cfg)
    if summary.get("main", True):
        click.echo(f"trained {summary['steps']} steps (effective batch {summary['effective_batch']}), "
                   f"final loss {summary['loss']:.4f}; checkpoint {summary['checkpoint']}")


@click.command("import-medi")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output checkpoint (.pt or .safetensors).")
@click.option("--ema", is_flag=True, help="Import the checkpoint's ema_model/ instead of model.safetensors.")
@click.option("--weights", help="Weights file inside the checkpoint directory (e.g. model_final.pth).")
@click.option("--condition", default=None,
              help="The training run's --domains_to_condition, comma-separated (e.g. tissue_source_site,gender,age_p); "
                   "needed only where the run does not record it (where a positional domain came in concat mode).")
@click.option("--metadata", type=click.Path(path_type=Path),
              help="For runs without mapping JSONs: the reference run's training metadata CSV (vocabularies are rebuilt).")
@click.option("--mode", type=click.Choice(["concat", "additive", "linear"]), default=None,
              help="The reference model's --cond_type; checked against the run (default: read from it).")
@click.option("--class-column", default=None,
              help="Column of --metadata holding the cancer type (default: first of class, project_id, cancer_type).")
@click.option("--resolution", type=int, default=None, help="Training resolution (default: config.json's, else 128).")
@click.option("--unet-config", default=None,
              help="UNet2DModel config as JSON (a file or a string) overriding what is read or inferred.")
@click.option("--null", "null_fill", type=click.Choice(["mean", "zeros"]), default="mean", show_default=True,
              help="How to fill our extra null-id row of each table (the reference has none).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (it is replaced whole, or not at all).")
def import_medi(source, out, ema, weights, condition, metadata, mode, class_column, resolution, unet_config, null_fill,
                overwrite):
    """Convert a reference MeDi run (RUN/, RUN/checkpoint-N/ or a weights file) into a medi-fast checkpoint."""
    from ..training.import_medi import import_run
    from ..training.medi_run import unet_config_option
    from ..vocab import parse_list

    ck = import_run(source, out=out, overwrite=overwrite, ema=ema, weights=weights,
                    condition=parse_list(condition) if condition is not None else None, metadata_csv=metadata,
                    mode=mode, class_column=class_column, resolution=resolution,
                    unet_config=unet_config_option(unet_config) if unet_config else None, null_fill=null_fill)
    src = ck.provenance["imported_from"]
    for note in src["notes"]:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {out} (hash {ck.hash}; conditioning {', '.join(ck.spec.names)}, mode {src['mode']}, "
               f"from {src['weights']}{', step ' + str(src['checkpoint_step']) if src['checkpoint_step'] else ''})")
