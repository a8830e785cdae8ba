"""Import a run of the reference MeDi code (``train_diffusion.py``) as it is.

A reference run directory holds ``cancer_type_mapping.json`` ({class: index}),
``domain_value_mapping.json`` ({domain: {value: index}}, categorical domains in the order of
``--domains_to_condition``), ``scheduler_config.json`` (the DDPMScheduler) and ``checkpoint-N/``
with ``model.safetensors`` (accelerate's save_state), ``model_final.pth`` (the same state dict) and,
with ``--use_ema``, ``ema_model/{config.json, diffusion_pytorch_model.safetensors}``.

Mapping onto MeDiUNet (a stock UNet2DModel with class_embed_type="identity", so z_cond is added to
the timestep embedding exactly where the reference adds its combined embedding):

    class_embedding.weight               -> conditioner.tables.class.weight[:-1]
    domain_embeddings.<column>.weight    -> conditioner.tables.<attribute>.weight[:-1]
    positional domain <name>_p           -> a continuous attribute, encoding "reference" (no weights)
    linear_comb.*                        -> conditioner.linear_comb.*
    everything else                      -> unet.*

The reference's embedding order is the order of ``--domains_to_condition``: the mapping JSON keeps it
for the categorical domains, but where a positional domain came in it is recorded nowhere, so in
concat mode (where order changes the model) ``--condition`` must say it.  The reference's linear
mode builds no positional encoder and its ``linear_comb`` takes 1 + (categorical domains) inputs,
so a positional domain there has no effect; the import leaves it out and says so.

Our tables have one extra last row (the null id, for guidance); the reference never trained one,
so it is filled with the mean of the table's rows (default) or zeros.  A positional domain's null
is the encoding of 60, the value the reference substitutes for a missing age.

``import_run`` is one step per stage, in order: the options (``_check_options``), the weights and
``ema_model/config.json`` (``_read_run``), the vocabularies (``_read_vocabularies``), the UNet config
(``_unet_config``), the conditioning mode (``_conditioning_mode``), the positional domains and the
concatenation order (``_domains``), the model with the reference's weights (``_build_model``), then
the schedule and the provenance.  Every value, from a file or an option, is checked before the
checkpoint is written, and it is written whole or not at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from medi_fast import checkpoint as ckpt_io
from medi_fast.conditioning import CATEGORICAL, CONTINUOUS, COLUMNS, REFERENCE, Attribute, ConditionSpec, \
    reference_sinusoidal
from medi_fast.errors import MediFastError, one_line
from medi_fast.io import check_writable_dir
from medi_fast.model import MeDiUNet
from medi_fast.vocab import Vocabulary, check_name

from .medi_run import (CLASS_MAP, DOMAIN_MAP, EMA_DIR, MAX_RESOLUTION, SCHEDULER, Fields, check_unet_config,
                       check_unet_shape, index_map, infer_unet_config, read_json, read_reference,
                       reference_vocabularies, resolve, schedule_from_config, sha, step_of, unet_config_from_reference)

# The reference fills a missing positional value (age) with 60 before encoding it.
POSITIONAL_MISSING = 60.0
POSITIONAL_MAX = 100.0
# Reference column -> medi-fast attribute; any other column keeps its name.
_ATTRIBUTE_FOR_COLUMN = {**{col: name for name, col in COLUMNS.items()}, "age_p": "age"}
# What users may type in --condition for a reference column.
_COLUMN_ALIASES = {"tss": "tissue_source_site", "age": "age_p", "age_at_index": "age_p"}


def _with_null(weight: torch.Tensor, null_fill: str) -> torch.Tensor:
    null = weight.mean(0, keepdim=True) if null_fill == "mean" else torch.zeros_like(weight[:1])
    return torch.cat([weight, null], 0)  # (V + 1, d)


def _command(order: list[str]) -> str:
    return f"--condition {','.join(order)}"


def _domain_order(categorical: list[str], positional: list[str], condition: list[str] | None,
                  order_matters: bool) -> list[str]:
    """The reference's --domains_to_condition order, checked against what the files show."""
    if condition is None:
        if positional and categorical and order_matters:
            raise MediFastError(f"the run does not record where {', '.join(positional)} came in --domains_to_condition "
                                f"(it changes this model); pass the training run's order, e.g. "
                                f"{_command(categorical + positional)}")
        return categorical + positional
    given = [_COLUMN_ALIASES.get(c, c) for c in condition]
    known = categorical + positional
    wrong = [c for c in given if c not in known] + [c for c in known if c not in given]
    if wrong:
        hint = [c for c in given if c in known] + [c for c in known if c not in given]
        raise MediFastError(f"--condition {','.join(condition)} does not match the run (its domains are "
                            f"{', '.join(known) or 'none'}: categorical from the weights and mapping, positional "
                            f"from config.json or the weights); pass {_command(hint)}")
    if [c for c in given if c in categorical] != categorical:
        fixed = iter(categorical)
        hint = [next(fixed) if c in categorical else c for c in given]
        raise MediFastError(f"--condition {','.join(condition)} orders the categorical domains differently from "
                            f"the run's mapping ({', '.join(categorical)}); pass {_command(hint)}")
    return given


