"""One optimiser step and its resume state, shared by the trainer (``loop``), the distiller
(``distill``) and ``medi-fast doctor --check``.

``TrainStep`` owns what every step does the same way: the forward pass under autocast, the loss
scaler (fp16 only), gradient clipping, the optimiser and LR-schedule step, the EMA update, and
saving/restoring all of it for an exact resume.  What differs between callers (the loss, which
optimiser, the schedule) is built by the caller and handed in.

The resume prelude (``resume_point``, ``check_resume_options``, ``load_resume``) is the one place that
decides whether a run directory may be continued: an existing run needs ``--resume``, ``--resume``
needs a complete checkpoint, and the options that shape the run must be the ones it started with.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medi_fast import checkpoint as ckpt_io
from medi_fast.backends import bf16_native
from medi_fast.errors import MediFastError

from .ema import EMA
from .rundir import RunDir


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from medi_fast.resources import check_device

    check_device(name)
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        # bf16 only where the GPU has bf16 units: is_bf16_supported() also counts emulation (T4, V100)
        return torch.bfloat16 if device.type == "cuda" and bf16_native(device) else None
    if precision == "fp16" and device.type != "cuda":
        raise MediFastError("--precision fp16 needs a CUDA GPU; use fp32 or bf16 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def step_generator(gen: torch.Generator, seed: int, rank: int, step: int) -> torch.Generator:
    """Reseed per (seed, rank, step): no generator state to save, and every rank draws its own noise."""
    return gen.manual_seed(((seed * 1_000_003 + step) * 10_007 + rank) % (2**63 - 1))


def rng_state() -> dict:
    """Python, numpy and torch global RNG states as tensors/ints (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(("MT19937", nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Python, numpy and torch from one seed (initial weights, anything drawn outside step_generator)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class StepResult:
    grad_norm: torch.Tensor | None  # the global norm before clipping; None when not clipping
    lr: float  # the learning rate this step used


class TrainStep:
    """forward (autocast) -> backward (scaled) -> unscale, clip -> optimiser step -> LR step -> EMA.

    ``forward`` is what the batch goes through (the model itself, or its DDP / compiled wrapper);
    ``model`` holds the weights the EMA follows.  Clipping runs over the optimiser's parameters.
    ``grad_clip=None`` skips unscaling and clipping (the scaler still unscales inside its step).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device_type: str,
                 amp: torch.dtype | None = None, forward=None, scheduler=None, ema: EMA | None = None,
                 grad_clip: float | None = None):
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema
        self.forward_fn = forward if forward is not None else model
        self.device_type, self.amp, self.grad_clip = device_type, amp, grad_clip
        # fp16 gradients underflow without loss scaling; bf16 and fp32 have fp32's exponent range
        self.scaler = torch.amp.GradScaler(device_type, enabled=amp == torch.float16)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def forward(self, *inputs) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.amp, enabled=self.amp is not None):
            return self.forward_fn(*inputs)

    def backward(self, loss: torch.Tensor, accum: int = 1) -> None:
        """Gradients of ``loss / accum`` (one of ``accum`` micro-batches), scaled when fp16."""
        self.scaler.scale(loss / accum).backward()

    def step(self) -> StepResult:
        grad_norm = None
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return StepResult(grad_norm, lr)

    # -- resume state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but the weights (those are in the checkpoint), and the RNG states of this instant."""
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "ema": self.ema.state_dict() if self.ema is not None else {}, "rng": rng_state()}

    def restore(self, ck: ckpt_io.Checkpoint, state: dict) -> None:
        """Weights and EMA weights from the checkpoint, optimiser/LR/scaler/EMA step and RNG from its state."""
        self.model.load_state_dict(ck.state_dict)
        if self.ema is not None:
            self.ema.model.load_state_dict(ck.ema_state_dict if ck.ema_state_dict is not None else ck.state_dict)
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])

    def save(self, run: RunDir, step: int, ck: ckpt_io.Checkpoint, **extra) -> Path:
        """Checkpoint, then its resume state (a pair is complete only when both exist: RunDir)."""
        path = ckpt_io.save(ck, run.checkpoint_path(step))
        run.save_state(path, {"step": step, "checkpoint": path.name, **self.state_dict(), **extra})
        return path


# -- the resume prelude ------------------------------------------------------------------------------
def resume_point(run: RunDir, resume: bool, what: str, started: bool = False) -> int:
    """The step to continue from (the newest complete checkpoint), or 0 for a new run.

    Refuses a run directory that holds a run (``started``: evidence beyond checkpoints) without
    ``--resume``, and ``--resume`` where there is nothing to continue.  Reads only."""
    done = run.complete_steps() if run.ckpt_dir.is_dir() else []
    if (done or started) and not resume:
        at = f" (checkpoint at step {done[-1]})" if done else ""
        raise MediFastError(f"{run.root} already holds a {what}{at}; pass --resume to continue it, or choose "
                            f"another --out")
    if resume and not done:
        raise MediFastError(f"--resume: {run.root} has no complete checkpoint to resume from; drop --resume to start")
    return done[-1] if done else 0


def read_run_config(path: Path) -> dict:
    """A run directory's config.json as a dict; a missing, corrupt or non-object file is refused."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MediFastError(f"--resume: {path} is missing; the run directory is incomplete, choose another "
                            f"--out to start over") from None
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise MediFastError(f"--resume: {path} is corrupt ({type(e).__name__}); restore it or choose another "
                            f"--out to start over") from None
    if not isinstance(value, dict):
        raise MediFastError(f"--resume: {path} holds a JSON {type(value).__name__}, not a run's options; restore "
                            f"it or choose another --out to start over")
    return value


def check_resume_options(recorded: dict, current: dict, flags: dict[str, str], where) -> None:
    """Refuse to continue a run with options that change what it computes (a different --lr makes the
    restored optimiser state meaningless).  ``flags``: key -> the option to name."""
    diff = [f"{flag} {recorded.get(key)!r} (now {current.get(key)!r})" for key, flag in flags.items()
            if recorded.get(key) != current.get(key)]
    if diff:
        raise MediFastError(f"--resume: {where} was started with {'; '.join(diff)}; resume with the original "
                            f"options or choose another --out")


def load_resume(run: RunDir, step: int) -> tuple[ckpt_io.Checkpoint, dict]:
    """The checkpoint and resume state of ``step`` (both verified on load)."""
    return ckpt_io.load(run.checkpoint_path(step)), run.load_state(step)
