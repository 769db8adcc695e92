"""The package's layering, checked by parsing every module's imports with ``ast``.

Rules (module names relative to ``prefork_proxy``; a rule on ``relay`` covers
``relay.py`` and a future ``relay/`` package alike):

1. ``relay`` only moves bytes and runs its loop: of this package it imports
   only ``errors``, ``splice`` and its own submodules; never ``config``,
   ``shared``, ``rows``, ``balancer``, ``health``, ``master``, ``worker``,
   ``accept``, ``listeners``, ``cli`` or ``api``.
2. ``master`` is imported only by the entry points that start a master:
   ``cli`` and ``api``.
3. ``cli`` is imported only by ``__main__``.
4. ``rows`` (the shared-memory layout of the worker rows) is a leaf: it
   imports nothing of this package, so every process can map it.

Imports anywhere in a module count, including those inside functions (a
late import is still a dependency).  Tests and scripts are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import prefork_proxy

PACKAGE = Path(prefork_proxy.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> Set[str]:
    """Modules of this package that ``path`` imports, relative to the package."""
    found: Set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if module else []
                if not is_package:
                    base = base[:-1]
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(["prefork_proxy", *base] + ([node.module] if node.module
                                                               else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "prefork_proxy" or not name.startswith("prefork_proxy."):
                continue
            found.add(name[len("prefork_proxy."):])
    return found


def _graph() -> Dict[str, Set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        graph[module] = _imports(path, module)
    return graph


def _is(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def test_the_import_graph_is_found():
    graph = _graph()
    assert {"relay", "master", "cli", "rows", "accept"} <= set(graph)
    assert "relay" in graph["accept"] and "rows" in graph["shared"]


def test_relay_imports_only_errors_splice_and_itself():
    graph = _graph()
    allowed = ("errors", "splice", "relay")
    for module, imports in graph.items():
        if not _is(module, "relay"):
            continue
        bad = {name for name in imports
               if not any(_is(name, ok) for ok in allowed)}
        assert not bad, f"{module} imports {sorted(bad)}: the relay only moves bytes"


def test_master_is_imported_only_by_cli_and_api_and_cli_only_by_main():
    graph = _graph()
    for module, imports in graph.items():
        if module not in ("cli", "api") and not _is(module, "master"):
            assert not any(_is(name, "master") for name in imports), \
                f"{module} imports master"
        if module != "__main__" and not _is(module, "cli"):
            assert not any(_is(name, "cli") for name in imports), f"{module} imports cli"


def test_rows_is_a_leaf():
    graph = _graph()
    assert not graph["rows"], f"rows imports {sorted(graph['rows'])}"
