"""Core commands: generate, init-checkpoint, info, backends, plan."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import MediFastError
from ..vocab import parse_list

META_OPTIONS = ("tss", "gender", "race", "age")


def _parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise MediFastError(f"--shard {text!r} must look like I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise MediFastError(f"--shard {text} is invalid; use I/N with 0 <= I < N")
    return i, n


def _metadata(tss, gender, race, age, meta) -> dict:
    values = {k: v for k, v in (("tss", tss), ("gender", gender), ("race", race), ("age", age)) if v is not None}
    given = {k: f"--{k} {v}" for k, v in values.items()}
    for item in meta:
        if "=" not in item:
            raise MediFastError(f"--meta {item!r} must look like NAME=VALUE")
        k, v = (part.strip() for part in item.split("=", 1))
        if k in values and str(values[k]) != v:  # which one was meant is the user's to say
            raise MediFastError(f"{given[k]} and --meta {item} give {k} twice with different values; give it once")
        values[k] = values.get(k, v)
        given.setdefault(k, f"--meta {item}")
    return values


PLAN_HELP = ("A plan CSV (columns class, metadata such as tss, count), or a strategy: 'match-train' (class and "
             "site frequencies of --sites-from INDEX; the FID protocol), 'fill-missing' (every --classes x site of "
             "--sites-from, --n-per-combo each; the augmentation protocol) or 'ood' (--k sites per class that "
             "--sites-from never shows with it, drawn with --seed).")


def _model_choice(model, model_opt):
    from ..defaults import require_model

    if model is not None and model_opt is not None and Path(model) != Path(model_opt):
        raise MediFastError(f"two models given ({model} and --model {model_opt}); give one")
    return require_model(model if model is not None else model_opt)


MODEL_HELP = ("Checkpoint, .onnx, .engine or export directory.  Default: $MEDI_FAST_MODEL, then model = ... in "
              "medi-fast.toml, then the last `medi-fast export` in this directory (see `medi-fast info`).")


def runtime_options(func):
    """The options `generate` and `edit` share: how the model runs and how images are written."""
    for option in reversed([
        click.option("--backend", default="auto", show_default=True, help="auto, or a name from `medi-fast backends`."),
        click.option("--device", help="torch device for torch backends (cpu, cuda, cuda:1)."),
        click.option("--engine-cache", type=click.Path(path_type=Path),
                     help="Where `--backend tensorrt` on an .onnx builds and reuses engines "
                          "(default ~/.cache/medi-fast/engines)."),
        click.option("--format", "fmt", type=click.Choice(["png", "jpeg", "tar"]), default="png", show_default=True),
        click.option("--jpeg-quality", type=int, default=95, show_default=True),
        click.option("--workers", type=int, default=2, show_default=True, help="Encoder/writer threads."),
    ]):
        func = option(func)
    return func


def ray_choice(ray_address, ray_workers, ray_gpus_per_worker=None):
    """`--ray [ADDRESS]` and its pool options as ``RayOptions`` (None without --ray), checked, the [ray]
    extra required in one line."""
    from ..generate import RayOptions

    if ray_address is None:
        given = [o for o, v in (("--ray-workers", ray_workers), ("--ray-gpus-per-worker", ray_gpus_per_worker))
                 if v is not None]
        if given:
            raise MediFastError(f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} only with --ray; "
                                "add --ray")
        return None
    if _given("workers"):  # Ray actors write their own files; there are no writer threads to size
        raise MediFastError("--workers has no effect with --ray (each actor writes its own files); drop it, "
                            "or size the pool with --ray-workers")
    from ..ray_generate import require_ray

    require_ray()  # a missing extra is said first, in one line
    return RayOptions(address=None if ray_address == "local" else ray_address, workers=ray_workers,
                      gpus_per_worker=ray_gpus_per_worker)


def check_engine_cache(engine_cache, backend) -> None:
    if engine_cache is not None and backend not in ("tensorrt", "ort-trt"):
        raise MediFastError("--engine-cache applies to --backend tensorrt or ort-trt only; drop it or pick one")


def open_for_backend(path, backend: str, engine_cache):
    """The model file as the backend runs it (an .onnx for --backend tensorrt: its engine, built on first
    use and reused from the engine cache after) and the backend's options from the command line."""
    from .. import backends

    info = backends.open_model(path)
    if backend == "tensorrt" and info.kind == "onnx":
        from ..engines.tensorrt_build import cached_engine

        info = backends.open_model(cached_engine(info.path, engine_cache))
    return info


