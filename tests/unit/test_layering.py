"""The import rules of STYLE.md, enforced: layers point one way, dangerous imports stay put."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["deployments", "flows", "tasks", "lifecycle"]  # each may import only those after it


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downwards(layer: str) -> None:
    forbidden = set(LAYERS[: LAYERS.index(layer)]) | {"cli", "simulator", "bench", "tests"}
    offenders = {str(f.relative_to(ROOT)): sorted(_imports(f) & forbidden)
                 for f in _files(layer) if _imports(f) & forbidden}
    assert offenders == {}


def test_lifecycle_never_imports_prefect() -> None:
    assert [str(f.relative_to(ROOT)) for f in _files("lifecycle") if "prefect" in _imports(f)] \
        == []


@pytest.mark.parametrize(("library", "allowed"), [
    pytest.param("pkcs11", {"hsm.py"}, id="pkcs11-only-in-hsm"),
    pytest.param("pandas", {"importer.py"}, id="pandas-only-in-importer"),
])
def test_dangerous_imports_stay_in_their_module(library: str, allowed: set[str]) -> None:
    users = {f.name for f in _files("lifecycle") if library in _imports(f)}
    assert users <= allowed, users


SQL_NAMES = {"select", "insert", "update", "delete", "text", "func", "Session", "col"}


def _sql_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module and node.module.split(".")[0] in {"sqlalchemy", "sqlmodel"}
            for alias in node.names} & SQL_NAMES


def test_sql_stays_in_the_store_modules() -> None:
    # The inventory is the SQL module; the audit trail and the principal table keep their own
    # small queries next to their rules (STYLE.md rule 1, with those two named exceptions).
    stores = {"inventory.py", "audit.py", "role.py"}
    users = {f.name for f in _files("lifecycle") if _sql_names(f)}
    assert users - stores == set()


def test_no_task_persists_results_or_caches() -> None:
    sources = "\n".join(f.read_text(encoding="utf-8") for f in _files("tasks") + _files("flows"))
    for risky in ("persist_result=True", "cache_key_fn", "cache_policy=INPUTS",
                  "cache_policy=DEFAULT", ".delay("):
        assert risky not in sources
    task_decorators = sources.count("@task(")
    assert task_decorators > 0
    assert sources.count("persist_result=False, cache_policy=NO_CACHE") == task_decorators
