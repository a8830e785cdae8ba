"""Reading a run directory of the reference MeDi code (``train_diffusion.py``): where its files
are, its weights (.safetensors or .pth), its scheduler config, its UNet config, and (for runs without
mapping JSONs) the vocabularies rebuilt from its training metadata CSV.  ``import_medi`` maps them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import pickle
import re
from pathlib import Path

import pandas as pd
import torch

from medi_fast.errors import MediFastError
from medi_fast.schedule import Schedule

UNKNOWN = "Unknown"
CLASS_COLUMNS = ("class", "project_id", "cancer_type")
CLASS_MAP, DOMAIN_MAP, SCHEDULER = "cancer_type_mapping.json", "domain_value_mapping.json", "scheduler_config.json"
WEIGHT_FILES = ("model.safetensors", "model_final.pth")
EMA_DIR, EMA_WEIGHTS = "ema_model", "diffusion_pytorch_model.safetensors"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MediFastError(f"{path} is not valid JSON ({e}); re-copy it from the reference run") from None


def step_of(directory: Path) -> int | None:
    m = re.fullmatch(r"checkpoint-(\d+)", directory.name)
    return int(m.group(1)) if m else None


def resolve(path, *, ema: bool = False, weights=None) -> dict:
    """RUN/, RUN/checkpoint-N/ or a weights file -> {run_dir, checkpoint_dir, weights, ema}."""
    path = Path(path)
    if not path.exists():
        raise MediFastError(f"{path} does not exist; pass a reference run directory, a checkpoint-N directory "
                            f"or a weights file")
    ckpt_dir = None
    if path.is_dir():
        steps = sorted((s, d) for d in path.iterdir() if d.is_dir() and (s := step_of(d)) is not None)
        if steps:  # a run directory: its latest checkpoint
            ckpt_dir = steps[-1][1]
        elif path.name == EMA_DIR:
            ckpt_dir, ema = path.parent, True
        else:
            ckpt_dir = path
        if weights is not None:
            w = Path(weights)
            w = w if w.is_absolute() or w.exists() else ckpt_dir / w
            if not w.is_file():
                raise MediFastError(f"--weights {weights} is not a file in {ckpt_dir}; pick one of "
                                    f"{', '.join(WEIGHT_FILES)} or pass --ema")
        elif ema:
            w = ckpt_dir / EMA_DIR / EMA_WEIGHTS
            if not w.is_file():
                raise MediFastError(f"{ckpt_dir} has no {EMA_DIR}/{EMA_WEIGHTS} (the run was trained without "
                                    f"--use_ema?); drop --ema to import {WEIGHT_FILES[0]}")
        else:
            w = next((ckpt_dir / f for f in WEIGHT_FILES if (ckpt_dir / f).is_file()), None)
            if w is None and (ckpt_dir / EMA_DIR / EMA_WEIGHTS).is_file():
                w, ema = ckpt_dir / EMA_DIR / EMA_WEIGHTS, True
            if w is None:
                raise MediFastError(f"{ckpt_dir} holds no weights ({', '.join(WEIGHT_FILES)} or {EMA_DIR}/); "
                                    f"pass a checkpoint-N directory of the run, or the weights file")
    else:
        if weights is not None or ema:
            raise MediFastError(f"{path} is already a weights file; drop --weights/--ema or pass its checkpoint directory")
        w = path
        ema = path.parent.name == EMA_DIR
        ckpt_dir = path.parent.parent if ema else path.parent
    run_dir = next((d for d in (ckpt_dir, ckpt_dir.parent) if (d / CLASS_MAP).is_file()), None)
    return {"run_dir": run_dir, "checkpoint_dir": ckpt_dir, "weights": w, "ema": bool(ema)}


def read_reference(path) -> dict[str, torch.Tensor]:
    """The reference state dict from .safetensors (save_state, EMA) or .pth (torch.save of the state dict)."""
    path = Path(path)
    if not path.is_file():
        raise MediFastError(f"reference weights {path} do not exist; check the path")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            sd = load_file(str(path))
        except Exception as e:  # safetensors raises several types for a bad file
            raise MediFastError(f"{path} is not a readable safetensors file ({str(e)[:120]}); re-copy it from "
                                f"the reference run") from None
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            raise MediFastError(f"{path} is not a readable torch state dict ({str(e).splitlines()[0][:120]}); "
                                f"re-copy it, or import model.safetensors instead") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise MediFastError(f"{path} does not hold a state dict of tensors; pass model_final.pth or model.safetensors")
    # DistributedDataParallel / wrapper prefixes
    for prefix in ("module.", "unet."):
        if "class_embedding.weight" not in sd and any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    return sd


def index_map(mapping: dict, what: str, path: Path) -> list[str]:
    """{name: index} -> names by index; refuses gaps and repeats."""
    if not isinstance(mapping, dict):
        raise MediFastError(f"{path}: {what} mapping must be a JSON object {{name: index}}; re-copy it from the reference run")
    try:
        ordered = sorted(mapping.items(), key=lambda kv: int(kv[1]))
    except (TypeError, ValueError, AttributeError):
        raise MediFastError(f"{path}: {what} must map names to integer indices; re-copy it from the reference run") from None
    if [int(i) for _, i in ordered] != list(range(len(ordered))):
        raise MediFastError(f"{path}: the {what} indices are not 0..{len(ordered) - 1}; re-copy it from the reference run")
    return [str(n) for n, _ in ordered]


def schedule_from_config(path: Path | None) -> Schedule:
    """The DDPMScheduler config of the run -> Schedule; refuses what medi-fast cannot reproduce.

    The reference's sample.py builds DPMSolverMultistepScheduler from this file, and diffusers then
    drops every key listed in ``_use_default_values`` (values the DDPM scheduler only defaulted), so
    the solver keeps its own defaults for them: a default "leading" spacing does not carry over and
    the solver runs "linspace".  solver_spacing follows the same rule.
    """
    if path is None:  # train_diffusion.py's DDPMScheduler(1000, "linear", "epsilon") with its defaults
        return Schedule()
    c = read_json(path)
    if not isinstance(c, dict):
        raise MediFastError(f"{path} is not a scheduler config (a JSON object); re-copy it from the reference run")
    why = None
    if c.get("trained_betas") is not None:
        why = "explicit trained_betas"
    elif c.get("beta_schedule", "linear") not in ("linear", "scaled_linear"):
        why = f"beta_schedule {c.get('beta_schedule')!r}"
    elif c.get("prediction_type", "epsilon") != "epsilon":
        why = f"prediction_type {c.get('prediction_type')!r}"
    elif c.get("rescale_betas_zero_snr") or c.get("thresholding"):
        why = "rescale_betas_zero_snr/thresholding"
    elif c.get("timestep_spacing", "leading") not in ("leading", "trailing", "linspace"):
        why = f"timestep_spacing {c.get('timestep_spacing')!r}"
    if why:
        raise MediFastError(f"{path} uses {why}, which medi-fast cannot reproduce; only linear/scaled_linear betas "
                            f"with epsilon prediction are supported")
    defaulted = set(c.get("_use_default_values") or [])
    spacing = c.get("timestep_spacing", "leading")
    return Schedule(num_train_timesteps=int(c.get("num_train_timesteps", 1000)),
                    beta_start=float(c.get("beta_start", 1e-4)), beta_end=float(c.get("beta_end", 0.02)),
                    beta_schedule=c.get("beta_schedule", "linear"), prediction_type="epsilon",
                    clip_sample=bool(c.get("clip_sample", True)),
                    clip_sample_range=float(c.get("clip_sample_range", 1.0)),
                    steps_offset=int(c.get("steps_offset", 0)), timestep_spacing=spacing,
                    solver_spacing=None if "timestep_spacing" in defaulted or "timestep_spacing" not in c else spacing)


def infer_unet_config(unet_sd: dict[str, torch.Tensor], resolution: int) -> dict:
    """UNet2DModel config from weight shapes (norm_num_groups and attention_head_dim are not visible
    in shapes: the reference's 32 and 8 are assumed; override with --unet-config)."""
    if "conv_in.weight" not in unet_sd:
        raise MediFastError("the file has no conv_in.weight: not a diffusers UNet2DModel; pass the reference "
                            "model's weights")
    levels = sorted({int(m.group(1)) for k in unet_sd for m in [re.match(r"down_blocks\.(\d+)\.", k)] if m})
    channels = [int(unet_sd[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in levels]
    layers = len({m.group(1) for k in unet_sd for m in [re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)] if m})
    down = ["AttnDownBlock2D" if any(k.startswith(f"down_blocks.{i}.attentions.") for k in unet_sd) else "DownBlock2D"
            for i in levels]
    up = ["AttnUpBlock2D" if any(k.startswith(f"up_blocks.{i}.attentions.") for k in unet_sd) else "UpBlock2D"
          for i in levels]
    return {"sample_size": resolution, "in_channels": int(unet_sd["conv_in.weight"].shape[1]),
            "out_channels": int(unet_sd["conv_out.weight"].shape[0]), "layers_per_block": layers,
            "block_out_channels": channels, "down_block_types": down, "up_block_types": up,
            "add_attention": any(k.startswith("mid_block.attentions.") for k in unet_sd),
            "norm_num_groups": 32, "class_embed_type": "identity"}


def unet_config_from_reference(config: dict) -> dict:
    """The reference UNet's config.json -> a stock UNet2DModel config (conditioning keys dropped)."""
    from diffusers import UNet2DModel

    accepted = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self", "class_embed_type", "num_class_embeds"}
    cfg = {k: v for k, v in config.items() if k in accepted}
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        if k in cfg:
            cfg[k] = list(cfg[k])
    return {**cfg, "class_embed_type": "identity"}


def reference_vocabularies(metadata_csv, columns: list[str], class_column: str | None = None):
    """(class names sorted, {column: values in order of first appearance + 'Unknown'}), as the
    reference builds them from its training metadata CSV."""
    path = Path(metadata_csv)
    if not path.is_file():
        raise MediFastError(f"--metadata {path} does not exist; pass the reference run's training metadata CSV")
    table = pd.read_csv(path, dtype=str)  # codes stay strings: "05" is not 5
    if class_column is None:
        class_column = next((c for c in CLASS_COLUMNS if c in table.columns), None)
    if class_column is None or class_column not in table.columns:
        raise MediFastError(f"--metadata {path} has no class column ({', '.join(CLASS_COLUMNS)}); pass --class-column")
    classes = sorted(table[class_column].dropna().astype(str).str.strip().unique())
    vocabs = {}
    for col in columns:
        if col not in table.columns:
            raise MediFastError(f"--condition {col}: column not in {path} (columns: {', '.join(table.columns)})")
        values = list(dict.fromkeys(table[col].fillna(UNKNOWN).astype(str).str.strip()))
        if UNKNOWN not in values:
            values.append(UNKNOWN)
        vocabs[col] = values
    return classes, vocabs
