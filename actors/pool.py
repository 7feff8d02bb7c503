"""A pool of workers for one actor kind, reading its mailbox through a consumer group.

Each worker is a consumer named ``{instance}:{kind}:{slot}``: on (re)start it reads its
own pending entries first (``0``), then new ones (``>``), ``COUNT``-bounded and
``BLOCK``-bounded, and handles each batch concurrently with the kind's
:class:`~graph.work.WorkHandlers`. A request is answered and acknowledged together
(reply ``XADD`` + ``XACK`` + ``XDEL`` in one ``MULTI``), so a worker that crashes
mid-message leaves it pending and its restarted self handles it. A handler that
raises is not a crash: the asker gets an error reply.

A reclaimer per pool (consumer ``{instance}:{kind}:reclaim``) takes over entries idle
longer than twice the ask timeout with ``XAUTOCLAIM`` (never ``JUSTID``: the delivery
counter must count) — the pending messages of a worker process that died. An entry
delivered more than ``max_deliveries`` times goes to the DLQ (``ctxd:dlq`` with its
``kind``) and its asker gets an error reply.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal

import anyio
import structlog
from anyio.abc import TaskStatus
from opentelemetry import trace
from opentelemetry.trace import Tracer
from redis.asyncio import Redis

from actors.config import Settings
from actors.mailbox import ActorReply, ActorRequest, mailbox_stream
from actors.redis_io import Entry, autoclaim, read_group, text
from actors.streams import dead_letter, ensure_group
from actors.supervisor import ChildSpec, RestartEvent, Supervisor, SupervisorConfig
from graph.work import WorkHandlers, WorkKind
from telemetry.propagation import extract_context
from telemetry.spans import process_span, record_error, send_span

__all__ = ["ActorPool", "FaultHook", "FaultPoint"]

_log = structlog.get_logger("ctxd.actors")
_REPLY_MAXLEN = 10_000

FaultPoint = Literal["received", "handled"]
"""Where a :data:`FaultHook` is called: before the handler runs, or before the reply."""

FaultHook = Callable[[FaultPoint, ActorRequest], Awaitable[None]]
"""Test seam: awaited at each :data:`FaultPoint`; raising there crashes the worker."""


class ActorPool:
    """The workers and the reclaimer of one actor kind, under a one_for_one supervisor.

    Args:
        redis: the client (bytes replies).
        settings: group, instance, worker count, read count, ask timeout, deliveries.
        kind: the actor kind served.
        handlers: the work itself.
        tracer: for the ``process`` and reply ``send`` spans.
        fault: test seam, see :data:`FaultHook`.
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        kind: WorkKind,
        handlers: WorkHandlers,
        *,
        tracer: Tracer | None = None,
        fault: FaultHook | None = None,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._kind = kind
        self._handlers = handlers
        self._tracer = tracer or trace.get_tracer("ctxd.actors")
        self._fault = fault
        self._stream = mailbox_stream(settings, kind.value)
        self.handled = 0
        """Requests answered by this pool since start."""

    @property
    def stream(self) -> str:
        """The mailbox stream this pool reads."""
        return self._stream

    def consumer(self, slot: int | str) -> str:
        """The consumer name of a worker slot (or ``reclaim``)."""
        return f"{self._settings.instance}:{self._kind.value}:{slot}"

    def supervisor(
        self,
        config: SupervisorConfig,
        *,
        on_restart: Callable[[RestartEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Supervisor:
        """A one_for_one supervisor over this pool's workers and its reclaimer."""
        children = [
            ChildSpec(f"{self._kind.value}.{slot}", self._worker_start(slot))
            for slot in range(self._settings.actor_workers)
        ]
        children.append(ChildSpec(f"{self._kind.value}.reclaim", self._reclaim))
        return Supervisor(
            f"actor.{self._kind.value}", children, config, clock=clock, on_restart=on_restart
        )

    def _worker_start(self, slot: int) -> Callable[[TaskStatus[None]], Awaitable[None]]:
        async def start(task_status: TaskStatus[None]) -> None:
            await self.run_worker(slot, task_status=task_status)

        return start

    async def run_worker(
        self, slot: int, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """One worker: own pending entries first, then new ones, until cancelled."""
        consumer = self.consumer(slot)
        group = self._settings.group
        await ensure_group(self._redis, self._stream, group)
        task_status.started()
        cursor = "0"
        while True:
            entries = await read_group(
                self._redis,
                group=group,
                consumer=consumer,
                stream=self._stream,
                cursor=cursor,
                count=self._settings.actor_read_count,
                block=None if cursor != ">" else self._settings.block_ms,
            )
            deliveries: Mapping[str, int] = {}
            if cursor != ">":
                if not entries:
                    cursor = ">"
                    continue
                cursor = entries[-1][0]
                deliveries = await self._delivery_counts([eid for eid, _ in entries])
            await self._serve_batch(consumer, entries, deliveries)

    async def _serve_batch(
        self, consumer: str, entries: list[Entry], deliveries: Mapping[str, int]
    ) -> None:
        if len(entries) == 1:
            entry_id, raw = entries[0]
            await self._serve(consumer, entry_id, raw, deliveries.get(entry_id, 1))
            return
        async with anyio.create_task_group() as tg:
            for entry_id, raw in entries:
                tg.start_soon(self._serve, consumer, entry_id, raw, deliveries.get(entry_id, 1))

    async def _reclaim(self, task_status: TaskStatus[None]) -> None:
        """Take over entries of dead consumers: idle longer than twice the ask timeout."""
        consumer = self.consumer("reclaim")
        min_idle_ms = int(self._settings.ask_timeout * 2000)
        await ensure_group(self._redis, self._stream, self._settings.group)
        task_status.started()
        while True:
            await anyio.sleep(self._settings.ask_timeout)
            cursor = "0-0"
            while True:
                cursor, claimed = await autoclaim(
                    self._redis,
                    stream=self._stream,
                    group=self._settings.group,
                    consumer=consumer,
                    min_idle_ms=min_idle_ms,
                    cursor=cursor,
                )
                if claimed:
                    _log.info("reclaimed idle requests", kind=self._kind.value, count=len(claimed))
                    counts = await self._delivery_counts([eid for eid, _ in claimed])
                    await self._serve_batch(consumer, claimed, counts)
                if cursor == "0-0":
                    break

    async def _delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for eid in entry_ids:
                pipe.xpending_range(self._stream, self._settings.group, min=eid, max=eid, count=1)
            replies = await pipe.execute()
        return {
            eid: int(reply[0]["times_delivered"])
            for eid, reply in zip(entry_ids, replies, strict=True)
            if reply
        }

    async def _serve(
        self, consumer: str, entry_id: str, raw: dict[bytes, bytes] | None, deliveries: int
    ) -> None:
        if raw is None:  # deleted while pending: nothing to answer
            await self._finish(entry_id, "", None)
            return
        fields = {text(k): text(v) for k, v in raw.items()}
        try:
            request = ActorRequest.from_fields(fields)
        except (KeyError, ValueError) as exc:
            await self._dead_letter(entry_id, fields, "invalid_request", repr(exc), deliveries)
            return
        if request.kind != self._kind.value:
            problem = f"kind {request.kind!r} sent to the {self._kind.value} mailbox"
            await self._dead_letter(entry_id, fields, "invalid_request", problem, deliveries)
            return
        if deliveries > self._settings.max_deliveries:
            error = (
                f"delivered {deliveries} times without an answer (limit"
                f" {self._settings.max_deliveries}); see the workers' logs for the crash"
            )
            await self._dead_letter(entry_id, fields, "poison", error, deliveries)
            reply = ActorReply(request.id, False, error, consumer)
            await self._finish(entry_id, request.reply_to, reply)
            return
        if request.reply_to and request.deadline < time.time():
            _log.info("request expired before it was handled", kind=self._kind.value, id=request.id)
            await self._finish(entry_id, "", None)
            return
        with process_span(
            self._tracer,
            stream=self._stream,
            group=self._settings.group,
            consumer=consumer,
            message_id=entry_id,
            workflow_id=None,
            delivery_count=deliveries,
            parent=extract_context(fields),
        ) as span:
            if self._fault is not None:
                await self._fault("received", request)
            try:
                result = await self._handlers.handle(self._kind, json.loads(request.payload))
                reply = ActorReply(request.id, True, json.dumps(result), consumer)
            except Exception as exc:  # noqa: BLE001 - the asker gets the error, not a crash
                record_error(span, exc)
                _log.warning(
                    "actor handler failed",
                    kind=self._kind.value,
                    error=f"{type(exc).__name__}: {exc}",
                )
                reply = ActorReply(request.id, False, f"{type(exc).__name__}: {exc}", consumer)
            if self._fault is not None:
                await self._fault("handled", request)
            await self._finish(entry_id, request.reply_to, reply)
        self.handled += 1

    async def _finish(self, entry_id: str, reply_to: str, reply: ActorReply | None) -> None:
        """Answer (if anyone asked) and acknowledge + delete the entry, in one MULTI."""
        async with self._redis.pipeline(transaction=True) as pipe:
            if reply_to and reply is not None:
                pipe.xadd(
                    reply_to,
                    reply.to_fields(),  # type: ignore[arg-type]
                    maxlen=_REPLY_MAXLEN,
                    approximate=True,
                )
            pipe.xack(self._stream, self._settings.group, entry_id)
            pipe.xdel(self._stream, entry_id)
            if reply_to and reply is not None:
                with send_span(self._tracer, stream=reply_to):
                    await pipe.execute()
            else:
                await pipe.execute()

    async def _dead_letter(
        self, entry_id: str, fields: dict[str, str], reason: str, error: str, attempts: int
    ) -> None:
        await dead_letter(
            self._redis,
            dlq_stream=self._settings.dlq_stream,
            input_stream=self._stream,
            group=self._settings.group,
            source_id=entry_id,
            fields={**fields, "kind": self._kind.value},
            reason=reason,
            error=error,
            attempts=attempts,
        )
        _log.error(
            "actor request dead-lettered", kind=self._kind.value, source_id=entry_id, reason=reason
        )
