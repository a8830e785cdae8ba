"""Generator: plan -> batches -> sampler -> uint8 images -> writer (and other sinks).

Resumable: files are written atomically, so on a rerun of the same command whatever exists is
whole and is skipped; stale temporary files from a killed run are removed first.  A run directory
remembers what it was made with (``run.json``) and refuses to be continued with different
settings, which would silently mix two experiments.  Encoding and writing run in worker threads
while the next batch samples.
"""
from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .backends import ModelInfo, sampling_threads
from .conditioning import column_for
from .errors import MediFastError
from .guidance import classifier_free
from .io import atomic_write_text, clean_tmp, ensure_dir
from .pixels import to_uint8
from .plan import Plan
from .samplers import get_sampler, needs_noise, sampler_entry, timesteps_for
from .version import __version__
from .writers import make_writer


FORMATS = ("png", "jpeg", "tar")


@dataclass(frozen=True)
class GenerateConfig:
    # DDIM-100 with eta 0: the published sampling protocol (FID was computed on DDIM-100).
    steps: int = 100
    eta: float = 0.0
    sampler: str = "ddim"
    # 1.0 = no guidance, as published (the published models were trained without cond-dropout).
    guidance: float = 1.0
    # 16 fills a CPU; GPUs want 64-128 (see benchmarks/RESULTS.md).
    batch_size: int = 16
    format: str = "png"
    jpeg_quality: int = 95
    # Encoder threads: PNG encoding releases the GIL, two keep up with a GPU at 128 px.
    workers: int = 2

    def __post_init__(self):
        # Every option is checked here, before a model is loaded or a file written.
        if self.batch_size <= 0:
            raise MediFastError(f"--batch-size must be positive, got {self.batch_size}")
        if self.steps <= 0:
            raise MediFastError(f"--steps must be a positive number of sampler steps, got {self.steps}; e.g. 100")
        if not (math.isfinite(self.eta) and 0 <= self.eta <= 1):
            raise MediFastError(f"--eta must be in [0, 1] (0 = deterministic DDIM), got {self.eta}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise MediFastError(f"--guidance must be a number >= 0 (1 = no guidance), got {self.guidance}")
        if self.format not in FORMATS:
            raise MediFastError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise MediFastError(f"--jpeg-quality must be in 1..100 (95 is near-lossless), got {self.jpeg_quality}")
        if not 1 <= self.workers <= 256:  # encoder/writer threads: a few per core is plenty
            raise MediFastError(f"--workers must be in 1..256 (encoder/writer threads), got {self.workers}")
        entry = sampler_entry(self.sampler)  # an unknown name fails before anything is loaded or written
        if self.eta and entry.stochastic:
            raise MediFastError(f"{self.sampler} draws fresh noise at every step and takes no --eta (got {self.eta}); "
                                f"use --eta 0")
        if self.eta and not entry.takes_eta:
            raise MediFastError(f"{self.sampler} is a deterministic ODE solver and takes no --eta (got {self.eta}); "
                                f"use --eta 0 or --sampler ddim")

    def sample(self, denoiser, info: ModelInfo, rows: pd.DataFrame) -> np.ndarray:
        """One batch of the job's images, uint8 (len(rows), H, W, 3): drawn from noise here.  A job that
        makes its images another way (``edit.EditConfig``) overrides this and ``manifest_columns``; the
        Generator, its units, run directory and writers, and the Ray actors stay as they are."""
        return sample_rows(denoiser, info, rows, self)

    def manifest_columns(self) -> dict:
        """The settings ``manifest.csv`` records on every row."""
        return {"steps": self.steps, "eta": self.eta, "guidance": self.guidance, "sampler": self.sampler}

    @property
    def verb(self) -> str:
        """What the job does, as its progress bar says it."""
        return "generate"


def for_model(cfg: GenerateConfig, info: ModelInfo, steps_given: bool = False,
              sampler_given: bool = False) -> GenerateConfig:
    """``cfg`` with the model's own sampler and steps where the user gave none.

    A distilled student (``medi-fast distill``) records the sampler and number of steps it was made
    for in its schedule (``default_sampler``, ``default_steps``); any other model keeps ``cfg``."""
    from dataclasses import replace

    sched = info.schedule
    changes = {}
    if sched.default_steps is not None and not steps_given:
        changes["steps"] = int(sched.default_steps)
    if sched.default_sampler is not None and not sampler_given:
        changes["sampler"] = sched.default_sampler
    return replace(cfg, **changes) if changes else cfg


def distilled_warning(info: ModelInfo, cfg: GenerateConfig) -> str | None:
    """One line when a distilled student runs with another sampler or number of steps than it was made
    for: legal (the samplers convert its v / x0 output), but the student learned to jump N steps of
    DDIM, not to follow the ODE at other step sizes, so quality is not what the benchmark measured."""
    sched = info.schedule
    if sched.default_steps is None:
        return None
    made = f"{sched.default_sampler or 'ddim'}-{sched.default_steps}"
    if cfg.sampler == (sched.default_sampler or "ddim") and cfg.steps == sched.default_steps:
        return None
    return (f"this model was distilled for {made} and runs with {cfg.sampler}-{cfg.steps}; its quality was only "
            f"measured at {made}; drop --steps/--sampler to use it")


def row_noise(rows: pd.DataFrame, resolution: int, device) -> Callable[[], torch.Tensor]:
    """Each row's own noise stream, seeded by its plan seed: every call draws the next (B, 3, H, W), so
    an image never depends on the rows it is batched with."""
    gens = [torch.Generator().manual_seed(int(s)) for s in rows["seed"]]
    return lambda: torch.stack([torch.randn(3, resolution, resolution, generator=g) for g in gens]).to(device)


def row_conditions(spec, rows: pd.DataFrame, device, column: Callable[[str], str] = str) -> dict:
    """The rows' conditioning ids on ``device``, each attribute read from ``rows[column(name)]``."""
    values = {name: rows[column(name)].tolist() for name in spec.names}
    return {k: v.to(device) for k, v in spec.encode(values, len(rows)).items()}


def guided(denoiser, spec, guidance: float):
    """The denoiser with classifier-free guidance at ``guidance`` (itself at 1)."""
    return denoiser if guidance == 1.0 else classifier_free(denoiser, spec, guidance)


def sample_rows(denoiser, info: ModelInfo, rows: pd.DataFrame, cfg: GenerateConfig) -> np.ndarray:
    """Generate one batch; each row's image depends only on its seed and conditioning."""
    device = getattr(denoiser, "device", torch.device("cpu"))
    draw = row_noise(rows, info.resolution, device)
    x_T = draw()  # (B, 3, H, W); with eta > 0 the per-row streams continue after it
    cond = row_conditions(info.spec, rows, device)
    sampler = get_sampler(cfg.sampler)
    ts = timesteps_for(cfg.sampler, info.schedule, cfg.steps)
    with sampling_threads(denoiser):
        x0 = sampler(guided(denoiser, info.spec, cfg.guidance), x_T, ts, info.schedule, cond, eta=cfg.eta,
                     noise=(lambda _: draw()) if needs_noise(cfg.sampler, cfg.eta) else None)
        return to_uint8(x0)


def _manifest(plan_rows: pd.DataFrame, files: list[str], info: ModelInfo, cfg: GenerateConfig) -> pd.DataFrame:
    df = pd.DataFrame({"file": files})
    for name in info.spec.names:
        df[column_for(name)] = plan_rows[name].to_numpy()
    for col in plan_rows.columns:  # what a job's plan adds (an edit's source image and conditions)
        if col not in ("index", "seed", *info.spec.names):
            df[col] = plan_rows[col].to_numpy()
    df["index"] = plan_rows["index"].to_numpy()
    df["seed"] = plan_rows["seed"].to_numpy()
    for key, value in cfg.manifest_columns().items():
        df[key] = value
    df["checkpoint_hash"] = info.model_hash
    return df


def check_unet_batch(denoiser, batch_size: int, guidance: float) -> None:
    """Refuse a batch the denoiser's engine profile cannot take, before anything is generated.

    Classifier-free guidance runs the conditional and unconditional halves as ONE UNet batch of
    2 x batch_size (one engine call per step, not two), so ``--batch-size 64 --guidance 3`` needs an
    engine profile up to 128.  Engine backends carry their I/O contract; others have no limit.
    """
    contract = getattr(denoiser, "contract", None)
    if contract is None:
        return
    unet = batch_size * (1 if guidance == 1.0 else 2)
    if unet > contract.batch.max:
        fit = contract.batch.max // (1 if guidance == 1.0 else 2)
        why = f"with --guidance {guidance} the UNet runs at 2 x {batch_size} = {unet}" if guidance != 1.0 else \
            f"--batch-size {batch_size}"
        raise MediFastError(f"{why}, above this engine's profile maximum {contract.batch.max}; use --batch-size "
                            f"{max(fit, 1)} or rebuild the engine with --batch {contract.batch.min},"
                            f"{contract.batch.opt},{max(unet, contract.batch.opt)}")


def guidance_warning(info: ModelInfo, guidance: float) -> str | None:
    """One line when guidance is asked of a model trained without conditioning dropout: legal, but its
    unconditional branch was never trained, so the result is rarely what is wanted."""
    if guidance == 1.0:
        return None
    prov = info.provenance or {}
    drop = prov.get("cond_drop", (prov.get("config") or {}).get("cond_drop"))
    try:
        drop = float(drop) if drop is not None else None
    except (TypeError, ValueError):
        drop = None
    if drop:
        return None
    known = "was trained without" if drop == 0 else "records no"
    return (f"--guidance {guidance}: this model {known} conditioning dropout (--cond-drop), so its unconditional "
            f"branch is untrained and guidance rarely helps; use --guidance 1 or a model trained with --cond-drop 0.1")


class Generator:
    """Runs a plan through a backend.  ``sinks``: callables ``sink(images, rows)`` fed every batch
    in plan order (e.g. streaming FID statistics); images skipped on resume are read back for them."""

    def __init__(self, info: ModelInfo, denoiser, cfg: GenerateConfig, sinks: Sequence[Callable] = (),
                 progress: bool = True):
        self.info, self.denoiser, self.cfg, self.sinks, self.progress = info, denoiser, cfg, list(sinks), progress

    def check(self, n_images: int) -> None:
        """Refuse what would fail mid-run: steps the sampler cannot take with this schedule, a batch
        that does not fit the device's memory."""
        from .model import get_preset
        from .resources import activation_bytes, check_batch

        timesteps_for(self.cfg.sampler, self.info.schedule, self.cfg.steps)
        ck = self.info.checkpoint
        config = getattr(ck, "unet_config", None)
        if config is None and self.info.preset:
            try:
                config = get_preset(self.info.preset).unet_config()
            except MediFastError:  # an exported model of an unknown preset: no estimate
                config = None
        if config is not None and n_images > 0:
            per_image = activation_bytes(config, self.info.resolution, training=False)
            if self.cfg.guidance != 1.0:
                per_image *= 2  # conditional and unconditional passes in one batch
            device = getattr(self.denoiser, "device", "cpu")
            check_batch(min(self.cfg.batch_size, n_images), per_image, device)

    def _run_record(self, plan: Plan, shard: tuple[int, int]) -> dict:
        return {"model_hash": self.info.model_hash, "plan_digest": plan.digest(), "shards": shard[1],
                "config": {k: v for k, v in asdict(self.cfg).items() if k not in ("batch_size", "workers")}}

    def check_run_dir(self, out, plan: Plan, shard: tuple[int, int] = (0, 1)) -> None:
        """Refuse an output directory whose ``run.json`` records another run, or cannot be read (its
        images could not be shown to belong to this run).  Reads only: callers check before printing."""
        path = Path(out) / "run.json"
        if not path.exists():
            return
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
            old = None
        if not isinstance(old, dict):  # written atomically: only a hand edit or another tool damages it
            raise MediFastError(f"{path} is not a medi-fast run record, so {out} cannot be resumed; delete {out} "
                                f"to start over, or choose a new --out")
        record = self._run_record(plan, shard)
        if {k: old.get(k) for k in record} != record:
            diff = [k for k in record if old.get(k) != record[k]]
            raise MediFastError(f"{out} holds a run made with different {', '.join(diff)}; rerun the original "
                                f"command to resume it, or choose a new --out")

    def claim_run_dir(self, out, plan: Plan, shard: tuple[int, int] = (0, 1)) -> None:
        """Claim ``out`` for this run: :meth:`check_run_dir`, then (re)write its ``run.json``.  ``plan`` is
        the whole plan, not the shard."""
        self.check_run_dir(out, plan, shard)
        record = self._run_record(plan, shard)
        atomic_write_text(Path(out) / "run.json",
                          json.dumps({**record, "medi_fast": __version__, "model": str(self.info.path)}, indent=2))

    def open_output(self, out, plan: Plan, shard: tuple[int, int] = (0, 1)):
        """Claim ``out`` for shard ``shard`` of ``plan`` (stale temporary files removed, ``run.json`` checked
        and written) and open its writer: ``(out, writer, pending)``, ``pending`` marking the shard's rows
        not yet on disk.  ``out`` None: no writer, every row pending."""
        part = plan.shard(*shard) if shard[1] > 1 else plan
        if out is None:
            return None, None, np.ones(len(part), dtype=bool)
        out = ensure_dir(out)
        clean_tmp(out)
        self.claim_run_dir(out, plan, shard)
        writer = make_writer(out, part.attributes, self.cfg.format, self.cfg.jpeg_quality)
        return out, writer, writer.pending(part.rows)

    def run(self, plan: Plan, out=None, shard: tuple[int, int] = (0, 1)) -> dict:
        """Generate ``plan`` (shard ``i`` of ``n``) into ``out`` (None: sinks only).  Returns stats."""
        cfg = self.cfg
        full_plan = plan
        plan = plan.shard(*shard) if shard[1] > 1 else plan
        check_unet_batch(self.denoiser, min(cfg.batch_size, max(len(plan), 1)), cfg.guidance)
        self.check(len(plan))  # before run.json: a refused run leaves nothing behind
        out, writer, pending = self.open_output(out, full_plan, shard)
        rows = plan.rows
        units = self.units(rows, pending, writer)
        t0 = time.perf_counter()
        made = 0
        bar = tqdm(total=int(pending.sum()), unit="img", desc=cfg.verb, disable=not self.progress,
                   dynamic_ncols=True, smoothing=0.1)
        futures: list[Future] = []
        try:
            with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
                for unit_rows, todo in units:
                    new = np.flatnonzero(todo)
                    images = self.sample_unit(unit_rows, todo, writer if self.sinks else None,
                                              on_batch=bar.update)
                    made += len(new)
                    for sink in self.sinks:
                        sink(images, unit_rows)
                    if writer is not None and len(new):
                        futures.append(pool.submit(writer.write, images[new], unit_rows.iloc[new]))
                    # Bound memory: at most 2 batches in flight per worker.
                    while len(futures) > 2 * max(1, cfg.workers):
                        futures.pop(0).result()
                for f in futures:
                    f.result()
        finally:
            bar.close()
            if out is not None:
                clean_tmp(out)
        seconds = time.perf_counter() - t0
        if out is not None:
            self.write_manifest(out, full_plan, shard, writer)
        return {"generated": made, "skipped": int((~pending).sum()), "seconds": seconds,
                "images_per_s": made / seconds if seconds > 0 else 0.0}

    def sample_unit(self, rows: pd.DataFrame, todo: np.ndarray, writer=None, on_batch=None) -> np.ndarray:
        """The images of one work unit, uint8 (len(rows), H, W, 3): its pending rows (``todo``) sampled
        in batches of ``--batch-size``, in order; with ``writer``, finished rows read back from it (for
        sinks), else left zero.  ``on_batch(n)`` after each batch."""
        res = self.info.resolution
        images = np.zeros((len(rows), res, res, 3), np.uint8)
        new = np.flatnonzero(todo)
        for s in range(0, len(new), self.cfg.batch_size):
            sel = new[s:s + self.cfg.batch_size]
            images[sel] = self.cfg.sample(self.denoiser, self.info, rows.iloc[sel])
            if on_batch is not None:
                on_batch(len(sel))
        old = np.flatnonzero(~np.asarray(todo, dtype=bool))
        if writer is not None and len(old):
            images[old] = writer.read(rows.iloc[old])
        return images

    def units(self, rows: pd.DataFrame, pending: np.ndarray, writer=None):
        """The run's work units, in plan order: ``(rows, pending mask)`` pairs, one ``--batch-size`` batch
        of pending rows for image folders, one whole tar shard for ``--format tar``.  With sinks every
        row is in a unit (finished images are read back for them).  Each unit is sampled in batches of
        ``--batch-size`` of its pending rows; a Ray run uses the same units, so each image is computed
        in the same batch as in a local run."""
        if writer is not None and self.cfg.format == "tar":
            shards = writer.shard_of(rows["index"].to_numpy())
            for k in np.unique(shards):
                sel = np.flatnonzero(shards == k)
                if pending[sel].any() or self.sinks:
                    yield rows.iloc[sel], pending[sel]
            return
        step = self.cfg.batch_size
        idx = np.flatnonzero(pending) if not self.sinks else np.arange(len(rows))
        for s in range(0, len(idx), step):
            sel = idx[s:s + step]
            yield rows.iloc[sel], pending[sel]

    def write_manifest(self, out: Path, plan: Plan, shard: tuple[int, int], writer) -> None:
        """Write ``manifest.csv`` (one row per image of shard ``i`` of ``n`` of the whole ``plan``: file,
        conditioning, index, seed, sampling settings, model hash) atomically; with shards, each writes its
        part and the last to finish writes the whole manifest."""
        i, n = shard
        part = plan.shard(i, n) if n > 1 else plan
        df = _manifest(part.rows, writer.files(part.rows), self.info, self.cfg)
        if n == 1:
            atomic_write_text(out / "manifest.csv", df.to_csv(index=False))
            return
        atomic_write_text(out / f"manifest.shard-{i:04d}-of-{n:04d}.csv", df.to_csv(index=False))
        parts = [out / f"manifest.shard-{k:04d}-of-{n:04d}.csv" for k in range(n)]
        if all(p.exists() for p in parts):  # the last shard to finish writes the whole manifest
            whole = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False) for p in parts])
            atomic_write_text(out / "manifest.csv", whole.to_csv(index=False))


