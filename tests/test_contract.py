"""The error contract as a property: every command, driven with generated bad inputs, ends in exactly one
stderr line `medi-fast: error: <what>; <fix>`, exit code 2, no traceback, and no new file anywhere.

Commands and their parameters are enumerated from ``medi_fast.cli.COMMANDS`` (groups such as ``data``
recursively), so a command added later is driven too.  Each example gives one or more parameters a bad
value of their type (files: missing, empty, a directory, truncated, bit-flipped, the wrong type, not
UTF-8; outputs: a path under a file; numbers: zero, negative, huge, NaN; names: unknown); the other
required parameters get a cheap valid value where one is known (``VALID``), else a bad value too.
``LEGIT`` lists the few (parameter, kind of value) pairs that are valid input, e.g. ``--seed 0``.

Examples are derandomized (the same on every run, so a failure reproduces exactly; hypothesis prints
the failing example) and bounded by ``MAX_EXAMPLES`` per command.
"""
from __future__ import annotations

import math
import os
import signal
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medi_fast.cli import COMMANDS, cli, main

MAX_EXAMPLES = int(os.environ.get("MEDI_FAST_CONTRACT_EXAMPLES", "30"))
# A command that runs longer than this accepted a bad input (every valid default below is tiny).
EXAMPLE_TIMEOUT_S = 60


def command_paths() -> list[tuple[str, ...]]:
    """Every runnable command, e.g. ('generate',), ('data', 'index')."""
    ctx = click.Context(cli)
    out = []

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            sub = click.Context(cmd, parent=ctx)
            for name in cmd.list_commands(sub):
                walk(cmd.get_command(sub, name), path + (name,))
        else:
            out.append(path)

    for name in COMMANDS:
        walk(cli.get_command(ctx, name), (name,))
    return out


def command_of(path: tuple[str, ...]) -> click.Command:
    cmd = cli
    ctx = click.Context(cli)
    for name in path:
        cmd = cmd.get_command(ctx, name)
        ctx = click.Context(cmd, parent=ctx)
    return cmd


OUTPUT_NAMES = {"out", "out_dir", "out_csv", "out_md", "runs_csv", "save_real_stats", "save_fake_stats", "fid_stats",
                "json_path"}


def is_output(p: click.Parameter) -> bool:
    return p.name in OUTPUT_NAMES or p.name.startswith("out_") or p.name.startswith("save_")


def kind_of(p: click.Parameter) -> str:
    t = p.type
    if is_output(p):
        return "output"
    if isinstance(t, click.Path):
        return "input"
    if isinstance(t, click.Choice):
        return "choice"
    if isinstance(t, (click.types.IntParamType, click.IntRange)):
        return "int"
    if isinstance(t, (click.types.FloatParamType, click.FloatRange)):
        return "float"
    if isinstance(t, click.types.BoolParamType) or getattr(p, "is_flag", False):
        return "flag"
    return "name"


FAMILIES = {
    "input": ["missing", "empty", "directory", "truncated", "bitflip", "text", "png", "non-utf8", "header-only"],
    "output": ["under-a-file"],
    "int": ["zero", "negative", "huge", "enormous"],
    "float": ["nan", "inf", "negative", "huge"],
    "name": ["unknown", "empty-string", "garbage"],
    "choice": ["unknown"],
    "flag": [],
}
NUMBERS = {"zero": "0", "negative": "-1", "huge": str(10**12), "enormous": str(10**30), "nan": "nan", "inf": "inf"}
NAMES = {"unknown": "nonexistent-xyz", "empty-string": "", "garbage": "%%,//,=="}