def backend_options(device, backend: str, engine_cache) -> dict:
    options = {"device": device} if device else {}
    if engine_cache and backend == "ort-trt":
        options["cache_dir"] = str(engine_cache)
    return options


def echo_start(job, info, choice, out_text: str | None) -> None:
    """What a job runs, where it writes and its warnings, on stderr once its checks have passed."""
    used = info.path if info.path == choice.path else f"{info.path} of {choice.path}"
    where = f"on Ray, backend {job.backend}" if job.on_ray else f"backend {job.backend}"
    click.echo(f"model {used} (from {choice.source}), hash {info.model_hash}, {where}", err=True)
    if job.out is not None:
        click.echo(f"output {job.out}" + (f" ({out_text})" if out_text else ""), err=True)
    for warning in job.warnings:
        click.echo(f"medi-fast: warning: {warning}", err=True)


@click.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--model", "model_opt", type=click.Path(path_type=Path), help=MODEL_HELP)
@click.option("--class", "class_", help="Cancer type: LUAD, TCGA-LUAD or Lung_adenocarcinoma.")
@click.option("--tss", help="Tissue source site code, as a string (e.g. 05).")
@click.option("--gender", help="Gender value, if the model is conditioned on it.")
@click.option("--race", help="Race value, if the model is conditioned on it.")
@click.option("--age", type=float, help="Age at index, if the model is conditioned on it.")
@click.option("--meta", multiple=True, metavar="NAME=VALUE", help="Any other conditioning attribute (repeatable).")
@click.option("--n", type=int, help="Number of images (single combination; or total for match-train).")
@click.option("--plan", "plan", help=PLAN_HELP)
@click.option("--sites-from", type=click.Path(path_type=Path), help="Training index/split CSV for --plan strategies.")
@click.option("--classes", help="Comma-separated classes for --plan fill-missing (default: all of the model's).")
@click.option("--n-per-combo", type=int, help="Images per class x site for --plan fill-missing or ood.")
@click.option("--k", "k", type=int, help="--plan ood: unseen sites per class.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Output directory (resumable).  Default: synth/<class>_<attr>-<value> (one combination) or "
                   "synth/<strategy>; with --fid-stats and no --out, no images are written.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per sampler batch.")
@click.option("--steps", type=int, help="Sampler steps [default: 100 (DDIM-100 as published); a distilled student's own].")
@click.option("--sampler", help="ddim, or a fast solver (see docs/samplers.md) [default: ddim].")
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM eta (0 = deterministic).")
@click.option("--seed", type=int, default=0, show_default=True, help="Base seed; image i depends on (seed, i) only.")
@click.option("--guidance", type=float, default=1.0, show_default=True,
              help="Classifier-free guidance scale (1 = none; needs a model trained with --cond-drop).")
@runtime_options
@click.option("--shard", help="I/N: generate only shard I of N of the plan (for many GPUs or jobs).")
@click.option("--fid-stats", type=click.Path(path_type=Path), help="Also stream Inception statistics to this .npz.")
@click.option("--inception-weights", type=click.Path(path_type=Path), help="Local FID Inception weights file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", metavar="[ADDRESS]",
              help="Run on Ray: a cluster ADDRESS (auto, ray://HOST:10001), or alone for a local instance "
                   "(docs/cluster.md). Needs the [ray] extra.")
@click.option("--ray-workers", type=int, help="With --ray: actors (default: autoscale to what the cluster holds).")
@click.option("--ray-gpus-per-worker", type=float,
              help="With --ray: GPUs per actor (default 1 where the cluster has GPUs, else 0: CPU actors).")
