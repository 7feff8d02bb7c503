"""The project's one root error and the small tree under it.

Messages say what was wrong, with the offending value, and what to do about it: a
person reading a DLQ entry or a start-up failure should not need the source.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = [
    "CheckpointStoreError",
    "ConfigError",
    "CtxdError",
    "FencedError",
    "InvalidEntryError",
    "PluginError",
    "RedisModulesMissingError",
    "WorkflowError",
    "exception_chain",
]


class CtxdError(Exception):
    """Root of every error ctxd raises on purpose."""


class ConfigError(CtxdError, ValueError):
    """A setting has a value ctxd cannot use; raised at start-up, before any work."""


class FencedError(CtxdError):
    """A write fenced by a lease was refused: this process no longer holds the lease.

    Raised in place of Redis's ``FENCED`` script error (one place turns one into the
    other: :func:`actors.runtime.scripts.call_script`), and when a lease could not be
    renewed. It is never the event's fault: the lease's new holder redoes the work, so
    callers stop what they were doing under the lease instead of retrying it.
    """


class InvalidEntryError(CtxdError, ValueError):
    """A stream entry breaks the input contract; it goes to the DLQ at once.

    Attributes:
        reason: a short machine-readable tag (``missing_workflow_id``, ``oversized_content``…).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PluginError(CtxdError):
    """A plug-in (the analyzer named by ``CTXD_ANALYZER``) raised a ``BaseException``
    that is not an ``Exception`` (nor cancellation or a process exit).

    Raised at the plug-in boundary (:class:`graph.work.WorkHandlers`) in place of the
    original, which is its ``__cause__``, so nothing upstream has to catch
    ``BaseException``. It is not a step failure to record and go on from: the actor
    running the plug-in crashes and is restarted (its request stays pending), and with
    ``CTXD_DISPATCH=local`` the graph run fails (retried, then dead-lettered as poison).
    """


class CheckpointStoreError(CtxdError):
    """The checkpoint store cannot answer state history (a Redis Cluster, say).

    Raised at start, before any work: state, history, rollback and integrity recovery
    search the store's indexes, and a store that answers them partly would lose state
    silently instead of failing.
    """


class RedisModulesMissingError(CtxdError):
    """The configured Redis lacks RedisJSON or RediSearch, which the checkpointer needs."""


class WorkflowError(CtxdError):
    """A workflow could not be advanced (state missing, checkpoint refused, bad resume value)."""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the members of exception groups, once each.

    Depth first: a group's members in order, a cause before a context. Errors reach the
    service wrapped (LangGraph, redisvl, task groups); callers ask what is inside.
    """
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            stack.extend(reversed(current.exceptions))
        for linked in (current.__context__, current.__cause__):
            if linked is not None:
                stack.append(linked)
