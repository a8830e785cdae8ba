"""``medi-fast distill TEACHER.pt --steps 4 --out student.pt``: progressive or consistency distillation (docs/distill.md)."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("distill")
@click.argument("teacher", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--steps", type=int, default=4, show_default=True, help="DDIM steps of the student (1, 2, 4, 8, ...).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The student checkpoint (.pt); written only when distillation is complete.  The run directory "
                   "(resume state, metrics, every stage's student) is OUT_STEM.distill/ beside it.")
@click.option("--teacher-steps", type=int,
              help="DDIM steps of the first teacher; stages halve it down to --steps (consistency: the grid the "
                   "student learns on) [default: 64; a student teacher: its own].")
@click.option("--data", help="Index or pack to distil on [default: what the teacher was trained on].")
@click.option("--split", help="Split CSV selecting the rows of --data [default: the teacher's].")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--iters-per-stage", type=int, default=500, show_default=True,
              help="Optimiser steps per halving (consistency: in all, its one stage).")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak learning rate, annealed to 0 in each stage.")
@click.option("--ema-decay", type=float,
              help="Maximum EMA decay of the student (consistency: also its target network) [default: 0.999; "
                   "consistency 0.95].")
@click.option("--prediction-type", type=click.Choice(["v_prediction", "sample"]), default="v_prediction",
              show_default=True, help="What the student predicts: v (the paper's choice) or x0.")
@click.option("--method", type=click.Choice(["progressive", "consistency"]), default="progressive", show_default=True,
              help="progressive: halving stages, a DDIM student; consistency: one stage, a student sampled by the "
                   "consistency sampler.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", is_flag=True, help="Continue the run directory of --out from its newest checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def distill(teacher, steps, out, teacher_steps, data, split, batch_size, iters_per_stage, lr, ema_decay,
            prediction_type, method, seed, device, resume, quiet):
    """Distil TEACHER into a student that samples in --steps steps (progressive or consistency distillation).

    \b
    medi-fast distill runs/medi/checkpoints/best.pt --steps 4 --out student.pt
    medi-fast generate student.pt --class LUAD --tss 05 --n 100     # DDIM-4, the student's own steps
    """
    from ..training.distill import distill as run

    path = run(teacher=str(teacher), steps=steps, out=str(out), teacher_steps=teacher_steps, data=data, split=split,
               batch_size=batch_size, iters_per_stage=iters_per_stage, lr=lr, ema_decay=ema_decay,
               prediction_type=prediction_type, method=method, seed=seed, device=device, resume=resume, progress=not quiet)
    sampler = "consistency" if method == "consistency" else "DDIM"
    click.echo(f"wrote {path} ({sampler}-{steps} student, {prediction_type}); stages in {Path(out).with_name(Path(out).stem + '.distill')}/stages")
