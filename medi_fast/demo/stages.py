"""The demo's settings and its stages (data, training, export, generation, evaluation); `run.py` runs them.

Each setting is the paper's downstream experiment in miniature:

* a training cohort in which every class is seen at some sites only, and every site holds more than one
  class, so a model can learn site and class apart; a class-only model (CLS) and a class + site model
  (MeDi) are trained on it;
* a low-data, confounded probe: k real patches per class, each class from a site of its own, so a
  classifier can read the stain instead of the tissue;
* augmentation: MeDi fills in every class x site combination of the cohort, CLS adds the same number
  of class-conditional patches (whose stains still follow the cohort's class-site confound); the probe
  is tested on sites nobody has seen (eight in ring4, each a stain shift of its own), and scored per
  site and averaged over them.

Features are the `colour-texture` statistics of `medi_fast.eval.features` (no weights, no download):
stain colour carries the site, texture the class, which is what the shortcut is made of.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import MediFastError, suggest


@dataclass(frozen=True)
class Setting:
    """Which classes live at which sites of the diffusion-training cohort, where the probe's real patches
    come from, and where it is tested."""

    name: str
    classes: tuple[str, ...]
    cohort: dict  # {class: training sites}
    probe_pool: dict  # {class: sites its k real probe patches may come from}
    test_sites: tuple[str, ...]
    k: int  # real probe patches per class
    summary: str  # one sentence for the report

    @property
    def sites(self) -> list[str]:
        """The cohort's sites (MeDi fills every class at each)."""
        return sorted({s for ss in self.cohort.values() for s in ss})

    @property
    def unseen(self) -> list[tuple[str, str]]:
        """Class x cohort-site combinations absent from training."""
        return [(c, s) for c in self.classes for s in self.sites if s not in self.cohort[c]]


SETTINGS = {
    # Four classes on a ring of four sites, each class at two neighbouring sites.  A CLS sample's stain
    # still says which two sites, hence which class pair, it came from; MeDi's fill-in spreads every class
    # over all four.  Eight unseen test sites, each a stain shift of its own, so that the probe's score
    # (their mean) is not decided by one shift that every arm solves or fails.
    "ring4": Setting(
        "ring4", ("LUAD", "LUSC", "KIRC", "DLBC"),
        {"LUAD": ("S1", "S2"), "LUSC": ("S2", "S3"), "KIRC": ("S3", "S4"), "DLBC": ("S4", "S1")},
        {"LUAD": ("S1",), "LUSC": ("S2",), "KIRC": ("S3",), "DLBC": ("S4",)},
        ("S5", "S6", "S7", "S8", "S9", "SA", "SB", "SC"), 10,
        "four classes on a ring of four sites (LUAD at S1-S2, LUSC at S2-S3, KIRC at S3-S4, DLBC at S4 and S1); "
        "the probe takes each class from a site of its own (LUAD S1, LUSC S2, KIRC S3, DLBC S4)"),
    # Two classes sharing half the sites: an easier setting, where any synthetic data lifts the probe to
    # the ceiling (RESULTS.md), so it cannot show what the site conditioning adds.
    "two-class": Setting(
        "two-class", ("LUAD", "LUSC"), {"LUAD": ("S1", "S2", "S3"), "LUSC": ("S2", "S3", "S4")},
        {"LUAD": ("S1", "S2"), "LUSC": ("S3", "S4")}, ("S5", "S6"), 20,
        "two classes (LUAD at S1-S3, LUSC at S2-S4); the probe takes LUAD from S1 or S2 and LUSC from S3 or S4"),
}
DEFAULT_SETTING = "ring4"


