"""``medi-fast doctor``: the environment, and with --check a self-test of every path on this machine."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.option("--check", is_flag=True, help="Run the self-test: every available backend and training precision "
              "against torch fp32 on the CPU, with a short timed run.")
@click.option("--model", type=click.Path(exists=True, path_type=Path),
              help="Check this checkpoint or .onnx instead of a small random model.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the report as JSON.")
@click.option("--no-training", is_flag=True, help="Skip the training checks.")
def doctor(check, model, json_path, no_training):
    """Print what this machine has (Python, torch, CUDA, GPUs, ONNX Runtime, TensorRT, ...) and,
    with --check, whether each inference and training path works here and how fast."""
    from ..doctor import Report, environment, format_environment, format_rows, run_checks
    from ..errors import MediFastError
    from ..io import atomic_write_text

    if json_path is not None:
        from ..defaults import check_config_output
        from ..io import check_output_file

        check_config_output("json_path", json_path)
        check_output_file(json_path, "--json")
    if model is not None and not check:
        raise MediFastError("--model is checked by the self-test only; add --check")
    if model is not None:
        from ..backends import open_model

        open_model(model)  # a missing, empty or corrupt model fails in one line before the checks
    def partial(report) -> None:  # each row as it finishes: a run cut short (a GPU hang, a limit) keeps them
        atomic_write_text(json_path, json.dumps(report.to_dict(complete=False), indent=2))

    report = run_checks(model, training=not no_training, on_row=partial if json_path is not None else None) \
        if check else Report(environment())
    click.echo(format_environment(report.environment))
    if check:
        click.echo("")
        click.echo(format_rows(report.rows))
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report.to_dict(), indent=2))
    bad = report.failures()
    if bad:
        raise MediFastError(f"{len(bad)} check(s) failed ({', '.join(r.path for r in bad)}); see the table above")
