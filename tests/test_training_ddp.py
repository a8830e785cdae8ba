"""DDP on CPU (gloo): two processes under torch.distributed.run end with identical weights."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

SCRIPT = r'''
import os, sys
import torch
torch.set_num_threads(1)
import pandas as pd
from medi_fast.training.config import TrainConfig
from medi_fast.training.data import MemoryPatches
from medi_fast.training.loop import train

out = sys.argv[1]
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (32, 3, 16, 16), generator=g).to(torch.uint8)
table = pd.DataFrame({"class": [["LUAD", "LUSC"][i % 2] for i in range(32)],
                      "tissue_source_site": [f"{i % 4:02d}" for i in range(32)]})
cfg = TrainConfig(preset="tiny-32", resolution=16, condition="class,tss", batch_size=4, steps=3, out=out,
                  workers=0, checkpoint_every=3, log_every=1, grid_every=0, lr=1e-3, warmup=1, device="cpu",
                  grad_accum=2)
seen = []
from medi_fast.training import stream as stream_mod
batch = stream_mod.IndexStream.batch
def spy(self, k):
    b = batch(self, k)
    seen.append(b)
    return b
stream_mod.IndexStream.batch = spy
summary = train(cfg, MemoryPatches(images, table))
rank = int(os.environ["RANK"])
torch.save({"model": summary["model"].state_dict(), "rows": seen, "effective": summary["effective_batch"]},
           f"{out}/rank{rank}.pt")
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_ranks_hold_identical_weights(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(script), str(out)]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=1800)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["effective"] == 4 * 2 * 2  # batch x world size x grad accum
    # the ranks trained on different rows (data sharding) ...
    assert r0["rows"] != r1["rows"]
    # ... yet hold bitwise identical weights after the steps (gradients all-reduced)
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    # only rank 0 wrote the run directory's files; the checkpoint is loadable
    from medi_fast import checkpoint as ckpt_io

    ck = ckpt_io.load(out / "checkpoints" / "step-00000003.pt")
    assert ck.provenance["world_size"] == 2 and ck.provenance["effective_batch"] == 16
    for k, v in ck.state_dict.items():
        assert torch.equal(v, r0["model"][k]), k
    assert len(list((out / "checkpoints").glob("step-*.pt"))) == 2  # one checkpoint + its state, once