# (command, parameter) -> kinds of value that are valid input there (documented meaning, not a hole).
_SEEDS = {"zero", "huge"}
LEGIT: dict[tuple[str, str], set[str]] = {
    # generate's per-image seeds, a split's shuffle and the probe's draws take 0 .. 2**63-1
    ("generate", "seed"): _SEEDS, ("data split", "seed"): _SEEDS, ("probe", "seed"): _SEEDS,
    ("shortcut", "seed"): {"zero"},  # scikit-learn's random_state: 0 .. 2**32-1
    # numpy- and torch-seeded commands take 0 .. 2**32-1
    ("init-checkpoint", "seed"): {"zero"}, ("data synth", "seed"): {"zero"}, ("data synth", "appearance_seed"): {"zero"},
    ("train", "seed"): {"zero"}, ("demo", "seed"): {"zero"},
    ("generate", "eta"): {"zero"}, ("generate", "age"): {"zero"},  # the values are legal; age checked vs model
    ("probe", "max_runs"): {"zero"},  # 0 = all site combinations
    ("train", "workers"): {"zero"}, ("train", "cond_drop"): {"zero"},
    ("train", "weight_decay"): {"zero"}, ("train", "ema_warmup"): {"zero"},
    ("train", "ema_decay"): {"zero"},
    # intervals and caps: a huge one means "never" or "all", which is what was asked
    ("train", "keep_last"): {"huge", "enormous"}, ("train", "checkpoint_every"): {"huge", "enormous"},
    ("train", "log_every"): {"huge", "enormous"}, ("train", "ema_power"): {"huge"}, ("train", "ema_inv_gamma"): {"huge"},
    ("train", "grad_clip"): {"zero", "huge"}, ("train", "grid_rows"): {"huge", "enormous"},
    ("train", "grid_cols"): {"huge", "enormous"},  # caps: at most the classes / sites there are
    ("train", "warmup"): {"zero", "huge"},  # >= 1: a number of steps
    ("generate", "batch_size"): {"huge", "enormous"},  # capped by the plan: --n 2 makes batches of 2
    ("generate", "classes"): {"empty-string"}, ("plan", "classes"): {"empty-string"},  # empty: the model's
    ("generate", "shard"): {"empty-string"},  # empty: the whole plan, as without --shard
    ("generate", "guidance"): {"huge"},  # no upper bound, as in diffusers: a large scale saturates the images
    ("train", "grid_every"): {"zero", "huge", "enormous"},
    ("export", "parity_steps"): {"zero"}, ("export", "optimization_level"): {"zero"},
    # free-form labels: any text names a site, a class list is checked against the model
    ("data synth", "sites"): {"unknown", "empty-string", "garbage"},  # ignored by the default confounded setting
    ("data synth", "train_sites"): {"unknown", "empty-string"},  # empty: the default
    ("data synth", "test_sites"): {"unknown", "empty-string"}, ("data synth", "n_test_per_combo"): {"zero"},
    ("data synth", "patches_per_slide"): {"huge", "enormous"},  # an upper bound: one slide holds them all
    ("init-checkpoint", "classes"): {"unknown"}, ("init-checkpoint", "tss"): {"unknown", "empty-string"},  # new vocabularies
    ("generate", "tss"): set(), ("info", "model"): set(),
    ("distill", "seed"): {"zero"}, ("distill", "ema_decay"): {"zero"},
    # edit takes generate's sampling options with their meanings
    ("edit", "seed"): _SEEDS, ("edit", "eta"): {"zero"}, ("edit", "guidance"): {"huge"},
    ("edit", "batch_size"): {"huge", "enormous"},
}


# Options that keep a run short should a bad input be accepted (the test then fails on exit 0, fast).
# "@name": that fixture's path.  Optional inputs (a model, training data) too, so a bad value meets the
# check that guards it instead of the refusal of a missing model.
CHEAP: dict[tuple[str, ...], dict[str, str]] = {
    ("train",): {"data": "@parquet", "steps": "2", "batch_size": "2", "grid_every": "0", "workers": "0",
                 "device": "cpu", "preset": "tiny-32", "checkpoint_every": "2", "condition": "class,tss"},
    ("generate",): {"model": "@ckpt", "n": "2", "steps": "2"},
    ("edit",): {"model": "@ckpt", "steps": "2", "to": "class=LUAD"},
    ("plan",): {"model": "@ckpt"},
    ("info",): {"model": "@ckpt"},
    ("distill",): {"teacher": "@ckpt", "data": "@parquet", "steps": "1", "teacher_steps": "2", "iters_per_stage": "1",
                   "batch_size": "2", "device": "cpu"},
}


