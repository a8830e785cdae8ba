"""Pathology foundation-model encoders by name: one registry entry each, built with timm, weights from disk.

Each :class:`EncoderSpec` says what its model card says: the timm architecture and its arguments (depth,
width, patch size, register tokens, MLP/activation layers, LayerScale), how tokens are pooled into one
embedding, the card's input transform (resize, crop, mean/std), the embedding width and the licence.
Sources are listed per entry and in docs/eval.md; the state-dict key names and shapes the published
checkpoints use are checked in tests/test_eval_encoders.py.

Weights come from a local file or a local Hugging Face cache folder; nothing is ever downloaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import MediFastError, suggest

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder as its model card specifies it."""

    name: str
    timm_name: str                    # timm architecture the card builds on
    timm_kwargs: dict                 # the card's arguments; "swiglu_packed" / "silu" stand for timm/torch layers
    pooling: str                      # "cls": class token; "cls+mean": class token ++ mean of patch tokens
    input_size: int                   # pixels the model sees
    resize: str                       # "shorter+center-crop" (Resize(S) + CenterCrop(S)) or "none"
    interpolation: str                # of that resize: "bilinear" or "bicubic"
    mean: tuple
    std: tuple
    dim: int                          # embedding width
    hf_repo: str                      # where the weights are published (gated; download them yourself)
    licence: str                      # one line, printed by `medi-fast embed`
    sources: tuple = field(default=())  # model card / paper / code the facts come from

    def licence_line(self) -> str:
        return f"{self.name} ({self.hf_repo}): {self.licence}"


_VIT_UNI2 = dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                 mlp_ratio=2.66667 * 2, no_embed_class=True, mlp_layer="swiglu_packed", act_layer="silu",
                 reg_tokens=8, dynamic_img_size=True)
# H-optimus-0's published build (bioptimus/releases): GluMlp(SiLU, gate_last=False) == timm's SwiGLUPacked.
_VIT_HOPTIMUS = dict(img_size=224, patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                     mlp_ratio=5.33334, mlp_layer="swiglu_packed", act_layer="silu", reg_tokens=4,
                     no_embed_class=True, dynamic_img_size=False)
_NC = ("CC-BY-NC-ND 4.0: non-commercial academic research only, with attribution; no redistribution of the "
       "weights; commercial use of the model or of its derivatives (models trained on its outputs, datasets "
       "made with it) needs the authors' approval")

ENCODERS: dict[str, EncoderSpec] = {s.name: s for s in (
    EncoderSpec(
        "uni", "vit_large_patch16_224",
        dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True),
        "cls", 224, "shorter+center-crop", "bilinear", IMAGENET_MEAN, IMAGENET_STD, 1024, "MahmoodLab/UNI", _NC,
        ("huggingface.co/MahmoodLab/UNI", "github.com/mahmoodlab/UNI uni/get_encoder/get_encoder.py",
         "Chen et al., Nature Medicine 2024")),
    EncoderSpec(
        "uni2-h", "vit_giant_patch14_224", _VIT_UNI2,
        "cls", 224, "shorter+center-crop", "bilinear", IMAGENET_MEAN, IMAGENET_STD, 1536, "MahmoodLab/UNI2-h", _NC,
        ("huggingface.co/MahmoodLab/UNI2-h", "github.com/mahmoodlab/UNI README.md and get_encoder.py")),
    EncoderSpec(
        "virchow2", "vit_huge_patch14_224",
        dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, mlp_layer="swiglu_packed", act_layer="silu",
             reg_tokens=4, dynamic_img_size=True),
        "cls+mean", 224, "shorter+center-crop", "bicubic", IMAGENET_MEAN, IMAGENET_STD, 2560, "paige-ai/Virchow2",
        "CC-BY-NC-ND 4.0: non-commercial academic research only, with attribution; no redistribution of the "
        "weights; see the model card's terms",
        ("huggingface.co/paige-ai/Virchow2 (card and config.json)", "Zimmermann et al., arXiv:2408.00738")),
    EncoderSpec(
        "h-optimus-0", "vit_giant_patch14_reg4_dinov2", _VIT_HOPTIMUS,
        "cls", 224, "none", "bilinear", HOPTIMUS_MEAN, HOPTIMUS_STD, 1536, "bioptimus/H-optimus-0",
        "Apache-2.0 (commercial use allowed; keep the licence and notices)",
        ("huggingface.co/bioptimus/H-optimus-0 (card and config.json)",
         "github.com/bioptimus/releases models/h-optimus/v0/README.md")),
    EncoderSpec(
        "h-optimus-1", "vit_giant_patch14_reg4_dinov2", _VIT_HOPTIMUS,
        "cls", 224, "none", "bilinear", HOPTIMUS_MEAN, HOPTIMUS_STD, 1536, "bioptimus/H-optimus-1",
        "gated, non-commercial research use under Bioptimus' terms of use (commercial use needs a separate "
        "licence); read the model card's terms before use",
        ("huggingface.co/bioptimus/H-optimus-1", "github.com/bioptimus/h1-jumpstart README.md")),
)}

