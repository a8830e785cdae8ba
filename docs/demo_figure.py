"""The README's demo picture (docs/demo.png) from a demo run's own figures: its real patches (the cohort's
sites and the first two test sites) above its MeDi samples, each under a one-line caption.

    python docs/demo_figure.py demo_out [--out docs/demo.png]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from medi_fast.demo.arms import MEDI
from medi_fast.demo.stages import SETTINGS


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo_out", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo.png")
    args = ap.parse_args()
    fig = args.demo_out / "figures"
    conf = args.demo_out / "demo_config.json"
    parts = [(None, fig / "real.png"),
             (f"{MEDI.name} samples, DDIM on ONNX Runtime (red: class x site never seen in training)",
              fig / f"{MEDI.recipe.folder}.png")]
    for p in (conf, *(p for _, p in parts)):
        if not p.is_file():
            raise SystemExit(f"{p} is missing; pass the folder of a finished `medi-fast demo` run")
    spec = SETTINGS[json.loads(conf.read_text())["setting"]]
    cohort, tests = spec.sites, spec.test_sites
    real, medi = (Image.open(p).convert("RGB") for _, p in parts)
    # Both grids share the label margin and the column pitch; the real one has the test sites after the cohort's.
    pitch = (real.width - medi.width) // len(tests)
    shown = tests[:2]
    real = real.crop((0, 0, medi.width + len(shown) * pitch, real.height))
    parts[0] = (f"real patches (training cohort {cohort[0]}-{cohort[-1]}; {', '.join(shown)}: two of the probe's "
                f"{len(tests)} unseen test sites)", None)
    images = [real, medi]
    head = 26
    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height + head for i in images)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for (caption, _), img in zip(parts, images):
        draw.text((8, y + 5), caption, fill="black", font=_font(15))
        canvas.paste(img, (0, y + head))
        y += img.height + head
    canvas.quantize(256).save(args.out, optimize=True)  # a doc picture: 256 colours keep it small
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
