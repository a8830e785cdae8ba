"""The FID network: InceptionV3 pool3 (2048-d), the TF-FID variant of pytorch-fid and torch-fidelity.

It is torchvision's Inception3 with the blocks the 2015 TensorFlow graph computes differently
(pytorch-fid's ``FIDInceptionA/C/E_1/E_2``): average pooling that ignores the zero padding
(``count_include_pad=False``) and a max pool in the last block.  Weights come ONLY from a local
file: ``--inception-weights PATH`` or the usual names in the torch hub checkpoint cache
(``pt_inception-2015-12-05-6726825d.pth`` from pytorch-fid, ``weights-inception-2015-12-05-6726825d.pth``
from torch-fidelity).  Nothing is downloaded.

Image protocol (pytorch-fid's): uint8 (H, W, 3) -> float in [0, 1] -> bilinear resize to 299x299
(``align_corners=False``, no antialiasing) -> ``2x - 1`` -> network -> global average pool -> 2048-d.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MediFastError

WEIGHT_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
FID_DIM = 2048
FID_SIZE = 299  # the TF graph's input size


def _tv():
    import torchvision.models.inception as tv

    return tv


def _avg3(x):  # TF's average pool excludes the padding from the mean
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _blocks():
    tv = _tv()

    class FIDInceptionA(tv.InceptionA):
        def forward(self, x):
            b1 = self.branch1x1(x)
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([b1, b5, b3, self.branch_pool(_avg3(x))], 1)

    class FIDInceptionC(tv.InceptionC):
        def forward(self, x):
            b1 = self.branch1x1(x)
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
                d = m(d)
            return torch.cat([b1, b7, d, self.branch_pool(_avg3(x))], 1)

    class FIDInceptionE(tv.InceptionE):
        pool = "avg"  # E_1 (Mixed_7b): average pool without padding; E_2 (Mixed_7c): max pool

        def forward(self, x):
            b1 = self.branch1x1(x)
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            p = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            return torch.cat([b1, b3, d, self.branch_pool(p)], 1)

    class FIDInceptionE2(FIDInceptionE):
        pool = "max"

    return FIDInceptionA, FIDInceptionC, FIDInceptionE, FIDInceptionE2


def fid_inception_v3(init_weights: bool = True) -> nn.Module:
    """The TF-FID InceptionV3 with torchvision's (random) initialisation; same state-dict keys as the
    pytorch-fid weights file.  ``init_weights=False`` skips the (slow) initialisation before a load."""
    tv = _tv()
    A, C, E1, E2 = _blocks()
    net = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=init_weights)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = A(192, pool_features=32), A(256, pool_features=64), A(288, pool_features=64)
    net.Mixed_6b, net.Mixed_6c = C(768, channels_7x7=128), C(768, channels_7x7=160)
    net.Mixed_6d, net.Mixed_6e = C(768, channels_7x7=160), C(768, channels_7x7=192)
    net.Mixed_7b, net.Mixed_7c = E1(1280), E2(2048)
    return net


def default_weight_dirs() -> list[Path]:
    """Where cached weights are looked for: the torch hub checkpoint cache (``$TORCH_HOME``)."""
    return [Path(torch.hub.get_dir()) / "checkpoints"]


def find_weights(path=None) -> Path:
    """An explicit file, else the first known file name in the torch hub cache; else one clear line."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MediFastError(f"Inception weights file {p} does not exist; pass the path of "
                                f"{WEIGHT_FILES[0]} (pytorch-fid) or {WEIGHT_FILES[1]} (torch-fidelity)")
        return p
    env = os.environ.get("MEDI_FAST_INCEPTION_WEIGHTS")
    if env:
        return find_weights(env)
    for d in default_weight_dirs():
        for name in WEIGHT_FILES:
            if (d / name).is_file():
                return d / name
    raise MediFastError(f"FID Inception weights not found (nothing is downloaded); put {WEIGHT_FILES[0]} in "
                        f"{default_weight_dirs()[0]} or pass --inception-weights PATH")


def load_state(net: nn.Module, path: Path) -> None:
    """Load a state dict strictly (only BatchNorm step counters may be absent)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MediFastError(f"cannot read Inception weights {path} ({type(e).__name__}); pass the original "
                            f"{WEIGHT_FILES[0]} file") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise MediFastError(f"{path} is not an FID InceptionV3 state dict ({what}); pass {WEIGHT_FILES[0]} "
                            f"(pytorch-fid) or {WEIGHT_FILES[1]} (torch-fidelity)")


class FIDInception(nn.Module):
    """float (B, 3, H, W) in [0, 1] -> pool3 features (B, 2048)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        n = net
        self.blocks = nn.Sequential(
            n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
            n.Conv2d_3b_1x1, n.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
            n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e,
            n.Mixed_7a, n.Mixed_7b, n.Mixed_7c, nn.AdaptiveAvgPool2d(1))

    def forward(self, x):  # (B, 3, H, W) in [0, 1]
        x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # the TF graph expects [-1, 1]
        return self.blocks(x).flatten(1)  # (B, 2048)


def build_fid_inception(weights=None, *, random_init: bool = False, seed: int = 0) -> FIDInception:
    """The FID network with weights from a local file (see :func:`find_weights`); ``random_init``
    (tests, demos) keeps torchvision's seeded random initialisation: features then mean nothing."""
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = fid_inception_v3()
    else:
        path = find_weights(weights)
        net = fid_inception_v3(init_weights=False)
        load_state(net, path)
    return FIDInception(net).eval().requires_grad_(False)


class InceptionExtractor:
    """Extractor ``uint8 (B, H, W, 3) -> float64 (B, 2048)`` with the FID network."""

    dim = FID_DIM

    def __init__(self, weights=None, device=None, batch_size: int = 50, random_init: bool = False, seed: int = 0):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_fid_inception(weights, random_init=random_init, seed=seed).to(self.device)
        self.batch_size = batch_size  # pytorch-fid's default
        self.name = "inception-random" if random_init else "inception"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1], as ToTensor does
            out.append(self.model(x).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim))
