"""Generation on a Ray cluster (``medi-fast generate --ray``, ``medi_fast.ray``), built on Ray Data.

The plan is cut into the same work units a local run uses (``Generator._units``: batches of
pending rows for image folders, whole shards for tar), and the units become a Ray Dataset.
``map_batches`` runs :class:`UnitWorker`, a callable class, as an actor pool: each actor opens the
model once with its backend and runs the local code (``sample_rows``, the writers) on one unit per
call.  Since the units and their batches are exactly those of a local run, the files are byte for
byte those of ``medi-fast generate`` without ``--ray``.  Ray does the scheduling, autoscaling and
fault handling: an actor that dies is restarted and its unit retried; files are written atomically
and named by plan index, so a retried unit rewrites the same files and never duplicates one.

For ``--fid-stats`` the actors return per-image features (a 2048-float row is smaller than the
2048 x 2048 outer-product sum of any unit under 2048 images) and the driver adds them into the same
running sums a local run keeps: the statistics equal the single-process ones to float64 rounding.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

import pickle

from .errors import MediFastError
from .generate import GenerateConfig, Generator, sample_rows

INSTALL_HINT = "install it with pip install 'medi-fast[ray]' (or pip install 'ray[data]')"


def require_ray():
    """Import Ray (with Ray Data), or fail in one line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra is ray[data]; a bare ray lacks its dependencies)
    except ImportError:
        raise MediFastError(f"--ray needs Ray Data, which is not installed; {INSTALL_HINT}") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """Join the Ray cluster at ``address`` (``auto``: the one ``ray start`` began on this node), or
    start a local instance sized to this machine; a no-op when this process is already connected."""
    ray = require_ray()
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
        if address:
            try:
                ray.init(address=address, **kwargs)
            except (ValueError, ConnectionError, TimeoutError) as e:
                raise MediFastError(f"cannot join the Ray cluster at {address!r} ({str(e).splitlines()[0][:160]}); "
                                    f"give auto, HOST:6379 or ray://HOST:10001, or --ray alone for a local "
                                    f"instance") from None
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
    return ray


def _check_backend(name: str, info) -> None:
    """Fail early on a backend name the workers could never use (availability is the workers' to tell:
    the driver may be a head node without GPUs)."""
    from . import backends

    if name == "auto":
        return
    if name not in backends.BACKENDS:
        backends.resolve(name, info)  # raises the usual "unknown backend" error
    entry = backends.BACKENDS[name]
    if info.kind not in entry.kinds:
        backends.resolve(name, info)  # raises the usual "cannot run a ... file" error


class UnitWorker:
    """The actor: opens the model once, then generates one work unit per call.

    A call gets a batch of units (columns ``rows``: the unit's plan rows, a pickled DataFrame; ``todo``:
    which of them still need an image) and returns one row per image of those units: its plan
    ``index``, whether it was ``generated`` now, and, as asked, its ``features`` (FID) or its ``image``
    and labels (streaming datasets).
    """

    def __init__(self, model, backend: str, backend_options: dict, config: GenerateConfig, out=None,
                 features: dict | None = None, emit_images: bool = False, threads: int | None = None):
        import torch

        from . import backends
        from .writers import make_writer

        if threads:  # the CPUs Ray gave this actor; torch would otherwise size itself to the whole node
            torch.set_num_threads(int(threads))
        self.info = backends.open_model(model)
        self.denoiser = backends.create(backend, self.info, **backend_options)
        self.cfg, self.emit_images = config, emit_images
        self.writer = make_writer(out, self.info.spec.names, config.format, config.jpeg_quality) if out else None
        self.extractor = None
        if features is not None:
            from .eval.features import get_extractor

            self.extractor = get_extractor(features["name"], weights=features.get("weights"),
                                           device=features.get("device"))

    def __call__(self, batch: dict) -> dict:
        parts = [self._unit(pickle.loads(r), np.asarray(t, dtype=bool)) for r, t in zip(batch["rows"], batch["todo"])]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _unit(self, rows: pd.DataFrame, todo: np.ndarray) -> dict:
        # The same steps, in the same order, as Generator.run does for one unit.
        cfg, res = self.cfg, self.info.resolution
        images = np.empty((len(rows), res, res, 3), np.uint8)
        new = np.flatnonzero(todo)
        for s in range(0, len(new), cfg.batch_size):
            sel = new[s:s + cfg.batch_size]
            images[sel] = sample_rows(self.denoiser, self.info, rows.iloc[sel], cfg)
        old = np.flatnonzero(~todo)
        if len(old):  # resumed: finished images are read back for the statistics
            images[old] = self.writer.read(rows.iloc[old])
        if self.writer is not None and len(new):
            self.writer.write(images[new], rows.iloc[new])
        out = {"index": rows["index"].to_numpy(np.int64), "generated": todo.copy()}
        if self.extractor is not None:
            out["features"] = np.asarray(self.extractor(images))  # as the extractor gives them: float64 sums follow
            out["label"] = rows["class"].astype(str).to_numpy()
        if self.emit_images:
            out["image"] = images
            out.update(_labels(self.info.spec, rows))
        return out


