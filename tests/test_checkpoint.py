import pickle
from pathlib import Path

import pytest
import torch

from medi_fast import MediFastError, checkpoint
from medi_fast.model import build_model
from medi_fast.schedule import Schedule


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("tiny-32", classes=["LUAD", "LUSC"], metadata={"tss": ["05", "44"], "age": None})


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_roundtrip_rebuilds_the_same_model_and_prefers_ema(tmp_path, suffix):
    model, ema = _model(0), _model(1)
    ck = checkpoint.from_model(model, Schedule(clip_sample=False), preset="tiny-32", ema_model=ema,
                               provenance={"step": 7})
    path = checkpoint.save(ck, tmp_path / f"m{suffix}")
    back = checkpoint.load(path)
    assert back.hash == ck.hash and len(back.hash) == 16
    assert back.spec == model.spec and back.schedule == Schedule(clip_sample=False)
    assert back.provenance == {"step": 7} and back.preset == "tiny-32"
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 900])
    cond = model.spec.encode({"class": ["LUAD", "LUSC"], "tss": ["05", "44"], "age": [50, None]})
    with torch.no_grad():
        assert torch.equal(back.build()(x, t, cond), ema(x, t, cond))  # EMA by default
        assert torch.equal(back.build(ema=False)(x, t, cond), model(x, t, cond))
    assert not list(tmp_path.glob(".medi-tmp-*"))


def test_pt_is_a_plain_dict_readable_with_weights_only(tmp_path):
    path = checkpoint.save(checkpoint.from_model(_model(), Schedule()), tmp_path / "m.pt")
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "medi-fast-checkpoint" and isinstance(obj["state_dict"], dict)
    assert obj["condition_spec"]["attributes"][1]["vocab"]["names"] == ["05", "44"]


def test_hash_depends_on_weights(tmp_path):
    a = checkpoint.from_model(_model(0), Schedule())
    b = checkpoint.from_model(_model(1), Schedule())
    assert a.compute_hash() != b.compute_hash()


def test_missing_truncated_corrupt_and_unsafe_files_are_refused(tmp_path):
    with pytest.raises(MediFastError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.pt")
    good = checkpoint.save(checkpoint.from_model(_model(), Schedule()), tmp_path / "m.pt")
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediFastError, match="truncated or corrupt"):
        checkpoint.load(tmp_path / "trunc.pt")
    # flip bytes inside the weights: the file still unpickles, the content hash does not match
    obj = torch.load(good, weights_only=True)
    key = next(iter(obj["state_dict"]))
    obj["state_dict"][key] = obj["state_dict"][key] + 1
    torch.save(obj, tmp_path / "flipped.pt")
    with pytest.raises(MediFastError, match="corrupt: content hash"):
        checkpoint.load(tmp_path / "flipped.pt")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(MediFastError, match="is not a plain-data checkpoint"):
        checkpoint.load(tmp_path / "pickled.pt")
    (tmp_path / "other.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(MediFastError):
        checkpoint.load(tmp_path / "other.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(MediFastError, match="not a medi-fast checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")


def _unsafe_model(monkeypatch):
    """A model whose tss vocabulary holds '..', as a file edited by hand (or by an attacker) would carry
    it; the content hash is no signature, so such a file can carry a matching one."""
    import medi_fast.conditioning
    import medi_fast.vocab

    with monkeypatch.context() as m:
        for module in (medi_fast.vocab, medi_fast.conditioning):
            m.setattr(module, "check_name", lambda name, *a, **k: name, raising=False)
        torch.manual_seed(0)
        return build_model("tiny-32", classes=["LUAD", "LUSC"], metadata={"tss": ["..", "44"]})


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_stored_vocabulary_that_is_not_safe_is_refused_as_corrupt_or_unsafe(tmp_path, monkeypatch, suffix):
    bad = checkpoint.save(checkpoint.from_model(_unsafe_model(monkeypatch), Schedule()), tmp_path / f"bad{suffix}")
    with pytest.raises(MediFastError, match=rf"checkpoint {bad} is corrupt or unsafe: its tss value '\.\.' is a "
                                            rf"relative path component; re-create it"):
        checkpoint.load(bad)


def test_an_onnx_header_with_an_unsafe_vocabulary_is_refused(monkeypatch):
    from medi_fast.backends.contract import IOContract
    from medi_fast.backends.onnx_info import metadata, parse_metadata

    model = _model()
    props = metadata(model.spec, Schedule(), preset="tiny-32", checkpoint_hash="0" * 16, resolution=32,
                     contract=IOContract.from_spec(model.spec, 32), precision="fp32", unet_config={}, provenance={})
    assert parse_metadata(props, Path("m.onnx")).spec == model.spec
    unsafe = _unsafe_model(monkeypatch).spec
    props = metadata(unsafe, Schedule(), preset="tiny-32", checkpoint_hash="0" * 16, resolution=32,
                     contract=IOContract.from_spec(unsafe, 32), precision="fp32", unet_config={}, provenance={})
    with pytest.raises(MediFastError, match=r"m.onnx is corrupt or unsafe: its tss value '\.\.' is a relative path"):
        parse_metadata(props, Path("m.onnx"))
