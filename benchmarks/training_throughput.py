"""Training throughput: medi-fast's trainer beside a reference-style loop, same data, model and batch.

Reference style (the published MeDi training script's structure): diffusers UNet2DModel with a class
embedding, a DataLoader decoding one JPEG per item with PIL (resize + normalise per image),
WeightedRandomSampler (class-balanced), DDPMScheduler.add_noise, AdamW, grad clipping, diffusers'
EMAModel, fp16 autocast + GradScaler where CUDA exists (fp32 on CPU).
Ours: `medi_fast.training.loop.train` on a memory-mapped pack (uint8 NCHW, one gather per batch),
bf16 autocast + channels_last on CUDA.

Both time steps [warmup, warmup + steps) after the same warm-up; one run each; the ratio is
ours / reference steps per second.  Writes benchmarks/results/training_throughput.json.

    python benchmarks/training_throughput.py --preset tiny-32 --resolution 32 --batch-size 32 --steps 30
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402


def make_data(root: Path, resolution: int, n_per_combo: int):
    from medi_fast.data.index import build_index
    from medi_fast.data.pack import pack_index
    from medi_fast.data.synth import SynthConfig, render_dataset

    cfg = SynthConfig.full(("LUAD", "LUSC", "KIRC", "DLBC"), ("S1", "S2", "S3", "S4"), n_per_combo=n_per_combo,
                           resolution=max(64, resolution))
    render_dataset(cfg, root / "synth")
    df = build_index(root / "synth", root / "synth" / "clinical.csv")
    return df, pack_index(df, resolution, root / "pack")


class JpegDataset(torch.utils.data.Dataset):
    """Per-image JPEG decode + resize + normalise, as torchvision transforms would do."""

    def __init__(self, paths, labels, resolution):
        self.paths, self.labels, self.r = list(paths), list(labels), resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.open(self.paths[i]).convert("RGB").resize((self.r, self.r), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return x, self.labels[i]


def reference_loop(df, preset, resolution, batch, steps, warmup, workers, device) -> float:
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    classes = sorted(df["class"].unique())
    labels = [classes.index(c) for c in df["class"]]
    counts = np.bincount(labels)
    weights = torch.as_tensor([1.0 / counts[y] for y in labels], dtype=torch.double)
    ds = JpegDataset(df["path"], labels, resolution)
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=10**7, replacement=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                                         pin_memory=device.type == "cuda")
    cfg = preset.unet_config()
    cfg.pop("class_embed_type")
    cfg["sample_size"] = resolution
    torch.manual_seed(0)
    model = UNet2DModel(**cfg, num_class_embeds=len(classes)).to(device)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    ema.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    sched = DDPMScheduler(num_train_timesteps=1000)
    fp16 = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    it = iter(loader)
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x0, y = next(it)
        x0, y = x0.to(device), y.to(device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],), device=device)
        xt = sched.add_noise(x0, noise, t)
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            eps = model(xt, t, class_labels=y).sample
            loss = torch.nn.functional.mse_loss(eps.float(), noise)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        ema.step(model.parameters())
        loss.item()  # the reference logs the loss every step
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def our_loop(pack, preset_name, resolution, batch, steps, warmup, workers, device, out) -> float:
    from medi_fast.training.config import TrainConfig
    from medi_fast.training.loop import train
    from medi_fast.training.rundir import read_metrics

    total = warmup + steps
    cfg = TrainConfig(data=str(pack), condition="class", preset=preset_name, resolution=resolution, batch_size=batch,
                      steps=total, out=str(out), workers=workers, checkpoint_every=total, log_every=1, grid_every=0,
                      device=device.type)
    train(cfg)
    rows = read_metrics(Path(out) / "metrics.csv")
    t = {int(r["step"]): float(r["elapsed_s"]) for r in rows}
    return steps / (t[total] - t[warmup])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-32")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n-per-combo", type=int, default=32)
    args = ap.parse_args()
    from medi_fast.model import get_preset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = get_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        df, pack = make_data(tmp, args.resolution, args.n_per_combo)
        ref = reference_loop(df, preset, args.resolution, args.batch_size, args.steps, args.warmup, args.workers, device)
        ours = our_loop(pack, args.preset, args.resolution, args.batch_size, args.steps, args.warmup, args.workers,
                        device, tmp / "run")
    rows = [{"loop": "reference-style (UNet2DModel, per-image JPEG DataLoader)", "steps_per_s": round(ref, 4),
             "images_per_s": round(ref * args.batch_size, 2), "ratio": 1.0},
            {"loop": "medi-fast trainer (pack, fused gather)", "steps_per_s": round(ours, 4),
             "images_per_s": round(ours * args.batch_size, 2), "ratio": round(ours / ref, 3)}]
    print(f"device {device}, preset {args.preset} at {args.resolution} px, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup}, {args.workers} workers")
    print(f"{'loop':60s} {'steps/s':>9s} {'img/s':>9s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['loop']:60s} {r['steps_per_s']:9.3f} {r['images_per_s']:9.1f} {r['ratio']:6.2f}")
    path = write_results("training_throughput", rows, {"args": vars(args), "device": str(device)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