def generate(model, model_opt, class_, tss, gender, race, age, meta, n, plan, sites_from, classes, n_per_combo, k,
             out, batch_size, steps, sampler, eta, seed, guidance, backend, device, engine_cache, fmt, jpeg_quality,
             workers, shard, fid_stats, inception_weights, quiet, ray_address, ray_workers, ray_gpus_per_worker):
    """Generate patches from MODEL (a checkpoint, an exported .onnx/.engine, or an export directory).

    \b
    medi-fast generate --class LUAD --tss 05 --n 10000          # the default model, into synth/LUAD_tss-05
    medi-fast generate ckpt.pt --class LUAD --tss 05 --n 1000 --out synth/
    medi-fast generate model.onnx --plan fill-missing --classes LUAD,LUSC --sites-from split/train.csv \\
        --n-per-combo 50 --out synth/
    """
    from .. import plan as plans
    from ..generate import FIDStats, GenerateConfig, for_model
    from ..job import run_job

    check_engine_cache(engine_cache, backend)
    if inception_weights is not None and fid_stats is None:
        raise MediFastError("--inception-weights applies to --fid-stats only; drop it or add --fid-stats FILE.npz")
    ray = ray_choice(ray_address, ray_workers, ray_gpus_per_worker)
    choice = _model_choice(model, model_opt)
    cfg = GenerateConfig(steps=100 if steps is None else steps, eta=eta, guidance=guidance, batch_size=batch_size,
                         sampler="ddim" if sampler is None else sampler,  # --sampler '' is an unknown name
                         format=fmt, jpeg_quality=jpeg_quality, workers=workers)
    shard_ = _parse_shard(shard)
    values = _with_class(class_, _metadata(tss, gender, race, age, meta))
    info = open_for_backend(choice.path, backend, engine_cache)
    cfg = for_model(cfg, info, steps_given=steps is not None, sampler_given=sampler is not None)
    the_plan = plans.build(info.spec, plan=plan, values=values, n=n, seed=seed, sites_from=sites_from,
                           classes=parse_list(classes or ""), n_per_combo=n_per_combo, k=k)
    out_source = _source_of("out")
    if out is None and fid_stats is None:
        out, out_source = plans.default_out_dir(the_plan, plan), "default; --out DIR to change"
    options = backend_options(device, backend, engine_cache)
    fid = FIDStats(fid_stats, weights=inception_weights, device=device) if fid_stats is not None else None

    def started(job) -> None:
        echo_start(job, info, choice, out_source)
        if not quiet:
            click.echo(f"{len(the_plan)} images planned"
                       f"{f', shard {shard_[0]}/{shard_[1]}' if shard_[1] > 1 else ''}", err=True)

    stats = run_job(info, the_plan, out, cfg, backend=backend, backend_options=options, shard=shard_, fid=fid,
                    ray=ray, progress=not quiet, on_start=started)
    if not quiet:
        click.echo(f"generated {stats['generated']} images ({stats['skipped']} already done)"
                   f"{' on Ray' if ray is not None else ''} in {stats['seconds']:.1f} s, "
                   f"{stats['images_per_s']:.2f} images/s"
                   + (f"; manifest {out / 'manifest.csv'}" if out is not None else ""), err=True)


def _source_of(name: str) -> str:
    """Where option ``name`` of the running command came from, as its output line says it."""
    from ..defaults import CONFIG_FILE

    source = click.get_current_context().get_parameter_source(name)
    if source is click.core.ParameterSource.DEFAULT_MAP:
        return f"{CONFIG_FILE} [{click.get_current_context().info_name}] {name}"
    return f"--{name.replace('_', '-')}"


def _given(name: str) -> bool:
    """Whether option ``name`` of the running command came from the command line (not its default)."""
    source = click.get_current_context().get_parameter_source(name)
    return source is click.core.ParameterSource.COMMANDLINE


def _with_class(class_, metadata: dict) -> dict:
    if class_ is None:
        return metadata
    if "class" in metadata and metadata["class"] != class_:
        raise MediFastError(f"--class {class_} and --meta class={metadata['class']} give the class twice with "
                            f"different values; give it once")
    return {"class": class_, **{k: v for k, v in metadata.items() if k != "class"}}


