"""``medi_fast.ray``: generation on a Ray cluster (see :mod:`medi_fast.ray_generate`, docs/cluster.md).

    import medi_fast.ray
    medi_fast.ray.generate("ckpt.pt", plan, "synth/")          # files, as `medi-fast generate --ray`
    ds = medi_fast.ray.dataset("ckpt.pt", plan)                # a lazy Ray Dataset of images + labels

``generate`` is ``medi_fast.generate.run_job`` with ``ray=RayOptions(...)``.  The code lives in
``ray_generate`` so that nothing inside the package is itself named ``ray`` where Ray's own modules
are imported.
"""
from .ray_generate import UnitWorker, connect, dataset, generate, require_ray

__all__ = ["generate", "dataset", "connect", "require_ray", "UnitWorker"]
