"""The pathology encoder registry against what each model card publishes (no downloads, random weights).

The true architectures are built on the meta device (shapes only, no memory, no compute): their state-dict
keys and shapes must equal those of the model built by the card's own code, and a few published shapes are
spelled out.  The embedding path (card transform, pooling, weight loading) runs on small random models of
the same structure (depth 2, width 48), against the card's torchvision transform and pooling code.
"""
import functools

import numpy as np
import pytest
import torch
from PIL import Image

from medi_fast.errors import MediFastError
from medi_fast.eval import encoders
from medi_fast.eval.encoders import ENCODERS, Encoder, build_model, embed_tokens, get_encoder_spec

NAMES = ["uni", "uni2-h", "virchow2", "h-optimus-0", "h-optimus-1"]
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
HOPT = dict(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))
SMALL = dict(depth=2, embed_dim=48, num_heads=3)


def card_model(name, **small):
    """The model exactly as each card's code builds it (kwargs copied from the cards, not from the registry)."""
    import timm

    swiglu, silu = timm.layers.SwiGLUPacked, torch.nn.SiLU
    if name == "uni":  # MahmoodLab/UNI get_encoder.py
        kw = dict(model_name="vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                  dynamic_img_size=True)
    elif name == "uni2-h":  # MahmoodLab/UNI README (local checkpoint recipe)
        kw = dict(model_name="vit_giant_patch14_224", img_size=224, patch_size=14, depth=24, num_heads=24,
                  init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                  mlp_layer=swiglu, act_layer=silu, reg_tokens=8, dynamic_img_size=True)
    elif name == "virchow2":  # paige-ai/Virchow2 config.json model_args + the card's create_model arguments
        kw = dict(model_name="vit_huge_patch14_224", img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                  global_pool="", dynamic_img_size=True, reg_tokens=4, mlp_layer=swiglu, act_layer=silu)
    else:  # bioptimus/releases H-optimus-0 README: a plain timm VisionTransformer with a GluMlp
        params = dict(patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-05, mlp_ratio=5.33334,
                      mlp_layer=functools.partial(timm.layers.mlp.GluMlp, act_layer=silu, gate_last=False),
                      act_layer=silu, reg_tokens=4, no_embed_class=True, img_size=224, num_classes=0, in_chans=3)
        return timm.models.VisionTransformer(**{**params, **small})
    return timm.create_model(**{**kw, **small})


# Published shapes (from the cards' code and papers): (key, shape) per encoder.
PUBLISHED = {
    "uni": {"cls_token": (1, 1, 1024), "pos_embed": (1, 197, 1024), "patch_embed.proj.weight": (1024, 3, 16, 16),
            "blocks.23.mlp.fc1.weight": (4096, 1024), "blocks.23.ls2.gamma": (1024,), "norm.weight": (1024,)},
    "uni2-h": {"cls_token": (1, 1, 1536), "reg_token": (1, 8, 1536), "pos_embed": (1, 256, 1536),
               "patch_embed.proj.weight": (1536, 3, 14, 14), "blocks.23.mlp.fc1.weight": (8192, 1536),
               "blocks.23.mlp.fc2.weight": (1536, 4096), "blocks.23.ls1.gamma": (1536,)},
    "virchow2": {"cls_token": (1, 1, 1280), "reg_token": (1, 4, 1280), "pos_embed": (1, 261, 1280),
                 "patch_embed.proj.weight": (1280, 3, 14, 14), "blocks.31.mlp.fc1.weight": (6832, 1280),
                 "blocks.31.mlp.fc2.weight": (1280, 3416), "blocks.31.ls1.gamma": (1280,)},
    "h-optimus-0": {"cls_token": (1, 1, 1536), "reg_token": (1, 4, 1536), "pos_embed": (1, 256, 1536),
                    "patch_embed.proj.weight": (1536, 3, 14, 14), "blocks.39.mlp.fc1.weight": (8192, 1536),
                    "blocks.39.mlp.fc2.weight": (1536, 4096), "blocks.39.ls2.gamma": (1536,)},
}
PUBLISHED["h-optimus-1"] = PUBLISHED["h-optimus-0"]
DEPTH = {"uni": 24, "uni2-h": 24, "virchow2": 32, "h-optimus-0": 40, "h-optimus-1": 40}
DIM = {"uni": 1024, "uni2-h": 1536, "virchow2": 2560, "h-optimus-0": 1536, "h-optimus-1": 1536}
# Parameter counts the papers/cards state, to the precision they state them: UNI (ViT-L/16) 303M (the existing
# UNI test), Virchow2 632M (arXiv:2408.00738), H-optimus 1.1B (its card).
PARAMS = {"uni": (303e6, 0.01), "virchow2": (632e6, 0.005), "h-optimus-0": (1.1e9, 0.05), "h-optimus-1": (1.1e9, 0.05)}


def test_registry_holds_the_five_encoders_with_their_cards_numbers():
    assert list(ENCODERS) == NAMES
    for name in NAMES:
        s = get_encoder_spec(name)
        assert s.dim == DIM[name] and s.input_size == 224 and s.licence and s.hf_repo
        norm = HOPT if name.startswith("h-optimus") else IMAGENET
        assert (s.mean, s.std) == (norm["mean"], norm["std"])
    assert get_encoder_spec("virchow2").pooling == "cls+mean"
    assert {get_encoder_spec(n).pooling for n in NAMES if n != "virchow2"} == {"cls"}
    with pytest.raises(MediFastError, match="closest: 'virchow2'"):
        get_encoder_spec("virchow")


@pytest.mark.parametrize("name", NAMES)
def test_true_architecture_has_the_published_state_dict_and_width(name):
    spec = get_encoder_spec(name)
    with torch.device("meta"):  # shapes only: no gigabytes, no initialisation time
        ours, card = build_model(spec), card_model(name)
        emb = embed_tokens(spec, ours, torch.empty(2, 3, 224, 224))
    sd, ref = ours.state_dict(), card.state_dict()
    assert list(sd) == list(ref)  # same key names, same order
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    for k, shape in PUBLISHED[name].items():
        assert tuple(sd[k].shape) == shape, k
    assert len(ours.blocks) == DEPTH[name] and f"blocks.{DEPTH[name]}.norm1.weight" not in sd
    assert tuple(emb.shape) == (2, DIM[name])
    if name in PARAMS:
        value, rel = PARAMS[name]
        assert sum(p.numel() for p in ours.parameters()) == pytest.approx(value, rel=rel)


def card_transform_literal(name):
    """Each card's preprocessing, written as the card writes it."""
    from timm.data import create_transform
    from torchvision import transforms

    if name in ("uni", "uni2-h"):  # MahmoodLab get_eval_transforms(img_resize=224, center_crop=True)
        return transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize(**IMAGENET)])
    if name == "virchow2":  # create_transform(**resolve_data_config(pretrained_cfg)) of the published config
        return create_transform(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=1.0, crop_mode="center",
                                is_training=False, **IMAGENET)
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(**HOPT)])  # H-optimus: no resize