def _concat_positional_count(d_t: int, class_w: int, cat_w: int | None, n_cat: int) -> int | None:
    """How many positional domains the concat widths leave room for (None: the widths fit no count)."""
    for total in range(1 + n_cat, d_t + 1):
        floor = d_t // total
        if floor + d_t % total == class_w and (cat_w is None or floor == cat_w):
            return total - 1 - n_cat
    return None


@dataclass
class _Run:
    """What the run's files say (filled in by the steps of ``import_run``, in order)."""

    src: dict  # resolve(): run_dir, checkpoint_dir, weights, ema
    sd: dict[str, torch.Tensor]
    config: dict | None  # ema_model/config.json, its values checked
    config_path: Path | None
    files: dict = field(default_factory=dict)  # name -> sha256 of each file the import read
    classes: list[str] = field(default_factory=list)
    vocabs: dict[str, list[str]] = field(default_factory=dict)  # categorical column -> values
    source_of_names: str = ""

    @property
    def tables_in_weights(self) -> list[str]:
        return [k.split(".")[1] for k in self.sd if k.startswith("domain_embeddings.") and k.endswith(".weight")]

    @property
    def categorical(self) -> list[str]:
        return list(self.vocabs)


def _check_options(out, overwrite: bool, condition: list[str] | None, resolution, mode, null_fill) -> None:
    """The options, before any file is read (a refused import writes nothing)."""
    if out is not None:
        out = Path(out)
        if out.suffix not in ckpt_io.SUFFIXES:
            raise MediFastError(f"--out {out} must end in .pt or .safetensors")
        if out.is_dir():
            raise MediFastError(f"--out {out} is a directory; give a checkpoint file name (.pt or .safetensors)")
        if out.exists() and not overwrite:
            raise MediFastError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")
        check_writable_dir(out.parent)
    if condition is not None:
        given = [_COLUMN_ALIASES.get(c, c) for c in condition]
        twice = sorted({c for c in given if given.count(c) > 1})
        if twice:
            once = ",".join(dict.fromkeys(given))
            raise MediFastError(f"--condition {','.join(condition)} names {', '.join(twice)} more than once; give each "
                                f"domain once, in the training run's order (e.g. --condition {once})")
        for c in given:
            check_name(c, "--condition domain", attribute=True)
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or not 1 <= resolution <= MAX_RESOLUTION):
        raise MediFastError(f"--resolution must be a whole number in 1..{MAX_RESOLUTION}, got {resolution!r}")
    if mode not in (None, "concat", "additive", "linear"):
        raise MediFastError(f"--mode {mode!r} is not a reference --cond_type; use concat, additive or linear")
    if null_fill not in ("mean", "zeros"):
        raise MediFastError(f"--null {null_fill!r} is unknown; use mean or zeros")


