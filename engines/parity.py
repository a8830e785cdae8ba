"""Parity of an exported graph against the torch model it came from.

Two figures (torch is the reference for ONNX):

1. fp32 graph vs torch fp32 on random inputs (timesteps from both ends of the schedule, random ids
   with null ids): max |eps_onnx - eps_torch| <= 1e-4.
2. A short DDIM run, ONNX Runtime vs the torch model, same x_T: max difference of the uint8 images
   (reported; a few levels at most is expected, since per-step errors of ~1e-6 are amplified by
   the 1 / sqrt(alpha_bar) of early steps).

Sized to what they prove: the graph computes the torch function (eps on a batch of 2) and the
sampler runs through it (a few DDIM steps).  A longer or wider run proves nothing more and costs
minutes on the published model (415M parameters) on a CPU.  The torch outputs are computed first
(:func:`torch_reference`) so the torch model can be freed before any ONNX Runtime session holds
the weights again (:func:`compare`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medi_fast.backends.accuracy import TIMESTEPS
from medi_fast.backends.contract import IOContract
from medi_fast.pixels import to_uint8
from medi_fast.samplers.ddim import ddim

from .export import example_inputs

FP32_MAX_ABS = 1e-4
# Batch of the parity inputs and of the DDIM run: two samples with different ids and timesteps.
PARITY_BATCH = 2
# DDIM steps of the whole-run figure (`medi-fast export --parity-steps`).
PARITY_STEPS = 2


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
    """Random samples and ids; the timesteps spread over TIMESTEPS (batch 2: 0 and 999)."""
    inputs = list(example_inputs(contract, spec, batch, seed))
    picks = [round(i * (len(TIMESTEPS) - 1) / max(1, batch - 1)) for i in range(batch)]
    inputs[1] = torch.tensor([TIMESTEPS[k] for k in picks], dtype=torch.long)
    return inputs


@dataclass
class TorchReference:
    """What the torch model computed on the parity inputs; the model itself is not kept."""

    inputs: list  # sample, timestep, ids... (the graph's inputs, in contract order)
    eps: np.ndarray  # (B, 3, H, W)
    ddim_steps: int = 0
    x_T: torch.Tensor | None = None
    cond: dict | None = None
    images: np.ndarray | None = None  # (B, H, W, 3) uint8 after the DDIM run


def torch_reference(model, contract: IOContract, *, batch: int = PARITY_BATCH, ddim_steps: int = PARITY_STEPS,
                    seed: int = 0) -> TorchReference:
    """eps of ``model`` on the parity inputs and, with ``ddim_steps``, the uint8 images of a DDIM run."""
    from medi_fast.schedule import Schedule

    model = model.float().eval()
    inputs = _probe_inputs(contract, model.spec, batch, seed)
    with torch.no_grad():
        eps = model(inputs[0], inputs[1], dict(zip(model.spec.names, inputs[2:]))).numpy()  # (B, 3, H, W)
    ref = TorchReference(inputs, eps)
    if ddim_steps:
        schedule = Schedule()
        g = torch.Generator().manual_seed(seed)
        ref.x_T = torch.randn((batch, 3, contract.resolution, contract.resolution), generator=g)
        ref.cond = dict(zip(model.spec.names, inputs[2:]))

        def torch_denoiser(x, t, c):
            with torch.no_grad():
                return model(x, t, c)

        ref.ddim_steps = ddim_steps
        ref.images = to_uint8(ddim(torch_denoiser, ref.x_T.clone(), schedule.timesteps(ddim_steps), schedule,
                                   ref.cond))
    return ref


def _eps(sess, contract: IOContract, inputs) -> np.ndarray:
    feeds = {name: v.numpy() for name, v in zip(contract.input_names, inputs)}
    return sess.run(contract.output_names, feeds)[0].astype(np.float32)


def compare(ref: TorchReference, fp32_path, contract: IOContract) -> ParityReport:
    """The parity report of the fp32 graph against ``ref``."""
    from medi_fast.schedule import Schedule

    report = ParityReport()
    sess = _session(Path(fp32_path))
    delta = _eps(sess, contract, ref.inputs) - ref.eps
    report.rows.append(ParityRow("fp32 graph vs torch fp32 (eps)", "max abs error", float(np.abs(delta).max()),
                                 FP32_MAX_ABS))
    if ref.ddim_steps:
        def ort_denoiser(x, t, c):
            return torch.from_numpy(sess.run(contract.output_names, contract.numpy_feeds(x, t, c))[0])

        schedule = Schedule()
        images = to_uint8(ddim(ort_denoiser, ref.x_T.clone(), schedule.timesteps(ref.ddim_steps), schedule, ref.cond))
        d = np.abs(images.astype(np.int16) - ref.images.astype(np.int16))
        what = f"DDIM-{ref.ddim_steps} ORT fp32 vs torch (uint8)"
        report.rows.append(ParityRow(what, "max level difference", int(d.max()), None))
        report.rows.append(ParityRow(what, "mean level difference", float(d.mean()), None))
    return report
