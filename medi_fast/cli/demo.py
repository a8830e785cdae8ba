"""`medi-fast demo`: the whole method on built-in synthetic data."""
from __future__ import annotations

import click


def _seed_list(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers (e.g. 0,1,2)") from None


@click.command()
@click.option("--out", default="demo_out", show_default=True, help="Output directory (data, runs, report).")
@click.option("--quick", is_flag=True, help="Smaller data and shorter training (about 3 minutes on 2 cores).")
@click.option("--train-steps", type=int, help="Override the training steps of each model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data, training and sampling.")
@click.option("--seeds", callback=_seed_list,
              help="Run once per seed (e.g. 0,1,2) into OUT/seed-S and report mean and spread over the seeds.")
@click.option("--setting", default=None, help="The demo's cohort and probe setting (default: ring4; two-class: the "
                                              "first, easier setting).")
@click.option("--distill", is_flag=True, help="Also distil the MeDi model into a 4-step student (progressive "
                                               "distillation from DDIM-64, about 28 more minutes on 2 cores) and "
                                               "add its samples to the report.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 training and generation where the CPU has bf16 units (the same result over seeds, "
                   "faster), fp32 elsewhere; fp32: fp32 on any CPU.")
@click.option("--overwrite", is_flag=True, help="Replace a previous demo run in OUT (OUT must otherwise be new or empty).")
def demo(out, quick, train_steps, seed, seeds, setting, distill, precision, overwrite):
    """Run MeDi end to end on synthetic H&E data: data, CLS + MeDi training, ONNX export, generation with
    ONNX Runtime, evaluation (FID-style distance, linear probe, shortcut meter) -> OUT/report.html."""
    from ..demo import DEFAULT_SETTING, DemoConfig, run_demo, run_seeds

    if train_steps is not None and not 1 <= train_steps <= 1_000_000:
        raise click.BadParameter("must be in 1..1000000 (the demo's models need hundreds)", param_hint="--train-steps")
    from ..errors import check_seed

    ctx = click.get_current_context()
    given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    if seeds is not None and ctx.get_parameter_source("seed") in given:  # a medi-fast.toml default is not "given"
        raise click.UsageError("--seed and --seeds both given; use --seed S for one run or --seeds 0,1,2 for several")
    for s in seeds or [seed]:
        check_seed(s, "--seeds" if seeds is not None else "--seed")
    cfg = DemoConfig.from_options(out, quick=quick, seed=seed, train_steps=train_steps,
                                  setting=DEFAULT_SETTING if setting is None else setting, distill=distill,
                                  precision=precision)
    path = run_seeds(cfg, seeds, overwrite=overwrite) if seeds is not None else run_demo(cfg, overwrite=overwrite)
    click.echo(f"report: {path}")