def _read_run(path, ema: bool, weights) -> _Run:
    """The weights and, where there is one, ema_model/config.json (its values checked)."""
    src = resolve(path, ema=ema, weights=weights)
    sd = read_reference(src["weights"])
    if "class_embedding.weight" not in sd:
        raise MediFastError(f"{src['weights']} has no class_embedding.weight: not a class-conditioned reference "
                            f"MeDi checkpoint; pass the run's model.safetensors or ema_model/")
    ckpt_dir = src["checkpoint_dir"]
    config_path = ckpt_dir / EMA_DIR / "config.json" if ckpt_dir is not None else None
    config = None
    if config_path is not None and config_path.is_file():
        fields = Fields(read_json(config_path), config_path)
        fields.text("class_embed_type", optional=True)
        for name in fields.texts("positional_domains", (), n=(0, 64)):
            check_name(name, f"{config_path}: positional domain", attribute=True,
                       fix="rename it in that file (names do not select weights)")
        fields.whole("optimization_step", 0, 10**12, optional=True)
        config = fields.data
    return _Run(src, sd, config, config_path if config is not None else None)


def _read_vocabularies(run: _Run, metadata_csv, condition: list[str] | None, class_column) -> None:
    """The vocabularies: the mapping JSONs (index i there is index i here), else the training CSV."""
    run_dir, ckpt_dir = run.src["run_dir"], run.src["checkpoint_dir"]
    if run_dir is not None:
        run.classes = index_map(read_json(run_dir / CLASS_MAP), "class", run_dir / CLASS_MAP)
        run.files[CLASS_MAP] = sha(run_dir / CLASS_MAP)
        dmap_path = run_dir / DOMAIN_MAP
        dmap = read_json(dmap_path) if dmap_path.is_file() else {}
        if dmap_path.is_file():
            run.files[DOMAIN_MAP] = sha(dmap_path)
        if not isinstance(dmap, dict):
            raise MediFastError(f"{dmap_path} must be a JSON object {{domain: {{value: index}}}}; re-copy it from the reference run")
        for col in dmap:
            check_name(col, f"{dmap_path}: domain", attribute=True, fix="re-copy it from the reference run")
        run.vocabs = {col: index_map(m, f"{col} value", dmap_path) for col, m in dmap.items()}
        run.source_of_names = f"{run_dir / CLASS_MAP} and {DOMAIN_MAP}"
    elif metadata_csv is not None:
        given = [_COLUMN_ALIASES.get(c, c) for c in (condition or [])]
        cat_cols = [c for c in given if not c.endswith("_p")]
        if sorted(cat_cols) != sorted(run.tables_in_weights):
            found = sorted(run.tables_in_weights)
            raise MediFastError(f"the weights have domain embeddings for {found or 'no columns'} but --condition says "
                                f"{cat_cols or 'none'}; pass --condition "
                                f"{','.join(found + [c for c in given if c.endswith('_p')])} (in the training order)")
        run.classes, run.vocabs = reference_vocabularies(metadata_csv, cat_cols, class_column)
        run.source_of_names = str(metadata_csv)
    else:
        raise MediFastError(f"no {CLASS_MAP} next to {run.src['weights']} (looked in {ckpt_dir} and its parent); pass "
                            f"the run directory as written by train_diffusion.py, or --metadata TRAIN_CSV for a run "
                            f"without its mapping JSONs")
    if sorted(run.categorical) != sorted(run.tables_in_weights):
        raise MediFastError(f"the mapping ({run.source_of_names}) lists domains {run.categorical or 'none'} but the "
                            f"weights have embeddings for {sorted(run.tables_in_weights) or 'none'}; import the "
                            f"checkpoint of the run these files belong to"
                            + ("" if run_dir is not None else f", or pass {_command(sorted(run.tables_in_weights))}"))
    for col, w in _tables(run).items():
        size = len(run.classes) if col == "class" else len(run.vocabs[col])
        if w.ndim != 2 or w.shape[0] != size:
            key = "class_embedding" if col == "class" else f"domain_embeddings.{col}"
            raise MediFastError(f"the mapping disagrees with the weights: {key} has {w.shape[0] if w.ndim else 0} "
                                f"rows but {run.source_of_names} gives {size} {col} values; "
                                + ("import the checkpoint of the run these files belong to" if run_dir is not None
                                   else "pass the metadata CSV the reference model was trained on"))


