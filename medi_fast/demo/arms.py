"""The demo's arms: the training sets the linear probe is compared on, one registry entry each.

An arm is a name, a recipe that turns the probe's real patches (and whatever models the recipe builds)
into the probe's training set (patches added to its real draw, or a transformed view of every real patch), its colour in the figures and its label in the report's prose.  The
orchestrator (`run.py`), the evaluation, the report, the figures, the report over seeds and the
benchmarks iterate over `REGISTRY`; adding an arm is one entry here and its test.

A recipe runs in two phases, so that every model is trained before any samples are made (the report's
timings read as data, models, samples): `prepare` builds what the arm needs (train and export a model),
`make` returns the arm's patches for the probe to add to its real draw, or None when the probe uses the
real patches alone.  Patches whose metadata has a `SOURCE` column are derived from the probe's real pool (a
stain-augmented copy of pool row SOURCE): the probe adds only those derived from the patches it drew.  A
recipe that transforms the real patches themselves (stain normalisation of train and test) leaves the
transformed patches, in index order, in `Context.views`; the probe is then trained and tested on them.
`load` makes the patches of a finished run again, or reads them back (`run.reevaluate`).

An arm's cost is the wall-clock seconds of the stages it ran (`Context.stage`), plus those of the arms its
recipe builds on (`needs`: a distilled student needs its teacher's model): what it takes to make its
training data from nothing but the rendered cohort.  `results.json` records it per arm (`arm_seconds`).
"""
from __future__ import annotations

import math
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from ..errors import MediFastError
from ..eval.probe import NO_SYNTHETIC, SOURCE
from . import stages, stain
from .stages import DemoConfig

# An arm's patches for the probe: (metadata with class and site, uint8 images), or None for none.
Patches = Optional[tuple[pd.DataFrame, np.ndarray]]


@dataclass
class Context:
    """What a recipe may use and leave behind: the run's configuration and directory, the timer and log
    of the orchestrator, and each arm's checkpoint and ONNX model for the arms built on it."""

    cfg: DemoConfig
    out: Path
    timer: Callable  # timer(label): a context manager that records the stage's seconds
    log: Callable[[str], None]
    total: int  # numbered steps of the whole run
    done: int = 0
    checkpoints: dict = field(default_factory=dict)
    onnx: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)  # arm name -> seconds of its own stages
    backends: dict = field(default_factory=dict)  # synthetic/ folder -> the backend that made its patches
    index: Optional[pd.DataFrame] = None  # the cohort's index, once rendered
    data: Optional[Path] = None  # the run whose cohort this is (out, or the run re-evaluated)
    made: dict = field(default_factory=dict)  # arm name -> its Patches, in the order the arms were made
    views: dict = field(default_factory=dict)  # arm name -> every real patch transformed, in index order
    _real: Optional[np.ndarray] = None

    def real(self) -> np.ndarray:
        """The cohort's real patches at the model resolution, in index order (read once)."""
        if self._real is None:
            self._real = stages.real_patches(self.data or self.out)
        return self._real

    def begin(self, msg: str) -> None:
        """Log the start of the next numbered step."""
        self.done += 1
        self.say(msg)

    def say(self, msg: str) -> None:
        """Log a part of the current step."""
        self.log(f"{self.done}/{self.total} {msg}")

    @contextmanager
    def stage(self, arm: str, label: str):
        """Time one stage of `arm`'s recipe: a row of the report's timings and part of the arm's cost."""
        t0 = time.perf_counter()
        with self.timer(label):
            yield
        self.seconds[arm] = self.seconds.get(arm, 0.0) + time.perf_counter() - t0


@dataclass(frozen=True)
class RealOnly:
    """The probe's k real patches per class alone (the probe adds nothing to its real draw)."""

    needs: tuple[str, ...] = ()
    trains: bool = False
    per_site: bool = False

    def prepare(self, arm: "Arm", ctx: Context) -> None:
        pass

    def make(self, arm: "Arm", ctx: Context) -> Patches:
        return None

    def load(self, arm: "Arm", run: Path, ctx: Context) -> Patches:
        return None


