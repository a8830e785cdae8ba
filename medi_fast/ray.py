"""``medi_fast.ray``: generation on a Ray cluster (docs/cluster.md).

    import medi_fast.ray
    medi_fast.ray.generate("ckpt.pt", plan, "synth/")          # files, as `medi-fast generate --ray`
    ds = medi_fast.ray.dataset("ckpt.pt", plan)                # a lazy Ray Dataset of images + labels

``generate`` is ``medi_fast.job.run_job`` with ``ray=RayOptions(...)``.  The executor lives in
``ray_generate`` so that nothing inside the package is itself named ``ray`` where Ray's own modules
are imported.
"""
from __future__ import annotations

from .generate import FIDStats, GenerateConfig, RayOptions
from .job import run_job
from .ray_generate import UnitWorker, connect, dataset, require_ray

__all__ = ["generate", "dataset", "connect", "require_ray", "UnitWorker"]


def generate(model, plan, out=None, *, config: GenerateConfig | None = None, backend: str = "auto",
             device: str | None = None, fid_stats=None, fid_features: str = "inception", inception_weights=None,
             address: str | None = None, workers: int | None = None, gpus_per_worker: float | None = None,
             cpus_per_worker: float | None = None, progress: bool = True) -> dict:
    """Generate ``plan`` from ``model`` on Ray into ``out`` (and/or stream FID statistics to
    ``fid_stats``): the same files, ``manifest.csv`` and ``run.json`` as a local run, resumable.
    ``job.run_job`` with ``ray=RayOptions(...)``.

    ``address``: a Ray cluster (``auto``, ``ray://host:10001``, ...); None starts a local instance
    (or uses the one this process is already connected to).  Returns the run's counts and speed.
    """
    require_ray()  # before anything is checked or written: the missing extra is the first thing to say
    ray_options = RayOptions(address=address, workers=workers, gpus_per_worker=gpus_per_worker,
                             cpus_per_worker=cpus_per_worker)
    fid = FIDStats(fid_stats, fid_features, inception_weights, device) if fid_stats is not None else None
    return run_job(model, plan, out, config, backend=backend, backend_options={"device": device} if device else {},
                   fid=fid, ray=ray_options, progress=progress)
