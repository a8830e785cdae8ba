"""UNI embeddings: timm ViT-L/16 configured as UNI (Chen et al. 2024), weights from a local file.

Images enter as uint8, are resized to ``image_size`` (bilinear, antialiased), scaled to [0, 1] and
normalised with the ImageNet mean/std UNI was trained with.  (The MeDi reference code fed [-1, 1]
diffusion outputs straight into UNI; that shifts every embedding, so we do not.)  Batched; fp16
autocast on CUDA.  ``encoder`` selects another timm architecture through the same path (tests use
``vit_tiny_patch16_224``).  Embeddings are written as ONE parquet/npz file with the metadata columns.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import MediFastError

UNI_ENCODER = "vit_large_patch16_224"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WEIGHT_NAMES = ("pytorch_model.bin", "model.safetensors", "pytorch_model.safetensors")
EMB_PREFIX = "emb_"


def create_encoder(encoder: str = UNI_ENCODER, image_size: int = 224) -> torch.nn.Module:
    """The timm model, randomly initialised; UNI's settings for its ViT-L/16 (LayerScale 1e-5, no head,
    dynamic image size), the same head-less settings for any other timm name."""
    import timm

    kw = dict(num_classes=0, pretrained=False)
    if encoder.startswith("vit_"):
        kw.update(img_size=image_size, patch_size=16, init_values=1e-5, dynamic_img_size=True)
    try:
        return timm.create_model(encoder, **kw)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise MediFastError(f"unknown timm encoder {encoder!r} ({e}); pass a name from timm.list_models()") from None


def resolve_weights(path) -> Path:
    """A weights file, or a folder (e.g. a Hugging Face cache snapshot of MahmoodLab/UNI) holding one."""
    p = Path(path)
    if p.is_dir():
        found = [f for name in WEIGHT_NAMES for f in sorted(p.rglob(name))]
        if not found:
            raise MediFastError(f"no {' or '.join(WEIGHT_NAMES)} under {p}; pass the weights file with --weights")
        return found[0]
    if not p.is_file():
        raise MediFastError(f"encoder weights {p} do not exist (nothing is downloaded); download UNI's "
                            f"pytorch_model.bin from huggingface.co/MahmoodLab/UNI and pass it with --weights")
    return p


def load_weights(model: torch.nn.Module, path) -> None:
    p = resolve_weights(path)
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
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatch: another architecture's weights
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise MediFastError(f"{p} does not fit encoder {type(model).__name__} ({first}); pass --encoder matching "
                            f"the weights") from None
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise MediFastError(f"{p} does not fit encoder {type(model).__name__} ({what}, {len(missing)} missing, "
                            f"{len(unexpected)} unexpected); pass --encoder matching the weights")


class UNIEncoder:
    """Extractor ``uint8 (B, H, W, 3) -> float64 (B, D)`` with a timm encoder (UNI by default)."""

    def __init__(self, weights=None, encoder: str | None = None, device=None, batch_size: int = 64,
                 image_size: int = 224, random_init: bool = False, seed: int = 0):
        encoder = encoder or UNI_ENCODER
        if weights is None and not random_init:
            raise MediFastError("UNI needs local weights: pass --weights PATH (UNI's pytorch_model.bin or its "
                                "Hugging Face cache folder); nothing is downloaded")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random_init must be reproducible
            self.model = create_encoder(encoder, image_size)
        if not random_init:
            load_weights(self.model, weights)
        else:  # LayerScale's 1e-5 init would make a random ViT's output ignore its input; make it see it
            for m in self.model.modules():
                if hasattr(m, "gamma") and isinstance(m.gamma, torch.nn.Parameter):
                    m.gamma.data.fill_(1.0)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self.model.eval().requires_grad_(False).to(self.device)
        self.batch_size, self.image_size = batch_size, image_size
        self.name = encoder + ("-random" if random_init else "")
        self.dim = int(getattr(self.model, "num_features", 0))
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised float (B, 3, S, S)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = self.preprocess(images[i:i + self.batch_size])
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
                out.append(self.model(x).float().cpu().numpy().astype(np.float64))  # (B, D)
        return np.concatenate(out) if out else np.zeros((0, self.dim))


def save_embeddings(path, meta: pd.DataFrame, emb: np.ndarray, encoder: str = "") -> Path:
    """One file: metadata columns + ``emb_0000..`` (parquet) or arrays ``embeddings`` + columns (npz)."""
    from ..io import atomic_path

    path = Path(path)
    emb = np.asarray(emb, dtype=np.float32)
    if len(meta) != len(emb):
        raise MediFastError(f"{len(meta)} metadata rows but {len(emb)} embeddings; this is a bug, please report it")
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            cols = pd.DataFrame(emb, columns=[f"{EMB_PREFIX}{i:04d}" for i in range(emb.shape[1])])
            df = pd.concat([meta.reset_index(drop=True).astype(str), cols], axis=1)
            df.attrs = {}
            df.to_parquet(tmp, index=False)
        elif path.suffix == ".npz":
            arrays = {f"meta/{c}": meta[c].astype(str).to_numpy(dtype=str) for c in meta.columns}
            with open(tmp, "wb") as f:
                np.savez(f, embeddings=emb, encoder=np.array(encoder), **arrays)
        else:
            raise MediFastError(f"--out {path} must end in .parquet or .npz")
    return path


def load_embeddings(path) -> tuple[pd.DataFrame, np.ndarray]:
    """File from :func:`save_embeddings` -> (metadata DataFrame, float32 (N, D))."""
    path = Path(path)
    if not path.is_file():
        raise MediFastError(f"embeddings file {path} does not exist; make it with `medi-fast embed --out {path.name}`")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                meta = pd.DataFrame({k[5:]: z[k] for k in z.files if k.startswith("meta/")})
                return meta, z["embeddings"].astype(np.float32)
        df = pd.read_parquet(path)
    except (OSError, ValueError, KeyError) as e:
        raise MediFastError(f"cannot read embeddings {path} ({type(e).__name__}); recompute with `medi-fast embed`") from None
    cols = [c for c in df.columns if c.startswith(EMB_PREFIX)]
    if not cols:
        raise MediFastError(f"{path} has no {EMB_PREFIX}* columns; make it with `medi-fast embed`")
    meta = df[[c for c in df.columns if not c.startswith(EMB_PREFIX)]].astype(str)
    return meta, df[cols].to_numpy(np.float32)