@click.command("init-checkpoint")
@click.option("--preset", default="tiny-32", show_default=True, help="tiny-32, small-64 or medi-128.")
@click.option("--classes", required=True, help="Comma-separated classes, e.g. LUAD,LUSC.")
@click.option("--tss", help="Comma-separated tissue source site codes, e.g. 05,44,49.")
@click.option("--meta", multiple=True, metavar="NAME=V1,V2", help="Other categorical metadata (repeatable).")
@click.option("--age", is_flag=True, help="Also condition on age (continuous).")
@click.option("--cls-only", is_flag=True, help="Class-only (CLS) model: same UNet, only the class embedding.")
@click.option("--resolution", type=int, help="Override the preset's resolution.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output .pt or .safetensors file.")
def init_checkpoint(preset, classes, tss, meta, age, cls_only, resolution, seed, out):
    """Write a randomly initialised checkpoint (tests, benchmarks, smoke runs)."""
    import torch

    from .. import checkpoint
    from ..model import build_model
    from ..schedule import Schedule
    from ..vocab import canonical_class, check_name

    from ..errors import check_seed

    check_seed(seed)
    # names become output folders and files: refused here with the option that gave them
    for option, text in (("--classes", classes), ("--tss", tss or "")):
        for name in parse_list(text):
            check_name(name, f"{option} value")
    for item in meta:
        if "=" not in item:
            raise MediFastError(f"--meta {item!r} must look like NAME=V1,V2")
        check_name(item.partition("=")[0].strip(), "--meta name", attribute=True)
        for name in parse_list(item.partition("=")[2]):
            check_name(name, f"--meta {item.partition('=')[0].strip()} value")
    metadata = {}
    if not cls_only:
        if tss:
            metadata["tss"] = parse_list(tss)
        for item in meta:
            k, v = item.split("=", 1)
            metadata[k.strip()] = parse_list(v)
        if age:
            metadata["age"] = None
    elif tss or meta or age:
        raise MediFastError("--cls-only takes no metadata; drop --tss/--meta/--age")
    torch.manual_seed(seed)
    model = build_model(preset, classes=[canonical_class(c) for c in parse_list(classes)], metadata=metadata,
                        resolution=resolution)
    ck = checkpoint.from_model(model, Schedule(), preset=preset,
                               provenance={"kind": "random-init", "seed": seed, "cond_drop": 0.0})
    checkpoint.save(ck, out)
    click.echo(f"wrote {out} (hash {ck.hash})")


@click.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(model, as_json):
    """Describe MODEL (default: the default model): conditioning, vocabularies, schedule, hash, provenance.

    The first line says which model this is and where that choice came from.
    """
    from .. import backends

    choice = _model_choice(model, None)
    i = backends.open_model(choice.path)
    d = {"path": str(i.path), "chosen_from": choice.source, "kind": i.kind, "preset": i.preset,
         "resolution": i.resolution, "hash": i.model_hash, "conditioning": i.spec.to_dict(),
         "schedule": i.schedule.to_dict(), "provenance": i.provenance}
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"model {choice.describe()}")
    click.echo(f"{i.path} ({i.kind}, preset {i.preset or '?'}, {i.resolution} px, hash {i.model_hash})")
    for a in i.spec.attributes:
        vals = ", ".join(a.vocab.names[:12]) + (" ..." if len(a.vocab) > 12 else "") if a.vocab else "continuous"
        click.echo(f"  {a.name:<8} width {a.dim:<4} {len(a.vocab) if a.vocab else '':>4}  {vals}")
    click.echo(f"  schedule {i.schedule.num_train_timesteps} {i.schedule.beta_schedule} betas "
               f"{i.schedule.beta_start}..{i.schedule.beta_end}, {i.schedule.prediction_type}")
    if i.schedule.default_steps is not None:
        click.echo(f"  distilled for {i.schedule.default_sampler or 'ddim'}-{i.schedule.default_steps} "
                   f"({i.schedule.timestep_spacing} timesteps); generate uses it unless --steps/--sampler are given")
    from ..checkpoint import provenance_lines

    for line in provenance_lines(i.provenance):
        click.echo(f"  {line}")


