"""`generate` as a pipeline: I/O overlap and peak memory against the number of images.

1. **I/O overlap.** The same Generator, plan and backend, run (a) with no output directory (pure
   sampling) and (b) writing PNGs (+ manifest) into a fresh directory; the two alternate for --repeats
   rounds (benchmarks/_common.alternate).  Efficiency = t(pure) / t(with PNG), best round against best
   round and the median of the same-round ratios; 1.0 means writing is completely hidden behind sampling.
2. **Peak memory.** `medi-fast generate` run in a fresh process for n = --small and n = --large images
   (PNG output); peak RSS (ru_maxrss) of each process.  The run streams (bounded in-flight batches,
   manifest from the written rows), so the peak must not grow with n.

    python benchmarks/generate_pipeline.py                    # tiny-32 at 32 px
    python benchmarks/generate_pipeline.py --small 1000 --large 20000 --mem-steps 1

Writes benchmarks/results/generate_pipeline.json (with the machine description) and prints two tables.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, compare, write_results  # noqa: E402

from medi_fast import backends, plan as plans  # noqa: E402
from medi_fast.cli import main as cli  # noqa: E402
from medi_fast.generate import GenerateConfig, Generator  # noqa: E402

_CHILD = """
import json, resource, sys
from medi_fast.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc or 0, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def overlap(ckpt: Path, n: int, steps: int, batch: int, repeats: int, tmp: Path):
    info = backends.open_model(ckpt)
    gen = Generator(info, backends.create("torch", info), GenerateConfig(steps=steps, batch_size=batch),
                    progress=False)
    plan = plans.single(info.spec, {"class": "LUAD", "tss": "05"}, n, seed=0)
    runs = iter(range(10**6))

    def with_png():  # a fresh directory each time (an existing run would be skipped, not rewritten)
        out = tmp / f"run{next(runs)}"
        gen.run(plan, out)
        assert sum(1 for _ in out.rglob("*.png")) == n

    # warm-up: one batch's worth of each; then alternating rounds
    small = plan.shard(0, max(1, n // batch))
    timings = alternate({"pure": lambda: gen.run(plan), "with_png": with_png}, repeats,
                        warmup_fns={"pure": lambda: gen.run(small), "with_png": lambda: gen.run(small, tmp / "warm")})
    c = compare(timings.wall, "pure")["with_png"]  # speed of writing relative to pure sampling = efficiency
    tp, tw = min(timings.wall["pure"]), c["seconds"]
    return {"n": n, "steps": steps, "batch": batch, "shipped": True, "pure_s": round(tp, 4), "with_png_s": round(tw, 4),
            "pure_s_per_round": [round(t, 4) for t in timings.wall["pure"]],
            "with_png_s_per_round": [round(t, 4) for t in timings.wall["with_png"]],
            "pure_img_s": round(n / tp, 2), "with_png_img_s": round(n / tw, 2), "efficiency": round(c["ratio_best"], 4),
            "efficiency_per_round_median": round(c["ratio_per_round_median"], 4),
            "efficiency_per_round_range": [round(x, 4) for x in c["ratio_per_round_range"]]}, timings


def peak_memory(ckpt: Path, n: int, steps: int, batch: int, tmp: Path) -> dict:
    out = tmp / f"mem{n}"
    cmd = [sys.executable, "-c", _CHILD, "generate", str(ckpt), "--class", "LUAD", "--tss", "05", "--n", str(n),
           "--steps", str(steps), "--batch-size", str(batch), "--backend", "torch", "--out", str(out), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"generate n={n} failed: {proc.stderr.strip().splitlines()[-1:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    files = sum(1 for _ in out.rglob("*.png"))
    assert files == n, (files, n)
    return {"n": n, "steps": steps, "batch": batch, "shipped": True, "peak_rss_mib": res["maxrss_mib"],
            "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-32")
    ap.add_argument("--n", type=int, default=512, help="images per overlap run")
    ap.add_argument("--steps", type=int, default=5, help="DDIM steps in the overlap runs")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", type=int, default=1000, help="n of the first memory run")
    ap.add_argument("--large", type=int, default=20000, help="n of the second memory run")
    ap.add_argument("--mem-steps", type=int, default=1, help="DDIM steps in the memory runs")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ckpt = tmp / "ckpt.pt"
        cli(["init-checkpoint", "--preset", args.preset, "--classes", "LUAD,LUSC", "--tss", "05,44", "--out", str(ckpt)])
        ov, timings = overlap(ckpt, args.n, args.steps, args.batch, args.repeats, tmp)
        mem = [peak_memory(ckpt, n, args.mem_steps, args.batch, tmp) for n in (args.small, args.large)]
    growth = mem[1]["peak_rss_mib"] / mem[0]["peak_rss_mib"]
    print(f"I/O overlap ({args.preset}, {ov['n']} images, DDIM-{ov['steps']}, batch {ov['batch']}): "
          f"pure sampling {ov['pure_img_s']:.1f} img/s, with PNG writing {ov['with_png_img_s']:.1f} img/s, "
          f"efficiency {ov['efficiency']:.2f}")
    for m in mem:
        print(f"peak RSS n={m['n']:>6}: {m['peak_rss_mib']:.0f} MiB ({m['seconds']:.0f} s)")
    print(f"peak RSS ratio n={args.large} / n={args.small}: {growth:.3f}")
    path = write_results("generate_pipeline", [ov] + mem,
                         {"preset": args.preset, "overlap": ov, "memory": mem, "memory_ratio": growth,
                          "command": " ".join(["python", "benchmarks/generate_pipeline.py"] + sys.argv[1:])},
                         timing=timings)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
