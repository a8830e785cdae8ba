"""The demo's arms: the training sets the linear probe is compared on, one registry entry each.

An arm is a name, a recipe that turns the probe's real patches (and whatever models the recipe builds)
into the probe's training set, its colour in the figures and its label in the report's prose.  The
orchestrator (`run.py`), the evaluation, the report, the figures, the report over seeds and the
benchmarks iterate over `REGISTRY`; adding an arm is one entry here and its test.

A recipe runs in two phases, so that every model is trained before any samples are made (the report's
timings read as data, models, samples): `prepare` builds what the arm needs (train and export a model),
`make` returns the arm's patches for the probe to add to its real draw, or None when the probe uses the
real patches alone.  `load` reads the patches of a finished run back (`run.reevaluate`).

An arm's cost is the wall-clock seconds of the stages it ran (`Context.stage`), plus those of the arms its
recipe builds on (`needs`: a distilled student needs its teacher's model): what it takes to make its
training data from nothing but the rendered cohort.  `results.json` records it per arm (`arm_seconds`).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from ..eval.probe import NO_SYNTHETIC
from . import stages
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

    def load(self, arm: "Arm", run: Path) -> Patches:
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
        with ctx.stage(arm.name, f"generate {arm.name} (ort-cpu, DDIM-{ctx.cfg.sample_steps})"):
            return stages.generate(ctx.cfg, ctx.onnx[arm.name], ctx.out, self.folder, cls_only=not self.per_site)

    def load(self, arm: "Arm", run: Path) -> Patches:
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
        with ctx.stage(arm.name, f"generate {arm.name} (ort-cpu, its own steps)"):
            return stages.generate(cfg, ctx.onnx[arm.name], ctx.out, self.folder, cls_only=not self.per_site)

    def load(self, arm: "Arm", run: Path) -> Patches:
        return stages.load_synthetic(run / "synthetic" / self.folder)


def _always(cfg: DemoConfig) -> bool:
    return True


@dataclass(frozen=True)
class Arm:
    """One arm.  `name` may hold `{cfg.FIELD}` placeholders (filled by `for_config`); `label` is how the
    report's prose describes its training data; `grid`: the report shows a grid of its samples."""

    name: str
    label: str
    colour: str
    recipe: RealOnly | ModelSamples | DistilledSamples
    grid: bool = False
    enabled: Callable[[DemoConfig], bool] = _always


REAL = Arm(NO_SYNTHETIC, "no synthetic data", "#9e9e9e", RealOnly())
CLS = Arm("CLS", "class-only", "#4a7fb5", ModelSamples("class", "cls"), grid=True)
MEDI = Arm("MeDi", "class + site", "#c0504d", ModelSamples("class,tss", "medi"), grid=True)
# demo --distill: the MeDi model distilled from DDIM-16 to a few steps (DemoConfig.distill*).
STUDENT = Arm("MeDi-{cfg.distill_steps}-step", "distilled", "#777", DistilledSamples(MEDI.name, "medi-student"),
              enabled=lambda cfg: cfg.distill)
# The probe's arms in this order (its tables, the figures' bars, results.json).
REGISTRY = (REAL, CLS, MEDI, STUDENT)


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
# samples, and what class-only samples add over the real patches alone.
GAPS = (Gap(MEDI.name, CLS.name, "medi_over_cls"), Gap(CLS.name, REAL.name, "cls_over_real"))
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
