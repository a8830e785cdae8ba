"""Unit tests of the trainer's parts against reference implementations (diffusers) and invariants."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import torch

from medi_fast.errors import MediFastError
from medi_fast.training.config import TrainConfig
from medi_fast.training.data import build_spec, condition_table, drop_conditions
from medi_fast.training.ema import EMA
from medi_fast.training.lr import warmup_cosine
from medi_fast.training.step import rng_state, set_rng_state
from medi_fast.training.stream import IndexStream, sampling_weights


def test_lr_matches_diffusers_cosine_with_warmup():
    from diffusers.optimization import get_cosine_schedule_with_warmup

    total = 1000
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    o1, o2 = torch.optim.AdamW([p1], lr=1e-4), torch.optim.AdamW([p2], lr=1e-4)
    ours, ref = warmup_cosine(o1, total, 0.01), get_cosine_schedule_with_warmup(o2, 10, total)
    for _ in range(total):
        assert o1.param_groups[0]["lr"] == pytest.approx(o2.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        o1.step(), o2.step(), ours.step(), ref.step()
    assert o1.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_matches_diffusers_ema_model(warmup):
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    ours = EMA(net, decay=0.999, warmup=warmup, inv_gamma=1.0, power=0.75)
    ref = EMAModel(net.parameters(), decay=0.999, use_ema_warmup=warmup, inv_gamma=1.0, power=0.75)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        net(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
        ours.update(net)
        ref.step(net.parameters())
    for a, b in zip(ours.model.parameters(), ref.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the averaged copy differs from the live weights (it is an average, not a copy)
    assert not torch.equal(next(ours.model.parameters()), next(net.parameters()))


def test_config_unknown_key_and_roundtrip(tmp_path):
    cfg = TrainConfig(data="x", steps=10, batch_size=4)
    path = cfg.write(tmp_path / "config.json")
    assert TrainConfig.read(path) == cfg
    with pytest.raises(MediFastError, match="unknown training option 'batchsize'.*batch_size"):
        TrainConfig.from_dict({"batchsize": 3})
    with pytest.raises(MediFastError, match="--cond-drop"):
        TrainConfig(cond_drop=1.5)
    with pytest.raises(MediFastError, match="must start with 'class'"):
        TrainConfig(condition="tss,class").attributes


def _table(n=60):
    rng = np.random.default_rng(0)
    # imbalanced classes: 40 / 15 / 5
    classes = ["LUAD"] * 40 + ["LUSC"] * 15 + ["KIRC"] * 5
    return pd.DataFrame({"class": classes[:n], "tissue_source_site": [f"{i % 7:02d}" for i in range(n)],
                         "gender": rng.choice(["male", "female"], n), "age_at_index": rng.uniform(30, 80, n)})


def test_index_stream_deterministic_sharded_and_class_balanced():
    t = _table()
    w = sampling_weights(t, "class")
    a, b = IndexStream(w, 8, seed=3), IndexStream(w, 8, seed=3)
    assert [a.batch(k) for k in range(20)] == [b.batch(k) for k in range(20)]
    # resuming at batch 13 gives the same batches as running through
    it = a.iterate(13)
    assert [next(it) for _ in range(5)] == [b.batch(k) for k in range(13, 18)]
    # two ranks: disjoint halves of the same global draw
    r0, r1 = IndexStream(w, 4, 3, 0, 2), IndexStream(w, 4, 3, 1, 2)
    g = IndexStream(w, 8, 3)
    for k in range(5):
        assert sorted(r0.batch(k) + r1.batch(k)) == sorted(r0._epoch_indices(0).view(-1).tolist()[4 * k:4 * k + 4]
                                                          + r1._epoch_indices(0).view(-1).tolist()[4 * k:4 * k + 4])
    assert g.epoch_len == r0.epoch_len
    # class-balanced: each class ~1/3 of draws although LUAD is 2/3 of the rows
    draws = np.concatenate([a.batch(k) for k in range(600)])
    frac = pd.Series(t["class"].to_numpy()[draws]).value_counts(normalize=True)
    assert all(abs(frac[c] - 1 / 3) < 0.03 for c in ("LUAD", "LUSC", "KIRC"))
    uni = IndexStream(sampling_weights(t, "uniform"), 8, 3)
    frac_u = pd.Series(t["class"].to_numpy()[np.concatenate([uni.batch(k) for k in range(600)])]).value_counts(normalize=True)
    assert abs(frac_u["LUAD"] - 40 / 60) < 0.03


def test_spec_vocabularies_from_training_rows():
    t = _table()
    spec = build_spec(t, ["class", "tss", "age"], d_t=128)
    assert spec.class_vocab.names == ("KIRC", "LUAD", "LUSC")  # sorted
    assert spec["tss"].vocab.names == tuple(f"{i:02d}" for i in range(7))  # first appearance, strings
    assert spec["age"].kind == "continuous"
    assert sum(a.dim for a in spec.attributes) == 128 and spec["tss"].dim == 128 // 3
    cond = condition_table(spec, t)
    assert cond["class"][0] == 1 and cond["tss"][3] == 3 and cond["age"].dtype == torch.float32
    with pytest.raises(MediFastError, match="column 'race' is not in the training metadata"):
        build_spec(t, ["class", "race"], d_t=128)
    with pytest.raises(MediFastError, match="empty"):
        build_spec(t.iloc[:0], ["class"], d_t=128)


def test_cond_drop_rate_and_null_ids():
    spec = build_spec(_table(), ["class", "tss", "age"], d_t=128)
    n = 20000
    cond = {"class": torch.zeros(n, dtype=torch.long), "tss": torch.ones(n, dtype=torch.long),
            "age": torch.full((n,), 50.0)}
    out = drop_conditions(cond, spec, 0.25, torch.Generator().manual_seed(0))
    assert abs((out["class"] == spec["class"].null_id).float().mean() - 0.25) < 0.02
    assert abs((out["tss"] == spec["tss"].null_id).float().mean() - 0.25) < 0.02
    assert abs(torch.isnan(out["age"]).float().mean() - 0.25) < 0.02
    # attributes drop independently
    both = ((out["class"] == spec["class"].null_id) & (out["tss"] == spec["tss"].null_id)).float().mean()
    assert abs(both - 0.0625) < 0.01
    assert drop_conditions(cond, spec, 0.0, torch.Generator()) is cond


def test_rng_state_roundtrip_weights_only(tmp_path):
    import random

    state = rng_state()
    torch.save(state, tmp_path / "s.pt")
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
