"""The demo's result over seeds, per variant: is MeDi ahead of CLS, and CLS of real data alone, by more
than the spread over seeds, and away from the ceiling?

    python benchmarks/demo_seeds.py [--variants ring4,ring4-1to1,...] [--seeds 0,1,2] [--default-seeds 0,1,2,3,4,5,6]
                                    [--work .bench-tmp/demo_seeds]

A variant is a demo setting with some DemoConfig fields changed (VARIANTS): the demo's default and the
variants it was chosen over.  Each (variant, seed) is `medi-fast demo --setting S --seed N` (the library's
`run_demo`, the full configuration) into WORK/<variant>/seed-<N>, except that

* a run whose results.json is already there with the same configuration is reused (an interrupted
  benchmark resumes), and
* a variant that differs from a finished run under WORK only in how the probe is evaluated (k, probe
  ratio, repeats) is evaluated again from that run's cohort and synthetic patches (`reevaluate`): the same
  models and patches, no retraining.  Its minutes are the source run's.

A variant tested on more than two sites is also scored on its first two alone, from the same probe runs'
per-site accuracies: how much the number of test sites decides the result, on the same models.

Per variant it writes WORK/<variant>/report.md (the `--seeds` report) and, for all variants,
benchmarks/results/demo_seeds.json: per (variant, arm) the mean, SD and range over seeds of the TSS-averaged
balanced accuracy, the gaps, the per-cell FID-style distances, MeDi's stain slope and the minutes per run;
per variant also each arm's mean seconds to make its training data (`arm_seconds`).  Variants left out of
--variants keep their recorded results, marked `carried_from` (when and where they ran).
`shipped` marks the demo's default.  The default's models (the default and its probe-only variants) run
over --default-seeds, the other variants over --seeds.  Seeds 5 and 6 of the default are a held-out check:
its test sites were chosen without them.  Each full run takes 8-17 minutes on 2 cores, as fast as the
machine is that hour.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402

from medi_fast.demo import DemoConfig, run_demo  # noqa: E402
from medi_fast.demo.run import EVALUATION_FIELDS, reevaluate, same_config  # noqa: E402
from medi_fast.demo.arms import HEADLINE  # noqa: E402
from medi_fast.demo.seeds import aggregate, gaps, write_seeds_report  # noqa: E402
from medi_fast.demo.stages import SETTINGS  # noqa: E402

# name: (setting, DemoConfig fields changed from the demo's defaults).  The first is the demo's default.
VARIANTS = {
    "ring4": ("ring4", {}),
    "ring4-1to1": ("ring4", {"probe_ratio": 1.0}),
    # The default in fp32 on any CPU (`--precision fp32`): the default's result before it trained and generated
    # in bf16 where the CPU has bf16 units; the two must give the same result over seeds.
    "ring4-fp32": ("ring4", {"precision": "fp32"}),
    "two-class-epsilon-1to1": ("two-class", {"prediction_type": "epsilon", "probe_ratio": 1.0}),
}
SHIPPED = next(iter(VARIANTS))


def variant_config(name: str, quick: bool = False) -> DemoConfig:
    setting, changes = VARIANTS[name]
    return replace(DemoConfig.from_options(quick=quick, setting=setting), **changes)


def describe(cfg: DemoConfig, test_sites: list[str]) -> str:
    return (f"setting `{cfg.setting}`, {cfg.prediction_type} models, probe k = {cfg.probe_k} real + "
            f"{cfg.probe_ratio:g}:1 synthetic per class, tested on {len(test_sites)} unseen sites "
            f"({', '.join(test_sites)})")


def same_models(a: DemoConfig, b: DemoConfig) -> bool:
    """Do a and b train the same models and make the same patches (they may probe them differently)?"""
    return replace(a, **{f: getattr(b, f) for f in EVALUATION_FIELDS}) == b


def scored_on(record: dict, sites: list[str]) -> dict:
    """The run's record with each arm's TSS-averaged accuracy taken over `sites` alone (the mean of those
    sites' balanced accuracies, as the probe would have scored on a test set of only those sites)."""
    probe = {a: {**v, "tss_bacc": sum(record["probe_sites"][a][s] for s in sites) / len(sites)}
             for a, v in record["probe"].items()}
    return {**record, "probe": probe}


def _finished(path: Path) -> dict | None:
    conf, res = path / "demo_config.json", path / "results.json"
    return json.loads(conf.read_text()) if conf.is_file() and res.is_file() else None


def run_one(cfg: DemoConfig, work: Path) -> dict:
    out = Path(cfg.out)
    res = out / "results.json"
    recorded = _finished(out)
    if recorded is not None and same_config(recorded, cfg):
        print(f"== reusing {out}", flush=True)
        return json.loads(res.read_text())
    for source in sorted(work.glob(f"*/{out.name}")):
        rec = _finished(source) if source.resolve() != out.resolve() else None
        if (rec is not None and same_config(rec, cfg, ignore=EVALUATION_FIELDS)
                and "reevaluated_from" not in json.loads((source / "results.json").read_text())):
            print(f"== re-evaluating {source} -> {out}", flush=True)
            reevaluate(cfg, source, overwrite=True)
            return json.loads(res.read_text())
    print(f"== demo --setting {cfg.setting} --seed {cfg.seed} -> {out}", flush=True)
    run_demo(cfg, overwrite=True)
    return json.loads(res.read_text())


def carry_over(names: list[str], quick: bool) -> dict:
    """The variants of the recorded results/demo_seeds.json that this run leaves out (--variants), kept
    as they were, each marked with when and on which machine it ran (`carried_from`)."""
    path = RESULTS / "demo_seeds.json"
    if not path.is_file():
        return {"variants": {}, "rows": []}
    old = json.loads(path.read_text())
    if bool(old.get("quick")) != quick:
        return {"variants": {}, "rows": []}
    mark = {"time_utc": old["machine"].get("time_utc"), "cpu": old["machine"].get("cpu"), "command": old.get("command")}
    keep = {label: {**v, "carried_from": v.get("carried_from", mark)} for label, v in old["variants"].items()
            if label.split(" on ")[0] not in names}
    return {"variants": keep, "rows": [r for r in old["rows"] if r["variant"] in keep]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the variants with other models than the default's")
    ap.add_argument("--default-seeds", default="0,1,2,3,4,5,6",
                    help="seeds of the default and of the variants that differ from it only in the probe")
    ap.add_argument("--work", default=".bench-tmp/demo_seeds", help="where the demo runs go (reused when present)")
    ap.add_argument("--quick", action="store_true", help="--quick demo runs (a smoke test of this script)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    default_seeds = [int(s) for s in args.default_seeds.split(",")]
    names = [s.strip() for s in args.variants.split(",") if s.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    work = Path(args.work)
    rows, per_variant = [], {}
    for name in names:
        base = variant_config(name, args.quick)
        own = default_seeds if same_models(base, variant_config(SHIPPED, args.quick)) else seeds
        records = [run_one(replace(base, out=str(work / name / f"seed-{s}"), seed=s), work) for s in own]
        write_seeds_report(work / name, base, records)
        test_sites = list(SETTINGS[base.setting].test_sites)
        scorings = [(name, records, test_sites)]
        if len(test_sites) > 2:
            scorings.append((f"{name} on {', '.join(test_sites[:2])}", [scored_on(r, test_sites[:2]) for r in records],
                             test_sites[:2]))
        for label, recs, sites in scorings:
            agg = aggregate(recs)
            per_variant[label] = {**agg, "records": recs, "k": base.probe_k, "setting": base.setting,
                                  "prediction_type": base.prediction_type, "probe_ratio": base.probe_ratio,
                                  "precision": base.precision,
                                  "test_sites": sites, "description": describe(base, sites),
                                  "summary": SETTINGS[base.setting].summary,
                                  "reevaluated": any("reevaluated_from" in r for r in recs), "rescored": label != name}
            st = agg["stats"]
            for col in (*agg["arms"], *(g.column for g in gaps(recs)), f"cell distance {HEADLINE.hi}",
                        f"cell distance {HEADLINE.lo}", "stain slope", "minutes"):
                rows.append({"variant": label, "setting": base.setting, "shipped": label == SHIPPED, "measure": col,
                             "seeds": len(own), **{k: round(v, 4) for k, v in st[col].items()}})
            print(f"== {label}: " + ", ".join(f"{a} {st[a]['mean']:.3f} ± {st[a]['sd']:.3f}" for a in agg["arms"]),
                  flush=True)
    carried = carry_over(names, args.quick)
    for label, v in carried["variants"].items():
        per_variant.setdefault(label, v)
    rows += [r for r in carried["rows"] if r["variant"] not in {x["variant"] for x in rows}]
    write_results("demo_seeds", rows, extra={"seeds": seeds, "default_seeds": default_seeds, "quick": args.quick,
                                             "variants": per_variant})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