WEIGHT_NAMES = ("pytorch_model.bin", "model.safetensors", "pytorch_model.safetensors")


def get_encoder_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise MediFastError(f"unknown encoder {name!r}{suggest(name, tuple(ENCODERS))}; choose one of "
                            f"{', '.join(ENCODERS)}")
    return ENCODERS[name]


def _layers(kwargs: dict) -> dict:
    """Registry kwargs -> timm kwargs (layer names -> classes)."""
    import torch
    from timm.layers import SwiGLUPacked

    kw = dict(kwargs)
    if kw.get("mlp_layer") == "swiglu_packed":
        kw["mlp_layer"] = SwiGLUPacked
    if kw.get("act_layer") == "silu":
        kw["act_layer"] = torch.nn.SiLU
    return kw


def build_model(spec: EncoderSpec, **overrides):
    """The card's architecture, randomly initialised, no head (``num_classes=0``).  ``overrides`` replace
    timm arguments (tests shrink depth and width; the structure stays the card's)."""
    import timm

    kw = _layers({**spec.timm_kwargs, **overrides})
    # Token pooling is done by `embed_tokens` from the final-norm tokens; the model's own head pools nothing
    # for "cls+mean" (Virchow2's config sets global_pool="") and takes the class token otherwise (timm default).
    kw.setdefault("global_pool", "" if spec.pooling == "cls+mean" else "token")
    try:
        return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kw)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise MediFastError(f"unknown timm encoder {spec.timm_name!r} ({e}); pass a name from timm.list_models()") from None


def embed_tokens(spec: EncoderSpec, model, x):
    """Normalised images (B, 3, S, S) -> embeddings (B, dim), pooled as the card says."""
    import torch

    tokens = model.forward_features(x)  # (B, prefix + patches, D), after the final norm
    cls = tokens[:, 0]
    if spec.pooling == "cls":
        return cls
    if spec.pooling == "cls+mean":  # skip the class and register tokens, average the patch tokens
        return torch.cat([cls, tokens[:, model.num_prefix_tokens:].mean(1)], dim=-1)
    raise MediFastError(f"encoder {spec.name}: unknown pooling {spec.pooling!r}; this is a bug, please report it")


def card_transform(spec: EncoderSpec):
    """The model card's torchvision transform (PIL RGB image -> normalised float tensor (3, S, S))."""
    from torchvision import transforms as T

    steps = []
    if spec.resize == "shorter+center-crop":
        interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[spec.interpolation]
        steps += [T.Resize(spec.input_size, interpolation=interp), T.CenterCrop(spec.input_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean=spec.mean, std=spec.std)])


