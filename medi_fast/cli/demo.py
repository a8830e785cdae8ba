"""`medi-fast demo`: the whole method on built-in synthetic data."""
from __future__ import annotations

import click


@click.command()
@click.option("--out", default="demo_out", show_default=True, help="Output directory (data, runs, report).")
@click.option("--quick", is_flag=True, help="Smaller data and shorter training (about 3 minutes on 2 cores).")
@click.option("--train-steps", type=int, help="Override the training steps of each model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data, training and sampling.")
@click.option("--overwrite", is_flag=True, help="Replace a previous demo run in OUT (OUT must otherwise be new or empty).")
def demo(out, quick, train_steps, seed, overwrite):
    """Run MeDi end to end on synthetic H&E data: data, CLS + MeDi training, ONNX export, generation with
    ONNX Runtime, evaluation (FID-style distance, linear probe, shortcut meter) -> OUT/report.html."""
    from ..demo import DemoConfig, run_demo

    if train_steps is not None and not 1 <= train_steps <= 1_000_000:
        raise click.BadParameter("must be in 1..1000000 (the demo's models need hundreds)", param_hint="--train-steps")
    from ..errors import check_seed

    check_seed(seed)
    path = run_demo(DemoConfig.from_options(out, quick=quick, seed=seed, train_steps=train_steps), overwrite=overwrite)
    click.echo(f"report: {path}")
