"""A pool of workers for one actor kind, reading its mailbox through a consumer group.

Each worker is a consumer named ``{instance}:{kind}:{slot}``: on (re)start it reads its
own pending entries first (``0``), then new ones (``>``), ``COUNT``-bounded and
``BLOCK``-bounded, and handles each batch concurrently with the kind's
:data:`RequestHandler` (the service's ``graph.work.WorkHandlers``). A request is
answered and acknowledged together (reply ``XADD`` + ``XACK`` + ``XDEL`` in one
``MULTI``), so a worker that crashes mid-message leaves it pending and its restarted
self handles it. A handler that raises is not a crash: the asker gets an error reply.
The one exception is a :class:`~graph.errors.PluginError` (the analyzer plug-in raised
a ``BaseException``): the worker crashes and is restarted, the request stays pending,
and why it crashed is kept (``{mailbox}:crashes``) for its DLQ entry should it become
poison.

A reclaimer per pool (consumer ``{instance}:{kind}:reclaim``) takes over entries idle
longer than twice the ask timeout with ``XAUTOCLAIM`` (never ``JUSTID``: the delivery
counter must count) — the pending messages of a worker process that died. Given a
:class:`Liveness` (the service passes the heartbeats), it also claims at once the
pending entries of consumers whose process is no longer live, once they are idle for
the liveness's ``min_idle``: their askers still wait (an ask times out after
``CTXD_ASK_TIMEOUT``, 10 s), so a SIGKILLed process's requests are answered seconds after
its death instead of failing their runs. An entry
delivered more than ``max_deliveries`` times goes to the DLQ (``ctxd:dlq`` with its
``kind``) and its asker gets an error reply.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import anyio
import structlog
from anyio.abc import TaskStatus
from opentelemetry import trace
from opentelemetry.trace import Tracer
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from actors.runtime import scripts
from actors.runtime.availability import RedisAvailability, is_outage
from actors.runtime.consumer import PlainGroupSource, consume_group
from actors.runtime.mailbox import JSON, ActorReply, ActorRequest, MailboxSettings, mailbox_stream
from actors.runtime.redis_io import (
    Entry,
    autoclaim,
    claim_pending_of,
    ensure_group,
    is_cluster_client,
    pending_consumers,
    text,
)
from actors.runtime.scripts import call_script
from actors.runtime.supervisor import ChildSpec, RestartEvent, Supervisor, SupervisorConfig
from graph.errors import PluginError
from telemetry.propagation import extract_context
from telemetry.spans import process_span, record_error, send_span

__all__ = [
    "ActorPool",
    "DeadLetter",
    "FaultHook",
    "FaultPoint",
    "Liveness",
    "PoolSettings",
    "RequestHandler",
]

_log = structlog.get_logger("ctxd.actors")
_CRASH_CHARS = 500
_CRASH_TTL = 86_400  # seconds; a crash matters until its request is answered or dead
_REPLY_STREAM_TTL = 86_400  # seconds after its last reply; as POOL_FINISH does

_Done = tuple[str, str, "ActorReply | None"]
"""A handled entry: its id, the stream to answer on ("" for none), the answer."""

FaultPoint = Literal["received", "handled"]
"""Where a :data:`FaultHook` is called: before the handler runs, or before the reply."""

FaultHook = Callable[[FaultPoint, ActorRequest], Awaitable[None]]
"""Test seam: awaited at each :data:`FaultPoint`; raising there crashes the worker."""

RequestHandler = Callable[[JSON], Awaitable[dict[str, JSON]]]
"""The work of one kind: a request's decoded payload in, the reply's JSON object out.

