"""The package's public surface and its dependency rule.

The other test modules import from the submodules (``telemetry.spans``…), which resolve
even when pytest's ``pythonpath`` puts ``tests/`` first and ``tests/telemetry`` shadows
the package as a namespace; this module checks the package itself.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "telemetry"


def test_import_telemetry_is_the_real_package() -> None:
    """Fails when sys.path lists tests/ before the project root (tests/telemetry shadows it)."""
    package = importlib.import_module("telemetry")
    assert getattr(package, "__file__", None) == str(PACKAGE_DIR / "__init__.py"), (
        f"'import telemetry' resolved to {list(package.__path__)}: put the project root "
        "before tests/ in pytest's pythonpath (pythonpath = ['.', 'tests'])"
    )


def test_all_is_sorted_and_every_name_exists() -> None:
    """Sorted as ruff's RUF022 sorts: CONSTANTS, then Classes, then functions."""
    package = importlib.import_module("telemetry.__init__")
    names = list(package.__all__)

    def key(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert names == sorted(names, key=key)
    assert len(set(names)) == len(names)
    assert [name for name in names if not hasattr(package, name)] == []


def test_telemetry_imports_neither_graph_nor_actors_nor_grpc_at_module_level() -> None:
    """The dependency rule, and grpc only inside OtlpReceiver.start."""
    for path in PACKAGE_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & {"graph", "actors", "grpc"}, f"{path.name}: {ast.unparse(node)}"
