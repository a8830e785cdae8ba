"""The import rules of docs/architecture.md, checked on the source and in a fresh interpreter.

* The runtime (everything in ``medi_fast/`` except the orchestrators) never imports
  ``medi_fast.training`` or ``medi_fast.engines``, not even inside a function.
* ``engines`` never imports ``training``, and ``training`` never imports ``engines``.
* Orchestrators (``medi_fast.cli``, the demo, ``medi_fast.doctor``) may import every layer.
* No import circle among the modules of ``medi_fast/``, ``training/`` and ``engines/`` (imports
  inside functions count: a lazy import hides a circle from the interpreter, not from a reader).
* No module uses another module's private name (``from x import _name``, ``x._name``); the
  module's own names, ``__dunder__`` names and tests are free to.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parents[1]
ORCHESTRATORS = ("cli", "demo", "doctor")
# The package each source folder installs as (setup.cfg's package_dir).
ROOTS = (("medi_fast", "medi_fast"), ("medi_fast.training", "training"), ("medi_fast.engines", "engines"))

def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` statement imports from, relative levels resolved."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of every module imported anywhere in ``path`` (top level or in functions)."""
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = _absolute(node, package)
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def _module_table(roots) -> dict[str, tuple[Path, str]]:
    """{module name: (file, package its relative imports start from)} for ``roots`` ((package, folder), ...).

    A folder inside another root's folder is skipped: the dev symlinks medi_fast/training and
    medi_fast/engines are the training/ and engines/ folders, listed under their own root."""
    folders = {Path(f).resolve() for _, f in roots}
    table = {}
    for package, folder in roots:
        folder = Path(folder)
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder)
            if len(rel.parts) > 1 and (folder / rel.parts[0]).resolve() in folders - {folder.resolve()}:
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
                name = ".".join([package, *parts])
                table[name] = (path, name)
            else:
                name = ".".join([package, *parts])
                table[name] = (path, name.rpartition(".")[0])
    return table


def _scan(table) -> tuple[nx.DiGraph, list[tuple[str, str]]]:
    """The import graph of ``table``'s modules (edges carry ``where``: file:line of the import) and every use
    of another module's private name as ("file:line", "module._name")."""
    graph = nx.DiGraph()
    graph.add_nodes_from(table)
    private = []
    for name, (path, package) in table.items():
        where = lambda node: f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{node.lineno}"  # noqa: E731
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}  # local name -> module it is bound to

        def edge(target, node):
            if target != name and not graph.has_edge(name, target):
                graph.add_edge(name, target, where=where(node))

        def use(module, attr, node):
            if attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__")) and module != name:
                private.append((where(node), f"{module}.{attr}"))

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in table:
                        edge(a.name, node)
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                mod = _absolute(node, package)
                for a in node.names:
                    if f"{mod}.{a.name}" in table:  # a module: `from . import backends`
                        edge(f"{mod}.{a.name}", node)
                        aliases[a.asname or a.name] = f"{mod}.{a.name}"
                    elif mod in table:
                        edge(mod, node)
                        use(mod, a.name, node)
        for node in ast.walk(tree):
            # x._name where x is (an attribute path to) a module of the table: `stages._real`, `medi_fast.io._unlink`
            if not isinstance(node, ast.Attribute) or isinstance(node.ctx, ast.Del):
                continue
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if not isinstance(base, ast.Name) or base.id not in aliases:
                continue
            module, rest = aliases[base.id], chain
            while len(rest) > 1 and f"{module}.{rest[0]}" in table:
                module, rest = f"{module}.{rest[0]}", rest[1:]
            if len(rest) == 1 and module in table:
                use(module, rest[0], node)
    return graph, private


def _circles(graph: nx.DiGraph) -> list[str]:
    """One circle per strongly connected group of modules, each import with its file:line."""
    out = []
    for group in nx.strongly_connected_components(graph):
        if len(group) < 2:
            continue
        cycle = nx.find_cycle(graph.subgraph(group))
        out.append(" -> ".join(f"{a} ({graph.edges[a, b]['where']})" for a, b in cycle) + f" -> {cycle[0][0]}")
    return sorted(out)


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


def _project():
    return _scan(_module_table([(pkg, REPO / folder) for pkg, folder in ROOTS]))


def test_no_import_circles():
    circles = _circles(_project()[0])
    assert not circles, ("import circles (module (file:line of its import) -> ...); make the dependency run one "
                         "way, e.g. move the shared code to the module both need:\n  " + "\n  ".join(circles))


def test_no_private_names_across_modules():
    found = set(_project()[1])
    offenders = sorted(found)
    assert not offenders, ("private names used from another module (make the name public where it belongs, or "
                           "move it there):\n  " + "\n  ".join(f"{w}: {n}" for w, n in offenders))


def test_the_checker_sees_circles_and_private_names(tmp_path):
    pkg = tmp_path / "medi_fast"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from ..a import helper\n")
    (pkg / "a.py").write_text("import os\n\ndef helper():\n    from .b import _hidden\n    return _hidden\n")
    (pkg / "b.py").write_text("from . import c\n\n_hidden = 1\n__all__ = []\nx = _hidden\n")
    (pkg / "c.py").write_text("import medi_fast.sub as s\nimport medi_fast.b\nfrom . import b\n\n"
                              "def f():\n    return s._secret, b.__all__, medi_fast.b._hidden, b._hidden\n")
    (pkg / "d.py").write_text("from .c import f\n")  # not in the circle
    (tmp_path / "engines").mkdir()  # another root, linked into the package as in a dev tree
    (tmp_path / "engines" / "e.py").write_text("from medi_fast.b import _hidden\n")
    (pkg / "engines").symlink_to(tmp_path / "engines")
    table = _module_table([("medi_fast", pkg), ("medi_fast.engines", tmp_path / "engines")])
    assert [n for n in table if "engines" in n] == ["medi_fast.engines.e"]
    graph, private = _scan(table)
    assert _circles(graph) == [
        f"medi_fast.a ({pkg / 'a.py'}:4) -> medi_fast.b ({pkg / 'b.py'}:1) -> medi_fast.c ({pkg / 'c.py'}:1) -> "
        f"medi_fast.sub ({pkg / 'sub' / '__init__.py'}:1) -> medi_fast.a"]
    assert sorted(private) == sorted([
        (f"{pkg / 'a.py'}:4", "medi_fast.b._hidden"), (f"{pkg / 'c.py'}:6", "medi_fast.sub._secret"),
        (f"{pkg / 'c.py'}:6", "medi_fast.b._hidden"), (f"{pkg / 'c.py'}:6", "medi_fast.b._hidden"),
        (f"{tmp_path / 'engines' / 'e.py'}:1", "medi_fast.b._hidden")])


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
