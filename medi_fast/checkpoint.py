"""Checkpoints: one file that rebuilds the model with no code from the run that wrote it.

``.pt``: a plain dict of str/int/float/list/dict and tensors, readable with
``torch.load(weights_only=True)`` (never a pickled class).  ``.safetensors``: the tensors, with
the same header dict as JSON in the metadata under the key ``medi_fast``.

Header keys: format, version, preset, unet_config, condition_spec, schedule, provenance, hash,
has_ema.  ``hash`` is a sha256 over the header's model description and the generation weights
(EMA when present); it is checked on load so a corrupt file is refused, and it is written into
every manifest so each generated image names the exact model that made it.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .conditioning import ConditionSpec
from .errors import MediFastError
from .io import atomic_path
from .schedule import Schedule
from .vocab import UnsafeName

FORMAT = "medi-fast-checkpoint"
VERSION = 1
SUFFIXES = (".pt", ".safetensors")


@dataclass
class Checkpoint:
    spec: ConditionSpec
    unet_config: dict
    schedule: Schedule
    state_dict: dict[str, torch.Tensor]
    ema_state_dict: dict[str, torch.Tensor] | None = None
    preset: str = ""
    provenance: dict = field(default_factory=dict)
    hash: str = ""
    path: Path | None = None

    @property
    def resolution(self) -> int:
        return int(self.unet_config["sample_size"])

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """EMA weights by default when present (what the published models generate with)."""
        return self.ema_state_dict if (ema and self.ema_state_dict is not None) else self.state_dict

    def build(self, ema: bool = True):
        from .model import MeDiUNet

        model = MeDiUNet(self.spec, self.unet_config)
        model.load_state_dict(self.weights(ema))
        return model.eval()

    def header(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "preset": self.preset, "unet_config": self.unet_config,
                "condition_spec": self.spec.to_dict(), "schedule": self.schedule.to_dict(),
                "provenance": self.provenance, "has_ema": self.ema_state_dict is not None}

    def compute_hash(self) -> str:
        h = hashlib.sha256()
        desc = {k: v for k, v in self.header().items() if k != "provenance"}
        h.update(json.dumps(desc, sort_keys=True).encode())
        for name, t in sorted(self.weights().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()[:16]


def provenance_lines(provenance: Mapping) -> list[str]:
    """Human-readable lines on where a model came from (``medi-fast info``); empty if nothing to say."""
    src = provenance.get("imported_from")
    if not isinstance(src, Mapping):
        return []
    lines = [f"imported from the MeDi run {src.get('run_dir') or src.get('metadata_csv') or '?'}: {src.get('weights')}"
             f"{', step ' + str(src['checkpoint_step']) if src.get('checkpoint_step') is not None else ''}, "
             f"{'EMA' if src.get('ema') else 'model (not EMA)'} weights, {src.get('mode')} mode, domains "
             f"{', '.join(src.get('domains_to_condition') or []) or 'none'}"]
    for name, digest in (src.get("files_sha256") or {}).items():
        lines.append(f"  {name} sha256 {digest}")
    lines += [f"  note: {n}" for n in src.get("notes") or []]
    return lines


def from_model(model, schedule: Schedule, *, preset: str = "", ema_model=None, provenance: Mapping | None = None) -> Checkpoint:
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ema = {k: v.detach().cpu().clone() for k, v in ema_model.state_dict().items()} if ema_model is not None else None
    return Checkpoint(model.spec, dict(model.unet_config), schedule, sd, ema, preset, dict(provenance or {}))


def save(ckpt: Checkpoint, path) -> Path:
    """Write atomically (temporary name, then rename); returns the path.  Sets ``ckpt.hash``."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise MediFastError(f"checkpoint name {path.name!r} must end in .pt or .safetensors")
    ckpt.hash = ckpt.compute_hash()
    header = {**ckpt.header(), "hash": ckpt.hash}
    with atomic_path(path) as tmp:
        if path.suffix == ".pt":
            obj = {**header, "state_dict": ckpt.state_dict}
            if ckpt.ema_state_dict is not None:
                obj["ema_state_dict"] = ckpt.ema_state_dict
            with open(tmp, "wb") as f:
                sink = _WriteErrors(f)
                try:
                    torch.save(obj, sink)
                except RuntimeError:
                    if sink.error is None:
                        raise
                    raise sink.error from None
        else:
            from safetensors import SafetensorError
            from safetensors.torch import save_file

            tensors = {"model." + k: v.contiguous() for k, v in ckpt.state_dict.items()}
            if ckpt.ema_state_dict is not None:
                tensors.update({"ema." + k: v.contiguous() for k, v in ckpt.ema_state_dict.items()})
            try:
                save_file(tensors, str(tmp), metadata={"medi_fast": json.dumps(header)})
            except SafetensorError as e:
                raise _os_error_in(e) from None
    ckpt.path = path
    return path


