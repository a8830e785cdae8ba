"""The engine I/O contract, declared once (docs/architecture.md, "The I/O contract").

ONNX export (input/output names, dynamic axes), TensorRT optimisation profiles (min/opt/max
shapes) and the runtime buffers of every engine backend all read this one object, so a name or a
dtype can never disagree between the build side and the runtime side.

The graph computes ``eps`` from

    sample    (B, 3, H, W) float32   x_t
    timestep  (B,)         int64     t, one per sample
    <attr>    (B,)         int64     one id tensor per categorical attribute (the null id = len(vocab))
    <attr>    (B,)         float32   continuous attributes (NaN = null)

where B is the only dynamic axis ("batch").  Attribute inputs are named after the attribute
(``class``, ``tss``, ...), in ConditionSpec order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from ..conditioning import CATEGORICAL, ConditionSpec
from ..errors import MediFastError, suggest

BATCH_AXIS = "batch"
SAMPLE, TIMESTEP, EPS = "sample", "timestep", "eps"
_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


@dataclass(frozen=True)
class BatchRange:
    """min/opt/max batch of an engine's optimisation profile."""

    # 1 so a single image always works; 16 is the generator's default batch on CPU and a good
    # GPU kernel-selection point; 64 is the paper's training batch and fits medi-128 in fp16 on a 24 GB GPU.
    min: int = 1
    opt: int = 16
    max: int = 64

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise MediFastError(f"--batch {self.min},{self.opt},{self.max} must satisfy 1 <= MIN <= OPT <= MAX; "
                                f"e.g. --batch 1,16,64")

    @classmethod
    def parse(cls, text: str) -> "BatchRange":
        """'1,16,64' -> BatchRange(1, 16, 64); a single number N means N,N,N."""
        try:
            parts = [int(p) for p in str(text).split(",") if p.strip()]
        except ValueError:
            parts = []
        if len(parts) == 1:
            parts *= 3
        if len(parts) != 3:
            raise MediFastError(f"--batch {text!r} must be MIN,OPT,MAX (three integers), e.g. --batch 1,16,64")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.min},{self.opt},{self.max}"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; ``shape`` uses the string ``"batch"`` for the dynamic axis."""

    name: str
    dtype: str  # numpy name: float32 | int64
    shape: tuple

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH[self.dtype]

    def shape_for(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH_AXIS else int(d) for d in self.shape)


@dataclass(frozen=True)
class IOContract:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch: BatchRange = field(default_factory=BatchRange)

    @classmethod
    def from_spec(cls, spec: ConditionSpec, resolution: int, batch: BatchRange | None = None) -> "IOContract":
        image = (BATCH_AXIS, 3, int(resolution), int(resolution))
        inputs = [TensorSpec(SAMPLE, "float32", image), TensorSpec(TIMESTEP, "int64", (BATCH_AXIS,))]
        for a in spec.attributes:
            inputs.append(TensorSpec(a.name, "int64" if a.kind == CATEGORICAL else "float32", (BATCH_AXIS,)))
        return cls(tuple(inputs), (TensorSpec(EPS, "float32", image),), batch or BatchRange())

    # -- names and shapes, for export and engine profiles ---------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    @property
    def attribute_names(self) -> list[str]:
        return self.input_names[2:]

    @property
    def resolution(self) -> int:
        return int(self.inputs[0].shape[-1])

    def tensor(self, name: str) -> TensorSpec:
        for s in self.inputs + self.outputs:
            if s.name == name:
                return s
        raise MediFastError(f"the engine has no tensor {name!r}; it has {', '.join(self.input_names + self.output_names)}")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's ``dynamic_axes``: axis 0 of every input and output is the batch."""
        return {s.name: {i: BATCH_AXIS for i, d in enumerate(s.shape) if d == BATCH_AXIS}
                for s in self.inputs + self.outputs}

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {s.name: s.shape_for(batch) for s in self.inputs + self.outputs}

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Input name -> (min, opt, max) shape: one TensorRT optimisation profile."""
        b = self.batch
        return {s.name: (s.shape_for(b.min), s.shape_for(b.opt), s.shape_for(b.max)) for s in self.inputs}

    def check_batch(self, batch: int) -> None:
        if not self.batch.min <= batch <= self.batch.max:
            raise MediFastError(f"batch {batch} is outside this engine's profile {self.batch}; use --batch-size "
                                f"between {self.batch.min} and {self.batch.max}, or rebuild with --batch")

    # -- runtime feeds ----------------------------------------------------------------------------
    def check_cond(self, cond: Mapping[str, object]) -> None:
        """Refuse unknown and missing attribute names with one line."""
        expected = self.attribute_names
        for name in cond:
            if name not in expected:
                raise MediFastError(f"this engine is not conditioned on {name!r}{suggest(name, expected)}; "
                                    f"it takes {', '.join(expected)}")
        missing = [n for n in expected if n not in cond]
        if missing:
            raise MediFastError(f"no value for {', '.join(missing)}; pass every attribute the engine takes "
                                f"({', '.join(expected)}), or its null id for unconditional sampling")

    def torch_feeds(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor],
                    device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Inputs as contiguous torch tensors of the contract's dtypes, in input order."""
        self.check_cond(cond)
        device = device or x.device
        values = {SAMPLE: x, TIMESTEP: t, **cond}
        out = {}
        for s in self.inputs:
            v = torch.as_tensor(values[s.name])
            out[s.name] = v.to(device=device, dtype=s.torch_dtype).contiguous()
        return out

    def numpy_feeds(self, x, t, cond) -> dict[str, np.ndarray]:
        """Inputs as numpy arrays (zero-copy for contiguous CPU tensors of the right dtype)."""
        return {k: v.numpy() for k, v in self.torch_feeds(x, t, cond, torch.device("cpu")).items()}

    def to_dict(self) -> dict:
        return {"inputs": [[s.name, s.dtype, list(s.shape)] for s in self.inputs],
                "outputs": [[s.name, s.dtype, list(s.shape)] for s in self.outputs],
                "batch": [self.batch.min, self.batch.opt, self.batch.max]}

    @classmethod
    def from_dict(cls, d: dict) -> "IOContract":
        def specs(rows):
            return tuple(TensorSpec(n, dt, tuple(shape)) for n, dt, shape in rows)

        return cls(specs(d["inputs"]), specs(d["outputs"]), BatchRange(*d["batch"]))