@dataclass(frozen=True)
class ModelSamples:
    """Samples of a `demo-32` UNet trained on the cohort with `--condition condition`, exported to ONNX and
    sampled with ONNX Runtime.  Conditioned on the site, it makes every class x cohort site, the combinations
    absent from training included; on the class alone, as many per class."""

    condition: str
    folder: str  # its runs/, engines/ and synthetic/ folder
    needs: tuple[str, ...] = ()
    trains: bool = True

    @property
    def per_site(self) -> bool:
        return "tss" in self.condition.split(",")

    def prepare(self, arm: "Arm", ctx: Context) -> None:
        cfg = ctx.cfg
        ctx.begin(f"training the {arm.name} model (--condition {self.condition}, {cfg.train_steps} steps)")
        with ctx.stage(arm.name, f"train {arm.name} ({cfg.train_steps} steps, batch {cfg.batch_size})"):
            ctx.checkpoints[arm.name] = stages.train_model(cfg, ctx.out, self.folder, self.condition)
        with ctx.stage(arm.name, f"export {arm.name} to ONNX"):
            ctx.onnx[arm.name] = stages.export_model(ctx.checkpoints[arm.name], ctx.out, self.folder)

    def make(self, arm: "Arm", ctx: Context) -> Patches:
        with ctx.stage(arm.name, f"generate {arm.name} ({stages.backend_label(ctx.cfg)}, DDIM-{ctx.cfg.sample_steps})"):
            return stages.generate(ctx.cfg, ctx.onnx[arm.name], ctx.out, self.folder, cls_only=not self.per_site,
                                   used=ctx.backends)

    def load(self, arm: "Arm", run: Path, ctx: Context) -> Patches:
        return stages.load_synthetic(run / "synthetic" / self.folder)


@dataclass(frozen=True)
class DistilledSamples:
    """Samples of the `teacher` arm's model distilled (progressive distillation) into a few-step student,
    which samples with its own steps and the teacher's plan."""

    teacher: str
    folder: str
    trains: bool = False

    @property
    def needs(self) -> tuple[str, ...]:
        return (self.teacher,)

    @property
    def per_site(self) -> bool:
        return arm(self.teacher).recipe.per_site

    def prepare(self, arm: "Arm", ctx: Context) -> None:
        pass  # it distils after every model has made its samples: see make

    def make(self, arm: "Arm", ctx: Context) -> Patches:
        cfg = ctx.cfg
        ctx.say(f"distilling {self.teacher} into a {cfg.distill_steps}-step student (DDIM-{cfg.distill_teacher_steps} "
                f"-> {cfg.distill_steps}, {cfg.distill_iters} iterations per stage)")
        with ctx.stage(arm.name, f"distil {self.teacher} -> {arm.name}"):
            path = stages.distill_model(cfg, ctx.checkpoints[self.teacher], ctx.out, self.folder)
        with ctx.stage(arm.name, f"export {arm.name} to ONNX"):
            ctx.onnx[arm.name] = stages.export_model(path, ctx.out, self.folder)
        with ctx.stage(arm.name, f"generate {arm.name} ({stages.backend_label(cfg)}, its own steps)"):
            return stages.generate(cfg, ctx.onnx[arm.name], ctx.out, self.folder, cls_only=not self.per_site,
                                   used=ctx.backends)

    def load(self, arm: "Arm", run: Path, ctx: Context) -> Patches:
        return stages.load_synthetic(run / "synthetic" / self.folder)


def _arm_seed(cfg: DemoConfig, name: str) -> list[int]:
    """The seed of an arm's random transform: the run's seed and the arm, so arms draw independently."""
    return [cfg.seed, zlib.crc32(name.encode())]