def _tables(run: _Run) -> dict[str, torch.Tensor]:
    return {"class": run.sd["class_embedding.weight"],
            **{c: run.sd[f"domain_embeddings.{c}.weight"] for c in run.categorical}}


def _unet_sd(run: _Run) -> dict[str, torch.Tensor]:
    return {k: v for k, v in run.sd.items() if not k.startswith(("class_embedding.", "domain_embeddings.", "linear_comb."))}


def _unet_config(run: _Run, resolution: int | None, unet_config: dict | None) -> dict:
    """The UNet config: ema_model/config.json, else the weight shapes; then the options."""
    if run.config is not None:
        cfg = unet_config_from_reference(run.config, run.config_path)
    else:
        cfg = infer_unet_config(_unet_sd(run), resolution or 128)
    if resolution is not None:
        cfg["sample_size"] = resolution
    if unet_config is not None:
        cfg.update(check_unet_config(unet_config, "--unet-config", fix="pass a JSON object of UNet2DModel options",
                                     strict=True))
    cfg["class_embed_type"] = "identity"
    sources = [str(s) for s, used in ((run.config_path, run.config is not None), ("--unet-config", unet_config),
                                      ("--resolution", resolution is not None)) if used]
    check_unet_shape(cfg, "the UNet config" + (f" ({', '.join(sources)})" if sources else " inferred from the weights"))
    return cfg


def _conditioning_mode(run: _Run, d_t: int, mode: str | None) -> str:
    """The reference's --cond_type: config.json, else the weights; checked against --mode."""
    categorical, config = run.categorical, run.config
    class_w = int(run.sd["class_embedding.weight"].shape[1])
    if "linear_comb.weight" in run.sd:
        seen = "linear"
    elif class_w < d_t:
        seen = "concat"
    else:
        seen = "additive" if categorical else "concat"
    ref_mode = (config or {}).get("class_embed_type") or seen
    if ref_mode not in ("concat", "additive", "linear"):
        ref_mode = "concat" if not categorical else ref_mode  # None/"linear"-less CLS models add the class only
    if ref_mode != seen and not (not categorical and {ref_mode, seen} <= {"concat", "additive"}):
        raise MediFastError(f"config.json says class_embed_type {ref_mode!r} but the weights are {seen!r}; "
                            f"pass the config.json of the same run")
    if mode is not None and mode != ref_mode and categorical:
        raise MediFastError(f"--mode {mode} but the run is a {ref_mode} model (from "
                            f"{'config.json' if config else 'the weight shapes'}); drop --mode or pass --mode {ref_mode}")
    return ref_mode


def _domains(run: _Run, ref_mode: str, d_t: int, condition: list[str] | None):
    """The positional domains (config.json, else --condition names ending in _p, else the concat
    widths), the width of their encoding, and the reference's concatenation order.

    Returns (order, positional, used_positional, pos_w, notes).
    """
    categorical, config, tables = run.categorical, run.config, _tables(run)
    if config is not None:
        positional = list(config.get("positional_domains") or [])
    else:
        # the reference's rule: a domain whose name ends in "_p" is positional
        positional = [c for c in (_COLUMN_ALIASES.get(x, x) for x in (condition or []))
                      if c not in categorical and c.endswith("_p")]
    notes = []
    used_positional = list(positional)
    class_w = int(tables["class"].shape[1])
    if ref_mode == "concat":
        cat_w = int(tables[categorical[0]].shape[1]) if categorical else None
        n_pos = _concat_positional_count(d_t, class_w, cat_w, len(categorical))
        if n_pos is None or (config is not None and n_pos != len(positional)):
            raise MediFastError(f"the embedding widths (class {class_w}, domains {cat_w}) do not split d_t = {d_t} "
                                f"as the reference's concat mode does; pass the weights and config.json of one run")
        if n_pos != len(positional):
            example = categorical + (positional + [f"age_p{i or ''}" for i in range(n_pos)])[:n_pos] \
                if n_pos > len(positional) else categorical
            raise MediFastError(f"the weights leave room for {n_pos} positional domain(s) (e.g. age_p) but "
                                f"{'--condition names' if condition else 'the run names'} {len(positional)}; pass the "
                                f"training run's --domains_to_condition, e.g. {_command(example)}")
        pos_w = d_t // (1 + len(categorical) + n_pos)
        if positional and pos_w % 2:
            raise MediFastError(f"the positional width {pos_w} is odd, which the reference cannot run either; "
                                f"this checkpoint is not usable")
    elif ref_mode == "linear":
        n_in = int(run.sd["linear_comb.weight"].shape[1]) // d_t
        if n_in == 1 + len(categorical) and positional:
            notes.append(f"{', '.join(positional)} left out: the reference's linear mode builds no positional "
                         f"encoder, so {'it' if len(positional) == 1 else 'they'} never reached this model")
            used_positional = []
        elif n_in != 1 + len(categorical) + len(positional):
            raise MediFastError(f"linear_comb takes {n_in} embeddings but the run has 1 class + {len(categorical)} "
                                f"categorical + {len(positional)} positional; pass the weights of the same run")
        pos_w = d_t
    else:
        pos_w = d_t
    order = _domain_order(categorical, positional, condition,
                          order_matters=ref_mode == "concat" or (ref_mode == "linear" and bool(used_positional)))
    order = [c for c in order if c in categorical or c in used_positional]
    return order, positional, used_positional, pos_w, notes


