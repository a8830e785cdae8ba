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

    ``commands``: {command name: list of its click parameters (or only their python names)}.  Keys use
    the option's spelling (``batch-size``); unknown tables and keys fail with the closest valid name
    (among ``all_commands`` for tables); given parameters, values are checked by their type
    (:func:`check_config_value`).
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
        params = {getattr(p, "name", p): p for p in commands[table]}
        names = list(params)
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in names or name == "model":
                valid = [n.replace("_", "-") for n in names if n != "model"]
                raise MediFastError(f"{CONFIG_FILE}: [{table}] has no option {key!r}{suggest(key, valid)}"
                                    + ("; set the model at the top level" if name == "model" else ""))
            if not isinstance(params[name], str):
                check_config_value(table, key, value, params[name])
        out[table] = {k.replace("-", "_"): v for k, v in values.items()}
    return out


def check_config_value(table: str, key: str, value, param) -> None:
    """Refuse a ``medi-fast.toml`` value that the option ``param`` (a click parameter) would refuse on
    the command line.  click converts ``default_map`` values itself, but only as far as Python's
    ``int()``/``float()`` go: a TOML array or table for a one-value option ends in a TypeError, and
    ``true`` or ``2.5`` for a count would silently become 1 or 2."""
    import click

    where = f"{CONFIG_FILE}: [{table}] {key} = {value!r}"
    if getattr(param, "is_flag", False):
        if not isinstance(value, bool):
            raise MediFastError(f"{where}: {key} is a flag; write {key} = true or false")
        return
    many = getattr(param, "multiple", False) or param.nargs != 1
    if many and not isinstance(value, list):
        raise MediFastError(f"{where}: {key} takes several values; write a list, e.g. {key} = [{value!r}]")
    for v in (value if many else [value]):
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            kind = "a list" if isinstance(v, list) else "a table" if isinstance(v, dict) else type(v).__name__
            raise MediFastError(f"{where}: {key} takes one {param.type.name} value, not {kind}; fix the entry")
        if isinstance(param.type, click.types.IntParamType) and isinstance(v, float):
            raise MediFastError(f"{where}: {key} takes a whole number; fix the entry")
        try:
            param.type.convert(v, param, None)
        except click.BadParameter as e:
            raise MediFastError(f"{where}: {' '.join(e.message.split()).rstrip('.')}; fix the entry") from None


def check_config_output(name: str, path) -> None:
    """An output file named in ``medi-fast.toml`` (not on the command line) must not exist yet: the
    entry applies to every run, so it would silently replace the file each time, whoever wrote it.
    ``name``: the option's parameter name in the running command."""
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT_MAP:
        return
    if path is not None and Path(path).exists():
        option = name.replace("_", "-")
        raise MediFastError(f"{path} exists and is named by {CONFIG_FILE} ([{ctx.info_name}] {option}); an output "
                            f"set there never replaces a file: give it on the command line to replace it, or "
                            f"remove the file")


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
