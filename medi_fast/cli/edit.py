"""``medi-fast edit``: real patches moved to another site, class or metadata by the same model (docs/edit.md)."""
from __future__ import annotations

from pathlib import Path

import click

from .core import (MODEL_HELP, backend_options, check_engine_cache, echo_start, open_for_backend, ray_choice,
                   runtime_options)


@click.command()
@click.argument("images", type=click.Path(path_type=Path))
@click.option("--to", "to", multiple=True, metavar="NAME=VALUE",
              help="Target condition, e.g. --to tss=44 (repeatable: --to class=LUSC); what is not given stays the "
                   "source's.")
@click.option("--strength", type=float, default=0.5, show_default=True,
              help="How far back the edit starts: 0 returns the input, 1 starts from noise.")
@click.option("--method", type=click.Choice(["sdedit", "inversion"]), default="sdedit", show_default=True,
              help="sdedit: noise then denoise under the target; inversion: DDIM-encode under the source condition "
                   "(needs an INPUT table with it), decode under the target.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory (resumable).")
@click.option("--model", "model", type=click.Path(path_type=Path), help=MODEL_HELP)
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per sampler batch.")
@click.option("--steps", type=int, help="Sampler steps of the whole trajectory; an edit runs the last steps x strength "
                                        "[default: 100; a distilled student's own].")
@click.option("--sampler", help="ddim, or a fast solver for sdedit (see docs/samplers.md) [default: ddim].")
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM eta for sdedit (0 = deterministic).")
@click.option("--seed", type=int, default=0, show_default=True, help="Base seed; image i depends on (seed, i) only.")
@click.option("--guidance", type=float, default=1.0, show_default=True,
              help="Classifier-free guidance scale of the decoding (1 = none; needs a model trained with --cond-drop).")
@runtime_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", metavar="[ADDRESS]",
              help="Run on Ray, as generate does (docs/cluster.md); the actors read INPUT's images, so give paths "
                   "they can reach.")
@click.option("--ray-workers", type=int, help="With --ray: actors (default: autoscale to what the cluster holds).")
def edit(images, to, strength, method, out, model, batch_size, steps, sampler, eta, seed, guidance, backend, device,
         engine_cache, fmt, jpeg_quality, workers, quiet, ray_address, ray_workers):
    """Move the real patches of IMAGES to another condition with MODEL: the counterfactual "this tissue as
    site 44 would have stained and scanned it".

    IMAGES: a folder of .png/.jpg patches (their source condition unknown: give --to class=...), or a
    .csv/.parquet table with a path (or file) column and each patch's class and metadata (a data
    index, or generate's manifest.csv), which --method inversion needs.

    \b
    medi-fast edit patches/ --to class=LUAD --to tss=44 --strength 0.5 --out edited/
    medi-fast edit index.parquet --to tss=44 --method inversion --strength 0.8 --out edited/
    """
    from .. import edit as edits
    from ..defaults import require_model
    from ..generate import for_model
    from ..job import run_job

    check_engine_cache(engine_cache, backend)
    ray = ray_choice(ray_address, ray_workers)
    cfg = edits.EditConfig(steps=100 if steps is None else steps, eta=eta, guidance=guidance, batch_size=batch_size,
                           sampler="ddim" if sampler is None else sampler, format=fmt, jpeg_quality=jpeg_quality,
                           workers=workers, strength=strength, method=method)
    targets = edits.parse_targets(to)
    edits.check_out(out, images)
    choice = require_model(model)
    info = open_for_backend(choice.path, backend, engine_cache)
    cfg = for_model(cfg, info, steps_given=steps is not None, sampler_given=sampler is not None)
    the_plan = edits.plan_edits(info.spec, edits.read_input(images, info.spec), targets, seed, method)
    edits.check_model(info, cfg)
    edits.check_images(the_plan, info.resolution)
    options = backend_options(device, backend, engine_cache)

    def started(job) -> None:
        echo_start(job, info, choice, None)
        if not quiet:
            click.echo(f"{len(the_plan)} images to edit ({method}, strength {strength}: the last "
                       f"{cfg.steps_run()} of {cfg.steps} {cfg.sampler} steps)", err=True)

    stats = run_job(info, the_plan, out, cfg, backend=backend, backend_options=options, ray=ray, progress=not quiet,
                    on_start=started)
    if not quiet:
        click.echo(f"edited {stats['generated']} images ({stats['skipped']} already done)"
                   f"{' on Ray' if ray is not None else ''} in {stats['seconds']:.1f} s; manifest "
                   f"{Path(out) / 'manifest.csv'}", err=True)
