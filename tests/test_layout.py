"""The tree shows the data flow (issue 17): no import cycle inside ``scanner/``, and each
package imports only the packages below it, as README.md's Design section lists them.

The walk reads every module's source with ``ast`` (imports inside functions count too: a
lazy import is still a dependency), so it sees what a run would import, without running it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "scanner"

# package -> the scanner packages it may import (besides itself). "top" is scanner/__init__.py,
# errors.py and schema.json: the version and the error tree, importable from anywhere.
ALLOWED: dict[str, set[str]] = {
    "top": set(),
    "core": {"top"},
    "catalog": {"top", "core"},
    "plan": {"top", "core", "catalog"},
    "probes": {"top", "core"},
    "engine": {"top", "core", "catalog", "plan", "probes"},
    "responder": {"top", "core"},
    # mesh -> report: the mesh's stderr summary is the report's text (one grouping of faults)
    "mesh": {"top", "core", "catalog", "plan", "probes", "engine", "responder", "report"},
    "report": {"top", "core"},
    "watch": {"top", "core", "catalog", "plan", "probes", "engine", "responder"},
    "ansible": {"top"},
    "lab": {"top", "core", "catalog", "plan", "probes", "engine", "responder", "mesh", "report"},
    "commands": {"top", "core", "catalog", "plan", "probes", "engine", "responder", "mesh",
                 "report", "lab", "watch", "ansible"},
    "cli": {"top", "commands"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("scanner"):
                    out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("scanner"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = all_modules()
    known = set(mods)
    return {name: imports_of(path, name, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def package_of(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1 or parts[1] in ("errors", "__main__", "entry"):
        return "cli" if parts[-1] in ("__main__", "entry") else "top"
    return parts[1]


def test_no_import_cycle() -> None:
    found = cycles(graph())
    assert not found, f"import cycles inside scanner/: {found}"


def test_cycle_finder_finds_a_cycle() -> None:
    # the check itself can fail: a two-module loop and a three-module loop are found
    g = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(cycles(g)) == [["a", "b"], ["c", "d", "e"]]


def test_packages_import_only_downstream() -> None:
    bad = []
    for mod, deps in graph().items():
        pkg = package_of(mod)
        assert pkg in ALLOWED, f"{mod}: package {pkg!r} is not in the layering table"
        for dep in deps:
            dpkg = package_of(dep)
            if dpkg != pkg and dpkg not in ALLOWED[pkg]:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the data flow:\n" + "\n".join(sorted(bad))


def test_library_never_imports_the_cli() -> None:
    g = graph()
    offenders = [m for m, deps in g.items() if "scanner.cli" in deps and package_of(m) != "cli"]
    assert not offenders, f"library modules that import scanner.cli: {offenders}"


def test_every_package_says_what_it_owns() -> None:
    for init in sorted(PKG.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert doc.strip(), f"{init.relative_to(ROOT)} has no docstring"
        assert "May import" in doc, f"{init.relative_to(ROOT)}: say which packages it may import"


def test_readme_tree_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```text\nscanner/\n(.*?)```", readme, re.S)
    assert block, "README.md: the Design section's ```text scanner/ tree is missing"
    named = set(re.findall(r"^  ([a-z_]+)/", block.group(1), re.M))
    real = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert named == real, f"README tree {sorted(named)} != packages {sorted(real)}"


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_layer_table_is_acyclic(pkg: str) -> None:
    # the table itself must be a DAG, or "downstream" means nothing
    seen: set[str] = set()
    todo = [pkg]
    while todo:
        p = todo.pop()
        for d in ALLOWED[p]:
            assert d != pkg, f"layering table: {pkg} reaches itself through {p}"
            if d not in seen:
                seen.add(d)
                todo.append(d)


def unexplained_lazy_imports(source: str) -> list[int]:
    """Line numbers of imports inside a function (or class) with no ``#`` comment saying why:
    on the import's own line, or on the line before it. Consecutive imports are one block, so
    a comment before the block covers each of them."""
    lines = source.splitlines()
    tree = ast.parse(source)
    inner: list[ast.stmt] = []

    def walk(node: ast.AST, nested: bool) -> None:
        for ch in ast.iter_child_nodes(node):
            if nested and isinstance(ch, (ast.Import, ast.ImportFrom)):
                inner.append(ch)
            walk(ch, nested or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef,
                                               ast.Lambda, ast.ClassDef)))

    walk(tree, False)
    import_lines = {n for node in inner for n in range(node.lineno, node.end_lineno + 1)}
    bad = []
    for node in inner:
        own = lines[node.lineno - 1 : node.end_lineno]
        if any("#" in line for line in own):
            continue
        before = node.lineno - 1  # 1-based number of the line above
        while before in import_lines:  # the block's first import
            before -= 1
        if before < 1 or not lines[before - 1].strip().startswith("#"):
            bad.append(node.lineno)
    return bad


def test_lazy_imports_say_why() -> None:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for n in unexplained_lazy_imports(path.read_text(encoding="utf-8")):
            bad.append(f"{rel}:{n}")
    assert not bad, (
        "imports inside a function belong at the module top, or need a comment saying why "
        "(measured start-up cost, optional dependency):\n" + "\n".join(bad)
    )


def test_lazy_import_check_can_fail() -> None:
    src = (
        "import os\n\n"
        "def f():\n"
        "    import sys\n"  # 4: no reason
        "    return sys\n\n"
        "def g():\n"
        "    # lazy: heavy\n"
        "    import json\n"
        "    from re import (\n"
        "        compile,\n"
        "    )\n"  # a block under one comment
        "    x = 1\n"
        "    import csv\n"  # 14: the comment above is not its own
        "    import abc  # optional\n"
        "    return json, compile, csv, abc, x\n"
    )
    assert unexplained_lazy_imports(src) == [4, 14]
