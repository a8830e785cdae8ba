"""The ``medi-fast`` command.  Each subcommand lives in a module of this package; the group loads
it only when it is invoked, so ``medi-fast --help`` stays fast and one broken extra never blocks
the rest.  Every MediFastError ends in one line on stderr and exit code 2, with no traceback."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

import click

from ..errors import MediFastError, from_exception, one_line

# command name -> "module:function" (relative to medi_fast.cli); help text shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("data:data", "Data: index, report, split, synthetic H&E set, pack for training."),
    "demo": ("demo:demo", "Run MeDi end to end on built-in synthetic data and write a report (start here)."),
    "generate": ("core:generate", "Generate patches from a checkpoint or engine."),
    "edit": ("edit:edit", "Move real patches to another site or class with the same model (SDEdit, DDIM inversion)."),
    "init-checkpoint": ("core:init_checkpoint", "Write a randomly initialised checkpoint (tests, benchmarks)."),
    "info": ("core:info", "Describe a checkpoint or engine: conditioning, vocabularies, schedule, hash."),
    "export": ("export:export", "Export a checkpoint to ONNX (fp32/fp16) and TensorRT, with a parity report."),
    "train": ("train:train", "Train a CLS or MeDi UNet (EMA, mixed precision, exact resume, DDP)."),
    "distill": ("distill:distill", "Distil a model into a few-step student (progressive distillation)."),
    "import-medi": ("train:import_medi", "Convert a reference MeDi run (as train_diffusion.py wrote it) to a medi-fast checkpoint."),
    "backends": ("core:list_backends", "List runtime backends and whether each is available here."),
    "doctor": ("doctor:doctor", "Print the environment; --check tests every backend and precision on this machine."),
    "plan": ("core:plan_cmd", "Write a plan CSV (match-train, fill-missing or ood) for generate --plan."),
    "fid": ("evaluate:fid", "FID per class and averaged, from images or saved statistics."),
    "embed": ("evaluate:embed", "Embed images with UNI (or another encoder) into one file with metadata."),
    "probe": ("evaluate:probe", "Linear probe (the paper's Table 1): no-synthetic vs CLS vs MeDi."),
    "shortcut": ("evaluate:shortcut", "Measure the class-site shortcut before and after augmentation."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        module, func = target.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), func)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="medi-fast")
@click.pass_context
def cli(ctx):
    """medi-fast: metadata-guided diffusion (MeDi) for computational pathology.

    Start with `medi-fast demo`; see README.md for the whole pipeline.  Option defaults can be set
    per command in ./medi-fast.toml (e.g. `[generate]` then `steps = 50`).
    """
    from .. import defaults

    tables = [k for k, v in defaults.project_config().items() if isinstance(v, dict)]
    params = {}
    for name in tables:
        command = ctx.command.get_command(ctx, name)
        if command is not None:
            params[name] = [p for p in command.params if p.name]  # parameters: values are checked by type
    ctx.default_map = defaults.command_defaults(params, all_commands=COMMANDS) or None


# What an interrupted command leaves, said on its one line: a run directory continues only with
# --resume (without it, train and distill refuse an existing run); generate skips finished images.
INTERRUPTED = {"train": "rerun with --resume to continue", "distill": "rerun with --resume to continue",
               "generate": "rerun the same command to resume", "edit": "rerun the same command to resume"}


def _interrupted(args: list[str]) -> str:
    command = next((a for a in args if not a.startswith("-")), None)  # the group itself takes no option values
    hint = INTERRUPTED.get(command)
    return f"medi-fast: interrupted; {hint}" if hint else "medi-fast: interrupted"


def _fail(message: str, code: int = 2):
    click.echo(one_line(message), err=True)
    sys.exit(code)


def _usage_message(e: click.ClickException) -> str:
    """click's usage errors (three lines, no prefix) as one line with the fix."""
    what = one_line(e.format_message()).rstrip(".")
    what = what[0].lower() + what[1:] if what else "bad usage"
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "medi-fast"
    return f"medi-fast: error: {what}; see `{path} --help`"


def main(argv=None) -> int:
    """The front door: every error a user can cause ends in one line `medi-fast: error: WHAT; FIX` and
    exit code 2; an interrupt (Ctrl-C) in exit code 130; anything else is a bug and keeps its traceback.

    click's own ``main`` is not used: it turns any EOFError (e.g. from reading an empty file) into
    an "abort" indistinguishable from Ctrl-C."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        with cli.make_context("medi-fast", args) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Exit as e:
        if e.exit_code:
            sys.exit(e.exit_code)
        return 0
    except BrokenPipeError:
        # The reader of stdout has gone (`medi-fast info | head -1`): stop quietly as other CLI tools
        # do.  stdout is pointed at /dev/null so that the interpreter's final flush does not fail too.
        with contextlib.suppress(OSError, ValueError):  # ValueError: a stdout without a descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, the status of a tool that the signal stopped
    except (KeyboardInterrupt, click.exceptions.Abort):
        _fail(_interrupted(args), 130)
    except click.ClickException as e:
        _fail(_usage_message(e), 2)
    except MediFastError as e:
        _fail(f"medi-fast: error: {e}", e.exit_code)
    except Exception as e:
        err = from_exception(e)
        if err is None:
            raise
        _fail(f"medi-fast: error: {err}", err.exit_code)
    return 0