def card_embedding(name, model, x):
    """Each card's forward + pooling."""
    out = model(x)
    if name == "virchow2":  # output (B, 261, D): class token ++ mean of the patch tokens (tokens 1-4 are registers)
        return torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1)
    return out  # class token (timm's global_pool="token")


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """A small random model of each card's structure, saved in a Hugging Face cache layout."""
    root = tmp_path_factory.mktemp("hf") / "hub"
    out = {}
    for name in NAMES:
        spec = get_encoder_spec(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(NAMES.index(name))
            m = card_model(name, **SMALL)
            for mod in m.modules():  # LayerScale 1e-5 would hide the input from a random model; make it matter
                if hasattr(mod, "gamma"):
                    mod.gamma.data.fill_(1.0)
        snap = root / ("models--" + spec.hf_repo.replace("/", "--")) / "snapshots" / "0123abc"
        snap.mkdir(parents=True)
        torch.save(m.state_dict(), snap / "pytorch_model.bin")
        out[name] = m.eval()
    return root, out


@pytest.mark.parametrize("name", NAMES)
def test_embeddings_equal_the_cards_transform_and_pooling(name, small_weights, monkeypatch):
    root, models = small_weights
    rng = np.random.default_rng(0)
    size = 224 if name.startswith("h-optimus") else 256  # the H-optimus cards take 224 px tiles as they are
    imgs = rng.integers(0, 256, size=(3, size, size, 3), dtype=np.uint8)
    imgs[1] = np.clip(imgs[1].astype(int) // 2 + 90, 0, 255)  # a paler image: the normalisation matters
    monkeypatch.setenv("HF_HUB_CACHE", str(root))  # weights=None: found in the (local) Hugging Face cache
    enc = Encoder(name, weights=None, device="cpu", batch_size=2, **SMALL)
    emb = enc(imgs)
    tf = card_transform_literal(name)
    x = torch.stack([tf(Image.fromarray(im)) for im in imgs])
    with torch.no_grad():
        ref = card_embedding(name, models[name], x).double().numpy()
    assert emb.shape == (3, enc.dim) and enc.dim == (96 if name == "virchow2" else 48)
    assert np.abs(emb - ref).max() <= 1e-5
    # the check has teeth: ImageNet statistics instead of H-optimus' (or the reverse) move the embeddings
    right, wrong = (IMAGENET, HOPT) if not name.startswith("h-optimus") else (HOPT, IMAGENET)
    t = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    x2 = (x * t(right["std"]) + t(right["mean"]) - t(wrong["mean"])) / t(wrong["std"])
    with torch.no_grad():
        assert np.abs(card_embedding(name, models[name], x2).double().numpy() - ref).max() > 1e-3


def test_weights_from_a_file_a_folder_and_mismatches(small_weights, tmp_path):
    root, models = small_weights
    folder = root / "models--paige-ai--Virchow2"
    file = next(folder.rglob("pytorch_model.bin"))
    imgs = np.random.default_rng(1).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    a = Encoder("virchow2", weights=file, device="cpu", **SMALL)(imgs)
    b = Encoder("virchow2", weights=folder, device="cpu", **SMALL)(imgs)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(MediFastError, match="--extractor matching the weights") as e:
        Encoder("uni2-h", weights=folder, device="cpu", **SMALL)  # Virchow2 weights, UNI2-h architecture
    assert "\n" not in str(e.value)
    with pytest.raises(MediFastError, match="nothing is downloaded"):
        Encoder("h-optimus-1", weights=tmp_path / "missing.bin", device="cpu", **SMALL)
    with pytest.raises(MediFastError, match="huggingface.co/bioptimus/H-optimus-0"):
        Encoder("h-optimus-0", weights=tmp_path, device="cpu", **SMALL)  # empty folder
    with pytest.raises(MediFastError, match="--resolution 224"):
        Encoder("h-optimus-0", weights=root / "models--bioptimus--H-optimus-0", device="cpu", **SMALL)(imgs[:, :200, :200])


@pytest.fixture()
def small_registry(monkeypatch):
    """The CLI builds the cards' architectures; shrink them (same structure) so the CLI runs in seconds."""
    real = encoders.build_model
    monkeypatch.setattr(encoders, "build_model", lambda spec, **kw: real(spec, **{**SMALL, **kw}))


@pytest.mark.parametrize("name", NAMES)
def test_embed_prints_the_licence_once_and_probe_takes_the_embeddings(name, small_registry, tmp_path, capsys):
    from medi_fast.cli import main
    from medi_fast.data.synth import render_patches
    from medi_fast.eval.embeddings import load_embeddings

    sets = {}
    for split, pairs in (("train", [("LUAD", "S1"), ("LUSC", "S2")]), ("test", [("LUAD", "S2"), ("LUSC", "S1")])):
        d = tmp_path / split
        for j, (c, s) in enumerate(pairs):
            (d / c).mkdir(parents=True)
            for i, img in enumerate(render_patches(c, s, 6, resolution=32, seed=[split == "test", j])):
                Image.fromarray(img).save(d / c / f"{s}_{i}.png")
        sets[split] = d

    def run(args):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr()

    for split, d in sets.items():
        code, out = run(["embed", "--images", d, "--extractor", name, "--random-init", "--resolution", "224",
                         "--out", tmp_path / f"{split}.npz", "--quiet"])
        assert code == 0, out.err
        assert out.err.count("licence:") == 1 and get_encoder_spec(name).licence in out.err
    meta, emb = load_embeddings(tmp_path / "train.npz")
    assert emb.shape == (12, 96 if name == "virchow2" else 48)
    # the site folder is not a column of a plain folder: give probe what it needs (class + site) from the names
    for split in sets:
        p = tmp_path / f"{split}.npz"
        with np.load(p) as z:
            arrays = dict(z)
        arrays["meta/tissue_source_site"] = np.array([s.split("/")[-1].split("_")[0] for s in arrays["meta/path"]])
        np.savez(p, **arrays)
    code, out = run(["probe", "--real-train", tmp_path / "train.npz", "--real-test", tmp_path / "test.npz",
                     "--synthetic", f"S={tmp_path / 'train.npz'}", "--task", "nsclc", "--k", "3",
                     "--one-site-per-class"])
    assert code == 0, out.err
    assert "| no-synthetic |" in out.out and "| S |" in out.out


def test_embed_rejects_encoder_options_for_registry_encoders(tmp_path, capsys):
    from medi_fast.cli import main

    with pytest.raises(SystemExit) as e:
        main(["embed", "--images", str(tmp_path), "--extractor", "virchow2", "--encoder", "vit_tiny_patch16_224",
              "--out", str(tmp_path / "e.npz")])
    assert e.value.code == 2 and "--extractor uni only" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_true_architecture_embeds_like_the_card(name):
    """The full-size random model (hundreds of millions of parameters): our path vs the card's, one image."""
    spec = get_encoder_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        enc = Encoder(name, random_init=True, device="cpu")
    img = np.random.default_rng(0).integers(0, 256, size=(1, 224, 224, 3), dtype=np.uint8)
    x = card_transform_literal(name)(Image.fromarray(img[0]))[None]
    with torch.no_grad():
        ref = card_embedding(name, enc.model, x).double().numpy()
    emb = enc(img)
    assert emb.shape == (1, spec.dim) and np.abs(emb - ref).max() <= 1e-5