def _build_model(run: _Run, cfg: dict, ref_mode: str, order: list[str], pos_w: int, null_fill: str) -> MeDiUNet:
    """The spec in the reference's concatenation order, and the model holding the reference's weights."""
    categorical, tables, d_t = run.categorical, _tables(run), int(cfg["block_out_channels"][0]) * 4
    attrs = [Attribute("class", CATEGORICAL, int(tables["class"].shape[1]),
                       Vocabulary("class", tuple(run.classes), tcga_aliases=True))]
    names = {}
    for col in order:
        names[col] = _ATTRIBUTE_FOR_COLUMN.get(col, col)
        if col in categorical:
            attrs.append(Attribute(names[col], CATEGORICAL, int(tables[col].shape[1]),
                                   Vocabulary(names[col], tuple(run.vocabs[col]))))
        else:
            attrs.append(Attribute(names[col], CONTINUOUS, pos_w, None, POSITIONAL_MAX, REFERENCE))
    # A linear model whose domains all vanished adds the class embedding alone (the reference skips
    # linear_comb when no domain embedding is present): that is concat with one d_t-wide table.
    spec_mode = ref_mode if len(attrs) > 1 else "concat"
    spec = ConditionSpec(tuple(attrs), d_t, spec_mode)
    ours = {f"unet.{k}": v for k, v in _unet_sd(run).items()}
    ours["conditioner.tables.class.weight"] = _with_null(tables["class"], null_fill)
    for col in order:
        if col in categorical:
            ours[f"conditioner.tables.{names[col]}.weight"] = _with_null(tables[col], null_fill)
        else:
            ours[f"conditioner.nulls.{names[col]}"] = reference_sinusoidal(
                torch.tensor([POSITIONAL_MISSING]), pos_w, POSITIONAL_MAX)[0]
    if spec_mode == "linear":
        ours["conditioner.linear_comb.weight"] = run.sd["linear_comb.weight"]
        ours["conditioner.linear_comb.bias"] = run.sd["linear_comb.bias"]
    # The config is compared with the weights on a model without storage first, so a config that
    # does not fit them is refused before memory is allocated for it.
    fix = "pass --unet-config with the reference model's config"
    try:
        with torch.device("meta"):
            shape = MeDiUNet(spec, cfg).state_dict()
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError, RuntimeError) as e:
        raise MediFastError(f"diffusers cannot build a UNet2DModel from this config "
                            f"({one_line(e)[:160]}); {fix}") from None
    missing = [k for k in shape if k not in ours]
    unexpected = [k for k in ours if k not in shape]
    if missing or unexpected:
        raise MediFastError(f"the weights do not fit the UNet config ({len(missing)} missing, e.g. "
                            f"{(missing or ['-'])[0]}; {len(unexpected)} unexpected, e.g. {(unexpected or ['-'])[0]}); "
                            f"{fix}")
    wrong = next((k for k in shape if tuple(shape[k].shape) != tuple(ours[k].shape)), None)
    if wrong is not None:
        raise MediFastError(f"the weights do not fit the UNet config ({wrong} is {tuple(ours[wrong].shape)} in the "
                            f"weights, {tuple(shape[wrong].shape)} in the config); {fix}")
    model = MeDiUNet(spec, cfg)
    model.load_state_dict(ours)
    return model


