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
"""
from __future__ import annotations

import torch

from medi_fast import checkpoint as ckpt_io
from medi_fast.conditioning import CATEGORICAL, CONTINUOUS, COLUMNS, REFERENCE, Attribute, ConditionSpec, \
    reference_sinusoidal
from medi_fast.errors import MediFastError
from medi_fast.model import MeDiUNet
from medi_fast.vocab import Vocabulary

from .medi_run import (CLASS_MAP, DOMAIN_MAP, EMA_DIR, SCHEDULER, index_map, infer_unet_config, read_json,
                       read_reference, reference_vocabularies, resolve, schedule_from_config, sha, step_of,
                       unet_config_from_reference)

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
    if wrong or len(set(given)) != len(given):
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


def import_run(path, *, out=None, ema: bool = False, weights=None, condition: list[str] | None = None,
               metadata_csv=None, mode: str | None = None, class_column: str | None = None,
               resolution: int | None = None, unet_config: dict | None = None,
               null_fill: str = "mean") -> ckpt_io.Checkpoint:
    """A reference MeDi run (RUN/, RUN/checkpoint-N/ or a weights file) -> Checkpoint (saved if ``out``).

    Everything comes from the run's own files where they say it (mapping JSONs, ema_model/config.json,
    scheduler_config.json, weight shapes); the options only fill in what they do not say.
    """
    src = resolve(path, ema=ema, weights=weights)
    sd = read_reference(src["weights"])
    if "class_embedding.weight" not in sd:
        raise MediFastError(f"{src['weights']} has no class_embedding.weight: not a class-conditioned reference "
                            f"MeDi checkpoint; pass the run's model.safetensors or ema_model/")
    run_dir, ckpt_dir = src["run_dir"], src["checkpoint_dir"]
    config_path = ckpt_dir / EMA_DIR / "config.json" if ckpt_dir is not None else None
    config = read_json(config_path) if config_path is not None and config_path.is_file() else None
    tables_in_weights = [k.split(".")[1] for k in sd if k.startswith("domain_embeddings.") and k.endswith(".weight")]

    # vocabularies: the mapping JSONs (index i there is index i here), else the training CSV
    files = {}
    if run_dir is not None:
        classes = index_map(read_json(run_dir / CLASS_MAP), "class", run_dir / CLASS_MAP)
        files[CLASS_MAP] = sha(run_dir / CLASS_MAP)
        dmap_path = run_dir / DOMAIN_MAP
        dmap = read_json(dmap_path) if dmap_path.is_file() else {}
        if dmap_path.is_file():
            files[DOMAIN_MAP] = sha(dmap_path)
        if not isinstance(dmap, dict):
            raise MediFastError(f"{dmap_path} must be a JSON object {{domain: {{value: index}}}}; re-copy it from the reference run")
        vocabs = {col: index_map(m, f"{col} value", dmap_path) for col, m in dmap.items()}
        source_of_names = f"{run_dir / CLASS_MAP} and {DOMAIN_MAP}"
    elif metadata_csv is not None:
        given = [_COLUMN_ALIASES.get(c, c) for c in (condition or [])]
        cat_cols = [c for c in given if not c.endswith("_p")]
        if sorted(cat_cols) != sorted(tables_in_weights):
            found = sorted(tables_in_weights)
            raise MediFastError(f"the weights have domain embeddings for {found or 'no columns'} but --condition says "
                                f"{cat_cols or 'none'}; pass --condition "
                                f"{','.join(found + [c for c in given if c.endswith('_p')])} (in the training order)")
        classes, vocabs = reference_vocabularies(metadata_csv, cat_cols, class_column)
        source_of_names = str(metadata_csv)
    else:
        raise MediFastError(f"no {CLASS_MAP} next to {src['weights']} (looked in {ckpt_dir} and its parent); pass "
                            f"the run directory as written by train_diffusion.py, or --metadata TRAIN_CSV for a run "
                            f"without its mapping JSONs")
    categorical = list(vocabs)
    if sorted(categorical) != sorted(tables_in_weights):
        raise MediFastError(f"the mapping ({source_of_names}) lists domains {categorical or 'none'} but the weights "
                            f"have embeddings for {sorted(tables_in_weights) or 'none'}; import the checkpoint of "
                            f"the run these files belong to"
                            + ("" if run_dir is not None else f", or pass {_command(sorted(tables_in_weights))}"))
    tables = {"class": sd["class_embedding.weight"], **{c: sd[f"domain_embeddings.{c}.weight"] for c in categorical}}
    sizes = {"class": classes, **vocabs}
    for col, w in tables.items():
        if w.shape[0] != len(sizes[col]):
            key = "class_embedding" if col == "class" else f"domain_embeddings.{col}"
            raise MediFastError(f"the mapping disagrees with the weights: {key} has {w.shape[0]} rows but "
                                f"{source_of_names} gives {len(sizes[col])} {col} values; "
                                + ("import the checkpoint of the run these files belong to" if run_dir is not None
                                   else "pass the metadata CSV the reference model was trained on"))

    # UNet: ema_model/config.json, else weight shapes
    unet_sd = {k: v for k, v in sd.items() if not k.startswith(("class_embedding.", "domain_embeddings.", "linear_comb."))}
    if config is not None:
        cfg = unet_config_from_reference(config)
    else:
        cfg = infer_unet_config(unet_sd, resolution or 128)
    if resolution is not None:
        cfg["sample_size"] = int(resolution)
    cfg.update(unet_config or {})
    cfg["class_embed_type"] = "identity"
    d_t = int(cfg["block_out_channels"][0]) * 4

    # mode: config.json, else the weights
    class_w = int(tables["class"].shape[1])
    if "linear_comb.weight" in sd:
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

    # positional domains: config.json, else --condition (names ending in _p), else concat widths
    if config is not None:
        positional = list(config.get("positional_domains") or [])
    else:
        # the reference's rule: a domain whose name ends in "_p" is positional
        positional = [c for c in (_COLUMN_ALIASES.get(x, x) for x in (condition or []))
                      if c not in categorical and c.endswith("_p")]
    notes = []
    used_positional = list(positional)
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
        n_in = int(sd["linear_comb.weight"].shape[1]) // d_t
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

    # the spec, in the reference's concatenation order
    attrs = [Attribute("class", CATEGORICAL, class_w, Vocabulary("class", tuple(classes), tcga_aliases=True))]
    names = {}
    for col in order:
        names[col] = _ATTRIBUTE_FOR_COLUMN.get(col, col)
        if col in categorical:
            attrs.append(Attribute(names[col], CATEGORICAL, int(tables[col].shape[1]), Vocabulary(names[col], tuple(vocabs[col]))))
        else:
            attrs.append(Attribute(names[col], CONTINUOUS, pos_w, None, POSITIONAL_MAX, REFERENCE))
    # A linear model whose domains all vanished adds the class embedding alone (the reference skips
    # linear_comb when no domain embedding is present): that is concat with one d_t-wide table.
    spec_mode = ref_mode if len(attrs) > 1 else "concat"
    spec = ConditionSpec(tuple(attrs), d_t, spec_mode)
    model = MeDiUNet(spec, cfg)
    ours = {f"unet.{k}": v for k, v in unet_sd.items()}
    ours["conditioner.tables.class.weight"] = _with_null(tables["class"], null_fill)
    for col in order:
        if col in categorical:
            ours[f"conditioner.tables.{names[col]}.weight"] = _with_null(tables[col], null_fill)
        else:
            ours[f"conditioner.nulls.{names[col]}"] = reference_sinusoidal(
                torch.tensor([POSITIONAL_MISSING]), pos_w, POSITIONAL_MAX)[0]
    if spec_mode == "linear":
        ours["conditioner.linear_comb.weight"] = sd["linear_comb.weight"]
        ours["conditioner.linear_comb.bias"] = sd["linear_comb.bias"]
    try:
        missing, unexpected = model.load_state_dict(ours, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise MediFastError(f"the weights do not fit the UNet config ({str(e).splitlines()[-1].strip()[:160]}); "
                            f"pass --unet-config with the reference model's config") from None
    if missing or unexpected:
        raise MediFastError(f"the weights do not fit the UNet config ({len(missing)} missing, e.g. "
                            f"{(missing or ['-'])[0]}; {len(unexpected)} unexpected, e.g. {(unexpected or ['-'])[0]}); "
                            f"pass --unet-config with the reference model's config")

    sched_path = run_dir / SCHEDULER if run_dir is not None and (run_dir / SCHEDULER).is_file() else None
    schedule = schedule_from_config(sched_path)
    if sched_path is not None:
        files[SCHEDULER] = sha(sched_path)
    if config is not None:
        files[f"{EMA_DIR}/config.json"] = sha(config_path)
    step = step_of(ckpt_dir) if ckpt_dir is not None else None
    if step is None and config is not None and config.get("optimization_step") is not None:
        step = int(config["optimization_step"])
    try:
        weights_rel = src["weights"].resolve().relative_to(run_dir.resolve())
    except (AttributeError, ValueError):  # no run directory, or weights from elsewhere
        weights_rel = src["weights"].resolve()
    prov = {"kind": "import-medi",
            "imported_from": {"run_dir": str(run_dir.resolve()) if run_dir is not None else None,
                              "weights": str(weights_rel), "checkpoint_step": step, "ema": src["ema"],
                              "mode": ref_mode, "domains_to_condition": order + [c for c in positional if c not in order],
                              "metadata_csv": str(metadata_csv) if run_dir is None and metadata_csv else None,
                              "files_sha256": files, "null_row": null_fill, "notes": notes}}
    ck = ckpt_io.from_model(model, schedule, preset="", provenance=prov)
    if out is not None:
        ckpt_io.save(ck, out)
    return ck


def import_medi(weights, metadata_csv, columns: list[str], *, mode: str = "concat", **kw) -> ckpt_io.Checkpoint:
    """A weights file + the reference's training metadata CSV (runs without mapping JSONs)."""
    return import_run(weights, metadata_csv=metadata_csv, condition=list(columns), mode=mode, **kw)