@dataclass(frozen=True)
class StainAugmented:
    """Stain augmentation (`stain.AUGMENTATIONS`).  Without `base`: ceil(probe ratio) augmented copies of
    every patch of the probe's real pool, of which the probe adds those of the patches it drew (as many
    per class as the synthetic arms add).  With `base`: that arm's samples, each augmented once."""

    method: str
    base: Optional[str] = None
    trains: bool = False
    per_site: bool = False

    @property
    def needs(self) -> tuple[str, ...]:
        return (self.base,) if self.base else ()

    def prepare(self, arm: "Arm", ctx: Context) -> None:
        pass

    def make(self, arm: "Arm", ctx: Context) -> Patches:
        what = f"{self.base}'s samples" if self.base else f"the probe's real pool x {math.ceil(ctx.cfg.probe_ratio)}"
        with ctx.stage(arm.name, f"stain-augment {arm.name} ({self.method}: {what})"):
            return self.patches(arm, ctx)

    def load(self, arm: "Arm", run: Path, ctx: Context) -> Patches:
        return self.patches(arm, ctx)

    def patches(self, arm: "Arm", ctx: Context) -> Patches:
        cfg, seed = ctx.cfg, _arm_seed(ctx.cfg, self.method + (self.base or ""))
        if self.base:
            meta, images = ctx.made[self.base]
            return meta.reset_index(drop=True), stain.augment(self.method, images, 1, seed)
        pool = stages.probe_pool(cfg, ctx.index)
        copies = math.ceil(cfg.probe_ratio)
        rows = ctx.index.loc[pool, ["class", "tissue_source_site"]].reset_index(drop=True)
        meta = rows.loc[rows.index.repeat(copies)].reset_index(drop=True)
        # the pool row each copy came from; its stain is no longer its site's
        meta[SOURCE] = np.repeat(np.arange(len(rows)), copies)
        meta["tissue_source_site"] = "none"
        return meta, stain.augment(self.method, ctx.real()[pool], copies, seed)


@dataclass(frozen=True)
class StainNormalised:
    """Stain normalisation (`stain.NORMALISATIONS`) of every real patch, the probe's training pool and its
    test sites alike, to one reference: a mosaic of the first REFERENCE_PER_CELL patches of every trained
    class x site cell of the cohort (the slides a lab has).  Nothing is added to the real draw."""

    method: str
    needs: tuple[str, ...] = ()
    trains: bool = False
    per_site: bool = False
    REFERENCE_PER_CELL = 4

    def prepare(self, arm: "Arm", ctx: Context) -> None:
        pass

    def make(self, arm: "Arm", ctx: Context) -> Patches:
        with ctx.stage(arm.name, f"stain-normalise {arm.name} ({self.method}: every real patch)"):
            ctx.views[arm.name] = self.view(ctx)
        return None

    def load(self, arm: "Arm", run: Path, ctx: Context) -> Patches:
        ctx.views[arm.name] = self.view(ctx)
        return None

    def reference(self, cfg: DemoConfig, index: pd.DataFrame, real: np.ndarray) -> np.ndarray:
        cells = index.groupby(["class", "tissue_source_site"], sort=True).indices
        picks = [pos[:self.REFERENCE_PER_CELL] for (c, s), pos in cells.items() if s in cfg.spec.cohort.get(c, ())]
        return stain.mosaic(real[np.concatenate(picks)])

    def view(self, ctx: Context) -> np.ndarray:
        real = ctx.real()
        return stain.normalise(self.method, real, self.reference(ctx.cfg, ctx.index, real))


@dataclass(frozen=True)
class Rendered:
    """The best a generator could do: patches freshly rendered by the demo's renderer (`stages.render_oracle`),
    as many per class as the model arms make.  `per_site`: every class x cohort site (what MeDi aims at);
    otherwise each class at its cohort sites only (what a class-only model learns: the cohort's mixture)."""

    per_site: bool
    needs: tuple[str, ...] = ()
    trains: bool = False

    def prepare(self, arm: "Arm", ctx: Context) -> None:
        pass

    def make(self, arm: "Arm", ctx: Context) -> Patches:
        with ctx.stage(arm.name, f"render {arm.name} (the demo's renderer)"):
            return stages.render_oracle(ctx.cfg, self.per_site)

    def load(self, arm: "Arm", run: Path, ctx: Context) -> Patches:
        return stages.render_oracle(ctx.cfg, self.per_site)


