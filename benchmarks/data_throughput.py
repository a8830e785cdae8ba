"""Data throughput: synthetic-set rendering at 64 px, and reading patches at 128 px from a pack versus
the JPEG-decoding index reader (the baseline, measured in the same run).

    .venv/bin/python benchmarks/data_throughput.py [--synth-n 1024] [--read-n 512] [--repeats 3]

Prints one table and writes benchmarks/results/data_throughput.json.  Every timing goes through
benchmarks/_common.alternate: one untimed run of each candidate, then --repeats alternating rounds
(the three readers side by side); rates are wall-clock patches/s of the best round, ratios best
against best and the median of the same-round ratios.  CPU-time rates (this process) are given beside
them because the machine may be shared (its load average is recorded in the JSON).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, compare, write_results  # noqa: E402

from medi_fast.data.dataset import open_dataset  # noqa: E402
from medi_fast.data.index import build_index, write_index  # noqa: E402
from medi_fast.data.pack import pack_index  # noqa: E402
from medi_fast.data.synth import SynthConfig, render_dataset, render_patches  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synth-n", type=int, default=1024, help="patches rendered at 64 px")
    ap.add_argument("--read-n", type=int, default=512, help="patches in the 128 px read test")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="batch size of the pack's get_batch")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per = max(1, args.synth_n // 4)
        cfg = SynthConfig.confounded(classes=("LUAD", "LUSC"), n_per_combo=per, resolution=64)
        k = [0]

        def synth():
            k[0] += 1
            render_dataset(cfg, tmp / f"synth{k[0]}")

        synth_tasks = {"synth render_dataset (render + JPEG + write)": (synth, cfg.n_patches),
                       "synth render_patches only (4 classes)": (
                           lambda: [render_patches(c, "S1", 64, 64, seed=i)
                                    for i, c in enumerate(("LUAD", "LUSC", "KIRC", "DLBC") * 4)], 1024)}
        st = alternate({name: fn for name, (fn, _) in synth_tasks.items()}, args.repeats)  # warm-up: imports, caches
        for name, (_, n_synth) in synth_tasks.items():
            rows.append({"task": name, "px": 64, "n": n_synth, "shipped": True,
                         "patches_per_s": n_synth / min(st.wall[name]), "cpu_patches_per_s": n_synth / min(st.cpu[name])})

        # a 128 px set on disk: JPEG files (the index) and their pack
        per = max(1, args.read_n // 4)
        render_dataset(SynthConfig.confounded(n_per_combo=per, resolution=128), tmp / "r128")
        df = build_index(tmp / "r128", tmp / "r128" / "clinical.csv")
        write_index(df, tmp / "index.parquet")
        t0 = time.perf_counter()  # built once: a one-off cost, not an alternative
        pack_index(tmp / "index.parquet", 128, tmp / "pack")
        pack_s = time.perf_counter() - t0
        n = len(df)
        rng = np.random.default_rng(0)
        order = rng.permutation(n)  # a shuffled epoch, as a trainer reads

        ds_idx = open_dataset(tmp / "index.parquet", resolution=128)
        ds_pack = open_dataset(tmp / "pack")

        def read_items(ds):
            for i in order:
                ds[int(i)]

        def read_batches():
            for s in range(0, n, args.batch):
                ds_pack.get_batch(order[s:s + args.batch])

        baseline = "read: index (JPEG decode per item) [baseline]"
        readers = {baseline: lambda: read_items(ds_idx), "read: pack ds[i] per item": lambda: read_items(ds_pack),
                   f"read: pack get_batch({args.batch})": read_batches}
        rt = alternate(readers, args.repeats)
        for name, c in compare(rt.wall, baseline).items():
            lo, hi = c["ratio_per_round_range"]
            rows.append({"task": name, "px": 128, "n": n, "shipped": name != baseline,
                         "patches_per_s": n / c["seconds"], "cpu_patches_per_s": n / min(rt.cpu[name]),
                         "vs_baseline": c["ratio_best"], "vs_baseline_per_round_median": c["ratio_per_round_median"],
                         "vs_baseline_per_round_range": [lo, hi]})
        rows.append({"task": "pack build (decode + resize + write, threads)", "px": 128, "n": n, "shipped": True,
                     "patches_per_s": n / pack_s})

    print(f"{'task':<52} {'px':>4} {'n':>6} {'patches/s':>11} {'cpu-time/s':>11} {'vs base':>8}")
    for r in rows:
        vs = f"{r['vs_baseline']:.1f}x" if "vs_baseline" in r else ""
        cpu = f"{r['cpu_patches_per_s']:.0f}" if "cpu_patches_per_s" in r else ""
        print(f"{r['task']:<52} {r['px']:>4} {r['n']:>6} {r['patches_per_s']:>11.0f} {cpu:>11} {vs:>8}")
    path = write_results("data_throughput", rows, {"args": vars(args)}, timing=rt)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
