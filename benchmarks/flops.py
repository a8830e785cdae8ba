"""FLOPs per UNet call (one sampler step) per preset, counted by torch's FlopCounterMode on the
meta device (no memory, no time).  2 FLOPs per multiply-accumulate.  These are the numbers in
``medi_fast.model.PRESETS[...].gflop_per_step``, used to report the fraction of a device's matmul
rate a backend reaches.

    python benchmarks/flops.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402


def main() -> int:
    from medi_fast.model import PRESETS, build_model, count_parameters

    rows = []
    for name, p in PRESETS.items():
        with torch.device("meta"):
            model = build_model(name, classes=["A", "B"], metadata={"tss": ["1", "2"]})
            x = torch.empty(2, 3, p.resolution, p.resolution)
            cond = {"class": torch.zeros(2, dtype=torch.long), "tss": torch.zeros(2, dtype=torch.long)}
            with FlopCounterMode(display=False) as fc:
                model(x, torch.zeros(2, dtype=torch.long), cond)
        gflop = fc.get_total_flops() / 2 / 1e9
        rows.append({"preset": name, "resolution": p.resolution, "params_M": round(count_parameters(model) / 1e6, 3),
                     "gflop_per_image_step": round(gflop, 3), "recorded_in_preset": p.gflop_per_step,
                     "gflop_per_image_ddim100": round(gflop * 100, 1)})
    for r in rows:
        print(f"{r['preset']:<10} {r['resolution']:>4} px  {r['params_M']:>8.3f} M params  "
              f"{r['gflop_per_image_step']:>9.3f} GFLOP/step  ({r['gflop_per_image_ddim100']} GFLOP per DDIM-100 image)")
    print(f"wrote {write_results('flops', rows, {'command': 'python benchmarks/flops.py'})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