@dataclass(frozen=True)
class Edited:
    """Real patches moved to other sites by `medi-fast edit` (`Pipeline.edit`) with the `model` arm's
    model: each patch of the probe's real pool that one of its runs draws (`stages.probe_drawn`), once into
    every cohort site (more copies, cycling the sites, when the probe ratio asks for more), with
    cfg.edit_method at cfg.edit_strength and DDIM-cfg.sample_steps.  The probe adds those derived from the
    patches it drew, as many per class as the synthetic arms add.  The edits are kept in
    OUT/synthetic/<folder> (`manifest.csv` and PNGs) for `load`."""

    model: str
    folder: str
    trains: bool = False
    per_site: bool = True

    @property
    def needs(self) -> tuple[str, ...]:
        return (self.model,)

    def prepare(self, arm: "Arm", ctx: Context) -> None:
        pass

    def make(self, arm: "Arm", ctx: Context) -> Patches:
        cfg = ctx.cfg
        with ctx.stage(arm.name, f"edit {arm.name} ({cfg.edit_method} {cfg.edit_strength:g}, "
                                 f"DDIM-{cfg.sample_steps}, {stages.backend_label(cfg)})"):
            meta, images = self.edits(ctx)
            folder = ctx.out / "synthetic" / self.folder
            folder.mkdir(parents=True, exist_ok=True)
            from PIL import Image

            meta["file"] = [f"{i:06d}.png" for i in range(len(meta))]
            for name, im in zip(meta["file"], images):
                Image.fromarray(im).save(folder / name)
            meta.to_csv(folder / "manifest.csv", index=False)
        return meta.drop(columns="file"), images

    def load(self, arm: "Arm", run: Path, ctx: Context) -> Patches:
        meta, images = stages.load_synthetic(run / "synthetic" / self.folder)
        pool = int(stages.probe_pool(ctx.cfg, ctx.index).sum())
        rows = pd.to_numeric(meta.get(SOURCE, pd.Series([], dtype=str)), errors="coerce")
        if SOURCE not in meta.columns or rows.isna().any() or not rows.between(0, pool - 1).all():
            raise MediFastError(f"the manifest in {run / 'synthetic' / self.folder} names source patches outside the "
                                f"probe's pool of {pool}; the run is damaged: run the demo afresh")
        meta[SOURCE] = rows.astype(int)
        # re-evaluated with another k or number of repeats, the probe draws patches the run did not edit
        copies = meta[SOURCE].value_counts()
        wanted = stages.probe_drawn(ctx.cfg, ctx.index)
        if not all(copies.get(r, 0) >= self.copies(ctx.cfg) for r in wanted):
            raise MediFastError(f"the edits in {run / 'synthetic' / self.folder} do not cover the real patches this "
                                "probe draws (another k, ratio or number of repeats than the run's); run the demo afresh")
        return meta.drop(columns="file"), images

    @staticmethod
    def copies(cfg: DemoConfig) -> int:
        """Edits per drawn patch: one per cohort site, or as many as the probe ratio asks for."""
        return max(len(cfg.spec.sites), math.ceil(cfg.probe_ratio))

    def edits(self, ctx: Context) -> tuple[pd.DataFrame, np.ndarray]:
        from ..api import Pipeline

        cfg, spec = ctx.cfg, ctx.cfg.spec
        pool = stages.probe_pool(cfg, ctx.index)
        rows = ctx.index.loc[pool, ["class", "tissue_source_site"]].reset_index(drop=True)
        drawn = stages.probe_drawn(cfg, ctx.index)
        copies = self.copies(cfg)
        source = np.repeat(drawn, copies)
        target = [spec.sites[j % len(spec.sites)] for j in range(copies)] * len(drawn)
        src = rows.loc[source].reset_index(drop=True)
        pipe = Pipeline.open(ctx.onnx[self.model], backend=stages.generation_backend(cfg), steps=cfg.sample_steps,
                             batch_size=cfg.sample_batch)
        ctx.backends[self.folder] = pipe.backend
        images = pipe.edit(ctx.real()[pool][source], tss=target, source=src, method=cfg.edit_method,
                           strength=cfg.edit_strength, seed=cfg.seed)
        meta = pd.DataFrame({"class": src["class"], "tissue_source_site": target, SOURCE: source,
                             "source_tissue_source_site": src["tissue_source_site"]})
        return meta, images


def _always(cfg: DemoConfig) -> bool:
    return True


@dataclass(frozen=True)
class Arm:
    """One arm.  `name` may hold `{cfg.FIELD}` placeholders (filled by `for_config`); `label` is how the
    report's prose describes its training data; `grid`: the report shows a grid of its samples."""

    name: str
    label: str
    colour: str
    recipe: RealOnly | ModelSamples | DistilledSamples | Edited | StainAugmented | StainNormalised | Rendered
    grid: bool = False
    enabled: Callable[[DemoConfig], bool] = _always


