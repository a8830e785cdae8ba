"""The run directory: resolved config, metrics (CSV + TensorBoard), checkpoints and resume state.

    out/config.json                  the resolved TrainConfig
    out/metrics.csv                  step, loss, lr, grad_norm, steps_per_s, images_per_s, elapsed_s
    out/tensorboard/                 the same scalars (tensorboard --logdir out/tensorboard)
    out/samples/step-00001000.png    sample grids (rows classes x columns sites)
    out/checkpoints/step-00001000.pt        a medi-fast checkpoint (model + EMA), for `medi-fast generate`
    out/checkpoints/step-00001000.state.pt  the trainer's resume state for that checkpoint
    out/checkpoints/best.pt          the checkpoint with the lowest mean loss since the previous one

A checkpoint is written before its state file, and old pairs are pruned only after both exist, so a
run killed at any instant (even SIGKILL) resumes from the newest complete pair.
"""
from __future__ import annotations

import csv
import io
import pickle
import re
from pathlib import Path

import torch

from medi_fast.errors import MediFastError
from medi_fast.io import atomic_path, atomic_write_text, clean_tmp, ensure_dir

METRICS = ("step", "loss", "lr", "grad_norm", "steps_per_s", "images_per_s", "elapsed_s")
_STEP = re.compile(r"^step-(\d{8})\.pt$")


class RunDir:
    def __init__(self, out, main: bool = True):
        self.root = Path(out)
        self.main = main
        self.ckpt_dir = self.root / "checkpoints"
        self.samples_dir = self.root / "samples"
        self._tb = None
        if main:
            ensure_dir(self.ckpt_dir)
            clean_tmp(self.root)  # temporary files of a killed run

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_path(self, step: int) -> Path:
        return self.ckpt_dir / f"step-{step:08d}.pt"

    @staticmethod
    def state_path(ckpt: Path) -> Path:
        return ckpt.with_name(ckpt.stem + ".state.pt")

    def complete_steps(self) -> list[int]:
        """Steps that have both a checkpoint and its resume state, ascending."""
        steps = []
        for p in self.ckpt_dir.glob("step-*.pt"):
            m = _STEP.match(p.name)
            if m and self.state_path(p).is_file():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def save_state(self, ckpt_path: Path, state: dict) -> None:
        with atomic_path(self.state_path(ckpt_path)) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)  # a full disk: OSError here; torch.save(state, name) raises RuntimeError

    def load_state(self, step: int) -> dict:
        path = self.state_path(self.checkpoint_path(step))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (EOFError, RuntimeError, pickle.UnpicklingError, OSError, ValueError, KeyError, IndexError, TypeError,
                AttributeError) as e:  # what torch.load raises on a truncated or foreign file
            raise MediFastError(f"--resume: resume state {path} is truncated or corrupt ({type(e).__name__}); delete "
                                f"it and its checkpoint {self.checkpoint_path(step).name} to resume from the one "
                                f"before") from None
        if not isinstance(state, dict) or "optimizer" not in state:
            raise MediFastError(f"--resume: {path} is not a medi-fast resume state; delete it and its checkpoint to "
                                f"resume from the one before")
        return state

    def prune(self, keep_last: int) -> None:
        for step in self.complete_steps()[:-keep_last]:
            p = self.checkpoint_path(step)
            self.state_path(p).unlink(missing_ok=True)
            p.unlink(missing_ok=True)

    # -- metrics -----------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.csv"

    def start_metrics(self, resume_step: int) -> None:
        """New run: header only.  Resume: keep rows up to the resumed step (a killed run may have
        logged steps past its last checkpoint; they are redone and logged again)."""
        if not self.main:
            return
        rows = []
        if resume_step > 0 and self.metrics_path.is_file():
            with open(self.metrics_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRICS)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.metrics_path, buf.getvalue())
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.root / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.metrics_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRICS).writerow({k: row.get(k, "") for k in METRICS})
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and v != "":
                    self._tb.add_scalar(f"train/{k}", float(v), int(row["step"]))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
