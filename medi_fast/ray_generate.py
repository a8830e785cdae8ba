"""Generation on a Ray cluster (``medi-fast generate --ray``, ``medi_fast.ray``), built on Ray Data.

A Ray job is a ``job.run_job`` with ``ray=RayOptions(...)``: the job checks everything, claims
the run directory, cuts the plan into the Generator's work units (``Generator.units``: batches of
pending rows for image folders, whole shards for tar) and writes the manifest, as for a local run.
This module only executes the units: they become a Ray Dataset, and ``map_batches`` runs
:class:`UnitWorker`, a callable class, as an actor pool: each actor opens the model once with its
backend and runs the local code (``sample_rows``, the writers) on one unit per call, with the torch
thread counts of the process that started the job (a convolution's rounding depends on them).  Same
units, same batches, same threads: the files are byte for byte those of ``medi-fast generate``
without ``--ray``.  Ray does the scheduling, autoscaling and fault handling: an actor that dies is
restarted and its unit retried; files are written atomically and named by plan index, so a retried
unit rewrites the same files and never duplicates one.

For ``--fid-stats`` the actors return per-image features (a 2048-float row is smaller than the
2048 x 2048 outer-product sum of any unit under 2048 images) and the driver adds them into the same
running sums a local run keeps: the statistics equal the single-process ones to float64 rounding.
"""
from __future__ import annotations

import os
import pickle
import socket
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import MediFastError
from .generate import GenerateConfig, Generator, RayOptions

INSTALL_HINT = "install it with pip install 'medi-fast[ray]' (or pip install 'ray[data]')"
ADDRESS_HINT = "give auto, HOST:6379 or ray://HOST:10001, or --ray alone for a local instance"


def require_ray():
    """Import Ray (with Ray Data), or fail in one line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra is ray[data]; a bare ray lacks its dependencies)
    except ImportError:
        raise MediFastError(f"--ray needs Ray Data, which is not installed; {INSTALL_HINT}") from None
    return ray


def check_address(address: str | None) -> None:
    """Refuse, in seconds, an address where nothing answers: Ray's own client retries an unreachable
    GCS address until it is killed.  Without an address (or with ``auto``) Ray joins ``$RAY_ADDRESS``
    when it is set, so that one is checked; else ``auto`` is Ray's to find (it fails at once when no
    cluster runs on this node).  A given address's form was checked with the other options."""
    source = ""
    if address in (None, "auto"):
        address, source = os.environ.get("RAY_ADDRESS"), " (from $RAY_ADDRESS)"
        if not address or address in ("auto", "local"):
            return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise MediFastError(f"{address!r}{source} is not a Ray address; {ADDRESS_HINT}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise MediFastError(f"cannot join the Ray cluster at {address!r}{source}: nothing answers at {host}:{port} "
                            f"({why}); start it with `ray start --head`, or {ADDRESS_HINT}") from None


def connect(address: str | None = None, num_cpus: int | None = None):
    """Join the Ray cluster at ``address`` (``auto``: the one ``ray start`` began on this node), or
    start a local instance sized to this machine; a no-op when this process is already connected (a
    given address must still be well formed and answer)."""
    ray = require_ray()
    if address:
        RayOptions(address=address)  # its form, checked where the other options are
    check_address(address)
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
        if address:
            try:
                ray.init(address=address, **kwargs)
            except (ValueError, ConnectionError, TimeoutError) as e:
                raise MediFastError(f"cannot join the Ray cluster at {address!r} ({str(e).splitlines()[0][:160]}); "
                                    f"{ADDRESS_HINT}") from None
        else:
            import logging

            # A new local instance announces its defaults (token authentication) as a warning; a refusal
            # that follows (no GPU for --ray-gpus-per-worker) must stay one line.  Errors still show.
            log = logging.getLogger("ray")
            level = log.level
            log.setLevel(logging.ERROR)
            try:
                ray.init(num_cpus=num_cpus, **kwargs)
            finally:
                log.setLevel(level)
    return ray


def check_backend(name: str, info) -> None:
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


@dataclass(frozen=True)
class Cluster:
    """A joined Ray cluster and the resources of one actor, checked to fit on one of its nodes."""

    ray: object
    options: RayOptions
    num_cpus: float
    num_gpus: float
    totals: dict

    def pool(self, units: int):
        """A fixed pool of ``workers`` actors, or one autoscaling from 1 to what the cluster holds; never
        more actors than units (an idle actor would only start up)."""
        if self.options.workers is not None:
            return self.ray.data.ActorPoolStrategy(size=max(1, min(int(self.options.workers), units)))
        if self.num_gpus:
            fits = self.totals.get("GPU", 0) // self.num_gpus
        else:
            fits = self.totals.get("CPU", 1) // self.num_cpus
        return self.ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(int(fits), units)))


def start(options: RayOptions, threads: int) -> Cluster:
    """Join (or start) Ray and size one actor: one GPU where the cluster has GPUs, else CPU actors with
    ``threads`` CPUs (the job's torch threads; capped by the largest node).  A size no live node can
    hold is refused here, before anything is written (Ray would wait for such a node forever)."""
    ray = connect(options.address)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    totals = ray.cluster_resources()
    most_gpus = max((r.get("GPU", 0) for r in nodes), default=0)
    most_cpus = max((r.get("CPU", 0) for r in nodes), default=0)
    gpus = options.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if most_gpus > 0 else 0.0
    if gpus > most_gpus:
        raise MediFastError(f"--ray-gpus-per-worker {gpus:g}: no node of the Ray cluster has {gpus:g} GPU(s) "
                            f"(the most on one node: {most_gpus:g}); use --ray-gpus-per-worker 0 for CPU actors, "
                            f"or join a cluster with GPUs")
    cpus = options.cpus_per_worker
    if cpus is None:
        cpus = 1.0 if gpus else float(max(1, min(threads, most_cpus or 1)))
    if options.cpus_per_worker is not None and cpus > most_cpus:
        raise MediFastError(f"{cpus:g} CPUs per actor: no node of the Ray cluster has that many (the most on one "
                            f"node: {most_cpus:g}); ask for fewer")
    return Cluster(ray, options, float(cpus), float(gpus), dict(totals))