REAL = Arm(NO_SYNTHETIC, "no synthetic data", "#9e9e9e", RealOnly())
CLS = Arm("CLS", "class-only", "#4a7fb5", ModelSamples("class", "cls"), grid=True)
MEDI = Arm("MeDi", "class + site", "#c0504d", ModelSamples("class,tss", "medi"), grid=True)
# demo --distill: the MeDi model distilled from DDIM-16 to a few steps (DemoConfig.distill*).
STUDENT = Arm("MeDi-{cfg.distill_steps}-step", "distilled", "#777", DistilledSamples(MEDI.name, "medi-student"),
              enabled=lambda cfg: cfg.distill)
# What a pathology user would do instead: stain augmentation of the real patches (HED jitter; Macenko
# augmentation, stronger), MeDi's samples with the same HED jitter, and stain normalisation.
HED = Arm("HED-jitter", "HED-jittered real patches", "#8fbf5a", StainAugmented("hed"))
MACENKO_AUG = Arm("Macenko-aug", "Macenko-augmented real patches", "#4f8f2f", StainAugmented("macenko"))
MEDI_HED = Arm("MeDi+HED", "HED-jittered MeDi samples", "#e08a3c", StainAugmented("hed", base=MEDI.name))
MACENKO_NORM = Arm("Macenko-norm", "Macenko-normalised real patches", "#8e6bb8", StainNormalised("macenko"))
REINHARD_NORM = Arm("Reinhard-norm", "Reinhard-normalised real patches", "#b39ddb", StainNormalised("reinhard"))
# The MeDi model's counterfactuals of the real patches: each drawn real patch shown at every cohort site.
EDITED = Arm("MeDi-edit", "real patches edited into every cohort site", "#d9928f", Edited(MEDI.name, "medi-edit"))
# The renderer itself as the generator: the ceiling of each model arm's recipe.
CLS_ORACLE = Arm("CLS-oracle", "rendered, class at its cohort sites", "#1f3f66", Rendered(per_site=False))
MEDI_ORACLE = Arm("MeDi-oracle", "rendered, every class x cohort site", "#7a1f1d", Rendered(per_site=True))
# The probe's arms in this order (its tables, the figures' bars, results.json).
REGISTRY = (REAL, CLS, MEDI, STUDENT, EDITED, HED, MACENKO_AUG, MEDI_HED, MACENKO_NORM, REINHARD_NORM,
            CLS_ORACLE, MEDI_ORACLE)


@dataclass(frozen=True)
class Gap:
    """Two arms the report and the report over seeds compare: does `hi` beat `lo`?  `key` names the
    verdict in seeds.json."""

    hi: str
    lo: str
    key: str

    @property
    def column(self) -> str:
        return f"{self.hi} - {self.lo}"


# The comparisons the demo is about, the headline first: what site conditioning adds over class-only
# samples, and what class-only samples add over the real patches alone; what MeDi adds over the cheap
# alternative (HED jitter); and, from the renderer itself, whether class-only data falls below real data
# alone by the cohort's design (CLS-oracle below it too) or by the trained model's quality.
GAPS = (Gap(MEDI.name, CLS.name, "medi_over_cls"), Gap(CLS.name, REAL.name, "cls_over_real"),
        Gap(MEDI.name, HED.name, "medi_over_hed"), Gap(CLS_ORACLE.name, REAL.name, "cls_oracle_over_real"))
HEADLINE = GAPS[0]


def arm(name: str) -> Arm:
    """The registry entry named `name` (as written in the registry, placeholders unfilled)."""
    return next(a for a in REGISTRY if a.name == name)


def for_config(cfg: DemoConfig) -> list[Arm]:
    """The arms a run with `cfg` compares, in registry order, their names filled in."""
    return [replace(a, name=a.name.format(cfg=cfg)) for a in REGISTRY if a.enabled(cfg)]


def cost(arms: list[Arm], seconds: dict[str, float]) -> dict[str, float]:
    """Each arm's seconds to make its training data: its own stages and those of the arms it needs."""
    return {a.name: round(seconds.get(a.name, 0.0) + sum(seconds.get(n, 0.0) for n in a.recipe.needs), 1)
            for a in arms}
