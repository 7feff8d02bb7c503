"""Reading plain-JSON values back as the types the code works with.

The workflow's state is plain JSON (:data:`graph.state.JSON`) and the schema check
(:func:`graph.state.state_problems`) has vouched for its shape by the time a node reads
it; these helpers say which type a node expects of a value, with the defaults the nodes
have always used for a value that is missing, ``None`` or empty. A value of another
type is a ``TypeError`` naming it, not a silent coercion.
"""

from __future__ import annotations

from typing import TypeGuard

from graph.state import JSON

__all__ = ["as_float", "as_int", "as_list", "as_object", "as_objects", "as_str", "is_object"]


def _wrong(value: JSON, expected: str) -> TypeError:
    return TypeError(f"expected {expected}, got {type(value).__name__} {str(value)[:60]!r}")


def is_object(value: JSON) -> TypeGuard[dict[str, JSON]]:
    """Whether ``value`` is a JSON object."""
    return isinstance(value, dict)


def as_int(value: JSON, default: int = 0) -> int:
    """``value`` as an int; ``default`` when it is falsy (missing, ``None``, 0)."""
    if not value:
        return default
    if isinstance(value, bool | int | float | str):
        return int(value)
    raise _wrong(value, "a number")


def as_float(value: JSON, default: float = 0.0) -> float:
    """``value`` as a float; ``default`` when it is falsy (missing, ``None``, 0)."""
    if not value:
        return default
    if isinstance(value, bool | int | float | str):
        return float(value)
    raise _wrong(value, "a number")


def as_str(value: JSON, default: str = "") -> str:
    """``value`` as text (``str()`` of a scalar); ``default`` when it is falsy."""
    if not value:
        return default
    if isinstance(value, dict | list):
        raise _wrong(value, "text")
    return str(value)


def as_list(value: JSON) -> list[JSON]:
    """A copy of a JSON array; empty for a falsy value."""
    if not value:
        return []
    if not isinstance(value, list):
        raise _wrong(value, "an array")
    return list(value)


def as_object(value: JSON) -> dict[str, JSON]:
    """A copy of a JSON object; empty for a falsy value."""
    if not value:
        return {}
    if not isinstance(value, dict):
        raise _wrong(value, "an object")
    return dict(value)


def as_objects(value: JSON) -> list[dict[str, JSON]]:
    """A copy of a JSON array of objects; empty for a falsy value."""
    items = as_list(value)
    for item in items:
        if not isinstance(item, dict):
            raise _wrong(item, "an object")
    return [item for item in items if isinstance(item, dict)]