def max_examples(path: tuple[str, ...]) -> int:
    """More examples for commands with more ways to be wrong."""
    return max(MAX_EXAMPLES, len(candidates(path)) // 4)


@dataclass
class Fixtures:
    root: Path  # input files (read-only for the commands)
    ckpt: Path
    index: Path  # CSV
    parquet: Path
    clinical: Path
    synth: Path

    def file(self, family: str, suffix: str) -> Path:
        d = self.root / "bad"
        d.mkdir(exist_ok=True)
        p = d / f"{family}{suffix}"
        if family == "missing":
            return self.root / "missing" / f"nope{suffix}"
        if p.exists():
            return p
        data = self.ckpt.read_bytes()
        if family == "directory":
            p.mkdir()
        elif family == "empty":
            p.write_bytes(b"")
        elif family == "truncated":
            p.write_bytes(data[: len(data) // 2])
        elif family == "bitflip":
            flipped = bytearray(data)
            for k in range(len(flipped) // 3, len(flipped) // 3 + 64):
                flipped[k] ^= 0xFF
            p.write_bytes(bytes(flipped))
        elif family == "text":
            p.write_text("hello, world\nthis is not the file you want\n")
        elif family == "png":
            from PIL import Image

            Image.new("RGB", (4, 4)).save(p, format="PNG")
        elif family == "non-utf8":
            p.write_bytes(b"class,tissue_source_site,count\n\xff\xfe\xfa,05,1\n")
        elif family == "header-only":
            p.write_text("class,tissue_source_site,project_id,slide_submitter_id,count\n")
        else:
            raise AssertionError(family)
        return p


SUFFIXES = ["", ".pt", ".csv", ".parquet", ".npz", ".json", ".safetensors", ".onnx"]


def valid_value(path: tuple[str, ...], p: click.Parameter, fx: Fixtures, work: Path) -> str | None:
    """A cheap valid value for a required parameter, or None if none is known here."""
    name, cmd = p.name, " ".join(path)
    if is_output(p):
        ext = {"plan": ".csv", "init-checkpoint": ".pt", "import-medi": ".pt", "data index": ".parquet",
               "embed": ".parquet"}.get(cmd, "")
        return str(work / f"result{ext}")
    table = {
        "model": fx.ckpt, "model_opt": fx.ckpt, "checkpoint": fx.ckpt, "teacher": fx.ckpt, "class_": "LUAD", "n": "2", "steps": "2",
        "batch_size": "2", "sites_from": fx.index, "strategy": "match-train", "classes": "LUAD,LUSC",
        "data": fx.parquet, "metadata": fx.clinical, "root": fx.synth, "index": fx.parquet, "resolution": "32",
        "task": "nsclc", "real": fx.synth, "fake": fx.synth, "images": fx.synth,
    }
    return None if name not in table else str(table[name])


def bad_value(p: click.Parameter, family: str, suffix: str, fx: Fixtures, work: Path) -> str:
    kind = kind_of(p)
    if kind == "input":
        return str(fx.file(family, suffix))
    if kind == "output":
        blocker = fx.file("text", ".txt")
        return str(blocker / "sub" / f"out{suffix}")
    if kind in ("int", "float"):
        return NUMBERS[family]
    if kind == "choice":
        return "nonexistent-xyz"
    return NAMES[family]


def candidates(path: tuple[str, ...]) -> list[tuple[click.Parameter, str]]:
    """(parameter, family) pairs that are invalid input for the command at ``path``."""
    cmd = command_of(path)
    out = []
    for p in cmd.params:
        if p.name in (None, "help") or getattr(p, "hidden", False):
            continue
        legit = LEGIT.get((" ".join(path), p.name), set())
        out += [(p, f) for f in FAMILIES[kind_of(p)] if f not in legit]
    return out


def snapshot(*roots: Path) -> set[str]:
    return {str(q) for r in roots for q in r.rglob("*")}


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tiny_ckpt) -> Fixtures:
    root = tmp_path_factory.mktemp("contract")
    synth = root / "syn"
    assert main(["data", "synth", "--out", str(synth), "--n-per-combo", "2", "--n-test-per-combo", "1",
                 "--resolution", "32", "--patches-per-slide", "2"]) == 0
    index = root / "index.csv"
    assert main(["data", "index", str(synth), "--metadata", str(synth / "clinical.csv"), "--out",
                 str(root / "index.parquet"), "--no-verify"]) == 0
    import pandas as pd

    pd.read_parquet(root / "index.parquet").to_csv(index, index=False)
    return Fixtures(root, tiny_ckpt, index, root / "index.parquet", synth / "clinical.csv", synth)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run_contract(argv: list[str], capsys, watched: list[Path]) -> None:
    before = snapshot(*watched)
    capsys.readouterr()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(EXAMPLE_TIMEOUT_S)
    try:
        with pytest.raises(SystemExit) as e, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # a user sees each warning as another stderr line
            main(argv)
    except _Timeout:
        pytest.fail(f"medi-fast {' '.join(argv)} ran over {EXAMPLE_TIMEOUT_S} s: a bad input was accepted")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    lines = err.splitlines()
    shown = f"medi-fast {' '.join(repr(a) for a in argv)}\nstderr:\n{err}"
    assert e.value.code == 2, f"exit {e.value.code}, not 2: {shown}"
    assert "Traceback" not in err, shown
    assert len(lines) == 1, f"{len(lines)} stderr lines, not 1: {shown}"
    assert lines[0].startswith("medi-fast: error: "), shown
    new = snapshot(*watched) - before
    assert not new, f"left {sorted(new)}: {shown}"


PATHS = command_paths()


def test_every_command_is_driven():
    """The enumeration reaches every entry of COMMANDS and the data subcommands, each with bad inputs."""
    names = {p[0] for p in PATHS}
    assert names == set(COMMANDS)
    assert {("data", "index"), ("data", "split"), ("data", "pack")} <= set(PATHS)
    assert sum(bool(candidates(p)) for p in PATHS) >= len(PATHS) - 2  # a command may take no parameter at all


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) for p in PATHS])
def test_bad_input_one_line_exit_2(path, fx, capsys):
    cands = candidates(path)
    if not cands:
        pytest.skip(f"{' '.join(path)} takes no parameter that can be wrong")

    @settings(max_examples=max_examples(path), deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def drive(data):
        picks = data.draw(st.lists(st.sampled_from(cands), min_size=1, max_size=2, unique_by=lambda c: c[0].name),
                          label="bad (parameter, kind)")
        suffix = data.draw(st.sampled_from(SUFFIXES), label="suffix")
        run_contract(build_argv(path, picks, suffix, fx), capsys, [Path.cwd(), fx.root, fx.ckpt.parent])

    drive()


def build_argv(path, picks, suffix, fx, skip=frozenset()) -> list[str]:
    """``skip``: parameters left off the command line (a medi-fast.toml entry gives them)."""
    work = Path(tempfile.mkdtemp(dir=Path.cwd()))
    cmd = command_of(path)
    chosen = {p.name: bad_value(p, fam, suffix, fx, work) for p, fam in picks}
    for p in cmd.params:
        if p.required and p.name not in chosen and p.name not in skip:
            v = valid_value(path, p, fx, work)
            chosen[p.name] = v if v is not None else bad_value(p, FAMILIES[kind_of(p)][0], suffix, fx, work)
    for name, value in CHEAP.get(path, {}).items():
        chosen.setdefault(name, str(getattr(fx, value[1:])) if value.startswith("@") else value)
    if path == ("generate",) and "out" not in chosen:
        chosen["out"] = str(work / "result")  # outputs of an accepted run land in the watched folder
    if path == ("generate",) and "class_" not in chosen and "plan" not in chosen:
        chosen["class_"] = "LUAD"
    chosen = {k: v for k, v in chosen.items() if k not in skip}
    argv = list(path)
    for p in cmd.params:
        if p.name not in chosen:
            continue
        if isinstance(p, click.Argument):
            argv.append(chosen[p.name])
        else:
            argv += [p.opts[0], chosen[p.name]]
    return argv


# --- Values read from files are inputs too: medi-fast.toml entries, plan CSVs, run directories' JSON.

# Values only a TOML entry can carry; each is wrong for every option (a flag takes true/false only).
TOML_ONLY = {"list": "[1, 2]", "table": "{ a = 1 }", "bool": "true", "fraction": "2.5", "word": '"yes"'}


def toml_families(p: click.Parameter) -> list[str]:
    kind = kind_of(p)
    if kind == "flag":
        return ["list", "table", "word"]
    own = ["list", "table", "bool"] + (["fraction"] if kind == "int" else [])
    if getattr(p, "multiple", False):
        own.remove("list")  # a list is what a repeatable option takes
    return FAMILIES[kind] + own


def toml_candidates(path: tuple[str, ...]) -> list[tuple[click.Parameter, str]]:
    """(option, family) pairs that are invalid as ``[command] option = VALUE`` in medi-fast.toml."""
    cmd = command_of(path)
    out = []
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.name in (None, "help") or getattr(p, "hidden", False):
            continue
        legit = LEGIT.get((" ".join(path), p.name), set())
        out += [(p, f) for f in toml_families(p) if f not in legit]
    return out


def toml_literal(p: click.Parameter, family: str, suffix: str, fx: Fixtures, work: Path) -> str:
    import json

    if family in TOML_ONLY:
        return TOML_ONLY[family]
    text = bad_value(p, family, suffix, fx, work)
    if kind_of(p) == "int":
        return text if abs(int(text)) < 2**63 else f"{float(text):e}"  # TOML integers are 64-bit
    if kind_of(p) == "float":
        return {"nan": "nan", "inf": "inf"}.get(text, repr(float(text)))
    value = json.dumps(text)  # a TOML basic string
    return f"[{value}]" if getattr(p, "multiple", False) else value


# Top-level commands only: medi-fast.toml has one table per command (`[generate]`), none for subcommands.
TOML_PATHS = [p for p in PATHS if len(p) == 1 and toml_candidates(p)]


@pytest.mark.parametrize("path", TOML_PATHS, ids=[" ".join(p) for p in TOML_PATHS])
def test_bad_toml_value_one_line_exit_2(path, fx, capsys):
    """The same contract when the bad value is an entry of ./medi-fast.toml instead of an option."""
    cands = toml_candidates(path)

    @settings(max_examples=max(MAX_EXAMPLES // 2, len(cands) // 6), deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def drive(data):
        p, family = data.draw(st.sampled_from(cands), label="bad (option, kind) in medi-fast.toml")
        suffix = data.draw(st.sampled_from(SUFFIXES), label="suffix")
        work = Path(tempfile.mkdtemp(dir=Path.cwd()))
        config = Path.cwd() / "medi-fast.toml"
        config.write_text(f"[{path[0]}]\n{p.name.replace('_', '-')} = {toml_literal(p, family, suffix, fx, work)}\n")
        try:
            run_contract(build_argv(path, [], suffix, fx, skip={p.name}), capsys, [Path.cwd(), fx.root, fx.ckpt.parent])
        finally:
            config.unlink()

    drive()


# A plan CSV's rows (generate --plan FILE): every cell a user can get wrong.  The tiny checkpoint takes
# class (LUAD, LUSC) and tss (05, 44, 49).
PLAN_CSVS = {
    "count-negative": "class,tss,count\nLUAD,05,-1\n",
    "count-zero": "class,tss,count\nLUAD,05,0\nLUSC,44,0\n",
    "count-fraction": "class,tss,count\nLUAD,05,1.5\n",
    "count-nan": "class,tss,count\nLUAD,05,nan\n",
    "count-empty": "class,tss,count\nLUAD,05,\n",
    "count-word": "class,tss,count\nLUAD,05,many\n",
    "count-trillion": f"class,tss,count\nLUAD,05,{10**12}\n",
    "count-past-int64": f"class,tss,count\nLUAD,05,{10**21}\n",
    "class-unknown": "class,tss,count\nnonexistent-xyz,05,1\n",
    "class-empty": "class,tss,count\n,05,1\n",
    "class-path": "class,tss,count\n../../escape,05,1\n",
    "tss-unknown": "class,tss,count\nLUAD,99,1\n",
    "tss-path": "class,tss,count\nLUAD,/etc/passwd,1\n",
    "no-count-column": "class,tss\nLUAD,05\n",
    "no-class-column": "tss,count\n05,1\n",
    "extra-column": "class,tss,count,race\nLUAD,05,1,x\n",
    "header-only": "class,tss,count\n",
    "ragged": "class,tss,count\nLUAD,05,1,7,8\n",
}


@pytest.mark.parametrize("case", sorted(PLAN_CSVS))
def test_bad_plan_csv_one_line_exit_2(case, fx, capsys):
    plan = fx.root / "plans" / f"{case}.csv"
    plan.parent.mkdir(exist_ok=True)
    plan.write_text(PLAN_CSVS[case])
    work = Path(tempfile.mkdtemp(dir=Path.cwd()))
    run_contract(["generate", str(fx.ckpt), "--plan", str(plan), "--steps", "2", "--out", str(work / "result")],
                 capsys, [Path.cwd(), fx.root, fx.ckpt.parent])


# A run directory's JSON: generate's OUT/run.json (what a resumed run must match) and a training run's
# config.json (`train --config`, and `train --resume` reads it from OUT).
JSON_VALUES = {"zero": 0, "negative": -1, "huge": 10**12, "enormous": 10**30, "nan": float("nan"), "inf": float("inf"),
               "unknown": "nonexistent-xyz", "empty-string": "", "garbage": "%%,//,==", "missing": "/nonexistent/x.pt",
               "list": [1, 2], "table": {"a": 1}, "bool": True, "null": None}


@pytest.mark.parametrize("content", ["[]", "\"x\"", "3", "{\"model_hash\": [1]}", "{truncated", ""],
                         ids=["list", "string", "number", "field-a-list", "truncated", "empty"])
def test_bad_generate_run_json_one_line_exit_2(content, fx, capsys):
    """An output directory whose run.json was damaged: its images cannot be shown to belong to this run."""
    out = Path(tempfile.mkdtemp(dir=Path.cwd())) / "result"
    out.mkdir()
    (out / "run.json").write_text(content)
    run_contract(["generate", str(fx.ckpt), "--class", "LUAD", "--n", "2", "--steps", "2", "--out", str(out)],
                 capsys, [Path.cwd(), fx.root, fx.ckpt.parent])


def train_config_candidates() -> list[tuple[str, str]]:
    """(field, family): each field of a training config with the bad values its option gets on the command
    line (minus LEGIT), and the JSON values no option can take (a list, a table, true, null)."""
    from dataclasses import fields

    from medi_fast.training.config import TrainConfig

    options = {p.name: p for p in command_of(("train",)).params}
    out = []
    for f in fields(TrainConfig):
        p = options.get(f.name)
        kind = kind_of(p) if p is not None else "name"
        own = [x for x in FAMILIES[kind] if x in JSON_VALUES] + ["list", "table"]
        own += [] if kind == "flag" else ["bool"]
        own += [] if "None" in str(f.type) else ["null"]
        legit = LEGIT.get(("train", f.name), set()) | ({"unknown"} if f.name == "out" else set())  # a new run folder
        out += [(f.name, x) for x in own if x not in legit]
    return out


def test_bad_train_config_json_one_line_exit_2(fx, capsys):
    """`train --config RUN/config.json` with one field damaged: refused like the same option."""
    import json

    from medi_fast.training.config import TrainConfig

    cands = train_config_candidates()

    @settings(max_examples=max(MAX_EXAMPLES, len(cands) // 6), deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(pick=st.sampled_from(cands))
    def drive(pick):
        name, family = pick
        work = Path(tempfile.mkdtemp(dir=Path.cwd()))
        cheap = {k: v for k, v in CHEAP[("train",)].items() if k != "data"}
        base = TrainConfig.from_dict({"data": str(fx.parquet), "out": str(work / "run"),
                                      **{k: (int(v) if v.isdigit() else v) for k, v in cheap.items()}}).to_dict()
        config = fx.root / "configs" / f"{name}-{family}.json"
        config.parent.mkdir(exist_ok=True)
        config.write_text(json.dumps({**base, name: JSON_VALUES[family]}))  # NaN as Python's json writes it
        run_contract(["train", "--config", str(config)], capsys, [Path.cwd(), fx.root, fx.ckpt.parent])

    drive()