def _provenance(run: _Run, ref_mode: str, order: list[str], positional: list[str], metadata_csv,
                null_fill: str, notes: list[str]) -> dict:
    run_dir, ckpt_dir = run.src["run_dir"], run.src["checkpoint_dir"]
    step = step_of(ckpt_dir) if ckpt_dir is not None else None
    if step is None and run.config is not None and run.config.get("optimization_step") is not None:
        step = run.config["optimization_step"]
    try:
        weights_rel = run.src["weights"].resolve().relative_to(run_dir.resolve())
    except (AttributeError, ValueError):  # no run directory, or weights from elsewhere
        weights_rel = run.src["weights"].resolve()
    return {"kind": "import-medi",
            "imported_from": {"run_dir": str(run_dir.resolve()) if run_dir is not None else None,
                              "weights": str(weights_rel), "checkpoint_step": step, "ema": run.src["ema"],
                              "mode": ref_mode, "domains_to_condition": order + [c for c in positional if c not in order],
                              "metadata_csv": str(metadata_csv) if run_dir is None and metadata_csv else None,
                              "files_sha256": run.files, "null_row": null_fill, "notes": notes}}


def import_run(path, *, out=None, overwrite: bool = False, ema: bool = False, weights=None,
               condition: list[str] | None = None, metadata_csv=None, mode: str | None = None,
               class_column: str | None = None, resolution: int | None = None, unet_config: dict | None = None,
               null_fill: str = "mean") -> ckpt_io.Checkpoint:
    """A reference MeDi run (RUN/, RUN/checkpoint-N/ or a weights file) -> Checkpoint (saved if ``out``).

    Everything comes from the run's own files where they say it (mapping JSONs, ema_model/config.json,
    scheduler_config.json, weight shapes); the options only fill in what they do not say.  Every
    value is checked before ``out`` is written, and ``out`` is written whole or not at all; an
    existing ``out`` is replaced only with ``overwrite``.
    """
    _check_options(out, overwrite, condition, resolution, mode, null_fill)
    run = _read_run(path, ema, weights)
    _read_vocabularies(run, metadata_csv, condition, class_column)
    cfg = _unet_config(run, resolution, unet_config)
    d_t = int(cfg["block_out_channels"][0]) * 4
    ref_mode = _conditioning_mode(run, d_t, mode)
    order, positional, used_positional, pos_w, notes = _domains(run, ref_mode, d_t, condition)
    model = _build_model(run, cfg, ref_mode, order, pos_w, null_fill)
    run_dir = run.src["run_dir"]
    sched_path = run_dir / SCHEDULER if run_dir is not None and (run_dir / SCHEDULER).is_file() else None
    schedule = schedule_from_config(sched_path)
    if sched_path is not None:
        run.files[SCHEDULER] = sha(sched_path)
    if run.config is not None:
        run.files[f"{EMA_DIR}/config.json"] = sha(run.config_path)
    prov = _provenance(run, ref_mode, order, positional, metadata_csv, null_fill, notes)
    ck = ckpt_io.from_model(model, schedule, preset="", provenance=prov)
    if out is not None:
        ckpt_io.save(ck, out)
    return ck


def import_medi(weights, metadata_csv, columns: list[str], *, mode: str = "concat", **kw) -> ckpt_io.Checkpoint:
    """A weights file + the reference's training metadata CSV (runs without mapping JSONs)."""
    return import_run(weights, metadata_csv=metadata_csv, condition=list(columns), mode=mode, **kw)