Raising answers the asker with the error; raising :class:`~graph.errors.PluginError`
crashes the worker instead.
"""


@dataclass(frozen=True)
class Liveness:
    """Which processes are alive, so a pool takes over a dead one's requests at once.

    Args:
        live: the names of the live processes (a consumer ``{name}:{kind}:{slot}``
            belongs to process ``name``).
        every: seconds between looks.
        min_idle: seconds an entry of a dead process's consumer must have been idle
            before it is claimed (at least the heartbeat window: a process that only
            stalled keeps what it is working on).
    """

    live: Callable[[], Awaitable[Collection[str]]]
    every: float
    min_idle: float


class DeadLetter(Protocol):
    """Writes a request the pool gives up on to the dead-letter stream and acknowledges it.

    The DLQ entry's layout belongs to the stream service, so the service passes this in.
    """

    async def __call__(
        self,
        *,
        stream: str,
        source_id: str,
        fields: Mapping[str, str],
        reason: str,
        error: str,
        attempts: int,
    ) -> None:
        """Dead-letter entry ``source_id`` of ``stream`` (fields decoded) with why."""
        ...


class PoolSettings(MailboxSettings, Protocol):
    """What a pool reads from the process's settings (``actors.config.Settings`` has it)."""

    @property
    def group(self) -> str:
        """The consumer group every mailbox is read through."""
        ...

    @property
    def actor_workers(self) -> int:
        """Workers per kind in this process."""
        ...

    @property
    def actor_read_count(self) -> int:
        """Requests one worker reads at a time."""
        ...

    @property
    def ask_timeout(self) -> float:
        """Seconds an asker waits; entries idle twice as long are reclaimed."""
        ...

    @property
    def max_deliveries(self) -> int:
        """Deliveries after which a request is poison."""
        ...

    @property
    def reply_maxlen(self) -> int:
        """Approximate bound of a reply stream (0: none)."""
        ...


