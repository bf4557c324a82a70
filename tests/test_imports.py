"""The package's import graph, read from the source with ``ast``: no import circle within horizon_triton (kernels
included, imports inside functions and under TYPE_CHECKING counted: a circle hidden in a function is still one),
and no private name (``_name``) imported from another module.

As a script it prints the graph, any circle and any private import, of this checkout or of another one:

    python tests/test_imports.py [--root CHECKOUT] [--packages]     # --packages: one line per package
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of horizon_triton, and of kernels/ as horizon_triton.kernels."""
    found = {}
    for top, name in ((root / "horizon_triton", "horizon_triton"), (root / "kernels", "horizon_triton.kernels")):
        for path in sorted(top.rglob("*.py")):
            parts = list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([name, *parts])] = path
    found.setdefault("horizon_triton.kernels", root / "horizon_triton" / "kernels" / "__init__.py")
    return found


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" or name == "horizon_triton.kernels" else name.rsplit(".", 1)[0]


def imports(root: Path):
    """(graph, privates): graph[module] = the set of modules it imports; privates = [(module, line, text)] for
    every private name one module takes from another (``from m import _x``, or ``m._x`` / ``C._x`` on an imported
    module or an imported name)."""
    mods = modules(root)
    graph, privates = {name: set() for name in mods}, []
    for name, path in mods.items():
        if not path.is_file():
            continue
        package = _package(name, path)
        tree = ast.parse(path.read_text(), str(path))
        imported = {}                                # local name -> what it names (a module, or module.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods:
                        graph[name].add(alias.name)
                        imported[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source not in mods:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in mods:                  # a module taken from its package
                        graph[name].add(sub)
                        imported[alias.asname or alias.name] = sub
                    else:
                        graph[name].add(source)
                        imported[alias.asname or alias.name] = sub
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            privates.append((name, node.lineno, f"from {source} import {alias.name}"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                privates.append((name, node.lineno, f"{imported[node.value.id]}.{node.attr}"))
        graph[name].discard(name)
    return graph, privates


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_import_circle():
    graph, _ = imports(ROOT)
    assert len(graph) > 40, "the walk found too few modules: is the layout what modules() expects?"
    assert circles(graph) == [], "import circles (each a set of modules that import one another)"


def test_no_private_name_crosses_a_module():
    _, privates = imports(ROOT)
    assert privates == [], "private names used outside their module: make them public or move the code"


def test_the_checks_see_a_circle_and_a_private_import(tmp_path):
    """The walk itself: a two-module circle through a function-level import, and a private name taken across."""
    (tmp_path / "horizon_triton" / "sub").mkdir(parents=True)
    (tmp_path / "kernels").mkdir()
    (tmp_path / "horizon_triton" / "__init__.py").write_text("")
    (tmp_path / "horizon_triton" / "sub" / "__init__.py").write_text("")
    (tmp_path / "horizon_triton" / "a.py").write_text("from .sub.b import helper\n")
    (tmp_path / "horizon_triton" / "sub" / "b.py").write_text("def helper():\n    from .. import a\n")
    (tmp_path / "horizon_triton" / "c.py").write_text("from .sub import b\nx = b._hidden\n"
                                                      "from horizon_triton.kernels.k import _kernel, Kernel\n"
                                                      "y = Kernel._launch\n")
    (tmp_path / "kernels" / "k.py").write_text("")
    graph, privates = imports(tmp_path)
    assert circles(graph) == [["horizon_triton.a", "horizon_triton.sub.b"]]
    assert [(m, text) for m, _, text in privates] == [
        ("horizon_triton.c", "from horizon_triton.kernels.k import _kernel"),
        ("horizon_triton.c", "horizon_triton.sub.b._hidden"),
        ("horizon_triton.c", "horizon_triton.kernels.k.Kernel._launch")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="a checkout of horizon-triton (default: this one)")
    parser.add_argument("--packages", action="store_true", help="one line per package instead of per module")
    args = parser.parse_args(argv)
    graph, privates = imports(args.root)
    if args.packages:
        def package(m):                          # horizon_triton.host.store -> horizon_triton.host
            return ".".join(m.split(".")[:2])
        shown = {}
        for m, targets in graph.items():
            shown.setdefault(package(m), set()).update(package(t) for t in targets)
        graph_shown = {k: v - {k} for k, v in shown.items()}
    else:
        graph_shown = graph
    for m in sorted(graph_shown):
        print(f"{m} -> {', '.join(sorted(graph_shown[m])) or '-'}")
    found = circles(graph)
    print(f"\n{len(found)} import circle(s)" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    print(f"{len(privates)} private import(s)" + "".join(f"\n  {m}:{line} {text}" for m, line, text in privates))
    return 1 if found or privates else 0


if __name__ == "__main__":
    sys.exit(main())
