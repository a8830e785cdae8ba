"""Python API for batch jobs.

    import medi_fast
    pipe = medi_fast.load("ckpt.pt")                      # or an exported .onnx / .engine
    images = pipe.generate(class_="LUAD", tss="05", n=64, seed=0)   # uint8 (64, H, W, 3)
    moved = pipe.edit(images, tss="44", strength=0.5)     # the same patches as site 44 renders them
    ds = pipe.dataset({"LUAD": ..., })                    # torch IterableDataset for augmentation
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Iterator, Mapping

import numpy as np
import pandas as pd
import torch

from . import backends
from . import plan as plans
from .conditioning import column_for
from .generate import GenerateConfig, for_model, sample_rows
from .job import run_job


class Pipeline:
    """A model file opened with a backend; generates uint8 images."""

    def __init__(self, info: backends.ModelInfo, denoiser, config: GenerateConfig):
        self.info, self.denoiser, self.config = info, denoiser, config

    @classmethod
    def open(cls, path, backend: str = "auto", **options) -> "Pipeline":
        gen_keys = set(GenerateConfig.__dataclass_fields__)
        config = GenerateConfig(**{k: v for k, v in options.items() if k in gen_keys})
        info = backends.open_model(path)
        # a distilled student samples with its own steps and sampler unless they are given
        config = for_model(config, info, steps_given="steps" in options, sampler_given="sampler" in options)
        denoiser = backends.create(backend, info, **{k: v for k, v in options.items() if k not in gen_keys})
        return cls(info, denoiser, config)

    @property
    def spec(self):
        return self.info.spec

    @property
    def backend(self) -> str:
        return getattr(self.denoiser, "name", "?")

    def _config(self, **overrides) -> GenerateConfig:
        return replace(self.config, **{k: v for k, v in overrides.items() if v is not None})

    def generate(self, class_=None, n: int = 1, seed: int = 0, *, steps=None, eta=None, guidance=None,
                 sampler=None, batch_size=None, progress: bool = False, **metadata) -> np.ndarray:
        """``n`` images of one combination -> uint8 (n, H, W, 3).  Metadata by attribute name
        (``tss="05"``, ``age=61``).  Image ``i`` depends only on (seed, i)."""
        p = plans.single(self.spec, {"class": class_, **metadata}, n, seed)
        return self.run(p, progress=progress, steps=steps, eta=eta, guidance=guidance, sampler=sampler,
                        batch_size=batch_size)

    def run(self, plan: plans.Plan, progress: bool = False, **overrides) -> np.ndarray:
        """All images of a plan, in plan order -> uint8 (N, H, W, 3)."""
        batches = []
        run_job(self.info, plan, None, self._config(**overrides), backend=self.denoiser,
                sinks=[lambda images, rows: batches.append(images.copy())], progress=progress)
        return np.concatenate(batches) if batches else np.empty((0, self.info.resolution, self.info.resolution, 3), np.uint8)

    def edit(self, images, class_=None, *, strength: float = 0.5, method: str = "sdedit", source=None,
             seed: int = 0, steps=None, eta=None, guidance=None, sampler=None, batch_size=None,
             **metadata) -> np.ndarray:
        """Real patches moved to another condition -> uint8 (N, H, W, 3) (docs/edit.md).

        ``images``: uint8 (N, H, W, 3) at the model's resolution (or one (H, W, 3), or a list).  The
        target: ``class_`` and metadata by attribute name (``tss="44"``, or one value per image:
        ``tss=["S1", "S2"]``); what is not given stays the source's.  ``source``: the images' own class
        and metadata (one mapping for all, or a DataFrame / list of mappings, one per image); needed for
        ``method="inversion"``, and for ``sdedit`` unless ``class_`` is given.  ``strength`` in [0, 1]: 0 returns the images, 1 starts from noise.  Image
        ``i`` depends only on (seed, i), its conditions and itself: ``medi-fast edit`` with the same seed
        writes the same images."""
        from . import edit as edits

        base = self._config(steps=steps, eta=eta, guidance=guidance, sampler=sampler, batch_size=batch_size)
        cfg = edits.EditConfig(**asdict(base), strength=strength, method=method)
        array = edits.as_images(images, self.info.resolution)
        targets = {k: v for k, v in {"class": class_, **metadata}.items() if v is not None}
        p = edits.plan_edits(self.spec, edits.source_frame(self.spec, len(array), source), targets, seed, method)
        edits.check_model(self.info, cfg)
        out = np.empty_like(array)
        for s in range(0, len(array), cfg.batch_size):
            out[s:s + cfg.batch_size] = edits.edit_rows(self.denoiser, self.info, array[s:s + cfg.batch_size],
                                                        p.rows.iloc[s:s + cfg.batch_size], cfg)
        return out

    def dataset(self, combos: pd.DataFrame | Mapping, n: int | None = None, seed: int = 0, **overrides) -> "SyntheticPatches":
        """A torch IterableDataset over a plan: a DataFrame of (class, metadata..., count) rows, or one
        combination as a mapping plus ``n``."""
        if isinstance(combos, Mapping):
            p = plans.single(self.spec, combos, n or 1, seed)
        else:
            p = plans.from_counts(self.spec, combos, seed)
        return SyntheticPatches(self, p, self._config(**overrides))


class SyntheticPatches(torch.utils.data.IterableDataset):
    """Streams ``(image uint8 (3, H, W), labels dict)`` generated on the fly, batch by batch.

    With several DataLoader workers each takes a disjoint shard of the plan (use one worker per GPU
    backend; on a GPU prefer num_workers=0 and let the backend batch)."""

    def __init__(self, pipe: Pipeline, plan: plans.Plan, config: GenerateConfig):
        self.pipe, self.plan, self.config = pipe, plan, config

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        p = self.plan.shard(info.id, info.num_workers) if info is not None and info.num_workers > 1 else self.plan
        bs = self.config.batch_size
        for s in range(0, len(p), bs):
            rows = p.rows.iloc[s:s + bs]
            images = sample_rows(self.pipe.denoiser, self.pipe.info, rows, self.config)
            for img, (_, row) in zip(images, rows.iterrows()):
                labels = {column_for(a): row[a] for a in p.attributes}
                labels.update(index=int(row["index"]), seed=int(row["seed"]))
                yield torch.from_numpy(img).permute(2, 0, 1).contiguous(), labels