def setting(name: str) -> Setting:
    if name not in SETTINGS:
        raise MediFastError(f"demo setting {name!r} does not exist{suggest(name, SETTINGS)}; choose from "
                            f"{', '.join(SETTINGS)}")
    return SETTINGS[name]


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo_out"
    setting: str = DEFAULT_SETTING
    # Synthetic patches per (class, site) of the cohort, and per (class, test site).
    n_per_combo: int = 160
    n_test_per_combo: int = 80
    # Rendered at 64 px, packed (antialiased) to 32 px: the demo-32 preset trains in minutes on a CPU.
    render_resolution: int = 64
    resolution: int = 32
    preset: str = "demo-32"
    # A small model trained for hundreds of steps needs a larger lr than the published 1e-4 x 800k
    # steps, and an EMA that forgets faster than 0.9999.
    train_steps: int = 700
    batch_size: int = 16
    lr: float = 2e-3
    ema_decay: float = 0.99
    # What both models predict (TrainConfig.prediction_type).
    prediction_type: str = "v_prediction"
    # Sampling: DDIM with fewer steps than the published 100 (on the demo model DDIM reaches DDIM-100's
    # colour-texture distance within 5 % at 8 steps: benchmarks/solver_quality.py).
    sample_steps: int = 15
    sample_batch: int = 64
    n_synthetic_per_combo: int = 40
    # The edited arm (arms.EDITED): each real patch the probe draws moved by `medi-fast edit` to every
    # cohort site with the MeDi model; inversion keeps the tissue (benchmarks/edit_quality.py).
    edit_method: str = "inversion"
    edit_strength: float = 0.5
    # Probe: k real patches per class (None: the setting's), repeated over site pairs and seeds.
    k: int | None = None
    # Synthetic patches per real one in the probe.  4: as many as k per cohort site of a class, so MeDi's
    # fill-in shows the probe each class at every site; at the paper's 1:1 it is 2-3 patches per site.
    probe_ratio: float = 4.0
    probe_repeats: int = 5
    seed: int = 0
    # Set by quick(): the report then says at the top that its numbers are not the demo's result.
    quick: bool = False
    # --distill: progressive distillation of the MeDi model (medi_fast.training.distill) from DDIM-64 to
    # a 4-step x0 student, whose samples are an arm of their own (arms.STUDENT).  1500 iterations per
    # halving (four halvings, about 28 minutes on 2 cores): the setting that met every bound on the demo
    # model (per-cell distance 0.99x DDIM-100's, stain slope 1.03x, probe +0.025; benchmarks/distill_quality.py).
    # From DDIM-16 none did (best 1.44x): DDIM-16 itself is 1.87x DDIM-100's.
    distill: bool = False
    distill_steps: int = 4
    distill_teacher_steps: int = 64
    distill_iters: int = 1500
    distill_prediction_type: str = "sample"
    # auto: bf16 where the CPU has bf16 units (training under bf16 autocast; generation and edits through
    # `auto`'s backend, openvino-bf16 when the extra is installed), fp32 elsewhere; fp32: training in fp32
    # and generation on ONNX Runtime's fp32, on any CPU.  Over seven seeds the two give the same result, bf16
    # 1.63x faster (benchmarks/demo_seeds.py, ring4 against ring4-fp32; benchmarks/demo_precision.py); what a
    # run used is in its results.json.
    precision: str = "auto"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise MediFastError(f"the demo's precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        spec = setting(self.setting)  # an unknown name fails here, before any output
        k = spec.k if self.k is None else self.k
        draw, made = round(self.probe_ratio * k), self.n_synthetic_per_combo * len(spec.sites)
        if not self.probe_ratio > 0:
            raise MediFastError(f"the probe ratio must be > 0 synthetic patches per real one, got {self.probe_ratio}")
        if draw > made:
            raise MediFastError(f"the probe draws {draw} synthetic patches per class but the demo makes {made}; "
                                f"lower the probe ratio ({self.probe_ratio:g}) or k ({k}), or make more per "
                                "class and site")

    @property
    def spec(self) -> Setting:
        return SETTINGS[self.setting]

    @property
    def probe_k(self) -> int:
        return self.spec.k if self.k is None else self.k

    @classmethod
    def quick_run(cls, out: str = "demo_out", **kw) -> "DemoConfig":
        # A smoke run of every stage: 120 training steps leave the models undertrained (noisy samples); a
        # --distill student gets 100 iterations per halving from DDIM-16 (a smoke of the stage, not its result).
        kw = {"distill_teacher_steps": 16, "distill_iters": 100, **kw}
        return cls(out=out, n_per_combo=64, n_test_per_combo=40, train_steps=120, sample_steps=10,
                   n_synthetic_per_combo=20, probe_repeats=3, quick=True, **kw)

    @classmethod
    def from_options(cls, out: str = "demo_out", quick: bool = False, seed: int = 0,
                     train_steps: int | None = None, setting: str = DEFAULT_SETTING,
                     distill: bool = False, precision: str = "auto") -> "DemoConfig":
        """The configuration `medi-fast demo` runs for its command-line options."""
        if train_steps is not None and train_steps < 1:
            raise MediFastError(f"--train-steps {train_steps} is not a number of steps; pass 1 or more")
        kw = {"setting": setting, "distill": distill, "precision": precision}
        cfg = cls.quick_run(out, **kw) if quick else cls(out=out, **kw)
        return replace(cfg, seed=seed, **({"train_steps": train_steps} if train_steps else {}))


def build_data(cfg: DemoConfig, out: Path) -> dict:
    from ..data.index import build_index, write_index
    from ..data.pack import pack_index
    from ..data.synth import SynthConfig, render_dataset

    spec = cfg.spec
    combos = {(c, s): cfg.n_per_combo for c, sites in spec.cohort.items() for s in sites}
    combos.update({(c, s): cfg.n_test_per_combo for c in spec.classes for s in spec.test_sites})
    sites = tuple(sorted({s for _, s in combos}))
    synth = SynthConfig(spec.classes, sites, combos, resolution=cfg.render_resolution, seed=cfg.seed,
                        train_combos=tuple((c, s) for c, ss in spec.cohort.items() for s in ss))
    render_dataset(synth, out / "data", overwrite=True)
    index = build_index(out / "data", out / "data" / "clinical.csv")
    write_index(index, out / "index.parquet")
    clinical = pd.read_csv(out / "data" / "clinical.csv", dtype=str, keep_default_na=False)
    test = clinical["tissue_source_site"].isin(spec.test_sites)
    clinical[~test].to_csv(out / "train.csv", index=False)
    clinical[test].to_csv(out / "test.csv", index=False)
    pack_index(index, cfg.resolution, out / "pack", overwrite=True, progress=True)
    return {"index": index, "train_csv": out / "train.csv"}


def check_precision(cfg: DemoConfig) -> None:
    """Refuse --precision bf16 on a CPU without bf16 units, in one line, before any output."""
    from ..backends import cpu_bf16_native

    if cfg.precision == "bf16" and not cpu_bf16_native():
        raise MediFastError("--precision bf16: this CPU has no bf16 units (avx512_bf16/amx_bf16 on x86-64, bf16 on "
                            "Arm; bf16 would be emulated, slower than fp32); use --precision auto or fp32")


def training_precision(cfg: DemoConfig) -> str:
    """The precision the demo trains its models in here: bf16 where asked, or under auto where the CPU has
    bf16 units (700 steps 1.5x faster, loss curve within 2 % of fp32's: benchmarks/cpu_bf16_training.py)."""
    from ..backends import cpu_bf16_native

    return "bf16" if cfg.precision == "bf16" or (cfg.precision == "auto" and cpu_bf16_native()) else "fp32"


def generation_backend(cfg: DemoConfig) -> str:
    """The backend the demo generates and edits with: ONNX Runtime's fp32 under --precision fp32, else
    `auto` (on a CPU with bf16 units and the openvino extra: openvino-bf16, gated per model)."""
    return "ort-cpu" if cfg.precision == "fp32" else "auto"


def backend_label(cfg: DemoConfig) -> str:
    """What generation_backend(cfg) will run here, for the log and the report's timings."""
    from .. import backends

    name = generation_backend(cfg)
    return backends.available("onnx")[0] if name == "auto" and backends.available("onnx") else name


def train_config(cfg: DemoConfig, out: Path, name: str, condition: str):
    """The demo's training settings for one model (a ``TrainConfig``; benchmarks vary one field of it)."""
    from ..training.config import TrainConfig

    return TrainConfig(data=str(out / "pack"), split=str(out / "train.csv"), condition=condition, preset=cfg.preset,
                       prediction_type=cfg.prediction_type, resolution=cfg.resolution, batch_size=cfg.batch_size,
                       lr=cfg.lr, steps=cfg.train_steps, out=str(out / "runs" / name), warmup=25,
                       ema_decay=cfg.ema_decay, workers=0, seed=cfg.seed, checkpoint_every=cfg.train_steps,
                       keep_last=1, log_every=25, grid_every=0, device="cpu", precision=training_precision(cfg))


def train_model(cfg: DemoConfig, out: Path, name: str, condition: str) -> Path:
    from ..training.loop import train

    result = train(train_config(cfg, out, name, condition))
    return Path(result["checkpoint"])


def export_model(ckpt_path: Path, out: Path, name: str) -> Path:
    from .. import checkpoint
    from ..engines.export import ExportConfig, export_onnx

    return export_onnx(checkpoint.load(ckpt_path), out / "engines" / name / "model.onnx", ExportConfig())


def distill_model(cfg: DemoConfig, teacher: Path, out: Path, name: str) -> Path:
    """The teacher checkpoint distilled to a cfg.distill_steps-step student (progressive distillation on
    the demo's pack and training split), as out/runs/<name>-<steps>.pt; returns its path."""
    from ..training.distill import distill

    return distill(teacher=str(teacher), steps=cfg.distill_steps, teacher_steps=cfg.distill_teacher_steps,
                   out=str(out / "runs" / f"{name}-{cfg.distill_steps}.pt"), data=str(out / "pack"),
                   split=str(out / "train.csv"), iters_per_stage=cfg.distill_iters, batch_size=cfg.batch_size,
                   lr=5e-4, ema_decay=cfg.ema_decay, seed=cfg.seed, device="cpu", progress=True,
                   prediction_type=cfg.distill_prediction_type)


def generate(cfg: DemoConfig, onnx_path: Path, out: Path, name: str, cls_only: bool,
             used: dict | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Generate with generation_backend(cfg) into out/synthetic/<name>; returns (manifest rows, images), and
    puts the backend that ran in used[name].  A distilled student samples with its own sampler and steps."""
    from .. import backends
    from .. import plan as plans
    from ..generate import GenerateConfig, for_model
    from ..job import run_job

    info = backends.open_model(onnx_path)
    classes, sites = cfg.spec.classes, cfg.spec.sites
    if cls_only:  # the same number of images per class as MeDi makes
        combos = pd.DataFrame({"class": list(classes), "count": [cfg.n_synthetic_per_combo * len(sites)] * len(classes)})
    else:  # every class x cohort site: the missing combinations included
        combos = pd.DataFrame([(c, s, cfg.n_synthetic_per_combo) for c in classes for s in sites],
                              columns=["class", "tss", "count"])
    plan = plans.from_counts(info.spec, combos, cfg.seed)
    images = []
    stats = run_job(info, plan, out / "synthetic" / name,
                    for_model(GenerateConfig(steps=cfg.sample_steps, batch_size=cfg.sample_batch), info),
                    backend=generation_backend(cfg), sinks=[lambda im, rows: images.append(im.copy())])
    if used is not None:
        used[name] = stats["backend"]
    manifest = pd.read_csv(out / "synthetic" / name / "manifest.csv", dtype=str, keep_default_na=False)
    if "tissue_source_site" not in manifest.columns:
        manifest["tissue_source_site"] = "none"
    return manifest, np.concatenate(images)


def load_synthetic(folder: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """A finished generation's (manifest rows, images) read back from folder, as `generate` returned them."""
    from PIL import Image

    path = folder / "manifest.csv"
    manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "tissue_source_site" not in manifest.columns:
        manifest["tissue_source_site"] = "none"
    root = folder.resolve()
    files = [folder / f for f in manifest.get("file", pd.Series([], dtype=str))]
    # a file named by the manifest stays inside its folder, whatever the manifest says
    if "file" not in manifest.columns or any(root not in f.resolve().parents for f in files):
        raise MediFastError(f"{path} does not list its images as files inside {folder}; the run is damaged: run the "
                            "demo afresh")
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return manifest, images


def real_patches(out: Path) -> np.ndarray:
    """The cohort's patches at the model resolution, in index order: the pack built in stage 1 (the same
    load_patch resize, so no JPEG is decoded twice)."""
    from ..data.pack import read_pack

    return np.ascontiguousarray(read_pack(out / "pack")[1].transpose(0, 2, 3, 1))  # (N, R, R, 3) uint8


def cell_labels(cfg: DemoConfig, synthetic: dict) -> dict[str, np.ndarray]:
    """Per model, a (class@site) label for each synthetic patch, for distances per cohort cell.  MeDi's
    patches carry their site; CLS's cannot, so each cohort site of a class gets its own disjoint random
    draw of that class's CLS patches, as many as MeDi made for the cell (the same sample size, so the
    distances' small-sample bias is the same for both)."""
    rng = np.random.default_rng([cfg.seed, 17])
    labels = {}
    for name, (meta, _) in synthetic.items():
        cls_ = meta["class"].to_numpy().astype(str)
        site = meta["tissue_source_site"].to_numpy().astype(str)
        lab = np.full(len(meta), "", dtype=object)
        if (site != "none").any():
            lab[:] = [f"{c}@{s}" for c, s in zip(cls_, site)]
        else:
            for c in cfg.spec.classes:
                pos = rng.permutation(np.flatnonzero(cls_ == c))
                for i, s in enumerate(cfg.spec.cohort[c]):
                    lab[pos[i * cfg.n_synthetic_per_combo:(i + 1) * cfg.n_synthetic_per_combo]] = f"{c}@{s}"
        labels[name] = lab
    return labels


def probe_pool(cfg: DemoConfig, index: pd.DataFrame) -> np.ndarray:
    """Which cohort patches (a mask over the index) the probe draws its k real patches per class from."""
    site = index["tissue_source_site"].to_numpy()
    pool = np.zeros(len(index), bool)
    for c, sites in cfg.spec.probe_pool.items():
        pool |= (index["class"].to_numpy() == c) & np.isin(site, sites)
    return pool


def probe_config(cfg: DemoConfig, repeat: int):
    """The linear probe's settings for one of its cfg.probe_repeats repeats (each its own draws)."""
    from ..eval.probe import ProbeConfig

    return ProbeConfig(k=cfg.probe_k, ratio=cfg.probe_ratio, one_site_per_class=True, max_runs=None,
                       seed=cfg.seed + repeat)


def probe_drawn(cfg: DemoConfig, index: pd.DataFrame) -> np.ndarray:
    """Positions in the probe's real pool (`probe_pool`'s rows, in index order) of every patch one of its
    runs draws, over all repeats: the patches an arm derived from the real draw needs to cover."""
    from ..eval.probe import drawn_rows

    meta = index.loc[probe_pool(cfg, index), ["class", "tissue_source_site"]].reset_index(drop=True)
    return np.unique(np.concatenate([drawn_rows(meta, list(cfg.spec.classes), probe_config(cfg, rep))
                                     for rep in range(cfg.probe_repeats)]))


def render_oracle(cfg: DemoConfig, per_site: bool) -> tuple[pd.DataFrame, np.ndarray]:
    """Fresh patches from the cohort's renderer, through the cohort's own path to the model resolution
    (the site's JPEG quality, then `load_patch`'s resize): per_site, n_synthetic_per_combo of every class x
    cohort site (what MeDi makes); otherwise as many per class, spread evenly over its cohort sites only
    (what a class-only model learns).  Seeds of their own: none is a patch of the cohort."""
    import io
    import zlib

    from ..data.imageio import load_patch
    from ..data.synth import jpeg_bytes, render_patches, site_style

    spec, n = cfg.spec, cfg.n_synthetic_per_combo
    counts = []
    for c in spec.classes:
        sites = spec.sites if per_site else list(spec.cohort[c])
        total = n * len(spec.sites)
        counts += [(c, s, total // len(sites) + (i < total % len(sites)) if not per_site else n)
                   for i, s in enumerate(sites)]
    rows, images = [], []
    for c, s, k in counts:
        style = site_style(s)
        rng = np.random.default_rng([cfg.seed, 7919, zlib.crc32(c.encode()), zlib.crc32(s.encode())])
        imgs = render_patches(c, style, k, cfg.render_resolution, seed=rng.integers(2 ** 63))
        images += [load_patch(io.BytesIO(jpeg_bytes(im, style.jpeg_quality)), cfg.resolution) for im in imgs]
        rows += [(c, s)] * k
    return pd.DataFrame(rows, columns=["class", "tissue_source_site"]), np.stack(images)


def evaluate(cfg: DemoConfig, index: pd.DataFrame, real_images: np.ndarray, synthetic: dict,
             views: dict | None = None, order: list[str] | None = None) -> dict:
    """The distances, the probe and the shortcut meter.  `synthetic`: each arm's added patches; `views`:
    each arm's transformed real patches (index order), on which the probe is trained and tested instead;
    `order`: the arms' order in the tables (first seen, otherwise)."""
    from ..eval.features import ColourTexture
    from ..eval.fid import compute_fid
    from ..eval.probe import NO_SYNTHETIC, SOURCE, per_site, run_probe, summarise
    from ..eval.shortcut import mi_report

    spec = cfg.spec
    feat = ColourTexture()
    x_real = feat(real_images)
    site = index["tissue_source_site"].to_numpy()
    cohort = ~np.isin(site, spec.test_sites)
    mu, sd = x_real[cohort].mean(0), x_real[cohort].std(0) + 1e-8  # standardise on the training cohort
    z = lambda x: (x - mu) / sd  # noqa: E731
    syn = {name: (meta, z(feat(images))) for name, (meta, images) in synthetic.items()}

    # FID-style distance per class (colour-texture features), synthetic vs the real cohort, averaged: for the
    # arms that make new patches; copies of the probe's own real pool (SOURCE) are no generator's output, and
    # how many there are follows the probe's settings.
    made = {name: p for name, p in synthetic.items() if SOURCE not in p[0].columns}
    fid_rows = []
    for name, (meta, xs) in ((n, syn[n]) for n in made):
        t = compute_fid(z(x_real[cohort]), xs, real_labels=index["class"].to_numpy()[cohort],
                        fake_labels=meta["class"].to_numpy()).set_index("group")
        fid_rows += [{"model": name, "class": c, "distance": float(t.loc[c, "fid"])} for c in spec.classes]
    fid = pd.DataFrame(fid_rows)

    # The same distance per trained (class, site) cell: does a model's patch look like that cell's?
    real_cells = np.array([f"{c}@{s}" for c, s in zip(index["class"].to_numpy()[cohort], site[cohort])], dtype=object)
    cells = [f"{c}@{s}" for c, ss in spec.cohort.items() for s in ss]
    cell_rows = []
    for name, lab in cell_labels(cfg, made).items():
        keep = np.isin(lab, cells)
        t = compute_fid(z(x_real[cohort]), syn[name][1][keep], real_labels=real_cells,
                        fake_labels=lab[keep]).set_index("group")
        cell_rows += [{"model": name, "class": cell.split("@")[0], "site": cell.split("@")[1],
                       "distance": float(t.loc[cell, "fid"]) if cell in t.index else np.nan} for cell in cells]
    fid_cells = pd.DataFrame(cell_rows)

    pool = probe_pool(cfg, index)
    test = np.isin(site, spec.test_sites)
    meta = index[["class", "tissue_source_site"]].reset_index(drop=True)
    keep = ["class", "tissue_source_site", SOURCE]

    def probe(x: np.ndarray, added: dict) -> list[pd.DataFrame]:
        """The probe's repeats on real features x (standardised), with `added` patches per arm."""
        out = []
        for rep in range(cfg.probe_repeats):
            pc = probe_config(cfg, rep)
            r = run_probe((meta[pool].reset_index(drop=True), x[pool]), (meta[test].reset_index(drop=True), x[test]),
                          {n: (m[[c for c in keep if c in m.columns]], xs) for n, (m, xs) in added.items()},
                          list(spec.classes), pc)
            r["run"] = r["run"] + rep * 1000
            out.append(r)
        return out

    runs = probe(z(x_real), syn)
    for name, images in (views or {}).items():
        # trained and tested on the transformed patches alone, standardised on the transformed cohort; the
        # same real draws as every other arm (the draw depends on the metadata and the seed only)
        xv = feat(images)
        mu_v, sd_v = xv[cohort].mean(0), xv[cohort].std(0) + 1e-8
        runs += [r[r["arm"] == NO_SYNTHETIC].assign(arm=name) for r in probe((xv - mu_v) / sd_v, {})]
    runs = pd.concat(runs, ignore_index=True)
    if order is not None:
        runs = runs.sort_values("arm", key=lambda a: a.map({n: i for i, n in enumerate(order)}),
                                kind="stable").reset_index(drop=True)
    summary = summarise(runs)
    sites = per_site(runs)
    probe_train = meta[pool]
    mi = mi_report(probe_train, {n: m[["class", "tissue_source_site"]] for n, (m, _) in syn.items()
                                 if (m["tissue_source_site"] != "none").any()})
    return {"fid": fid, "fid_cells": fid_cells, "probe_runs": runs, "probe": summary, "probe_sites": sites, "mi": mi}


def measure_site_fidelity(cfg: DemoConfig, index: pd.DataFrame, real_images: np.ndarray,
                          medi: tuple[pd.DataFrame, np.ndarray]):
    """Real vs MeDi per-site stain colour over the training cohort: the measure benchmarks/site_fidelity.py
    reports for any checkpoint (medi_fast.eval.site_fidelity)."""
    from ..eval.site_fidelity import site_colours, site_fidelity

    meta, images = medi
    cohort = ~index["tissue_source_site"].isin(cfg.spec.test_sites).to_numpy()
    return site_fidelity(site_colours(images, meta["class"], meta["tissue_source_site"], real_images[cohort],
                                      index["class"].to_numpy()[cohort], index["tissue_source_site"].to_numpy()[cohort]))