def _labels(spec, rows: pd.DataFrame) -> dict:
    """Label columns for training: for each attribute its value by data column name (``class``,
    ``tissue_source_site``, ...) and, for categorical ones, the vocabulary id as ``<column>_id``
    (int64, -1 for a missing value), which is what ``iter_torch_batches`` turns into tensors."""
    from .conditioning import CATEGORICAL, column_for

    out = {"seed": rows["seed"].to_numpy(np.int64)}
    for a in spec.attributes:
        col, vals = column_for(a.name), rows[a.name]
        if a.kind == CATEGORICAL:
            out[col] = np.array(["" if v is None else str(v) for v in vals], dtype=object)
            out[f"{col}_id"] = np.array([-1 if v is None else a.vocab.id(v) for v in vals], dtype=np.int64)
        else:
            out[col] = vals.astype(np.float64).to_numpy()
    return out


def _resources(ray, workers: int | None, gpus_per_worker: float | None, cpus_per_worker: float | None,
               units: int) -> dict:
    """map_batches' resources: one GPU per actor where the cluster has GPUs, else one-CPU actors; a
    fixed pool of ``workers`` actors, or an autoscaling pool from 1 to as many as the cluster holds."""
    total = ray.cluster_resources()
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if total.get("GPU", 0) > 0 else 0.0
    if cpus_per_worker is None:
        cpus_per_worker = 1.0
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise MediFastError("--ray-gpus-per-worker must be >= 0 and CPUs per worker > 0")
    if workers is not None:
        if workers <= 0:
            raise MediFastError(f"--ray-workers must be positive, got {workers}")
        pool = ray.data.ActorPoolStrategy(size=min(int(workers), units))  # an idle actor would only start up
    else:
        fits = total.get("GPU", 0) // gpus_per_worker if gpus_per_worker else total.get("CPU", 1) // cpus_per_worker
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(int(fits), units)))
    return {"num_gpus": gpus_per_worker, "num_cpus": cpus_per_worker, "compute": pool}


def _quiet_data(progress: bool) -> None:
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar counts images; Ray's counts blocks
    ctx.verbose_stats_logs = False
    if not progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def generate(model, plan, out=None, *, config: GenerateConfig | None = None, backend: str = "auto",
             device: str | None = None, fid_stats=None, fid_features: str = "inception", inception_weights=None,
             address: str | None = None, workers: int | None = None, gpus_per_worker: float | None = None,
             cpus_per_worker: float | None = None, progress: bool = True) -> dict:
    """Generate ``plan`` from ``model`` on Ray into ``out`` (and/or stream FID statistics to
    ``fid_stats``): the same files, ``manifest.csv`` and ``run.json`` as a local run, resumable.

    ``address``: a Ray cluster (``auto``, ``ray://host:10001``, ...); None starts a local instance
    (or uses the one this process is already connected to).  Returns the run's counts and speed.
    """
    import time

    from . import backends
    from .io import clean_tmp, ensure_dir
    from .writers import make_writer

    require_ray()  # before anything is written
    cfg = config or GenerateConfig()
    if out is None and fid_stats is None:
        raise MediFastError("give --out DIR (images) and/or --fid-stats FILE.npz (statistics only)")
    info = model if isinstance(model, backends.ModelInfo) else backends.open_model(model)
    _check_backend(backend, info)
    sink = None
    if fid_stats is not None:
        from .eval.features import get_extractor
        from .eval.fid import FIDStatsSink

        if fid_features not in ("inception", "inception-random", "colour-texture", "uni"):
            get_extractor(fid_features)  # the usual "unknown feature extractor" error, before the actors start

        # The sink's accumulator and writer are used here; the actors run the extractor.
        sink = FIDStatsSink(fid_stats, per="class", extractor=_Named(fid_features))
    rows = plan.rows.reset_index(drop=True)
    local = Generator(info, None, cfg, sinks=[sink] if sink else [], progress=False)
    writer, pending = None, np.ones(len(rows), dtype=bool)
    if out is not None:
        out = ensure_dir(out)
        clean_tmp(out)
        local._check_run_dir(out, plan, (0, 1))
        writer = make_writer(out, plan.attributes, cfg.format, cfg.jpeg_quality)
        pending = writer.pending(rows)
    units = [_item(u, t) for u, t in local._units(rows, pending, writer)]
    made, t0 = 0, time.perf_counter()
    if units:
        ray = connect(address)
        _quiet_data(progress)
        res = _resources(ray, workers, gpus_per_worker, cpus_per_worker, len(units))
        options = {"device": device} if device else {}
        features = {"name": fid_features, "weights": str(inception_weights) if inception_weights else None,
                    "device": device} if sink else None
        ds = ray.data.from_items(units, override_num_blocks=min(len(units), 200)).map_batches(
            UnitWorker, batch_size=1, zero_copy_batch=True,
            fn_constructor_kwargs={"model": str(info.path), "backend": backend, "backend_options": options,
                                   "config": cfg, "out": str(out) if out is not None else None,
                                   "features": features, "threads": max(1, round(res["num_cpus"]))},
            **res)
        from tqdm.auto import tqdm

        bar = tqdm(total=int(pending.sum()), unit="img", desc="generate (ray)", disable=not progress,
                   dynamic_ncols=True)
        try:
            for batch in _user_errors(ds.iter_batches(batch_size=None, batch_format="numpy")):
                n = int(batch["generated"].sum())
                made += n
                bar.update(n)
                if sink is not None:
                    sink.acc.add(batch["features"], batch["label"])
        finally:
            bar.close()
            if out is not None:
                clean_tmp(out)  # a killed actor's half-written temporary files
    seconds = time.perf_counter() - t0
    if out is not None:
        local._write_manifest(out, plan, (0, 1), writer)
        missing = int(writer.pending(rows).sum())
        if missing:
            raise MediFastError(f"{missing} planned image(s) are missing from {out} after the Ray run; "
                                f"rerun the same command to finish them")
    if sink is not None:
        sink.close()
    return {"generated": made, "skipped": int((~pending).sum()), "seconds": seconds,
            "images_per_s": made / seconds if seconds > 0 else 0.0}


