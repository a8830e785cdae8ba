"""Exact resume: a run SIGKILLed mid-way and resumed repeats the uninterrupted run's losses and weights."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from medi_fast import checkpoint as ckpt_io
from medi_fast.training.rundir import read_metrics

SCRIPT = r'''
import sys, time
import torch
torch.set_num_threads(1)  # same thread count in every run: CPU reductions are then bitwise repeatable
import pandas as pd
from medi_fast.training.config import TrainConfig
from medi_fast.training.data import MemoryPatches
from medi_fast.training import ema as ema_mod
from medi_fast.training.loop import train

out, resume, slow = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (24, 3, 16, 16), generator=g).to(torch.uint8)
table = pd.DataFrame({"class": [["LUAD", "LUSC", "KIRC"][i % 3] for i in range(24)],
                      "tissue_source_site": [f"{i % 4:02d}" for i in range(24)]})
if slow:  # give the test time to kill the run between checkpoints
    update = ema_mod.EMA.update
    def slow_update(self, model):
        update(self, model)
        time.sleep(0.4)
    ema_mod.EMA.update = slow_update
cfg = TrainConfig(preset="tiny-32", resolution=16, condition="class,tss", batch_size=4, steps=10, out=out,
                  workers=0, checkpoint_every=3, keep_last=2, log_every=1, grid_every=0, resume=resume,
                  cond_drop=0.2, grad_accum=2, warmup=2, lr=1e-3, device="cpu")
train(cfg, MemoryPatches(images, table))
'''


def _run(script, out, resume, slow, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(out), "1" if resume else "0", "1" if slow else "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_sigkill_and_resume_reproduces_uninterrupted_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p_ref = _run(script, ref, False, False)
    p_cut = _run(script, cut, False, True)
    # kill the second run after its step-6 checkpoint, while steps 7.. are in progress
    state6 = cut / "checkpoints" / "step-00000006.state.pt"
    while not state6.exists() and p_cut.poll() is None:  # progress, not the clock: a loaded machine is slower
        time.sleep(0.05)
    assert state6.exists(), p_cut.communicate()[1].decode()[-2000:]
    time.sleep(0.5)
    os.kill(p_cut.pid, signal.SIGKILL)
    p_cut.wait()
    assert p_cut.returncode == -signal.SIGKILL
    assert not (cut / "checkpoints" / "step-00000010.pt").exists()  # really killed mid-way
    # resume finishes the run
    p_res = _run(script, cut, True, False)
    _, err = p_res.communicate(timeout=3600)  # a hang only
    assert p_res.returncode == 0, err.decode()[-2000:]
    _, err = p_ref.communicate(timeout=3600)
    assert p_ref.returncode == 0, err.decode()[-2000:]

    ref_rows, cut_rows = read_metrics(ref / "metrics.csv"), read_metrics(cut / "metrics.csv")
    assert [r["step"] for r in cut_rows] == [str(s) for s in range(1, 11)]
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in cut_rows] == \
           [(r["loss"], r["lr"], r["grad_norm"]) for r in ref_rows]
    # identical weights (model and EMA): the content hashes agree
    a, b = ckpt_io.load(ref / "checkpoints/step-00000010.pt"), ckpt_io.load(cut / "checkpoints/step-00000010.pt")
    assert a.hash == b.hash
    for k in a.state_dict:
        assert (a.state_dict[k] == b.state_dict[k]).all(), k
    # keep-last 2 (+ best.pt), no temporary files left behind
    names = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert names == ["best.pt", "step-00000009.pt", "step-00000009.state.pt", "step-00000010.pt",
                     "step-00000010.state.pt"]


def test_resume_refusals(tmp_path, capsys):
    from medi_fast.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "x", "--out", str(tmp_path / "none"), "--resume"])
    assert e.value.code == 2
    assert "has no complete checkpoint to resume from; drop --resume" in capsys.readouterr().err
