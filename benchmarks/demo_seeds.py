"""The demo's result over seeds, per setting: is MeDi ahead of CLS, and CLS of real data alone, by more
than the spread over seeds, and away from the ceiling?

    python benchmarks/demo_seeds.py [--settings ring4,two-class] [--seeds 0,1,2] [--work .bench-tmp/demo_seeds]

Runs `medi-fast demo --setting S --seed N` (the library's `run_demo`, the full configuration) for every
setting and seed into WORK/<setting>/seed-<N>; a run whose results.json is already there with the same
configuration is reused, so an interrupted benchmark resumes.  Per setting it writes WORK/<setting>/report.md
(the `--seeds` report) and, for all settings, benchmarks/results/demo_seeds.json: per (setting, arm) the mean,
SD and range over seeds of the TSS-averaged balanced accuracy, the gaps, the per-cell FID-style distances,
MeDi's stain slope and the minutes per run.  `shipped` marks the demo's default setting.  Each full run
takes about 10 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from medi_fast.demo import DEFAULT_SETTING, SETTINGS, DemoConfig, run_demo  # noqa: E402
from medi_fast.demo.seeds import ARMS, aggregate, write_seeds_report  # noqa: E402


def same_run(recorded: dict, cfg: DemoConfig) -> bool:
    """Did the recorded run have this configuration?  A setting added to DemoConfig after the run was
    recorded counts as the same when it has its default value (the run could not have differed)."""
    want = json.loads(json.dumps(asdict(cfg)))
    default = json.loads(json.dumps(asdict(DemoConfig())))
    return (all(k in want and want[k] == v for k, v in recorded.items())
            and all(want[k] == default[k] for k in want if k not in recorded))


def run_one(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    res, conf = out / "results.json", out / "demo_config.json"
    if res.exists() and conf.exists() and same_run(json.loads(conf.read_text()), cfg):
        print(f"== reusing {out}", flush=True)
        return json.loads(res.read_text())
    print(f"== demo --setting {cfg.setting} --seed {cfg.seed} -> {out}", flush=True)
    run_demo(cfg, overwrite=True)
    return json.loads(res.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated demo settings")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", default=".bench-tmp/demo_seeds", help="where the demo runs go (reused when present)")
    ap.add_argument("--quick", action="store_true", help="--quick demo runs (a smoke test of this script)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    rows, per_setting = [], {}
    for name in settings:
        base = DemoConfig.from_options(quick=args.quick, setting=name)
        records = [run_one(replace(base, out=str(Path(args.work) / name / f"seed-{s}"), seed=s)) for s in seeds]
        write_seeds_report(Path(args.work) / name, base, records)
        agg = aggregate(records)
        per_setting[name] = {**agg, "records": records, "k": base.probe_k, "summary": SETTINGS[name].summary}
        st = agg["stats"]
        for col in (*ARMS, "MeDi - CLS", "CLS - no-synthetic", "cell distance MeDi", "cell distance CLS",
                    "stain slope", "minutes"):
            rows.append({"setting": name, "shipped": name == DEFAULT_SETTING, "measure": col,
                         "seeds": len(seeds), **{k: round(v, 4) for k, v in st[col].items()}})
        print(f"== {name}: " + ", ".join(f"{a} {st[a]['mean']:.3f} ± {st[a]['sd']:.3f}" for a in ARMS), flush=True)
    write_results("demo_seeds", rows, extra={"seeds": seeds, "quick": args.quick, "settings": per_setting})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
