"""UNI embeddings through the real code path with a small random ViT; embedding files round-trip."""
import numpy as np
import pandas as pd
import pytest
import torch

from medi_fast.errors import MediFastError
from medi_fast.eval.embeddings import load_embeddings, save_embeddings
from medi_fast.eval.encoders import IMAGENET_MEAN, IMAGENET_STD, UNIEncoder, create_encoder

ENC = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = create_encoder(ENC, image_size=32)
        for blk in model.blocks:  # UNI's LayerScale init (1e-5) makes a random ViT ignore its input; undo it
            blk.ls1.gamma.data.fill_(1.0)
            blk.ls2.gamma.data.fill_(1.0)
    path = tmp_path_factory.mktemp("uni") / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_uni_config_is_the_published_one():
    with torch.device("meta"):  # the configuration only: no 300M-parameter initialisation
        m = create_encoder("vit_large_patch16_224", image_size=224)
    assert m.num_features == 1024 and m.patch_embed.patch_size == (16, 16)
    assert m.num_classes == 0 and m.dynamic_img_size
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(303e6, rel=0.01)  # UNI's ViT-L/16
    assert m.blocks[0].ls1.gamma.shape == (1024,)  # LayerScale present (init_values set)


def test_local_weights_give_the_saved_model_on_normalised_01_images(weights, tmp_path):
    path, model = weights
    enc = UNIEncoder(weights=path, encoder=ENC, device="cpu", batch_size=3, image_size=32)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    emb = enc(imgs)
    assert emb.shape == (5, 192) and enc.dim == 192
    # Reference: uint8 -> [0, 1] -> ImageNet normalisation -> the model that was saved.
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model(x).double().numpy()
    np.testing.assert_allclose(emb, ref, rtol=1e-4, atol=1e-5)
    # Feeding [-1, 1] (what the reference code did) gives different embeddings: the check has teeth.
    with torch.no_grad():
        wrong = model(x.new_tensor(imgs).permute(0, 3, 1, 2) / 127.5 - 1).double().numpy()
    assert not np.allclose(emb, wrong, atol=1e-3)
    # A folder (HF cache snapshot) holding the file works too.
    np.testing.assert_allclose(UNIEncoder(weights=path.parent, encoder=ENC, device="cpu", image_size=32)(imgs), emb,
                               rtol=1e-4, atol=1e-5)


def test_images_are_resized_to_the_encoder_size(weights):
    path, _ = weights
    enc = UNIEncoder(weights=path, encoder=ENC, device="cpu", image_size=32)
    imgs = np.random.default_rng(1).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    assert enc.preprocess(imgs).shape == (2, 3, 32, 32)
    assert enc(imgs).shape == (2, 192)


def test_weight_errors_are_one_line(tmp_path, weights):
    with pytest.raises(MediFastError, match="--weights") as e:
        UNIEncoder(weights=None, encoder=ENC)
    assert "\n" not in str(e.value)
    with pytest.raises(MediFastError, match="do not exist"):
        UNIEncoder(weights=tmp_path / "missing.bin", encoder=ENC)
    with pytest.raises(MediFastError, match="--encoder matching"):
        UNIEncoder(weights=weights[0], encoder="vit_small_patch16_224", image_size=32)
    with pytest.raises(MediFastError, match="unknown timm encoder"):
        UNIEncoder(weights=weights[0], encoder="not_a_model")


@pytest.mark.parametrize("suffix", [".parquet", ".npz"])
def test_embeddings_file_round_trip(tmp_path, suffix):
    meta = pd.DataFrame({"path": ["/a.png", "/b.png", "/c.png"], "class": ["LUAD", "LUSC", "LUAD"],
                         "tissue_source_site": ["05", "44", "05"]})
    emb = np.random.default_rng(2).normal(size=(3, 7)).astype(np.float32)
    save_embeddings(tmp_path / f"e{suffix}", meta, emb, "enc")
    m2, e2 = load_embeddings(tmp_path / f"e{suffix}")
    np.testing.assert_array_equal(e2, emb)
    pd.testing.assert_frame_equal(m2.reset_index(drop=True), meta)
    with pytest.raises(MediFastError, match=r"\.parquet or \.npz"):
        save_embeddings(tmp_path / "e.txt", meta, emb)
