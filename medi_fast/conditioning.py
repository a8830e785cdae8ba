"""What conditions the model: ConditionSpec (the declaration) and Conditioner (the embeddings).

The paper's constraint: the class embedding and the metadata embeddings are concatenated into one
vector z_cond whose width equals the timestep-embedding width d_t, so that z_cond can be added to
the timestep embedding.  ``d_class + sum(d_meta) == d_t`` is checked at construction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from .errors import MediFastError
from .vocab import Vocabulary, check_name

MODES = ("concat", "additive", "linear")
CATEGORICAL = "categorical"
CONTINUOUS = "continuous"
# Continuous encodings.  "reference": the MeDi code's SineCosinePositionEncoder (clamp to
# [0, scale], divide by scale, sin/cos at frequencies exp(-ln(10000) 2i/d)), what new models use.
# "x1000": the encoding of checkpoints written before it (no clamp, arguments scaled by 1000); a
# checkpoint header without an "encoding" key means this one, so older files keep their meaning.
REFERENCE, LEGACY_X1000 = "reference", "x1000"
ENCODINGS = (REFERENCE, LEGACY_X1000)


@dataclass(frozen=True)
class Attribute:
    """One conditioning attribute: a categorical vocabulary, or a continuous value (e.g. age)."""

    name: str
    kind: str
    dim: int
    vocab: Vocabulary | None = None
    # Continuous values are clamped to [0, scale] and divided by it before the sinusoidal encoding
    # (ages span 0..100, the reference's max_position).
    scale: float = 100.0
    encoding: str = REFERENCE

    def __post_init__(self):
        check_name(self.name, "attribute name", attribute=True)  # names output folders and model table keys
        if self.kind not in (CATEGORICAL, CONTINUOUS):
            raise MediFastError(f"attribute {self.name!r}: kind must be categorical or continuous, got {self.kind!r}")
        if self.kind == CATEGORICAL and self.vocab is None:
            raise MediFastError(f"categorical attribute {self.name!r} needs a vocabulary")
        if self.dim <= 0 or (self.kind == CONTINUOUS and self.dim % 2):
            raise MediFastError(f"attribute {self.name!r}: width {self.dim} must be positive (and even if continuous)")
        if self.encoding not in ENCODINGS:
            raise MediFastError(f"attribute {self.name!r}: unknown encoding {self.encoding!r}; use {REFERENCE!r}")

    @property
    def null_id(self) -> int:
        return self.vocab.null_id if self.vocab is not None else -1

    def to_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "dim": self.dim, "scale": self.scale,
             "vocab": self.vocab.to_dict() if self.vocab is not None else None}
        if self.kind == CONTINUOUS and self.encoding != LEGACY_X1000:
            d["encoding"] = self.encoding  # absent = x1000, so older headers (and hashes) stay as they were
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Attribute":
        vocab = Vocabulary.from_dict(d["vocab"]) if d.get("vocab") else None
        encoding = d.get("encoding", LEGACY_X1000 if d["kind"] == CONTINUOUS else REFERENCE)
        return cls(d["name"], d["kind"], int(d["dim"]), vocab, float(d.get("scale", 100.0)), encoding)


@dataclass(frozen=True)
class ConditionSpec:
    """Class first, then metadata; widths add up to the timestep-embedding width d_t."""

    attributes: tuple[Attribute, ...]
    d_t: int
    # How embeddings combine (the reference code's three modes): "concat" (the paper: widths sum to
    # d_t), "additive" (every table d_t wide, summed), "linear" (d_t-wide tables concatenated, then a
    # Linear layer back to d_t).
    mode: str = "concat"

    def __post_init__(self):
        object.__setattr__(self, "attributes", tuple(self.attributes))
        if not self.attributes or self.attributes[0].name != "class" or self.attributes[0].kind != CATEGORICAL:
            raise MediFastError("the first conditioning attribute must be the categorical 'class'")
        names = [a.name for a in self.attributes]
        if len(set(names)) != len(names):
            raise MediFastError(f"conditioning attributes repeat a name: {names}")
        if self.mode not in MODES:
            raise MediFastError(f"unknown conditioning mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.mode != "concat":
            wrong = [f"{a.name} {a.dim}" for a in self.attributes if a.dim != self.d_t]
            if wrong:
                raise MediFastError(f"in {self.mode} mode every embedding must be d_t = {self.d_t} wide, "
                                    f"got {', '.join(wrong)}")
            return
        total = sum(a.dim for a in self.attributes)
        if total != self.d_t:
            widths = " + ".join(f"{a.name} {a.dim}" for a in self.attributes)
            raise MediFastError(f"conditioning widths {widths} = {total} must equal the timestep-embedding width "
                                f"d_t = {self.d_t}; change the widths so they sum to {self.d_t}")

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    @property
    def metadata(self) -> tuple[Attribute, ...]:
        return self.attributes[1:]

    @property
    def class_vocab(self) -> Vocabulary:
        return self.attributes[0].vocab

    def __getitem__(self, name: str) -> Attribute:
        for a in self.attributes:
            if a.name == name:
                return a
        raise MediFastError(f"this model is not conditioned on {name!r}; it takes {', '.join(self.names)}")

    def __contains__(self, name: str) -> bool:
        return name in self.names

    @property
    def cls_only(self) -> bool:
        return len(self.attributes) == 1

    @classmethod
    def build(cls, d_t: int, classes: Sequence[str], metadata: Mapping[str, Sequence[str] | None] = (),
              widths: Mapping[str, int] | None = None, mode: str = "concat") -> "ConditionSpec":
        """Default widths as the reference 'concat' mode: floor(d_t / (1+k)) each, the class gets the rest.

        ``metadata`` maps a name to its values (categorical) or to None (continuous).
        """
        metadata = dict(metadata)
        k = len(metadata)
        base = d_t // (1 + k) if mode == "concat" else d_t
        widths = dict(widths or {})
        # sin/cos encodings need an even width; the class takes whatever is left over.
        dims = {name: widths.get(name, base - (base % 2 if metadata[name] is None else 0)) for name in metadata}
        class_dim = widths.get("class", d_t - sum(dims.values()) if mode == "concat" else d_t)
        attrs = [Attribute("class", CATEGORICAL, class_dim, Vocabulary("class", tuple(classes), tcga_aliases=True))]
        for name, values in metadata.items():
            if values is None:
                attrs.append(Attribute(name, CONTINUOUS, dims[name]))
            else:
                attrs.append(Attribute(name, CATEGORICAL, dims[name], Vocabulary(name, tuple(values))))
        return cls(tuple(attrs), d_t, mode)

    def encode(self, values: Mapping[str, object], n: int | None = None) -> dict[str, torch.Tensor]:
        """Names -> id tensors, e.g. {'class': 'LUAD', 'tss': '05'} -> {'class': tensor([0]), ...}.

        A value may be a scalar (broadcast to ``n``) or a sequence.  Missing metadata and None
        become the null id (unconditional for that attribute).
        """
        unknown = set(values) - set(self.names)
        if unknown:
            name = sorted(unknown)[0]
            if self.cls_only:
                raise MediFastError(f"this is a class-only checkpoint; it takes no {name!r} (drop --{name})")
            raise MediFastError(f"this model is not conditioned on {name!r}; it takes {', '.join(self.names)}")
        out = {}
        for a in self.attributes:
            v = values.get(a.name)
            seq = list(v) if isinstance(v, (list, tuple)) or hasattr(v, "__array__") else [v] * (n or 1)
            if a.kind == CATEGORICAL:
                ids = [a.null_id if x is None else a.vocab.id(x) for x in seq]
                out[a.name] = torch.tensor(ids, dtype=torch.long)
            else:
                vals = [math.nan if x is None else float(x) for x in seq]
                out[a.name] = torch.tensor(vals, dtype=torch.float32)
        return out

    def null(self, n: int) -> dict[str, torch.Tensor]:
        """The unconditional input: every attribute at its null id (NaN for continuous ones)."""
        out = {}
        for a in self.attributes:
            if a.kind == CATEGORICAL:
                out[a.name] = torch.full((n,), a.null_id, dtype=torch.long)
            else:
                out[a.name] = torch.full((n,), math.nan, dtype=torch.float32)
        return out

    def to_dict(self) -> dict:
        return {"d_t": self.d_t, "mode": self.mode, "attributes": [a.to_dict() for a in self.attributes]}

    @classmethod
    def from_dict(cls, d: dict) -> "ConditionSpec":
        return cls(tuple(Attribute.from_dict(a) for a in d["attributes"]), int(d["d_t"]), d.get("mode", "concat"))


def sinusoidal(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The x1000 encoding of older checkpoints (x already divided by scale).  x: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    arg = x.float()[:, None] * freqs[None] * 1000.0  # scaled so 0..1 spans many periods
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def reference_sinusoidal(x: torch.Tensor, dim: int, max_position: float = 100.0) -> torch.Tensor:
    """The reference MeDi encoder of a positional domain (e.g. age_p).  x: (B,) raw values -> (B, dim).

    Same operations in the same order as the reference's SineCosinePositionEncoder (so float32
    results are identical): clamp to [0, max_position], divide by it, sin/cos at exp(-ln(1e4) 2i/d).
    """
    x = x.float().clamp(0.0, max_position) / max_position
    i = torch.arange(dim // 2, device=x.device, dtype=x.dtype)
    div_term = torch.exp(-math.log(10000.0) * (2 * i / dim))
    pos = x.unsqueeze(1) * div_term.unsqueeze(0)  # (B, dim / 2)
    return torch.cat([torch.sin(pos), torch.cos(pos)], dim=1)


def encode_continuous(a: Attribute, v: torch.Tensor) -> torch.Tensor:
    """The fixed encoding of a continuous attribute's values (no NaN).  (B,) -> (B, a.dim)."""
    if a.encoding == LEGACY_X1000:
        return sinusoidal(v / a.scale, a.dim)
    return reference_sinusoidal(v, a.dim, a.scale)


