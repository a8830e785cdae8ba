"""One denoiser against another on a fixed probe set: the fp16 gate's figures.

A reduced-precision model (an fp16 graph, an fp16 TensorRT engine) is compared with its fp32
reference by the eps it predicts, over timesteps 0..999 and every id of every attribute.  It lives
in the runtime because an fp16 graph exported on a machine without a GPU is gated where it first
runs on one (``backends.export_candidates``); the build side (engines/gate.py, the TensorRT build)
uses the same check.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MediFastError
from .contract import BatchRange, IOContract

# Relative eps error of a reduced-precision denoiser vs its fp32 reference.  bf16 keeps 8 mantissa
# bits to fp16's 11: ~1e-2 on every model tried (CPU and GPU), hence a bound three times that.
FP16_REL = 1e-2
BF16_REL = 3e-2
# OpenVINO's bf16 precision hint runs more of the graph in bf16 than torch's autocast (which keeps its
# normalisations in fp32): 1.9e-2 (medi-128), 2.4e-2 (small-64) and 3.2e-2 (tiny-32), random weights.
OPENVINO_BF16_REL = 5e-2
# Probe batches of a gate that runs when a backend starts (bf16 on a CPU): the first batch covers
# every probed timestep; the two fp32 reference calls (batches of 4) are most of its cost.
GATE_BATCHES = 2
# Timesteps probed: both ends of the schedule and the middle, where eps magnitudes differ most.
TIMESTEPS = (0, 1, 250, 500, 750, 999)
# Image bound of a DDIM run through a reduced-precision denoiser vs its fp32 reference, in uint8
# levels: fp16 rounding moves a handful of pixels by a few levels; a broken layer moves whole images.
# Meaningful for trained weights only (docs/engines.md, "The fp16 accuracy gate").
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
                   ddim_steps: int = 0, image_bound: int = IMAGE_LEVELS, seed: int = 0,
                   batches: int | None = None) -> DenoiserCheck:
    """Compare two denoisers ``(x, t, cond) -> eps`` on the probe set (its first ``batches`` batches
    when given) and a DDIM run if ``ddim_steps``.

    Backend-agnostic: each denoiser gets its inputs on its own ``device`` (CPU when it has none).
    """
    from ..schedule import Schedule

    def run(den, x, t, cond):
        dev = getattr(den, "device", torch.device("cpu"))
        with torch.no_grad():
            out = den(x.to(dev), t.to(dev), {k: v.to(dev) for k, v in cond.items()})
        return out.float().cpu()

    num = den = 0.0
    max_abs, nonfinite = 0.0, 0
    for x, t, cond in probe_set(contract, spec, seed)[:batches]:
        ref, out = run(reference, x, t, cond), run(candidate, x, t, cond)
        nonfinite += int((~torch.isfinite(out)).sum())
        delta = torch.nan_to_num(out - ref, nan=float("inf")).double()
        max_abs = max(max_abs, float(delta.abs().max()))
        num += float((delta ** 2).sum())
        den += float((ref.double() ** 2).sum())
    rel = (num / den) ** 0.5 if den else float("inf")
    check = DenoiserCheck(rel, max_abs, nonfinite, rel_bound)
    if ddim_steps:
        from ..pixels import to_uint8
        from ..samplers.ddim import ddim

        schedule = Schedule()
        x, _, cond = probe_set(contract, spec, seed)[0]
        ts = schedule.timesteps(ddim_steps)
        images = [ddim(lambda a, b, c, d=d: run(d, a, b, c), x.clone(), ts, schedule, cond)
                  for d in (reference, candidate)]
        check.nonfinite += int((~torch.isfinite(images[1])).sum())
        a, b = (to_uint8(torch.nan_to_num(im)).astype(np.int16) for im in images)
        check.image_levels, check.image_bound = int(np.abs(a - b).max()), image_bound
    return check


class AccuracyGateError(MediFastError):
    """A reduced-precision backend whose eps on this model is too far from fp32."""


def bf16_gate(name: str, reference, candidate, info, rel_bound: float | None = None) -> DenoiserCheck:
    """The gate a bf16 backend passes when it starts on a CPU: its eps on the first ``GATE_BATCHES``
    probe batches (of 4) within ``rel_bound`` (default ``BF16_REL``) of ``reference`` (the same model
    in fp32) and finite; ``AccuracyGateError`` in one line otherwise."""
    contract = IOContract.from_spec(info.spec, info.resolution, BatchRange(1, 4, 4))
    check = check_denoiser(reference, candidate, contract, info.spec, batches=GATE_BATCHES,
                           rel_bound=BF16_REL if rel_bound is None else rel_bound)
    if not check.ok:
        raise AccuracyGateError(f"{name} fails its accuracy gate on {info.path.name}: {check.summary()} "
                                "against the same model in fp32")
    return check
