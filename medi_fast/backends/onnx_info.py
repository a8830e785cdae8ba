"""An .onnx file's self-description: what ``medi-fast export`` writes into ``metadata_props`` and
what the runtime reads back, so ``medi-fast generate model.onnx`` needs no checkpoint.

Keys (all strings; structured values are JSON):

    medi_fast.format           "medi-fast-onnx"
    medi_fast.version          format version (int)
    medi_fast.condition_spec   ConditionSpec.to_dict(), vocabularies included
    medi_fast.vocabularies     {attribute: [names...]}, for people reading the graph in Netron
    medi_fast.schedule         Schedule.to_dict()
    medi_fast.preset           preset name
    medi_fast.checkpoint_hash  the source checkpoint's content hash (written into every manifest)
    medi_fast.resolution       image side in pixels
    medi_fast.contract         IOContract.to_dict()
    medi_fast.precision        "fp32" | "fp16"
    medi_fast.unet_config      the UNet2DModel config (for rebuilding a reference)
    medi_fast.provenance       the checkpoint's training provenance plus export details
"""
from __future__ import annotations

import json
from pathlib import Path

from ..conditioning import ConditionSpec
from ..errors import MediFastError
from ..schedule import Schedule
from ..vocab import UnsafeName
from . import ModelInfo
from .contract import IOContract

FORMAT = "medi-fast-onnx"
VERSION = 1
PREFIX = "medi_fast."


def metadata(spec: ConditionSpec, schedule: Schedule, *, preset: str, checkpoint_hash: str, resolution: int,
             contract: IOContract, precision: str, unet_config: dict, provenance: dict) -> dict[str, str]:
    """The metadata_props entries for an exported graph."""
    vocabs = {a.name: list(a.vocab.names) for a in spec.attributes if a.vocab is not None}
    values = {"format": FORMAT, "version": VERSION, "condition_spec": spec.to_dict(), "vocabularies": vocabs,
              "schedule": schedule.to_dict(), "preset": preset, "checkpoint_hash": checkpoint_hash,
              "resolution": int(resolution), "contract": contract.to_dict(), "precision": precision,
              "unet_config": unet_config, "provenance": provenance}
    return {PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def parse_metadata(props: dict[str, str], path: Path, kind: str = "onnx") -> ModelInfo:
    """metadata dict (from metadata_props or an engine sidecar) -> ModelInfo; clear errors."""
    if props.get(PREFIX + "format") != FORMAT:
        raise MediFastError(f"{path} was not exported by medi-fast (no medi_fast metadata); export the checkpoint "
                            f"with `medi-fast export CKPT --out DIR`")
    try:
        if int(props[PREFIX + "version"]) > VERSION:
            raise MediFastError(f"{path} was exported by a newer medi-fast; upgrade medi-fast")
        spec = ConditionSpec.from_dict(json.loads(props[PREFIX + "condition_spec"]))
        schedule = Schedule.from_dict(json.loads(props[PREFIX + "schedule"]))
        contract = IOContract.from_dict(json.loads(props[PREFIX + "contract"]))
        provenance = json.loads(props.get(PREFIX + "provenance", "{}"))
        extra = {"precision": props.get(PREFIX + "precision", "fp32"),
                 "unet_config": json.loads(props.get(PREFIX + "unet_config", "{}")), "metadata": dict(props)}
        return ModelInfo(Path(path), kind, spec, schedule, int(props[PREFIX + "resolution"]),
                         props.get(PREFIX + "preset", ""), props[PREFIX + "checkpoint_hash"], provenance,
                         contract=contract, extra=extra)
    except UnsafeName as e:  # a name that would lead generate's files out of their folder
        raise MediFastError(f"{path} is corrupt or unsafe: its {e.problem}; re-export it from a trusted checkpoint "
                            f"rather than use it") from None
    except (KeyError, ValueError, TypeError) as e:
        raise MediFastError(f"{path} has incomplete medi_fast metadata ({e}); re-export it with `medi-fast export`") from None


def read_props(path) -> dict[str, str]:
    """metadata_props of an .onnx file, without loading external weight files."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise MediFastError(f"model file {path} does not exist; check the path")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as e:
        raise MediFastError(f"{path} is truncated or not an ONNX file ({type(e).__name__}); re-export it with "
                            f"`medi-fast export`") from None
    if not model.graph.node:
        raise MediFastError(f"{path} is truncated or not an ONNX file (empty graph); re-export it with `medi-fast export`")
    return {p.key: p.value for p in model.metadata_props}


def read_onnx_info(path) -> ModelInfo:
    """READERS entry for .onnx."""
    return parse_metadata(read_props(path), Path(path))