class Conditioner(nn.Module):
    """Embedding tables -> z_cond of width d_t.   # (B, d_t)

    concat (the paper): z = [e_class, e_meta...]; additive: z = e_class + sum e_meta;
    linear: z = W [e_class, e_meta...] + b.

    Table ``i`` has ``len(vocab) + 1`` rows; the last row is the learned null embedding.
    Continuous attributes use a fixed sinusoidal encoding (the reference's, see reference_sinusoidal);
    NaN selects a learned null vector.
    """

    def __init__(self, spec: ConditionSpec):
        super().__init__()
        self.spec = spec
        self.tables = nn.ModuleDict()
        self.nulls = nn.ParameterDict()
        for a in spec.attributes:
            if a.kind == CATEGORICAL:
                self.tables[a.name] = nn.Embedding(len(a.vocab) + 1, a.dim)
            else:
                self.nulls[a.name] = nn.Parameter(torch.zeros(a.dim))
        if spec.mode == "linear":
            self.linear_comb = nn.Linear(spec.d_t * len(spec.attributes), spec.d_t)

    def forward(self, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for a in self.spec.attributes:
            v = cond[a.name]
            if a.kind == CATEGORICAL:
                parts.append(self.tables[a.name](v.long()))  # (B, d_a)
            else:
                missing = torch.isnan(v)
                enc = encode_continuous(a, torch.where(missing, torch.zeros_like(v), v))
                parts.append(torch.where(missing[:, None], self.nulls[a.name][None].to(enc.dtype), enc))
        if self.spec.mode == "additive":
            return torch.stack(parts, 0).sum(0)
        z = torch.cat(parts, dim=1)
        return self.linear_comb(z) if self.spec.mode == "linear" else z


# Conditioning attribute name -> column of the data index / clinical CSV.  Any other metadata
# column conditions under its own name (e.g. `--condition class,tss,age`).
COLUMNS = {"class": "class", "tss": "tissue_source_site", "gender": "gender", "race": "race", "age": "age_at_index"}
# Attributes that are continuous by default.
CONTINUOUS_ATTRIBUTES = {"age"}


def column_for(attribute: str) -> str:
    return COLUMNS.get(attribute, attribute)
