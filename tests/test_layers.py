"""The import rules between ctxd's layers (issue #13), read from the source with ``ast``.

``graph`` decides and ``telemetry`` shows: neither knows the actors. The actor runtime
knows no workflow: from ``graph`` it takes only the errors, and nothing from the stream
service, the application or their configuration. The stream service does not know the
application that composes it. Every import counts, also those inside functions and under
``TYPE_CHECKING``: a late import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Rule:
    """Modules under ``package`` may import none of ``forbidden`` except ``allowed``."""

    package: str
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()

    def breaks(self, imported: str) -> bool:
        """Whether importing ``imported`` from inside ``package`` breaks this rule."""
        if any(_within(imported, name) for name in self.allowed):
            return False
        return any(_within(imported, name) for name in self.forbidden)


RULES = (
    Rule("graph", ("actors",)),
    Rule("telemetry", ("graph", "actors")),
    Rule(
        "actors.runtime",
        ("graph", "actors.service", "actors.app", "actors.config"),
        allowed=("graph.errors",),
    ),
    Rule("actors.service", ("actors.app",)),
)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every module the file at ``path`` imports, with the line it does so on."""
    return _imports_of(path.read_text(), _module_name(path), is_package=path.name == "__init__.py")


def _imports_of(source: str, module: str, *, is_package: bool) -> Iterator[tuple[int, str]]:
    """Every module ``source`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            yield node.lineno, origin
            for alias in node.names:
                yield node.lineno, f"{origin}.{alias.name}"


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.package)
def test_layer_imports_only_what_its_rule_allows(rule: Rule) -> None:
    """No module of the layer imports a layer its rule forbids."""
    sources = _sources(rule.package)
    assert sources, f"no sources under {rule.package}"
    broken = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for path in sources
        for line, imported in _imports(path)
        if rule.breaks(imported)
    ]
    assert broken == []


def test_rules_catch_a_forbidden_import() -> None:
    """The checker sees plain, ``from``, relative and function-local imports."""
    runtime = next(rule for rule in RULES if rule.package == "actors.runtime")
    assert runtime.breaks("graph.work")
    assert runtime.breaks("actors.config")
    assert runtime.breaks("actors.service.streams.dead_letter")
    assert not runtime.breaks("graph.errors")
    assert not runtime.breaks("graph.errors.CtxdError")
    assert not runtime.breaks("actors.runtime.mailbox")
    assert not runtime.breaks("graphs")  # a prefix of a name is not the package
    source = (
        "from ..config import Settings\n"
        "from . import pool\n"
        "def f() -> None:\n"
        "    import graph.work\n"
        "    from graph import state\n"
    )
    found = {name for _, name in _imports_of(source, "actors.runtime.probe", is_package=False)}
    assert {"actors.config.Settings", "actors.runtime.pool", "graph.work", "graph.state"} <= found