@click.command("backends")
@click.argument("model", required=False, type=click.Path(path_type=Path))
def list_backends(model):
    """List runtime backends and whether each is available here, then which files of MODEL (an
    export directory; default: the default model) would run here and with which backend."""
    from .. import backends
    from ..defaults import choose_model

    if model is not None and not model.exists():
        raise MediFastError(f"model {model} does not exist; check the path, or run `medi-fast backends` alone")
    for name, e in sorted(backends.BACKENDS.items(), key=lambda kv: -kv[1].rank):
        ok, why = e.availability()
        click.echo(f"{name:<14} {'yes' if ok else 'no ':<4} runs {'/'.join(e.kinds):<12} {e.description}"
                   + ("" if ok else f"  [{why}]"))
    gated = {n for n, e in backends.BACKENDS.items() if e.availability()[0] and e.load_class().gated_here()}
    click.echo("\nauto tries, best first (a gated backend that fails its accuracy gate on a model gives way to "
               "the next):")
    for kind in ("checkpoint", "onnx", "tensorrt"):
        names = backends.available(kind)
        click.echo(f"  {kind:<11} " + (" > ".join(n + (" (gated)" if n in gated else "") for n in names) or "none here"))
    choice = choose_model(model)
    if choice is None or not choice.path.exists():
        return
    click.echo(f"\nmodel {choice.describe()}")
    if backends.is_export_dir(choice.path):
        rows = backends.export_candidates(choice.path)
        first = next((p for p, b, _ in rows if b is not None), None)
        for path, backend, why in rows:
            mark = "  <- used" if path == first else ""
            click.echo(f"  {path.name:<18} " + (f"runs with {backend}{mark}" if backend else f"does not run here: {why}"))
    else:
        i = backends.open_model(choice.path)
        names = backends.available(i.kind)
        click.echo(f"  {i.path.name:<18} " + (f"runs with {names[0]}" if names else "no backend available here"))


@click.command("plan")
@click.argument("strategy", type=click.Choice(["match-train", "fill-missing", "ood"]))
@click.option("--model", type=click.Path(path_type=Path), help="Model whose vocabularies the plan uses. " + MODEL_HELP)
@click.option("--sites-from", required=True, type=click.Path(path_type=Path), help="Training index or split CSV.")
@click.option("--classes", help="fill-missing: comma-separated classes (default: all of the model's).")
@click.option("--n", type=int, help="match-train: total images (default: as many as the index rows).")
@click.option("--n-per-combo", type=int, default=1, show_default=True, help="fill-missing, ood: images per combination.")
@click.option("--k", "k", type=int, help="ood: unseen sites per class.")
@click.option("--seed", type=int, default=0, show_default=True, help="ood: seed of the site draw (use generate's --seed).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Plan CSV to write.")
def plan_cmd(strategy, model, sites_from, classes, n, n_per_combo, k, seed, out):
    """Write a plan CSV (one row per combination with a count) for `generate --plan`."""
    from .. import backends
    from ..io import atomic_write_text

    from .. import plan as plans

    if strategy != "ood" and _given("seed"):
        raise MediFastError(f"--seed only changes an ood plan's site draw; a {strategy} plan file does not depend "
                            f"on it (generate's --seed seeds the images); drop it")
    from ..defaults import check_config_output
    from ..io import check_output_file

    check_config_output("out", out)
    check_output_file(out, "--out")
    info = backends.open_model(_model_choice(None, model).path)
    p = plans.build(info.spec, plan=strategy, n=n, seed=seed, sites_from=sites_from, classes=parse_list(classes or ""),
                    n_per_combo=n_per_combo, k=k)
    combos = p.combinations()
    atomic_write_text(out, combos.to_csv(index=False))
    click.echo(f"wrote {out}: {len(combos)} combinations, {len(p)} images")