def _user_errors(batches):
    """Re-raise a MediFastError from inside an actor (wrapped by Ray) as itself: one line for the CLI."""
    try:
        yield from batches
    except MediFastError:
        raise
    except Exception as e:
        chain, c = [], e
        while c is not None and len(chain) < 20:  # Ray's wrappers keep the original as .cause / __cause__
            chain.append(c)
            c = getattr(c, "cause", None) or c.__cause__
        ours = [c for c in chain if type(c) is MediFastError]
        if not ours:
            raise
        raise MediFastError(*ours[-1].args) from None


def _item(rows: pd.DataFrame, todo: np.ndarray) -> dict:
    """One work unit as a Dataset row: its plan rows travel with it (a few KB), not the whole plan
    to every actor."""
    return {"rows": pickle.dumps(rows.reset_index(drop=True)), "todo": np.asarray(todo, dtype=bool)}


class _Named:
    """Stands in for the extractor on the driver: FIDStatsSink records its name in the npz."""

    def __init__(self, name: str):
        self.name = name


def dataset(model, plan, *, config: GenerateConfig | None = None, backend: str = "auto", device: str | None = None,
            address: str | None = None, workers: int | None = None, gpus_per_worker: float | None = None,
            cpus_per_worker: float | None = None):
    """A lazy Ray Dataset of generated images with their labels, generated as it is consumed.

    Columns: ``image`` (uint8 H x W x 3), ``index``, ``seed``, each attribute by data column name
    (``class``, ``tissue_source_site``, ...; strings for categorical ones) and ``<column>_id`` (int64
    vocabulary id, -1 if missing) for categorical ones.  For a training loop::

        ds = medi_fast.ray.dataset("ckpt.pt", plan)
        for b in ds.select_columns(["image", "class_id"]).iter_torch_batches(batch_size=64):
            ...
    """
    from . import backends

    cfg = config or GenerateConfig()
    info = model if isinstance(model, backends.ModelInfo) else backends.open_model(model)
    _check_backend(backend, info)
    rows = plan.rows.reset_index(drop=True)
    units = [_item(rows.iloc[s:s + cfg.batch_size], np.ones(len(rows.iloc[s:s + cfg.batch_size]), dtype=bool))
             for s in range(0, len(rows), cfg.batch_size)]
    ray = connect(address)
    _quiet_data(False)
    res = _resources(ray, workers, gpus_per_worker, cpus_per_worker, max(1, len(units)))
    options = {"device": device} if device else {}
    return ray.data.from_items(units, override_num_blocks=min(len(units), 200)).map_batches(
        UnitWorker, batch_size=1, zero_copy_batch=True,
        fn_constructor_kwargs={"model": str(info.path), "backend": backend, "backend_options": options,
                               "config": cfg, "emit_images": True,
                               "threads": max(1, round(res["num_cpus"]))},
        **res).drop_columns(["generated"])


__all__ = ["generate", "dataset", "connect", "require_ray", "UnitWorker"]
