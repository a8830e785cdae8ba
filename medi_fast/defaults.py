"""Which model a command uses when none is named, and the project's option defaults.

The model, first match wins (``medi-fast info`` prints the result and its source):

1. ``--model PATH`` (or the MODEL argument) on the command line;
2. the environment variable ``MEDI_FAST_MODEL``;
3. ``model = "PATH"`` in ``medi-fast.toml`` in the current directory (relative to that file);
4. the last ``medi-fast export`` run in the current directory (recorded in ``.medi-fast/last-export.json``).

A model path may be an export directory: the file used is the fastest this machine can run
(:func:`pick_export_file`), once the directory is known to be a finished export
(:func:`check_export_dir`) and, for the fp16 graph on a GPU, once it passed the fp16 gate there
(:func:`fp16_gate_here`).  ``medi-fast.toml`` may also hold option defaults per command, e.g.
``[generate] steps = 50``; command-line options override them.
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
# Files of an export directory, in the order they are preferred when their backend is available here.
EXPORT_FILES = (("model.engine", ("tensorrt",)), ("model.fp16.onnx", ("ort-trt", "ort-cuda")),
                ("model.onnx", None))
# Written last by `medi-fast export`: a directory without it is an export that did not finish.
EXPORT_RECORD = "export.json"
# The fp16 gate's result for an fp16 graph exported without a GPU, written on its first GPU use.
FP16_GATE_FILE = "fp16_gate.json"

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


def check_export_dir(directory) -> dict:
    """The export record of a finished export directory; one line refusing any other.

    ``medi-fast export`` removes ``export.json`` before writing a model file and writes it last, so
    a directory without it was interrupted (killed, out of disk) and may hold a half-written model.
    """
    directory = Path(directory)
    rerun = f"rerun `medi-fast export CKPT --out {directory}`"
    path = directory / EXPORT_RECORD
    if not path.is_file():
        raise MediFastError(f"export directory {directory} is incomplete (no {EXPORT_RECORD}: its export was "
                            f"interrupted or failed); {rerun}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        record = None
    if not isinstance(record, dict):
        raise MediFastError(f"{path} is corrupt; {rerun}")
    if record.get("parity_ok") is not True:
        raise MediFastError(f"export directory {directory} failed its parity check (see its parity.json) and must "
                            f"not be used; {rerun} after fixing the checkpoint, or report it")
    return record


def fp16_gate_here(directory, backend: str, record: dict) -> str:
    """"" when the export directory's fp16 graph may run on ``backend`` (a GPU backend), else why not.

    ``record``: the directory's export.json.  A graph exported on a machine with a GPU passed the
    fp16 gate there (its ``fp16_gate`` says ``ok``; exports from before the key existed were gated
    when written).  One exported without a GPU (``ok: null``) is gated here, on its first use: the
    fp16 graph on ``backend`` against the fp32 graph in fp32 on the GPU (accuracy.check_denoiser:
    relative eps error and NaN/inf over the probe set); the result is kept in ``fp16_gate.json``
    per GPU model.
    """
    import torch

    from . import backends
    from .backends import accuracy

    directory = Path(directory)
    gate = record.get("fp16_gate", {"ok": True})
    if not isinstance(gate, dict) or gate.get("ok") not in (True, None):
        raise MediFastError(f"{directory / EXPORT_RECORD} has a corrupt fp16_gate entry; rerun "
                            f"`medi-fast export CKPT --out {directory}`")
    if gate["ok"] is True:
        return ""
    fp16 = directory / "model.fp16.onnx"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else backend
    saved_path = directory / FP16_GATE_FILE
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8")) if saved_path.is_file() else {}
    except (ValueError, OSError):
        saved = {}
    numbers = ("rel", "rel_bound", "nonfinite")
    if not (isinstance(saved, dict) and saved.get("gpu") == gpu and isinstance(saved.get("ok"), bool)
            and all(type(saved.get(k)) in (int, float) for k in numbers)):  # anything else: gate again
        info = backends.open_model(directory / "model.onnx")
        # the fp32 graph in fp32: ort-trt would build it as an fp16 engine, and judge fp16 by fp16
        reference = backends.create("ort-cuda" if "ort-cuda" in backends.available("onnx") else "ort-cpu", info)
        candidate = backends.create(backend, backends.open_model(fp16))
        try:
            check = accuracy.check_denoiser(reference, candidate, info.contract, info.spec)
        finally:
            reference.close()
            candidate.close()
        saved = {"gpu": gpu, "backend": backend, **check.to_dict()}
        try:
            from .io import atomic_write_text

            atomic_write_text(saved_path, json.dumps(saved, indent=2))
        except MediFastError:  # a read-only export directory (a shared model): gated again next time
            pass
    if saved["ok"]:
        return ""
    return (f"failed the fp16 gate on {gpu} (relative eps error {saved['rel']:.3g}, bound {saved['rel_bound']:g}, "
            f"{saved['nonfinite']} NaN/inf); rerun `medi-fast export CKPT --out {directory}` on this machine to pin "
            f"more layers to fp32")


def export_candidates(directory) -> list[tuple[Path, str | None, str]]:
    """Each model file of a finished export directory with the backend that would run it here (or
    None) and why."""
    from . import backends

    record = check_export_dir(directory)
    out = []
    for name, wanted in EXPORT_FILES:
        path = Path(directory) / name
        if not path.is_file():
            continue
        kind = "tensorrt" if path.suffix == ".engine" else "onnx"
        names = [n for n in backends.available(kind) if wanted is None or n in wanted]
        if wanted is not None and not names:
            out.append((path, None, f"needs {' or '.join(wanted)}, not available here"))
        elif not names:
            out.append((path, None, "no backend available here"))
        elif name == "model.fp16.onnx" and (why := fp16_gate_here(directory, names[0], record)):
            out.append((path, None, why))
        else:
            out.append((path, names[0], ""))
    return out


def pick_export_file(directory) -> Path:
    """The fastest file of an export directory that this machine can run (engine > fp16 on GPU > fp32)."""
    candidates = export_candidates(directory)
    for path, backend, _ in candidates:
        if backend is not None:
            return path
    found = ", ".join(p.name for p, _, _ in candidates) or "no model files"
    raise MediFastError(f"no file of export directory {directory} runs here ({found}); "
                        f"re-export with `medi-fast export CKPT --out {directory}`")


def is_export_dir(path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name, _ in EXPORT_FILES)