def check_shard(shard: tuple[int, int], n_images: int) -> None:
    """Refuse a shard ``I/N`` that is malformed or names more shards than the plan has images (every
    shard past the plan's size would be empty, and N shard manifests would be waited for)."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise MediFastError(f"--shard {i}/{n} is invalid; use I/N with 0 <= I < N")
    if n > max(n_images, 1):
        raise MediFastError(f"--shard {i}/{n} cuts a plan of {n_images} image(s) into {n} shards; use at most "
                            f"{max(n_images, 1)} shards (N <= {max(n_images, 1)})")


@dataclass(frozen=True)
class FIDStats:
    """Stream FID statistics of the generated images, per class, to ``path`` (``--fid-stats``).

    ``features``: an extractor of ``eval.features.EXTRACTORS`` (Inception for FID); ``weights``: its
    local weights file; ``device``: where it runs."""

    path: Path
    features: str = "inception"
    weights: Path | None = None
    device: str | None = None


@dataclass(frozen=True)
class RayOptions:
    """Run the job on Ray (``--ray``): ``address`` of a cluster (``auto``, ``HOST:6379``,
    ``ray://HOST:10001``; None starts a local instance), a fixed pool of ``workers`` actors (None:
    autoscale), GPUs and CPUs per actor (None: one GPU where the cluster has GPUs, else CPU actors with
    as many CPUs as the job's torch threads)."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None

    def __post_init__(self):
        # Checked before Ray is started or joined: a bad number fails in one line, not after a cluster start.
        if self.address is not None and self.address != "auto":
            host, sep, port = str(self.address).removeprefix("ray://").rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise MediFastError(f"--ray {self.address!r} is not a Ray address; give auto, HOST:6379 or "
                                    f"ray://HOST:10001, or --ray alone for a local instance")
        if self.workers is not None and self.workers <= 0:
            raise MediFastError(f"--ray-workers must be a positive number of actors, got {self.workers}; drop it "
                                f"to let the pool scale to the cluster")
        if self.gpus_per_worker is not None and not (math.isfinite(self.gpus_per_worker)
                                                     and 0 <= self.gpus_per_worker <= 1024):
            raise MediFastError(f"--ray-gpus-per-worker must be a number of GPUs >= 0 (0: CPU actors; 0.5: two "
                                f"actors per GPU), got {self.gpus_per_worker}")
        if self.cpus_per_worker is not None and not (math.isfinite(self.cpus_per_worker)
                                                     and 0 < self.cpus_per_worker <= 4096):
            raise MediFastError(f"cpus_per_worker must be a positive number of CPUs, got {self.cpus_per_worker}")
