"""Render a demo report in headless Chromium, as a reader's browser shows it, to a PNG (docs/report.png).

    python docs/render_report.py demo_out/report.html [--out docs/report.png] [--width 1360] [--height N] [--colours 256]

Uses Debian's `chromium` (installed with apt-get if no Chromium or Chrome is on the PATH; needs root
or sudo).  The page is opened from disk with the network switched off, so a picture that is not
embedded or beside the page shows up broken.  Without --height the whole page is captured: its
height is measured first by loading a copy of it that writes the height into its title.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
         "--no-first-run", "--disable-extensions", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>")


def browser() -> str:
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print("no Chromium on the PATH; installing Debian's chromium with apt-get", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(sudo + ["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"], check=True, env=env)
    found = next((shutil.which(n) for n in BROWSERS if shutil.which(n)), None)
    if not found:
        raise SystemExit("apt-get installed chromium but no browser is on the PATH")
    return found


def page_height(exe: str, page: Path, width: int) -> int:
    """Load a copy of the page (beside it, so relative pictures still resolve) that puts its height in the title."""
    probe = "<script>window.addEventListener('load',()=>{document.title='height:'+document.documentElement.scrollHeight})</script>"
    with tempfile.NamedTemporaryFile("w", suffix=".html", dir=page.parent, delete=False) as f:
        f.write(page.read_text().replace("</body>", probe + "</body>"))
    try:
        dom = subprocess.run([exe, *FLAGS, f"--window-size={width},1000", "--virtual-time-budget=5000", "--dump-dom",
                              Path(f.name).resolve().as_uri()], check=True, capture_output=True, text=True, timeout=120).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"<title>height:(\d+)</title>", dom)
    if not m:
        raise SystemExit("could not measure the page height; pass --height")
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", nargs="?", default="demo_out/report.html")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "report.png"))
    ap.add_argument("--width", type=int, default=1360)
    ap.add_argument("--height", type=int, help="capture only the top N px (default: the whole page)")
    ap.add_argument("--colours", type=int, default=256,
                    help="save as a palette PNG of this many colours (a third of the size; 0: full colour)")
    args = ap.parse_args()
    page = Path(args.report).resolve()
    if not page.is_file():
        raise SystemExit(f"{page} does not exist; run `medi-fast demo` first")
    exe = browser()
    height = args.height or page_height(exe, page, args.width)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, *FLAGS, f"--window-size={args.width},{height}", "--virtual-time-budget=5000",
                    f"--screenshot={out}", page.as_uri()], check=True, capture_output=True, timeout=120)
    if args.colours:
        from PIL import Image

        with Image.open(out) as im:
            shot = im.convert("RGB").quantize(colors=args.colours, dither=Image.Dither.NONE)
        shot.save(out, optimize=True)
    print(f"wrote {out} ({args.width} x {height} px) with {Path(exe).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
