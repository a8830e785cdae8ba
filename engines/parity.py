"""Parity of an exported graph against the torch model it came from.

Three figures, each with its threshold (torch is the reference for ONNX):

1. fp32 graph vs torch fp32 on random inputs over several timesteps and ids (null ids included):
   max |eps_onnx - eps_torch| <= 1e-4.
2. fp16 graph vs torch fp32: ||delta|| / ||ref|| <= 1e-2.
3. A whole DDIM run, ONNX Runtime vs the torch model, same x_T: max difference of the uint8 images
   (reported; a few levels at most is expected, since per-step errors of ~1e-6 are amplified by
   the 1 / sqrt(alpha_bar) of early steps).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medi_fast.backends.contract import IOContract
from medi_fast.generate import to_uint8
from medi_fast.samplers.ddim import ddim

from .export import example_inputs

FP32_MAX_ABS = 1e-4
FP16_REL = 1e-2
# Timesteps probed: both ends of the schedule and the middle, where eps magnitudes differ most.
TIMESTEPS = (0, 1, 250, 500, 750, 999)


@dataclass
class ParityRow:
    check: str
    metric: str
    value: float
    threshold: float | None  # None: reported, not enforced

    @property
    def ok(self) -> bool:
        return self.threshold is None or self.value <= self.threshold


@dataclass
class ParityReport:
    rows: list[ParityRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def table(self) -> str:
        lines = [f"{'check':<34} {'metric':<22} {'value':>10} {'limit':>8}  ok"]
        for r in self.rows:
            limit = f"{r.threshold:.0e}" if r.threshold is not None else "-"
            lines.append(f"{r.check:<34} {r.metric:<22} {r.value:>10.3g} {limit:>8}  {'yes' if r.ok else 'NO'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "rows": [{"check": r.check, "metric": r.metric, "value": r.value,
                                         "threshold": r.threshold, "ok": r.ok} for r in self.rows]}


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _probe_inputs(contract: IOContract, spec, batch: int, seed: int):
    """Random samples and ids with the timesteps of TIMESTEPS cycled over the batch."""
    inputs = list(example_inputs(contract, spec, batch, seed))
    inputs[1] = torch.tensor([TIMESTEPS[i % len(TIMESTEPS)] for i in range(batch)], dtype=torch.long)
    return inputs


def eps_errors(model, onnx_path, contract: IOContract, *, batch: int = 6, rounds: int = 2, seed: int = 0):
    """(max abs error, relative L2 error) of the graph's eps vs the torch model's, over ``rounds`` draws."""
    sess = _session(Path(onnx_path))
    max_abs, num, den = 0.0, 0.0, 0.0
    for r in range(rounds):
        inputs = _probe_inputs(contract, model.spec, batch, seed + r)
        with torch.no_grad():
            ref = model(inputs[0], inputs[1], dict(zip(model.spec.names, inputs[2:]))).numpy()  # (B, 3, H, W)
        feeds = {name: v.numpy() for name, v in zip(contract.input_names, inputs)}
        out = sess.run(contract.output_names, feeds)[0].astype(np.float32)
        delta = out - ref
        max_abs = max(max_abs, float(np.abs(delta).max()))
        num += float((delta.astype(np.float64) ** 2).sum())
        den += float((ref.astype(np.float64) ** 2).sum())
    return max_abs, (num / den) ** 0.5


def ddim_uint8_diff(model, onnx_path, contract: IOContract, *, steps: int = 10, batch: int = 4, seed: int = 0):
    """Max and mean |uint8 difference| of a whole DDIM run through ONNX Runtime vs torch."""
    from medi_fast.schedule import Schedule

    sess = _session(Path(onnx_path))
    schedule = Schedule()
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((batch, 3, contract.resolution, contract.resolution), generator=g)
    ids = _probe_inputs(contract, model.spec, batch, seed)[2:]
    cond = dict(zip(model.spec.names, ids))

    def ort_denoiser(x, t, c):
        feeds = contract.numpy_feeds(x, t, c)
        return torch.from_numpy(sess.run(contract.output_names, feeds)[0])

    def torch_denoiser(x, t, c):
        with torch.no_grad():
            return model(x, t, c)

    ts = schedule.timesteps(steps)
    a = to_uint8(ddim(ort_denoiser, x_T.clone(), ts, schedule, cond)).astype(np.int16)
    b = to_uint8(ddim(torch_denoiser, x_T.clone(), ts, schedule, cond)).astype(np.int16)
    d = np.abs(a - b)
    return int(d.max()), float(d.mean())


def run_parity(model, fp32_path, contract: IOContract, *, fp16_path=None, ddim_steps: int = 10,
               ddim_batch: int = 4) -> ParityReport:
    model = model.float().eval()
    report = ParityReport()
    max_abs, rel = eps_errors(model, fp32_path, contract)
    report.rows.append(ParityRow("fp32 graph vs torch fp32 (eps)", "max abs error", max_abs, FP32_MAX_ABS))
    if fp16_path is not None:
        _, rel16 = eps_errors(model, fp16_path, contract)
        report.rows.append(ParityRow("fp16 graph vs torch fp32 (eps)", "||delta|| / ||ref||", rel16, FP16_REL))
    if ddim_steps:
        mx, mean = ddim_uint8_diff(model, fp32_path, contract, steps=ddim_steps, batch=ddim_batch)
        report.rows.append(ParityRow(f"DDIM-{ddim_steps} ORT fp32 vs torch (uint8)", "max level difference", mx, None))
        report.rows.append(ParityRow(f"DDIM-{ddim_steps} ORT fp32 vs torch (uint8)", "mean level difference", mean, None))
    return report


# -- one denoiser against another (engine builds, the fp16 gate) -----------------------------------
# Image bound of a DDIM run through a reduced-precision denoiser vs its fp32 reference, in uint8
# levels: fp16 rounding moves a handful of pixels by a few levels; a broken layer moves whole images.
IMAGE_LEVELS = 8


@dataclass
class DenoiserCheck:
    """A candidate denoiser (an engine, an fp16 graph) against its reference on one probe set."""

    rel: float  # ||eps_cand - eps_ref|| / ||eps_ref|| over every probe
    max_abs: float
    nonfinite: int  # NaN/inf values in the candidate's eps or images
    rel_bound: float
    image_levels: int | None = None  # max |uint8 difference| after a DDIM run, when run
    image_bound: int | None = None

    @property
    def ok(self) -> bool:
        image_ok = self.image_levels is None or self.image_bound is None or self.image_levels <= self.image_bound
        return self.nonfinite == 0 and self.rel <= self.rel_bound and image_ok

    def summary(self) -> str:
        text = f"relative eps error {self.rel:.3g} (bound {self.rel_bound:g}), {self.nonfinite} NaN/inf"
        if self.image_levels is not None:
            text += f", DDIM images differ by up to {self.image_levels} levels (bound {self.image_bound})"
        return text

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in ("rel", "max_abs", "nonfinite", "rel_bound", "image_levels",
                                                  "image_bound")}, "ok": self.ok}


def probe_set(contract: IOContract, spec, seed: int = 0):
    """Probe inputs covering TIMESTEPS and every id of every categorical attribute (null included).

    Returns a list of (x, t, cond) batches on the CPU, each within the contract's batch range.
    """
    n_ids = max([len(a.vocab) + 1 for a in spec.attributes if a.vocab is not None] + [len(TIMESTEPS)])
    batch = max(contract.batch.min, min(contract.batch.max, 8))
    total = -(-n_ids // batch) * batch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((total, 3, contract.resolution, contract.resolution), generator=g)
    t = torch.tensor([TIMESTEPS[i % len(TIMESTEPS)] for i in range(total)], dtype=torch.long)
    cond = {}
    for a in spec.attributes:
        if a.vocab is not None:
            cond[a.name] = torch.arange(total) % (len(a.vocab) + 1)
        else:  # continuous: values over [0, 90] and NaN (null) every 5th
            v = torch.rand(total, generator=g) * 90
            v[::5] = float("nan")
            cond[a.name] = v
    return [(x[s:s + batch], t[s:s + batch], {k: v[s:s + batch] for k, v in cond.items()})
            for s in range(0, total, batch)]


def check_denoiser(reference, candidate, contract: IOContract, spec, *, rel_bound: float = FP16_REL,
                   ddim_steps: int = 0, image_bound: int = IMAGE_LEVELS, seed: int = 0) -> DenoiserCheck:
    """Compare two denoisers ``(x, t, cond) -> eps`` on the probe set (and a DDIM run if ``ddim_steps``).

    Backend-agnostic: each denoiser gets its inputs on its own ``device`` (CPU when it has none).
    """
    from medi_fast.schedule import Schedule

    def run(den, x, t, cond):
        dev = getattr(den, "device", torch.device("cpu"))
        with torch.no_grad():
            out = den(x.to(dev), t.to(dev), {k: v.to(dev) for k, v in cond.items()})
        return out.float().cpu()

    num = den = 0.0
    max_abs, nonfinite = 0.0, 0
    for x, t, cond in probe_set(contract, spec, seed):
        ref, out = run(reference, x, t, cond), run(candidate, x, t, cond)
        nonfinite += int((~torch.isfinite(out)).sum())
        delta = torch.nan_to_num(out - ref, nan=float("inf")).double()
        max_abs = max(max_abs, float(delta.abs().max()))
        num += float((delta ** 2).sum())
        den += float((ref.double() ** 2).sum())
    rel = (num / den) ** 0.5 if den else float("inf")
    check = DenoiserCheck(rel, max_abs, nonfinite, rel_bound)
    if ddim_steps:
        schedule = Schedule()
        x, _, cond = probe_set(contract, spec, seed)[0]
        ts = schedule.timesteps(ddim_steps)
        images = [ddim(lambda a, b, c, d=d: run(d, a, b, c), x.clone(), ts, schedule, cond)
                  for d in (reference, candidate)]
        check.nonfinite += int((~torch.isfinite(images[1])).sum())
        a, b = (to_uint8(torch.nan_to_num(im)).astype(np.int16) for im in images)
        check.image_levels, check.image_bound = int(np.abs(a - b).max()), image_bound
    return check
