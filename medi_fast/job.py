"""The generation job: the one home of "open the model, pick the backend, check everything, run",
locally or on Ray (docs/architecture.md).  The ``generate`` command, the Python API, the demo and
``medi_fast.ray.generate`` call :func:`run_job`; the Generator (generate.py) and the Ray executor
(ray_generate.py) are its parts, and neither imports this module.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .backends import ModelInfo
from .errors import MediFastError
from .generate import (FIDStats, GenerateConfig, Generator, RayOptions, check_shard, check_unet_batch,
                       distilled_warning, guidance_warning)
from .io import clean_tmp
from .plan import Plan


@dataclass(frozen=True)
class JobStart:
    """What a job is about to do, handed to ``run_job``'s ``on_start`` once every check has passed and
    before the first byte is written (the CLI prints it)."""

    info: ModelInfo
    backend: str  # the backend's name (on Ray: as given; each actor resolves ``auto`` itself)
    config: GenerateConfig
    images: int  # in this shard
    shard: tuple[int, int]
    out: Path | None
    on_ray: bool
    warnings: tuple[str, ...]


def run_job(model, plan: Plan, out=None, config: GenerateConfig | None = None, *, backend="auto",
            backend_options: dict | None = None, shard: tuple[int, int] = (0, 1), fid: FIDStats | None = None,
            ray: RayOptions | None = None, sinks: Sequence[Callable] = (), progress: bool = True,
            on_start: Callable[[JobStart], None] | None = None) -> dict:
    """Run one generation job: ``plan`` (shard ``I/N``) from ``model`` into ``out`` (None: no files)
    with ``config``, locally or on Ray, optionally streaming FID statistics (``fid``) and images to
    ``sinks`` (callables ``sink(images, rows)``, local runs only).  The one home of this wiring: the
    ``generate`` command, the Python API, the demo and ``medi_fast.ray.generate`` call it.

    ``model``: a model file or an opened ``ModelInfo`` (the orchestrator has already resolved what the
    runtime does not build: e.g. a TensorRT engine from the engine cache).  ``backend``: a name
    (``auto`` allowed) created with ``backend_options``, or, locally, an already created backend.
    Every option, the model, the backend and the output directory are checked before the first byte is
    written; then ``on_start(JobStart)`` is called.  Returns the counts and speed (``generated``,
    ``skipped``, ``seconds``, ``images_per_s``) and the ``backend`` used.

    On Ray the actors run with this process's torch thread counts and generate the same work units in
    the same batches, so they write the bytes a local run of the same job writes.
    """
    from . import backends

    cfg = config or GenerateConfig()
    options = dict(backend_options or {})
    shard = (int(shard[0]), int(shard[1]))
    check_shard(shard, len(plan))
    if ray is not None:
        if shard[1] > 1:
            raise MediFastError("--shard and --ray do not combine; drop --shard (Ray spreads the plan over its workers)")
        if sinks:
            raise MediFastError("sinks run in this process and cannot follow images made on Ray; run locally, "
                                "or use fid=FIDStats(...) for statistics")
        if not isinstance(backend, str):
            raise MediFastError("on Ray each actor creates its own backend: give the backend by name")
        if out is None and fid is None:
            raise MediFastError("give --out DIR (images) and/or --fid-stats FILE.npz (statistics only)")
    info = model if isinstance(model, ModelInfo) else backends.open_model(model)
    part = plan.shard(*shard) if shard[1] > 1 else plan
    if out is not None:
        from .io import check_writable_dir

        out = check_writable_dir(out)  # before any weights are loaded
    if fid is not None:
        from .eval.features import EXTRACTORS, get_extractor

        if Path(fid.path).suffix != ".npz":
            raise MediFastError(f"--fid-stats {fid.path} must end in .npz")
        if fid.features not in EXTRACTORS:
            get_extractor(fid.features)  # the usual "unknown feature extractor" error, before any work
    if ray is not None:
        from . import ray_generate

        ray_generate.check_backend(backend, info)
        name = backend
        threads = (torch.get_num_threads(), torch.get_num_interop_threads())
        cluster = ray_generate.start(ray, threads[0])  # joins or starts Ray; refuses a cluster no actor fits
        gen = Generator(info, None, cfg, progress=False)
        sink = None
        if fid is not None:
            from .eval.fid import FIDStatsSink

            # The driver keeps the accumulator and writes the npz; the actors run the extractor.
            sink = FIDStatsSink(fid.path, per="class", extractor=ray_generate.NamedExtractor(fid.features))
            gen.sinks = [sink.add]  # every row is then in a unit, as in a local run with a sink
    else:
        from .resources import check_device

        check_device(options.get("device"))
        if isinstance(backend, str):
            denoiser = backends.create(backend, info, **options)
        else:
            denoiser = backend
        name = getattr(denoiser, "name", type(denoiser).__name__)
        all_sinks = list(sinks)
        sink = None
        if fid is not None:
            from .eval.features import get_extractor
            from .eval.fid import FIDStatsSink

            sink = FIDStatsSink(fid.path, per="class",
                                extractor=get_extractor(fid.features, weights=fid.weights, device=fid.device))
            all_sinks.append(sink.add)
        gen = Generator(info, denoiser, cfg, sinks=all_sinks, progress=progress)
        check_unet_batch(denoiser, min(cfg.batch_size, max(len(part), 1)), cfg.guidance)
        gen.check(len(part))
    if out is not None:
        gen.check_run_dir(out, plan, shard)  # a directory of another run: refused before anything is printed
    local = ray is None and isinstance(backend, str)
    idle_gpu = backends.idle_gpu_warning(backend, denoiser, info) if local else None
    notes = tuple(getattr(denoiser, "notes", ())) if local else ()  # auto's fallbacks past a failed gate
    warnings = tuple(w for w in (guidance_warning(info, cfg.guidance), distilled_warning(info, cfg), idle_gpu, *notes)
                     if w)
    if on_start is not None:
        on_start(JobStart(info, name, cfg, len(part), shard, out, ray is not None, warnings))
    if ray is None:
        stats = gen.run(plan, out, shard)
    else:
        stats = _run_on_ray(gen, plan, out, cluster, backend=name, backend_options=options, fid=fid, sink=sink,
                            threads=threads, progress=progress)
    if sink is not None:
        sink.close()
    return {**stats, "backend": name}


def _run_on_ray(gen: Generator, plan: Plan, out, cluster, *, backend: str, backend_options: dict,
                fid: FIDStats | None, sink, threads: tuple[int, int], progress: bool) -> dict:
    """The Ray half of ``run_job``: the run directory, units and manifest are this module's (the same
    as a local run's); ``ray_generate.run_units`` only executes the units on actors."""
    from . import ray_generate

    cfg = gen.cfg
    rows = plan.rows.reset_index(drop=True)
    out, writer, pending = gen.open_output(out, plan)
    units = list(gen.units(rows, pending, writer))
    t0 = time.perf_counter()
    made = 0
    if units:
        features = None if fid is None else {"name": fid.features, "device": fid.device,
                                             "weights": str(fid.weights) if fid.weights else None}
        try:
            made = ray_generate.run_units(
                cluster, units, model=gen.info.path, backend=backend, backend_options=backend_options, config=cfg,
                out=out, features=features, threads=threads, progress=progress,
                on_features=None if sink is None else sink.acc.add, total=int(pending.sum()))
        finally:
            if out is not None:
                clean_tmp(out)  # a killed actor's half-written temporary files
    seconds = time.perf_counter() - t0
    if out is not None:
        gen.write_manifest(out, plan, (0, 1), writer)
        missing = int(writer.pending(rows).sum())
        if missing:
            raise MediFastError(f"{missing} planned image(s) are missing from {out} after the Ray run; "
                                f"rerun the same command to finish them")
    return {"generated": made, "skipped": int((~pending).sum()), "seconds": seconds,
            "images_per_s": made / seconds if seconds > 0 else 0.0}