class _WriteErrors:
    """A file for torch.save that keeps the OSError of a failed write: torch's zip writer reports
    any failed write (a full disk included) as a RuntimeError about positions, which names no cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _os_error_in(e: Exception) -> Exception:
    """safetensors reports a failed write as "... I/O error: ... (os error N)": the OSError it was."""
    import os
    import re

    m = re.search(r"os error (\d+)\)", str(e))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else e


def _first_line(e: BaseException) -> str:
    """An exception's first message line, or its type name when the message is empty."""
    lines = str(e).strip().splitlines()
    return lines[0][:120] if lines else type(e).__name__


# Pickle instructions that import or call a Python object: a file that uses them is not plain data.
_CODE_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "REDUCE", "EXT1", "EXT2", "EXT4"}


def builds_objects(path) -> bool:
    """Whether ``path`` holds a well-formed pickle (a raw one, torch's legacy format of several in a
    row, or the ``data.pkl`` of torch's zip format) that imports or calls Python objects.  The stream
    is only disassembled (``pickletools``), never run; a pickle that does not parse to its end does
    not count, so a corrupt file is not called unsafe."""
    import io
    import pickletools
    import zipfile

    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return False
    stream, found = io.BytesIO(data), False
    while stream.tell() < len(data):
        try:
            ops = {op.name for op, _, _ in pickletools.genops(stream)}
        except Exception:  # noqa: BLE001 - garbage raises whatever the disassembler trips on
            break
        found |= bool(ops & _CODE_OPS)
    return found


def _read(path: Path) -> tuple[dict, dict, dict | None]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as e:
            raise MediFastError(f"checkpoint {path} is truncated or corrupt ({e}); re-copy or re-export it") from None
        if "medi_fast" not in meta:
            raise MediFastError(f"{path} is a safetensors file without a medi-fast header; for reference MeDi "
                                f"weights use `medi-fast import-medi {path} ...`")
        try:
            header = json.loads(meta["medi_fast"])
        except ValueError as e:
            raise MediFastError(f"checkpoint {path} has a corrupt header ({e}); re-copy or re-export it") from None
        sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
        return header, sd, ema
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles before refusing them: one line is enough
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's safe unpickler refuses a pickle that imports or calls Python objects (loading it would
        # run code) and garbage alike; only the first is "unsafe" rather than "corrupt".
        if "global" in str(e).lower() or builds_objects(path):
            raise MediFastError(f"refusing {path}: it is not a plain-data checkpoint (it holds pickled objects, "
                                f"and loading them could run code), so it will not be loaded; give a medi-fast "
                                f"checkpoint (plain dicts of tensors) or convert reference weights with "
                                f"`medi-fast import-medi`") from None
        why = "not a pickle torch reads" if "weights only load failed" in str(e).lower() else _first_line(e)
        raise MediFastError(f"checkpoint {path} is truncated or corrupt ({why}); re-copy it") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        # torch.load on garbage raises any of these, some with an empty message.
        raise MediFastError(f"checkpoint {path} is truncated or corrupt ({_first_line(e)}); re-copy it") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("state_dict"), dict):
        raise MediFastError(f"{path} is not a medi-fast checkpoint; create one with `medi-fast train` or "
                            f"`medi-fast init-checkpoint`, or import reference weights with `medi-fast import-medi`")
    return obj, obj["state_dict"], obj.get("ema_state_dict")


def load(path, *, verify: bool = True) -> Checkpoint:
    """Read a checkpoint; refuses missing, truncated, corrupt and unsafe files with one clear line."""
    path = Path(path)
    if path.is_dir():
        raise MediFastError(f"checkpoint {path} is a directory; give the checkpoint file (.pt or .safetensors)")
    if not path.is_file():
        raise MediFastError(f"checkpoint {path} does not exist; check the path")
    if path.suffix not in SUFFIXES:
        raise MediFastError(f"{path} is not a checkpoint (.pt or .safetensors)")
    header, sd, ema = _read(path)
    if int(header.get("version", 0)) > VERSION:
        raise MediFastError(f"{path} was written by a newer medi-fast (format {header['version']}); upgrade medi-fast")
    try:
        ckpt = Checkpoint(ConditionSpec.from_dict(header["condition_spec"]), dict(header["unet_config"]),
                          Schedule.from_dict(header["schedule"]), sd, ema, header.get("preset", ""),
                          dict(header.get("provenance", {})), header.get("hash", ""), path)
    except UnsafeName as e:  # a name that would lead generate's files out of their folder
        raise MediFastError(f"checkpoint {path} is corrupt or unsafe: its {e.problem}; re-create it rather than "
                            f"use it") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MediFastError(f"checkpoint {path} has an incomplete header (missing {e}); re-create it") from None
    if verify:
        actual = ckpt.compute_hash()
        if actual != ckpt.hash:
            raise MediFastError(f"checkpoint {path} is corrupt: content hash {actual} != recorded {ckpt.hash}; re-copy it")
    return ckpt
