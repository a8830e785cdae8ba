"""Training throughput: medi-fast's trainer beside a reference-style loop, same data, model and batch.

Reference style (the published MeDi training script's structure): diffusers UNet2DModel with a class
embedding, a DataLoader decoding one JPEG per item with PIL (resize + normalise per image),
WeightedRandomSampler (class-balanced), DDPMScheduler.add_noise, AdamW, grad clipping, diffusers'
EMAModel, fp16 autocast + GradScaler where CUDA exists (fp32 on CPU).
Ours: `medi_fast.training.loop.train` on a memory-mapped pack (uint8 NCHW, one gather per batch),
bf16 autocast + channels_last on CUDA.

Both are timed the same way, by benchmarks/_common.alternate with one clock (time.perf_counter).
A training run has fixed costs (model and optimiser built, loader workers started; ours also writes
its run directory and final checkpoint) that say nothing about steps per second, so each loop runs
twice per round from a fresh start, once for --warmup steps and once for --warmup + --steps, and its
time for --steps steps is the difference within the round.  The four runs alternate (after one
untimed short run of each); the ratio is ours / reference steps per second, best round against best
round and as the median and range of the same-round ratios; the range says how much of it this
(shared, noisy) machine decides.  Writes benchmarks/results/training_throughput.json.

    python benchmarks/training_throughput.py --preset tiny-32 --resolution 32 --batch-size 32 --steps 30 --rounds 5
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, compare, within_noise, write_results  # noqa: E402


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


def reference_loop(df, preset, resolution, batch, steps, workers, device) -> float:
    """A complete reference-style run of ``steps`` steps from a fresh start; returns the last loss."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    classes = sorted(df["class"].unique())
    labels = [classes.index(c) for c in df["class"]]
    counts = np.bincount(labels)
    weights = torch.as_tensor([1.0 / counts[y] for y in labels], dtype=torch.double)
    ds = JpegDataset(df["path"], labels, resolution)
    # draws the run's indices when the loader starts: exactly as many as the run needs
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=steps * batch, replacement=True)
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
    for _ in range(steps):
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
        last = loss.item()  # the reference logs the loss every step
    del it  # stops the loader's workers
    if device.type == "cuda":
        torch.cuda.synchronize()
    return last


def our_loop(pack, preset_name, resolution, batch, steps, workers, device, out) -> float:
    """A complete run of `medi_fast.training.loop.train` for ``steps`` steps into the fresh ``out``."""
    from medi_fast.training.config import TrainConfig
    from medi_fast.training.loop import train

    cfg = TrainConfig(data=str(pack), condition="class", preset=preset_name, resolution=resolution, batch_size=batch,
                      steps=steps, out=str(out), workers=workers, checkpoint_every=steps, grid_every=0,
                      device=device.type)
    loss = train(cfg)["loss"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss


REFERENCE = "reference-style (UNet2DModel, per-image JPEG DataLoader)"
OURS = "medi-fast trainer (pack, fused gather)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-32")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed steps: the long run's steps beyond the short run's")
    ap.add_argument("--warmup", type=int, default=5, help="steps of the short run (also the untimed first run)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs both loops once, alternating")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n-per-combo", type=int, default=32)
    ap.add_argument("--threads", type=int, help="torch threads of both loops (default: torch's own choice); on a "
                    "CPU shared with other jobs, 1 avoids the threads waiting for each other")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from medi_fast.model import get_preset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = get_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        df, pack = make_data(tmp, args.resolution, args.n_per_combo)
        runs = itertools.count()

        def ref(steps):
            return reference_loop(df, preset, args.resolution, args.batch_size, steps, args.workers, device)

        def ours(steps):  # a fresh run directory each time (an existing one would be refused)
            return our_loop(pack, args.preset, args.resolution, args.batch_size, steps, args.workers, device,
                            tmp / f"run{next(runs)}")

        short, long_ = args.warmup, args.warmup + args.steps
        fns = {(REFERENCE, short): lambda: ref(short), (REFERENCE, long_): lambda: ref(long_),
               (OURS, short): lambda: ours(short), (OURS, long_): lambda: ours(long_)}
        timings = alternate({f"{loop} x{n}": fn for (loop, n), fn in fns.items()}, args.rounds,
                            warmup_fns={f"{loop} x{n}": fns[loop, short] for loop, n in fns})
    wall = {loop: [b - a for a, b in zip(timings.wall[f"{loop} x{short}"], timings.wall[f"{loop} x{long_}"])]
            for loop in (REFERENCE, OURS)}  # per round: the time of --steps steps, fixed costs cancelled
    if min(min(v) for v in wall.values()) <= 0:
        raise SystemExit(f"a run of {long_} steps was not slower than one of {short}: the machine's noise exceeds "
                         f"the work; raise --steps")
    rows = []
    for label, c in compare(wall, REFERENCE).items():
        lo, hi = c["ratio_per_round_range"]
        sps = args.steps / c["seconds"]
        rows.append({"loop": label, "shipped": label == OURS, "steps": args.steps,
                     "seconds": round(c["seconds"], 3), "seconds_per_round": [round(t, 3) for t in c["seconds_per_round"]],
                     f"run_s_{short}_steps": [round(t, 3) for t in timings.wall[f"{label} x{short}"]],
                     f"run_s_{long_}_steps": [round(t, 3) for t in timings.wall[f"{label} x{long_}"]],
                     "steps_per_s": round(sps, 4), "images_per_s": round(sps * args.batch_size, 2),
                     "ratio": round(c["ratio_best"], 3), "ratio_per_round_median": round(c["ratio_per_round_median"], 3),
                     "ratio_per_round_range": [round(lo, 3), round(hi, 3)], "within_noise": within_noise(c)})
    print(f"device {device}, preset {args.preset} at {args.resolution} px, batch {args.batch_size}, runs of "
          f"{args.warmup + args.steps} minus runs of {args.warmup} steps, {args.rounds} alternating rounds, "
          f"{args.workers} workers")
    print(f"{'loop':60s} {'steps/s':>9s} {'img/s':>9s} {'best':>6s} {'rounds: median (range)':>24s}")
    for r in rows:
        lo, hi = r["ratio_per_round_range"]
        print(f"{r['loop']:60s} {r['steps_per_s']:9.3f} {r['images_per_s']:9.1f} {r['ratio']:6.2f} "
              f"{r['ratio_per_round_median']:10.2f} ({lo:.2f}-{hi:.2f})")
    if rows[-1]["within_noise"]:
        print("the same-round ratios fall on both sides of 1: the difference is inside this machine's noise")
    path = write_results("training_throughput", rows, {"args": vars(args), "device": str(device),
                                                       "torch_threads": torch.get_num_threads()}, timing=timings)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
