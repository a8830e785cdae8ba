"""The FID InceptionV3: local weights only, 2048-d, deterministic, equal to pytorch-fid's network."""
import numpy as np
import pytest
import torch

from medi_fast.errors import MediFastError
from medi_fast.eval.inception import (WEIGHT_FILES, InceptionExtractor, build_fid_inception, fid_inception_v3,
                                      find_weights)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A randomly initialised FID Inception saved as a state dict (stands in for the real file)."""
    path = tmp_path_factory.mktemp("inc") / WEIGHT_FILES[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        net = fid_inception_v3()
    # Random BatchNorm statistics so every layer matters (the defaults 0/1 would hide a mis-wired BN).
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(2, 48, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def extractor(weights):
    return InceptionExtractor(weights, device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def features(extractor, images):
    return extractor(images)


def test_features_are_2048_d_and_deterministic(extractor, features, images):
    f1 = features
    extractor.batch_size = 1  # another batch composition, same images
    try:
        f2 = extractor(images)
    finally:
        extractor.batch_size = 2
    assert f1.shape == (2, 2048) and f1.dtype == np.float64
    assert np.abs(f1).max() > 0 and np.isfinite(f1).all()
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-7)
    assert not np.allclose(f1[0], f1[1])  # different images, different features


@pytest.mark.slow
def test_features_equal_pytorch_fid_for_same_weights_file(features, images, weights, monkeypatch):
    pytest.importorskip("pytorch_fid")
    import pytorch_fid.inception as pfi

    state = torch.load(weights, weights_only=True)
    # pytorch-fid would download its weights: hand it the same local file instead.
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    ref_net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # what pytorch-fid's ToTensor gives
    with torch.no_grad():
        ref = ref_net(x)[0].squeeze(-1).squeeze(-1).double().numpy()
    ours = features
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_weights_found_in_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDI_FAST_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MediFastError) as e:
        find_weights()
    msg = str(e.value)
    assert "\n" not in msg and WEIGHT_FILES[0] in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "--inception-weights" in msg
    cached = tmp_path / "hub" / "checkpoints" / WEIGHT_FILES[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_weights() == cached


def test_missing_and_wrong_weights_files(tmp_path):
    with pytest.raises(MediFastError, match="does not exist"):
        build_fid_inception(tmp_path / "nope.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(MediFastError, match="not an FID InceptionV3 state dict"):
        build_fid_inception(wrong)
