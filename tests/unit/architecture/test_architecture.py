"""The architecture, enforced: imports point one way, dangerous libraries stay in their package.

Each rule is a function over a source tree that returns its offenders. It runs on the project
(expecting none) and on a small tree with the rule broken on purpose (expecting exactly that
offence), so every rule is shown to be able to fail.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("lifecycle", "tasks", "flows", "deployments", "cli", "simulator", "hes_adapters")
# Shared foundations of the lifecycle; every other package under lifecycle/ is a process.
# ``installation`` (the HSM's long-lived keys and their pins) is one: every process checks the
# keys through it before it starts. ``identity`` (signed requests, principals' keys, the trust
# anchor) is one: every process authorizes its requests through it.
FOUNDATIONS = frozenset({"hsm", "inventory", "audit", "installation", "identity", "dlms", "pki",
                         "hes", "meter_keys"})
LAYERS = ("deployments", "flows", "tasks", "lifecycle")  # each imports only those after it


@dataclass(frozen=True)
class Import:
    source: str        # dotted module that imports
    target: str        # dotted module (project) or top-level name (third party)
    line: int
    in_function: bool
    type_checking: bool

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line} -> {self.target}"


def _modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(root: Path) -> list[Import]:
    modules = _modules(root)
    out: list[Import] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        out += _walk(tree, name, modules, in_function=False, type_checking=False)
    return out


def _walk(node: ast.AST, source: str, modules: dict[str, Path], *, in_function: bool,
          type_checking: bool) -> Iterator[Import]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            for alias in child.names:
                yield Import(source, _resolve(alias.name, modules), child.lineno, in_function,
                             type_checking)
        elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
            for alias in child.names:
                dotted = f"{child.module}.{alias.name}"
                target = dotted if dotted in modules else _resolve(child.module, modules)
                yield Import(source, target, child.lineno, in_function, type_checking)
        else:
            nested_fn = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            nested_tc = type_checking or (isinstance(child, ast.If)
                                          and "TYPE_CHECKING" in ast.unparse(child.test))
            yield from _walk(child, source, modules, in_function=nested_fn,
                             type_checking=nested_tc)


def _resolve(name: str, modules: dict[str, Path]) -> str:
    return name if name.split(".")[0] in PACKAGES else name.split(".")[0]


def _in(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _process_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lifecycle" or len(parts) < 2 or parts[1] in FOUNDATIONS:
        return None
    return parts[1] if (ROOT / "lifecycle" / parts[1]).is_dir() or len(parts) > 2 else None


# --- the rules ----------------------------------------------------------------------------------
def cycles(root: Path) -> list[str]:
    """Import cycles between project modules (imports that run: not under TYPE_CHECKING)."""
    graph: dict[str, set[str]] = {}
    for imp in _imports(root):
        if not imp.type_checking and imp.target.split(".")[0] in PACKAGES:
            graph.setdefault(imp.source, set()).add(imp.target)
    found: list[str] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def _library_outside(root: Path, libraries: set[str], allowed: Callable[[str], bool],
                     scope: tuple[str, ...] = PACKAGES) -> list[str]:
    return [imp.where for imp in _imports(root)
            if imp.target in libraries and _in(imp.source, *scope) and not allowed(imp.source)]


def pkcs11_outside_hsm(root: Path) -> list[str]:
    return _library_outside(root, {"pkcs11"}, lambda m: _in(m, "lifecycle.hsm"))


def sql_outside_inventory(root: Path) -> list[str]:
    return _library_outside(root, {"sqlalchemy", "sqlmodel", "alembic"},
                            lambda m: _in(m, "lifecycle.inventory"))


def dataframes_outside_reader(root: Path) -> list[str]:
    # The simulator plays the manufacturer, whose XLSX export needs openpyxl: it is not
    # meterkeys, so the rule covers meterkeys' own packages.
    return _library_outside(root, {"pandas", "openpyxl"},
                            lambda m: m == "lifecycle.factory_import.reader",
                            scope=("lifecycle", "tasks", "flows", "deployments", "cli"))


def frameworks_in_lifecycle(root: Path) -> list[str]:
    return _library_outside(root, {"prefect", "typer", "rich"}, lambda m: False,
                            scope=("lifecycle",))


def lifecycle_importing_outer_layers(root: Path) -> list[str]:
    return [imp.where for imp in _imports(root) if _in(imp.source, "lifecycle")
            and _in(imp.target, "flows", "tasks", "cli", "simulator", "deployments")]


def layers_pointing_upwards(root: Path) -> list[str]:
    offenders = []
    for imp in _imports(root):
        layer = imp.source.split(".")[0]
        if layer not in LAYERS:
            continue
        above = set(LAYERS[: LAYERS.index(layer)]) | {"cli", "simulator"}
        if imp.target.split(".")[0] in above:
            offenders.append(imp.where)
    return offenders


def processes_crossing(root: Path) -> list[str]:
    offenders = []
    for imp in _imports(root):
        if not _in(imp.source, "lifecycle") or not _in(imp.target, "lifecycle"):
            continue
        mine, theirs = _process_of(imp.source), _process_of(imp.target)
        if theirs is not None and theirs != mine:
            offenders.append(imp.where)
    return offenders


def flows_using_lifecycle(root: Path) -> list[str]:
    return [imp.where for imp in _imports(root) if _in(imp.source, "flows")
            and _in(imp.target, "lifecycle") and not imp.type_checking]


def function_level_project_imports(root: Path) -> list[str]:
    # A function-level import that dodges a cycle means the cut is wrong (STYLE.md). Spawned
    # worker entry points may import in the child; today none needs to.
    return [imp.where for imp in _imports(root)
            if imp.in_function and imp.target.split(".")[0] in PACKAGES]


RULES = [cycles, pkcs11_outside_hsm, sql_outside_inventory, dataframes_outside_reader,
         frameworks_in_lifecycle, lifecycle_importing_outer_layers, layers_pointing_upwards,
         processes_crossing, flows_using_lifecycle, function_level_project_imports]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_the_project_keeps_the_rule(rule: Callable[[Path], list[str]]) -> None:
    assert rule(ROOT) == []


# --- each rule can fail: a small tree that breaks it on purpose ---------------------------------
BREAKS = {
    "cycles": {"lifecycle/a.py": "from lifecycle import b\n",
               "lifecycle/b.py": "from lifecycle import a\n"},
    "pkcs11_outside_hsm": {"lifecycle/inventory/db.py": "import pkcs11\n"},
    "sql_outside_inventory": {"cli/meters.py": "from sqlalchemy import select\n"},
    "dataframes_outside_reader": {"lifecycle/factory_import/steps.py": "import pandas as pd\n"},
    "frameworks_in_lifecycle": {"lifecycle/audit/trail.py": "from prefect import task\n"},
    "lifecycle_importing_outer_layers": {"lifecycle/clock.py": "from tasks import context\n"},
    "layers_pointing_upwards": {"tasks/context.py": "from flows import factory_import\n"},
    "processes_crossing": {"lifecycle/claim/steps.py":
                           "from lifecycle.factory_import import rules\n",
                           "lifecycle/factory_import/rules.py": "x = 1\n"},
    "flows_using_lifecycle": {"flows/factory_import.py":
                              "from lifecycle.inventory.batches import BatchStatus\n"},
    "function_level_project_imports": {"lifecycle/hsm/connection.py":
                                       "def f():\n    from lifecycle import errors\n"},
}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_the_rule_catches_a_planted_break(rule: Callable[[Path], list[str]],
                                          tmp_path: Path) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    for name, text in BREAKS[rule.__name__].items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert len(rule(tmp_path)) >= 1


def test_no_task_persists_results_or_caches() -> None:
    files = sorted((ROOT / "tasks").rglob("*.py")) + sorted((ROOT / "flows").rglob("*.py"))
    sources = "\n".join(f.read_text(encoding="utf-8") for f in files)
    for risky in ("persist_result=True", "cache_key_fn", "cache_policy=INPUTS",
                  "cache_policy=DEFAULT", ".delay("):
        assert risky not in sources
    task_decorators = sources.count("@task(")
    assert task_decorators > 0
    assert sources.count("persist_result=False, cache_policy=NO_CACHE") == task_decorators