class ActorPool:
    """The workers and the reclaimer of one actor kind, under a one_for_one supervisor.

    Args:
        redis: the client (bytes replies).
        settings: group, instance, worker count, read count, ask timeout, deliveries.
        kind: the actor kind served.
        handler: the work itself.
        dead_letter: where poison and invalid requests go.
        tracer: for the ``process`` and reply ``send`` spans.
        fault: test seam, see :data:`FaultHook`.
        availability: the process's Redis monitor; workers and the reclaimer wait out
            outages with it instead of crashing (they raise them when None).
        liveness: which processes are alive (the reclaimer claims a dead one's pending
            requests at once); None: only entries idle twice the ask timeout are taken.
    """

    def __init__(
        self,
        redis: Redis,
        settings: PoolSettings,
        kind: str,
        handler: RequestHandler,
        *,
        dead_letter: DeadLetter,
        tracer: Tracer | None = None,
        fault: FaultHook | None = None,
        availability: RedisAvailability | None = None,
        liveness: Liveness | None = None,
    ) -> None:
        self._redis = redis
        self._availability = availability
        self._liveness = liveness
        self._settings = settings
        self._kind = str(kind)
        self._handler = handler
        self._dead_letter_to = dead_letter
        self._tracer = tracer or trace.get_tracer("ctxd.actors")
        self._fault = fault
        self._stream = mailbox_stream(settings, self._kind)
        self._crashes = f"{self._stream}:crashes"
        self.handled = 0
        """Requests answered by this pool since start."""

    @property
    def stream(self) -> str:
        """The mailbox stream this pool reads."""
        return self._stream

    def consumer(self, slot: int | str) -> str:
        """The consumer name of a worker slot (or ``reclaim``)."""
        return f"{self._settings.instance}:{self._kind}:{slot}"

    def supervisor(
        self,
        config: SupervisorConfig,
        *,
        on_restart: Callable[[RestartEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Supervisor:
        """A one_for_one supervisor over this pool's workers and its reclaimer."""
        children = [
            ChildSpec(f"{self._kind}.{slot}", self._worker_start(slot))
            for slot in range(self._settings.actor_workers)
        ]
        children.append(ChildSpec(f"{self._kind}.reclaim", self._reclaim))
        return Supervisor(
            f"actor.{self._kind}", children, config, clock=clock, on_restart=on_restart
        )

    def _worker_start(self, slot: int) -> Callable[[TaskStatus[None]], Awaitable[None]]:
        async def start(task_status: TaskStatus[None]) -> None:
            await self.run_worker(slot, task_status=task_status)

        return start

    async def run_worker(
        self, slot: int, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """One worker: own pending entries first, then new ones, until cancelled.

        The read loop is :func:`~actors.runtime.consumer.consume_group`: an outage is
        waited out there (not a crash), anything else crashes the worker.
        """
        consumer = self.consumer(slot)
        await self._ensure_group()
        task_status.started()
        source = PlainGroupSource(
            self._redis,
            stream=self._stream,
            group=self._settings.group,
            consumer=consumer,
            block_ms=self._settings.block_ms,
        )

        async def handle(entries: list[Entry], redelivered: bool) -> None:
            deliveries: Mapping[str, int] = {}
            if redelivered:
                deliveries = await self._delivery_counts([eid for eid, _ in entries])
            await self._serve_batch(consumer, entries, deliveries)

        await consume_group(
            source, handle, count=self._settings.actor_read_count, availability=self._availability
        )

    async def _ensure_group(self) -> None:
        if self._availability is None:
            await ensure_group(self._redis, self._stream, self._settings.group)
        else:
            await self._availability.call(
                lambda: ensure_group(self._redis, self._stream, self._settings.group)
            )

    async def _wait_out(self, exc: Exception) -> None:
        """Wait out a Redis outage (not a crash: no restart counted); re-raise the rest."""
        if self._availability is None or not is_outage(exc):
            raise exc
        self._availability.report(exc)
        await self._availability.wait_available()

    async def _serve_batch(
        self, consumer: str, entries: list[Entry], deliveries: Mapping[str, int]
    ) -> None:
        """Handle a batch concurrently, then answer and acknowledge it in one script.

        A batch holding a redelivered request (after a crash) is served one request at a
        time, each answered at once, those that crashed a worker before last: a request
        that crashes its worker again takes only itself down, not the requests read
        with it.
        """
        if len(entries) > 1 and any(deliveries.get(eid, 1) > 1 for eid, _ in entries):
            crashed = await self._redis.hmget(self._crashes, [eid for eid, _ in entries])
            order = sorted(range(len(entries)), key=lambda i: crashed[i] is not None)
            for i in order:
                await self._serve_batch(consumer, [entries[i]], deliveries)
            return
        done: list[_Done] = []
        if len(entries) == 1:
            entry_id, raw = entries[0]
            await self._serve(consumer, entry_id, raw, deliveries.get(entry_id, 1), done)
        else:
            try:
                async with anyio.create_task_group() as tg:
                    for entry_id, raw in entries:
                        count = deliveries.get(entry_id, 1)
                        tg.start_soon(self._serve, consumer, entry_id, raw, count, done)
            except* PluginError as crashed:
                # The crash as itself (the restart log and metric name PluginError); the
                # batch's other requests stay pending with it and are served again.
                raise crashed.exceptions[0] from None
        await self._finish(done)
        self.handled += len(done)

    async def _reclaim(self, task_status: TaskStatus[None]) -> None:
        """Take over entries of dead consumers: at once when their process is known dead
        (:class:`Liveness`), otherwise once idle longer than twice the ask timeout."""
        consumer = self.consumer("reclaim")
        await self._ensure_group()
        task_status.started()
        scan_every = self._settings.ask_timeout
        every = min(scan_every, self._liveness.every) if self._liveness else scan_every
        next_scan = anyio.current_time() + scan_every
        while True:
            await anyio.sleep(every)
            try:
                if self._liveness is not None:
                    await self._claim_from_dead(consumer, self._liveness)
                if anyio.current_time() >= next_scan:
                    next_scan = anyio.current_time() + scan_every
                    await self._claim_idle(consumer)
            except Exception as exc:  # noqa: BLE001 - re-raised unless an outage
                await self._wait_out(exc)

    async def _claim_idle(self, consumer: str) -> None:
        """Claim and serve every entry idle longer than twice the ask timeout."""
        min_idle_ms = int(self._settings.ask_timeout * 2000)
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
                _log.info("reclaimed idle requests", kind=self._kind, count=len(claimed))
                counts = await self._delivery_counts([eid for eid, _ in claimed])
                await self._serve_batch(consumer, claimed, counts)
            if cursor == "0-0":
                return

    async def _claim_from_dead(self, consumer: str, liveness: Liveness) -> None:
        """Claim and serve the pending entries of consumers whose process is not live."""
        owners = await pending_consumers(self._redis, self._stream, self._settings.group)
        suffix = f":{self._kind}:"
        others = [
            c
            for c in owners
            if suffix in c and c.rsplit(":", 2)[0] != self._settings.instance  # not ours
        ]
        if not others:
            return
        live = set(await liveness.live())
        for owner in others:
            if owner.rsplit(":", 2)[0] in live:
                continue
            claimed = await claim_pending_of(
                self._redis,
                stream=self._stream,
                group=self._settings.group,
                owner=owner,
                consumer=consumer,
                min_idle_ms=int(liveness.min_idle * 1000),
            )
            if claimed:
                _log.info(
                    "took over a dead process's requests",
                    kind=self._kind,
                    consumer=owner,
                    count=len(claimed),
                )
                counts = await self._delivery_counts([eid for eid, _ in claimed])
                await self._serve_batch(consumer, claimed, counts)

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
        self,
        consumer: str,
        entry_id: str,
        raw: dict[bytes, bytes] | None,
        deliveries: int,
        done: list[_Done],
    ) -> None:
        if raw is None:  # deleted while pending: nothing to answer
            done.append((entry_id, "", None))
            return
        try:
            fields = {text(k): text(v) for k, v in raw.items()}
        except UnicodeDecodeError as exc:  # garbage appended to the mailbox: not a request
            copy = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
            problem = f"a field is not UTF-8 ({exc.reason} at byte {exc.start}): send text"
            await self._dead_letter(entry_id, copy, "invalid_request", problem, deliveries)
            return
        try:
            request = ActorRequest.from_fields(fields)
        except (KeyError, ValueError) as exc:
            await self._dead_letter(entry_id, fields, "invalid_request", repr(exc), deliveries)
            return
        if request.kind != self._kind:
            problem = f"kind {request.kind!r} sent to the {self._kind} mailbox"
            await self._dead_letter(entry_id, fields, "invalid_request", problem, deliveries)
            return
        crash = await self._redis.hget(self._crashes, entry_id) if deliveries > 1 else None
        if crash is not None or deliveries > self._settings.max_deliveries:
            # A request that crashed its worker with a PluginError does so again: one
            # crash (one restart) per such request, not CTXD_MAX_DELIVERIES of them,
            # which would spend the pool's restart intensity on a single bad event.
            why = (
                f"it crashed its worker: {text(crash)}; not handled again"
                if crash is not None
                else "each time the worker handling it stopped before answering (its "
                "process was killed, or the handler outlived the ask timeout)"
            )
            error = (
                f"delivered {deliveries} times without an answer (limit"
                f" {self._settings.max_deliveries}); {why}"
            )
            await self._dead_letter(entry_id, fields, "poison", error, deliveries)
            if crash is not None:
                await self._redis.hdel(self._crashes, entry_id)
            done.append(
                (entry_id, request.reply_to, ActorReply(request.id, False, error, consumer))
            )
            return
        if request.reply_to and request.deadline < time.time():
            _log.info("request expired before it was handled", kind=self._kind, id=request.id)
            done.append((entry_id, "", None))
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
                # The asker gives up at the deadline; a handler that hangs past it would
                # only hold a worker hostage, so it is cancelled there too.
                with anyio.fail_after(max(request.deadline - time.time(), 0.0)):
                    result = await self._handler(json.loads(request.payload))
                reply = ActorReply(request.id, True, json.dumps(result), consumer)
            except PluginError as exc:
                # Not a handler failure: the plug-in raised a BaseException. The worker
                # crashes (its supervisor restarts it) and the request stays pending; on
                # its next delivery the recorded crash sends it to the DLQ (see _serve).
                record_error(span, exc)
                _log.error("analyzer plug-in crashed its worker", kind=self._kind, error=str(exc))
                await self._remember_crash(entry_id, f"{type(exc).__name__}: {exc}")
                raise
            except Exception as exc:  # noqa: BLE001 - the asker gets the error, not a crash
                record_error(span, exc)
                _log.warning(
                    "actor handler failed",
                    kind=self._kind,
                    error=f"{type(exc).__name__}: {exc}",
                )
                reply = ActorReply(request.id, False, f"{type(exc).__name__}: {exc}", consumer)
            if self._fault is not None:
                await self._fault("handled", request)
        done.append((entry_id, request.reply_to, reply))

    async def _remember_crash(self, entry_id: str, error: str) -> None:
        """Keep why a request crashed its worker, for its DLQ entry should it come to that
        (the DLQ may be written by another process, after a restart). Best effort: the
        crash itself must propagate, not a Redis error on the way."""
        with contextlib.suppress(RedisError):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(self._crashes, entry_id, error[:_CRASH_CHARS])
                pipe.expire(self._crashes, _CRASH_TTL)
                await pipe.execute()

    async def _finish(self, done: list[_Done]) -> None:
        """Answer (where anyone asked), acknowledge and delete, atomically."""
        if not done:
            return
        if is_cluster_client(self._redis):
            await self._finish_across_slots(done)
            return
        keys = [self._stream]
        args: list[str | int] = [self._settings.group, self._settings.reply_maxlen, len(done)]
        for entry_id, reply_to, reply in done:
            answer = reply.to_fields() if reply_to and reply is not None else {}
            keys.append(reply_to if answer else self._stream)
            args += [entry_id, len(answer)]
            for name, value in answer.items():
                args += [name, value]
        streams = sorted({k for k in keys[1:] if k != self._stream})
        if streams:
            with send_span(self._tracer, stream=streams[0]):
                await call_script(self._redis, scripts.POOL_FINISH, keys=keys, args=args)
        else:
            await call_script(self._redis, scripts.POOL_FINISH, keys=keys, args=args)

    async def _finish_across_slots(self, done: list[_Done]) -> None:
        """:meth:`_finish` on a Redis Cluster, where the reply streams and the mailbox
        are in different slots and no one script may touch them all.

        Replies first, then acknowledge and delete: a crash between the two leaves the
        requests pending, so they are handled and answered again; the asker takes the
        first answer by request id and drops a late one. Answering after acknowledging
        could lose an answer instead.
        """
        replies = [
            (reply_to, reply.to_fields())
            for _, reply_to, reply in done
            if reply_to and reply is not None
        ]
        if replies:
            maxlen = self._settings.reply_maxlen or None  # 0: no bound
            with send_span(self._tracer, stream=sorted({r for r, _ in replies})[0]):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for stream, fields in replies:
                        body: dict[FieldT, EncodableT] = dict(fields.items())
                        pipe.xadd(stream, body, maxlen=maxlen, approximate=True)
                    # A reply_to that is no stream (WRONGTYPE) loses only its own reply.
                    added = await pipe.execute(raise_on_error=False)
                answered = sorted(
                    {
                        r
                        for (r, _), a in zip(replies, added, strict=True)
                        if not isinstance(a, Exception)
                    }
                )
                if answered:
                    # The reply stream of an asker that died goes away a day after its
                    # last reply (only streams a reply went to: never another key).
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for stream in answered:
                            pipe.expire(stream, _REPLY_STREAM_TTL)
                        await pipe.execute()
        ids = [entry_id for entry_id, _, _ in done]
        async with self._redis.pipeline(transaction=False) as pipe:  # one slot: the mailbox
            pipe.xack(self._stream, self._settings.group, *ids)
            pipe.xdel(self._stream, *ids)
            await pipe.execute()

    async def _dead_letter(
        self, entry_id: str, fields: dict[str, str], reason: str, error: str, attempts: int
    ) -> None:
        await self._dead_letter_to(
            stream=self._stream,
            source_id=entry_id,
            fields={**fields, "kind": self._kind},
            reason=reason,
            error=error,
            attempts=attempts,
        )
        _log.error(
            "actor request dead-lettered", kind=self._kind, source_id=entry_id, reason=reason
        )