class UnitWorker:
    """The actor: opens the model once, then generates one work unit per call.

    A call gets a batch of units (columns ``rows``: the unit's plan rows, a pickled DataFrame; ``todo``:
    which of them still need an image) and returns one row per image of those units: its plan
    ``index``, whether it was ``generated`` now, and, as asked, its ``features`` (FID) or its ``image``
    and labels (streaming datasets).
    """

    def __init__(self, model, backend: str, backend_options: dict, config: GenerateConfig, out=None,
                 features: dict | None = None, emit_images: bool = False, threads: tuple[int, int] | None = None):
        import torch

        from . import backends
        from .writers import make_writer

        if threads:
            # The job's own torch thread counts, not the actor's CPU share: a convolution's rounding
            # depends on the intra-op count, and these make each image the local run's, byte for byte.
            intra, interop = (int(v) for v in threads)
            torch.set_num_threads(intra)
            if torch.get_num_interop_threads() != interop:
                try:
                    torch.set_num_interop_threads(interop)
                except RuntimeError:  # fixed once torch's pool has started; it never changes a result
                    pass
        self.info = backends.open_model(model)
        self.generator = Generator(self.info, backends.create(backend, self.info, **backend_options), config,
                                   progress=False)
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
        # Finished images are read back only for the statistics, as a local run does for its sinks.
        images = self.generator.sample_unit(rows, todo, self.writer if self.extractor is not None else None)
        new = np.flatnonzero(todo)
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


def _quiet_data(progress: bool) -> None:
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar counts images; Ray's counts blocks
    ctx.verbose_stats_logs = False
    if not progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def _map(cluster: Cluster, units: list, **worker_kwargs):
    """The units as a Ray Dataset mapped by a pool of UnitWorker actors (one unit per call)."""
    items = [_item(rows, todo) for rows, todo in units]
    return cluster.ray.data.from_items(items, override_num_blocks=min(len(items), 200)).map_batches(
        UnitWorker, batch_size=1, zero_copy_batch=True, fn_constructor_kwargs=worker_kwargs,
        num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus, compute=cluster.pool(len(items)))


def run_units(cluster: Cluster, units: list, *, model, backend: str, backend_options: dict, config: GenerateConfig,
              out=None, features: dict | None = None, threads: tuple[int, int] = (1, 1), progress: bool = True,
              on_features=None, total: int = 0) -> int:
    """Generate ``units`` (``Generator.units``) on the cluster's actors, writing into ``out``; returns the
    number of images generated.  ``on_features(features, labels)`` gets each unit's FID features."""
    from tqdm.auto import tqdm

    _quiet_data(progress)
    ds = _map(cluster, units, model=str(model), backend=backend, backend_options=backend_options, config=config,
              out=str(out) if out is not None else None, features=features, threads=threads)
    made = 0
    bar = tqdm(total=total, unit="img", desc="generate (ray)", disable=not progress, dynamic_ncols=True)
    try:
        for batch in _user_errors(ds.iter_batches(batch_size=None, batch_format="numpy")):
            n = int(batch["generated"].sum())
            made += n
            bar.update(n)
            if on_features is not None:
                on_features(batch["features"], batch["label"])
    finally:
        bar.close()
    return made


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


class NamedExtractor:
    """Stands in for the extractor on the driver: FIDStatsSink records its name in the npz."""

    def __init__(self, name: str):
        self.name = name


def dataset(model, plan, *, config: GenerateConfig | None = None, backend: str = "auto", device: str | None = None,
            address: str | None = None, workers: int | None = None, gpus_per_worker: float | None = None,
            cpus_per_worker: float | None = None):
    """A lazy Ray Dataset of generated images with their labels, generated as it is consumed.

    Columns: ``image`` (uint8 H x W x 3), ``index``, ``seed``, each attribute by data column name
    (``class``, ``tissue_source_site``, ...; strings for categorical ones) and ``<column>_id`` (int64
    vocabulary id, -1 if missing) for categorical ones.  Image ``i`` is image ``i`` of a local run of
    the same plan and batch size (the same units and torch threads).  For a training loop::

        ds = medi_fast.ray.dataset("ckpt.pt", plan)
        for b in ds.select_columns(["image", "class_id"]).iter_torch_batches(batch_size=64):
            ...
    """
    import torch

    from . import backends

    cfg = config or GenerateConfig()
    options = RayOptions(address=address, workers=workers, gpus_per_worker=gpus_per_worker,
                         cpus_per_worker=cpus_per_worker)
    info = model if isinstance(model, backends.ModelInfo) else backends.open_model(model)
    check_backend(backend, info)
    rows = plan.rows.reset_index(drop=True)
    units = list(Generator(info, None, cfg, progress=False).units(rows, np.ones(len(rows), dtype=bool)))
    threads = (torch.get_num_threads(), torch.get_num_interop_threads())
    cluster = start(options, threads[0])
    _quiet_data(False)
    return _map(cluster, units, model=str(info.path), backend=backend,
                backend_options={"device": device} if device else {}, config=cfg, emit_images=True,
                threads=threads).drop_columns(["generated"])


__all__ = ["dataset", "connect", "require_ray", "UnitWorker", "start", "run_units", "check_backend", "NamedExtractor"]
