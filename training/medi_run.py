"""Reading a run directory of the reference MeDi code (``train_diffusion.py``): where its files
are, its weights (.safetensors or .pth), its scheduler config, its UNet config, and (for runs without
mapping JSONs) the vocabularies rebuilt from its training metadata CSV.  ``import_medi`` maps them.

Every value read here is checked as a command-line option would be (``Fields``): a run directory is
input like any other, and a value that passes on to a checkpoint (a resolution, a number of
timesteps, a name) would otherwise fail later, in ``generate`` or ``export``, far from its cause.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import pickle
import re
from pathlib import Path

import pandas as pd
import torch

from medi_fast.errors import MediFastError
from medi_fast.schedule import Schedule
from medi_fast.vocab import name_problem

UNKNOWN = "Unknown"
CLASS_COLUMNS = ("class", "project_id", "cancer_type")
CLASS_MAP, DOMAIN_MAP, SCHEDULER = "cancer_type_mapping.json", "domain_value_mapping.json", "scheduler_config.json"
WEIGHT_FILES = ("model.safetensors", "model_final.pth")
EMA_DIR, EMA_WEIGHTS = "ema_model", "diffusion_pytorch_model.safetensors"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


RECOPY = "re-copy it from the reference run"
# Plausibility bounds, as for options: far beyond any published model, far below what would exhaust
# memory before the weights are compared with the config.
MAX_TIMESTEPS = 100_000
MAX_RESOLUTION = 4096
MAX_CHANNELS = 8192
MAX_LEVELS = 8


def _parse_int(text: str):
    # json turns an integer of more than 4300 digits into a ValueError without naming the field;
    # as a float (inf) it reaches the field's range check, which does.
    return int(text) if len(text) <= 100 else float(text)


def parse_json(text: str, source) -> object:
    """JSON text read from ``source`` (a file or an option), refused in one line if it is not JSON."""
    try:
        return json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise MediFastError(f"{source} is not valid JSON ({e}); {RECOPY if isinstance(source, Path) else 'fix it'}") \
            from None
    except RecursionError:
        raise MediFastError(f"{source} nests deeper than any configuration does; "
                            f"{RECOPY if isinstance(source, Path) else 'fix it'}") from None


def read_json(path: Path):
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise MediFastError(f"{path} is not valid JSON ({e.reason} at byte {e.start}); {RECOPY}") from None
    return parse_json(text, path)


def unet_config_option(text: str):
    """``--unet-config``: a JSON file, or the JSON text itself."""
    try:
        is_file = Path(text).is_file()
    except OSError:  # JSON text too long to be a file name
        is_file = False
    return read_json(Path(text)) if is_file else parse_json(text, "--unet-config")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


class Fields:
    """A JSON object read from ``source`` (a run file or an option), with typed access: a value of the
    wrong type or out of range is refused naming the source, the field and ``fix``."""

    def __init__(self, data, source, fix: str = RECOPY):
        if not isinstance(data, dict):
            raise MediFastError(f"{source} must be a JSON object, got {type(data).__name__}; {fix}")
        self.data, self.source, self.fix = data, source, fix

    def __contains__(self, key) -> bool:
        return key in self.data

    def refuse(self, key: str, expected: str, value) -> MediFastError:
        return MediFastError(f"{self.source}: {key} must be {expected}, got {_shown(value)}; {self.fix}")

    def whole(self, key: str, lo: int, hi: int, default=None, *, optional: bool = False):
        value = self.data.get(key, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.refuse(key, f"a whole number in {lo}..{hi}", value)
        return value

    def number(self, key: str, lo: float, hi: float, default=None) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            raise self.refuse(key, f"a number in {lo:g}..{hi:g}", value)
        return float(value)

    def flag(self, key: str, default=None) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.refuse(key, "true or false", value)
        return value

    def text(self, key: str, default=None, *, optional: bool = False) -> str | None:
        value = self.data.get(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > 200:
            raise self.refuse(key, "a short text", value)
        return value

    def texts(self, key: str, default=(), *, n: tuple[int, int] = (0, 64)) -> list[str]:
        value = self.data.get(key, default)
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)) or not n[0] <= len(value) <= n[1] \
                or not all(isinstance(v, str) and len(v) <= 200 for v in value):
            raise self.refuse(key, f"a list of {n[0]}..{n[1]} texts", value)
        return list(value)

    def wholes(self, key: str, lo: int, hi: int, *, n: tuple[int, int]) -> list[int]:
        value = self.data.get(key)
        if not isinstance(value, (list, tuple)) or not n[0] <= len(value) <= n[1] or not all(
                isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in value):
            raise self.refuse(key, f"a list of {n[0]}..{n[1]} whole numbers in {lo}..{hi}", value)
        return list(value)

    def scalar(self, key: str):
        """Any JSON scalar (null, true/false, a finite number, a short text)."""
        value = self.data.get(key)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            return self.number(key, -1e9, 1e9) if isinstance(value, float) else self.whole(key, -10**9, 10**9)
        return self.text(key)


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
    """{name: index} -> names by index; refuses gaps, repeats, non-integer indices and names that
    cannot name generate's folders and files."""
    if not isinstance(mapping, dict):
        raise MediFastError(f"{path}: {what} mapping must be a JSON object {{name: index}}; {RECOPY}")
    for name, i in mapping.items():
        if isinstance(i, bool) or not isinstance(i, int):
            raise MediFastError(f"{path}: the index of {what} {_shown(name)} must be a whole number, got {_shown(i)}; "
                                f"{RECOPY}")
    ordered = sorted(mapping.items(), key=lambda kv: kv[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        raise MediFastError(f"{path}: the {what} indices are not 0..{len(ordered) - 1}; {RECOPY}")
    for name, _ in ordered:
        problem = name_problem(name)
        if problem is not None:
            raise MediFastError(f"{path}: {what} {_shown(name)} {problem}, so it cannot name generated files; rename "
                                f"it in that file (the index, not the name, selects the weights)")
    return [n for n, _ in ordered]


def schedule_from_config(path: Path | None) -> Schedule:
    """The DDPMScheduler config of the run -> Schedule; refuses what the import does not map.

    The reference's sample.py builds DPMSolverMultistepScheduler from this file, and diffusers then
    drops every key listed in ``_use_default_values`` (values the DDPM scheduler only defaulted), so
    the solver keeps its own defaults for them: a default "leading" spacing does not carry over and
    the solver runs "linspace".  solver_spacing follows the same rule.
    """
    if path is None:  # train_diffusion.py's DDPMScheduler(1000, "linear", "epsilon") with its defaults
        return Schedule()
    c = Fields(read_json(path), path)
    beta_schedule = c.text("beta_schedule", "linear")
    prediction = c.text("prediction_type", "epsilon")
    spacing = c.text("timestep_spacing", "leading")
    why = None
    if c.data.get("trained_betas") is not None:
        why = "explicit trained_betas"
    elif beta_schedule not in ("linear", "scaled_linear"):
        why = f"beta_schedule {beta_schedule!r}"
    elif c.flag("rescale_betas_zero_snr", False) or c.flag("thresholding", False):
        why = "rescale_betas_zero_snr/thresholding"
    elif spacing not in ("leading", "trailing", "linspace"):
        why = f"timestep_spacing {spacing!r}"
    if why:
        raise MediFastError(f"{path} uses {why}, which medi-fast cannot reproduce; only linear/scaled_linear betas "
                            f"with epsilon prediction are supported")
    if prediction != "epsilon":
        # The reference's train_diffusion.py trains epsilon only, and the import's parity with it is
        # what is tested; a run edited to predict something else is not one it knows how to map.
        raise MediFastError(f"{path} uses prediction_type {prediction!r}; import-medi maps the reference's "
                            f"epsilon-prediction runs only (train_diffusion.py trains epsilon)")
    n = c.whole("num_train_timesteps", 1, MAX_TIMESTEPS, 1000)
    beta_start, beta_end = c.number("beta_start", 0.0, 1.0, 1e-4), c.number("beta_end", 0.0, 1.0, 0.02)
    if not 0 < beta_end < 1 or beta_start > beta_end:
        raise c.refuse("beta_end", f"above beta_start ({beta_start:g}) and below 1", beta_end)
    defaulted = set(c.texts("_use_default_values", (), n=(0, 256)))
    return Schedule(num_train_timesteps=n, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule,
                    prediction_type="epsilon", clip_sample=c.flag("clip_sample", True),
                    clip_sample_range=c.number("clip_sample_range", 1e-6, 1e6, 1.0),
                    steps_offset=c.whole("steps_offset", 0, n - 1, 0), timestep_spacing=spacing,
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


# Bounds of the UNet2DModel options that size the model; the others are checked by their type.
_UNET_BOUNDS = {"sample_size": (1, MAX_RESOLUTION), "in_channels": (1, 64), "out_channels": (1, 64),
                "layers_per_block": (1, 32), "block_out_channels": (1, MAX_CHANNELS),
                "norm_num_groups": (1, MAX_CHANNELS), "attn_norm_num_groups": (1, MAX_CHANNELS),
                "attention_head_dim": (1, MAX_CHANNELS), "time_embedding_dim": (1, 4 * MAX_CHANNELS),
                "num_train_timesteps": (1, MAX_TIMESTEPS), "downsample_padding": (0, 16)}
# Set by the import itself, never read from a config.
_UNET_OWN = {"self", "class_embed_type", "num_class_embeds"}


def check_unet_config(data, source, *, fix: str = RECOPY, strict: bool = False) -> dict:
    """A UNet2DModel config read from ``source`` -> its UNet2DModel options, each checked against
    the type diffusers declares for it (and the bounds above).  ``strict``: refuse keys that are not
    UNet2DModel options (an option the user typed) instead of dropping them (a reference config.json
    also holds its conditioning and EMA settings)."""
    import typing

    from diffusers import UNet2DModel

    f = Fields(data, source, fix)
    params = {k: p for k, p in inspect.signature(UNet2DModel.__init__).parameters.items() if k not in _UNET_OWN}
    cfg = {}
    for key in data:
        if key not in params:
            if strict:
                raise MediFastError(f"{source}: {key!r} is not a UNet2DModel option the import takes; {fix}")
            continue
        args = set(typing.get_args(params[key].annotation)) or {params[key].annotation}
        optional = type(None) in args
        if key in ("block_out_channels",):
            cfg[key] = f.wholes(key, *_UNET_BOUNDS[key], n=(1, MAX_LEVELS))
        elif key in ("down_block_types", "up_block_types"):
            cfg[key] = f.texts(key, n=(1, MAX_LEVELS))
        elif key in _UNET_BOUNDS:
            cfg[key] = f.whole(key, *_UNET_BOUNDS[key], optional=optional)
        elif bool in args:
            cfg[key] = f.flag(key)
        elif int in args:
            cfg[key] = f.whole(key, -10**6, 10**6, optional=optional)
        elif float in args:
            cfg[key] = f.number(key, -1e6, 1e6)
        else:
            cfg[key] = f.text(key, optional=optional)
    return cfg


def check_unet_shape(cfg: dict, source: str) -> None:
    """What no single option shows: one block type per level, and a resolution the levels divide."""
    levels = len(cfg.get("block_out_channels") or ())
    if not levels:
        raise MediFastError(f"{source}: block_out_channels is missing; pass --unet-config with the reference model's "
                            f"config")
    for key in ("down_block_types", "up_block_types"):
        if key in cfg and len(cfg[key]) != levels:
            raise MediFastError(f"{source}: {key} names {len(cfg[key])} blocks for {levels} levels of "
                                f"block_out_channels; give one per level")
    size, step = cfg.get("sample_size"), 2 ** (levels - 1)
    if not isinstance(size, int) or size < step or size % step:
        raise MediFastError(f"{source}: resolution (sample_size) {size} does not fit {levels} levels (a multiple of "
                            f"{step} is needed); pass --resolution with the run's training resolution")


def unet_config_from_reference(config: dict, source) -> dict:
    """The reference UNet's config.json -> a stock UNet2DModel config (conditioning keys dropped)."""
    return {**check_unet_config(config, source), "class_embed_type": "identity"}


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
    for col, values in {class_column: classes, **vocabs}.items():
        for value in values:
            problem = name_problem(value)
            if problem is not None:
                raise MediFastError(f"--metadata {path}: {col} value {_shown(value)} {problem}, so it cannot name "
                                    f"generated files; rename it in the CSV keeping the order the weights follow "
                                    f"(classes sorted, other values by first appearance)")
    return classes, vocabs
