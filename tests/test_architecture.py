"""The import rules of docs/architecture.md, checked on the source and in a fresh interpreter.

* The runtime (everything in ``medi_fast/`` except the orchestrators) never imports
  ``medi_fast.training`` or ``medi_fast.engines``, not even inside a function.
* ``engines`` never imports ``training``, and ``training`` never imports ``engines``.
* Orchestrators (``medi_fast.cli``, the demo, ``medi_fast.doctor``) may import every layer.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORCHESTRATORS = ("cli", "demo", "doctor")


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of every module imported anywhere in ``path`` (top level or in functions)."""
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def _modules(folder: Path, package: str):
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(folder).with_suffix("")
        parts = list(rel.parts)
        yield path, parts, ".".join([package, *parts[:-1]])  # the package relative imports start from


def _forbidden(names: set[str], layers: tuple[str, ...]) -> list[str]:
    bad = []
    for n in names:
        for layer in layers:
            if n == f"medi_fast.{layer}" or n.startswith(f"medi_fast.{layer}.") or n == layer or n.startswith(f"{layer}."):
                bad.append(n)
    return sorted(bad)


def test_runtime_never_imports_training_or_engines():
    offenders = {}
    for path, parts, pkg in _modules(REPO / "medi_fast", "medi_fast"):
        if parts[0] in ORCHESTRATORS or parts[0] in ("training", "engines"):  # the last two: dev symlinks
            continue
        bad = _forbidden(_imports(path, pkg), ("training", "engines"))
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert not offenders, f"runtime modules import the build/training side: {offenders}"


@pytest.mark.parametrize("folder, other", [("engines", "training"), ("training", "engines")])
def test_engines_and_training_do_not_import_each_other(folder, other):
    offenders = {}
    for path, parts, pkg in _modules(REPO / folder, f"medi_fast.{folder}"):
        bad = _forbidden(_imports(path, pkg), (other,))
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert not offenders, offenders


def test_the_checker_sees_function_level_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ..engines.export import export_onnx\n    from .training import loop\n")
    names = _imports(src, "medi_fast.x")
    # ..engines from package medi_fast.x is medi_fast.engines; .training is medi_fast.x.training (allowed)
    assert _forbidden(names, ("engines", "training")) == ["medi_fast.engines.export",
                                                         "medi_fast.engines.export.export_onnx"]


def test_generation_through_the_api_loads_neither(tiny_ckpt, tmp_path):
    """A fresh interpreter that generates through the Python API and the generate command's code
    path ends with no module of training/ or engines/ loaded."""
    code = f"""
import json, sys
import medi_fast
from medi_fast import backends, plan, generate
pipe = medi_fast.load({str(tiny_ckpt)!r}, steps=2, batch_size=2)
pipe.generate("LUAD", tss="05", n=2, seed=0)
info = backends.open_model({str(tiny_ckpt)!r})
p = plan.build(info.spec, values={{"class": "LUSC", "tss": "44"}}, n=2)
generate.Generator(info, backends.create("torch", info), generate.GenerateConfig(steps=2, batch_size=2),
                   progress=False).run(p, {str(tmp_path / "out")!r})
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("medi_fast.training", "medi_fast.engines")))))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
    assert len(list((tmp_path / "out").rglob("*.png"))) == 2
