"""Which model a command uses when none is named, and the project's option defaults.

The model, first match wins (``medi-fast info`` prints the result and its source):

1. ``--model PATH`` (or the MODEL argument) on the command line;
2. the environment variable ``MEDI_FAST_MODEL``;
3. ``model = "PATH"`` in ``medi-fast.toml`` in the current directory (relative to that file);
4. the last ``medi-fast export`` run in the current directory (recorded in ``.medi-fast/last-export.json``).

A model path may be an export directory: the file used is the fastest this machine can run, which
is backend knowledge (:func:`medi_fast.backends.pick_export_file`).  ``medi-fast.toml`` may also hold
option defaults per command, e.g. ``[generate] steps = 50``; command-line options override them.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import MediFastError, suggest

ENV_MODEL = "MEDI_FAST_MODEL"
CONFIG_FILE = "medi-fast.toml"
STATE_DIR = ".medi-fast"
LAST_EXPORT = "last-export.json"

HOW_TO_GIVE = (f"give one with --model PATH (a checkpoint, .onnx, .engine or export directory), set {ENV_MODEL}, "
               f"put model = \"PATH\" in {CONFIG_FILE}, or run `medi-fast export CKPT` here first")


@dataclass(frozen=True)
class ModelChoice:
    path: Path
    source: str  # e.g. "--model", "$MEDI_FAST_MODEL", "medi-fast.toml", "the last export here, ..."

    def describe(self) -> str:
        return f"{self.path} (from {self.source})"


def _cwd(cwd) -> Path:
    return Path(cwd) if cwd is not None else Path.cwd()


def _toml_load(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MediFastError(f"{path} is not valid TOML ({str(e).splitlines()[0]}); fix or delete it") from None
    except OSError as e:
        raise MediFastError(f"cannot read {path} ({e.strerror}); fix its permissions or delete it") from None


def project_config(cwd=None) -> dict:
    """The parsed ``medi-fast.toml`` of ``cwd`` (empty when there is none)."""
    path = _cwd(cwd) / CONFIG_FILE
    if not path.exists():
        return {}
    if path.is_dir():
        raise MediFastError(f"{path} is a directory; {CONFIG_FILE} must be a TOML file")
    return _toml_load(path)


def command_defaults(commands: dict, cwd=None, all_commands=()) -> dict:
    """click ``default_map`` from the tables of ``medi-fast.toml``.

    ``commands``: {command name: list of its option names (python form)}.  Keys use the option's
    spelling (``batch-size``); unknown tables and keys fail with the closest valid name (among
    ``all_commands`` for tables).
    """
    config = project_config(cwd)
    out: dict[str, dict] = {}
    for table, values in config.items():
        if table == "model":
            if not isinstance(values, str):
                raise MediFastError(f"{CONFIG_FILE}: model must be a path string, e.g. model = \"ckpt.export\"")
            continue
        if table not in commands or not isinstance(values, dict):
            raise MediFastError(f"{CONFIG_FILE}: unknown table or key {table!r}{suggest(table, [*commands, *all_commands, 'model'])}; "
                                f"use model = \"PATH\" and [command] tables such as [generate]")
        names = commands[table]
        for key in values:
            name = key.replace("-", "_")
            if name not in names or name == "model":
                valid = [n.replace("_", "-") for n in names if n != "model"]
                raise MediFastError(f"{CONFIG_FILE}: [{table}] has no option {key!r}{suggest(key, valid)}"
                                    + ("; set the model at the top level" if name == "model" else ""))
        out[table] = {k.replace("-", "_"): v for k, v in values.items()}
    return out


def record_export(out_dir, cwd=None) -> Path:
    """Remember ``out_dir`` as this directory's default model (used by step 4 of the order)."""
    from .io import atomic_write_text

    state = _cwd(cwd) / STATE_DIR / LAST_EXPORT
    atomic_write_text(state, json.dumps({"path": str(Path(out_dir).resolve())}, indent=2))
    return state


def _last_export(cwd) -> Path | None:
    state = _cwd(cwd) / STATE_DIR / LAST_EXPORT
    if not state.is_file():
        return None
    try:
        return Path(json.loads(state.read_text())["path"])
    except (ValueError, KeyError, TypeError, OSError):
        raise MediFastError(f"{state} is corrupt; delete it or run `medi-fast export CKPT` again") from None


def choose_model(explicit=None, cwd=None, env=None) -> ModelChoice | None:
    """The model by the documented order, or None when nothing names one."""
    env = os.environ if env is None else env
    if explicit is not None:
        return ModelChoice(Path(explicit), "--model")
    if env.get(ENV_MODEL):
        return ModelChoice(Path(env[ENV_MODEL]), f"${ENV_MODEL}")
    config = project_config(cwd)
    if "model" in config:
        if not isinstance(config["model"], str):
            raise MediFastError(f"{CONFIG_FILE}: model must be a path string, e.g. model = \"ckpt.export\"")
        return ModelChoice(_cwd(cwd) / config["model"], f"{CONFIG_FILE}")
    last = _last_export(cwd)
    if last is not None:
        return ModelChoice(last, f"the last export here, {STATE_DIR}/{LAST_EXPORT}")
    return None


def require_model(explicit=None, cwd=None) -> ModelChoice:
    choice = choose_model(explicit, cwd)
    if choice is None:
        raise MediFastError(f"no model given; {HOW_TO_GIVE}")
    if not choice.path.exists():
        raise MediFastError(f"model {choice.path} (from {choice.source}) does not exist; {HOW_TO_GIVE}")
    return choice
