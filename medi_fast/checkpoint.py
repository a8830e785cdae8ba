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
            with open(tmp, "wb") as f:  # a full disk: OSError here; torch.save(obj, name) raises RuntimeError
                torch.save(obj, f)
        else:
            from safetensors.torch import save_file

            tensors = {"model." + k: v.contiguous() for k, v in ckpt.state_dict.items()}
            if ckpt.ema_state_dict is not None:
                tensors.update({"ema." + k: v.contiguous() for k, v in ckpt.ema_state_dict.items()})
            save_file(tensors, str(tmp), metadata={"medi_fast": json.dumps(header)})
    ckpt.path = path
    return path


def _first_line(e: BaseException) -> str:
    """An exception's first message line, or its type name when the message is empty."""
    lines = str(e).strip().splitlines()
    return lines[0][:120] if lines else type(e).__name__


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
        if "global" in str(e).lower():  # a class or function reference: loading it would run code
            raise MediFastError(f"refusing {path}: it needs arbitrary unpickling, which can run code; "
                                f"only medi-fast checkpoints (plain dicts of tensors) are loaded") from None
        raise MediFastError(f"checkpoint {path} is truncated or corrupt ({_first_line(e)}); re-copy it") from None
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
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MediFastError(f"checkpoint {path} has an incomplete header (missing {e}); re-create it") from None
    if verify:
        actual = ckpt.compute_hash()
        if actual != ckpt.hash:
            raise MediFastError(f"checkpoint {path} is corrupt: content hash {actual} != recorded {ckpt.hash}; re-copy it")
    return ckpt