def default_weights(spec: EncoderSpec) -> Path | None:
    """The model's folder in the local Hugging Face cache, if the weights were downloaded there before."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    folder = Path(hub) / ("models--" + spec.hf_repo.replace("/", "--"))
    return folder if folder.is_dir() else None


def resolve_weights(path, spec: EncoderSpec | None = None) -> Path:
    """A weights file, or a folder (e.g. a Hugging Face cache folder ``models--ORG--NAME``) holding one."""
    what = f"{spec.name}'s weights ({', '.join(WEIGHT_NAMES[:2])} from huggingface.co/{spec.hf_repo})" if spec \
        else "the encoder weights"
    p = Path(path)
    if p.is_dir():
        found = [f for name in WEIGHT_NAMES for f in sorted(p.rglob(name))]
        if not found:
            raise MediFastError(f"no {' or '.join(WEIGHT_NAMES)} under {p}; pass {what} with --weights")
        return found[0]
    if not p.is_file():
        raise MediFastError(f"encoder weights {p} do not exist (nothing is downloaded); download {what} and pass "
                            f"the file or its folder with --weights")
    return p


def load_weights(model, path, spec: EncoderSpec | None = None) -> None:
    """Load a state dict strictly: every key the architecture has, nothing else, same shapes."""
    import torch

    p = resolve_weights(path, spec)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MediFastError(f"cannot read encoder weights {p} ({type(e).__name__}); pass a state-dict file") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    fix = (f"pass --extractor matching the weights (this is {spec.name})" if spec and spec.name in ENCODERS
           else "pass --encoder matching the weights")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatch: another architecture's weights
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise MediFastError(f"{p} does not fit encoder {type(model).__name__} ({first}); {fix}") from None
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise MediFastError(f"{p} does not fit encoder {type(model).__name__} ({what}, {len(missing)} missing, "
                            f"{len(unexpected)} unexpected); {fix}")


class Encoder:
    """Feature extractor ``uint8 (B, H, W, 3) -> float64 (B, dim)`` for a registry encoder.

    Preprocessing is the card's torchvision transform applied to each image (so the numbers are the card's);
    the forward pass is batched, with fp16 autocast on CUDA.  ``random_init`` uses seeded random weights with
    LayerScale set to 1 (at its 1e-5 init a random ViT's output ignores its input): for tests and demos only.
    """

    def __init__(self, name: str = "uni", weights=None, device=None, batch_size: int = 64, random_init: bool = False,
                 seed: int = 0, spec: EncoderSpec | None = None, **overrides):
        import torch

        self.spec = spec or get_encoder_spec(name)
        if weights is None and not random_init:
            weights = default_weights(self.spec)
            if weights is None:
                raise MediFastError(f"{self.spec.name} needs local weights: pass --weights PATH (the "
                                    f"pytorch_model.bin/model.safetensors of huggingface.co/{self.spec.hf_repo}, or "
                                    f"its Hugging Face cache folder); nothing is downloaded")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random_init must be reproducible
            self.model = build_model(self.spec, **overrides)
        if random_init:
            for m in self.model.modules():
                if hasattr(m, "gamma") and isinstance(m.gamma, torch.nn.Parameter):
                    m.gamma.data.fill_(1.0)
        else:
            load_weights(self.model, weights, self.spec)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self.model.eval().requires_grad_(False).to(self.device)
        self.batch_size = batch_size
        self.transform = card_transform(self.spec)
        self.name = self.spec.name + ("-random" if random_init else "")
        width = int(getattr(self.model, "num_features", 0))
        self.dim = 2 * width if self.spec.pooling == "cls+mean" else width
        self.licence = self.spec.licence_line()

    def preprocess(self, images: np.ndarray):
        """uint8 (B, H, W, 3) -> the card's transform of each image, stacked (B, 3, S, S)."""
        import torch
        from PIL import Image

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise MediFastError(f"expected uint8 images (B, H, W, 3), got {images.dtype} {images.shape}")
        if self.spec.resize == "none" and images.shape[1:3] != (self.spec.input_size,) * 2:
            raise MediFastError(f"{self.spec.name} takes {self.spec.input_size}x{self.spec.input_size} patches (its "
                                f"card does not resize), got {images.shape[1]}x{images.shape[2]}; pass --resolution "
                                f"{self.spec.input_size}")
        return torch.stack([self.transform(Image.fromarray(im)) for im in images]).to(self.device)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(images), self.batch_size):
            x = self.preprocess(images[i:i + self.batch_size])
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
                out.append(embed_tokens(self.spec, self.model, x).float().cpu().numpy().astype(np.float64))
        return np.concatenate(out) if out else np.zeros((0, self.dim))


def custom_spec(timm_name: str, image_size: int = 224) -> EncoderSpec:
    """UNI's recipe (class token, ImageNet mean/std, resize + centre crop) on another timm architecture: the
    ``--encoder NAME`` escape hatch, used by tests with tiny models."""
    kw = dict(img_size=image_size, dynamic_img_size=True, init_values=1e-5) if timm_name.startswith("vit_") else {}
    return replace(ENCODERS["uni"], name=timm_name, timm_name=timm_name, timm_kwargs=kw, input_size=image_size,
                   dim=0, hf_repo="local", licence="the licence of the weights you pass", sources=())


UNI_ENCODER = "vit_large_patch16_224"


def create_encoder(encoder: str = UNI_ENCODER, image_size: int = 224):
    """The timm model, randomly initialised: UNI's card settings (LayerScale 1e-5, no head, dynamic image size)
    on ``encoder`` (any timm name)."""
    return build_model(custom_spec(encoder, image_size))


def UNIEncoder(weights=None, encoder: str | None = None, device=None, batch_size: int = 64, image_size: int = 224,
               random_init: bool = False, seed: int = 0) -> Encoder:
    """The ``uni`` registry encoder, or UNI's recipe on another timm architecture (``encoder``,
    ``image_size``: tests use ``vit_tiny_patch16_224`` at 32 px).  (The MeDi reference code fed [-1, 1]
    diffusion outputs straight into UNI; that shifts every embedding, so the card's transform is used.)"""
    if (encoder or UNI_ENCODER) == UNI_ENCODER and image_size == 224:
        return Encoder("uni", weights=weights, device=device, batch_size=batch_size, random_init=random_init, seed=seed)
    return Encoder(spec=custom_spec(encoder or UNI_ENCODER, image_size), weights=weights, device=device,
                   batch_size=batch_size, random_init=random_init, seed=seed)
