"""Actor mailboxes on Redis streams: the messages, ``tell`` and ``ask``.

Every actor kind has a mailbox stream ``{prefix}:actor:{kind}`` read by its workers
through the consumer group ``settings.group``. A request is a flat stream entry
(:class:`ActorRequest`: id, kind, JSON payload, reply stream, deadline, and the W3C
``traceparent``/``tracestate`` of the asker's ``send`` span). A worker answers on the
asker's per-instance reply stream ``{prefix}:reply:{instance}`` with an
:class:`ActorReply` carrying the request id.

:class:`Mailbox` is the asking side. One reader task per reply stream (:meth:`Mailbox.run`)
hands each reply to the waiting :meth:`Mailbox.ask` by correlation id, so an ask is one
``XADD`` plus one wake-up, whatever the number of asks in flight. Payloads are JSON
text in stream fields, never pickle.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias, cast

import anyio
import structlog
from opentelemetry import trace
from opentelemetry.trace import Tracer
from redis.asyncio import Redis

from actors.runtime.availability import RedisAvailability, is_outage
from actors.runtime.redis_io import text
from graph.errors import CtxdError
from telemetry.propagation import inject_fields
from telemetry.spans import send_span, set_message_id

__all__ = [
    "JSON",
    "ActorError",
    "ActorReply",
    "ActorRequest",
    "Mailbox",
    "MailboxSettings",
    "MailboxStatistics",
    "mailbox_stream",
    "reply_stream",
]

_log = structlog.get_logger("ctxd.mailbox")
_TRIM_EVERY = 256  # replies read between two trims of the reply stream

JSON: TypeAlias = dict[str, "JSON"] | list["JSON"] | str | int | float | bool | None
"""A plain-JSON value, as payloads and replies travel in mailbox fields.

The same shape as :data:`graph.state.JSON`, written again here because the runtime does
not import the domain; mypy treats the two aliases as one type.
"""


class MailboxSettings(Protocol):
    """What a mailbox reads from the process's settings (``actors.config.Settings`` has it).

    The runtime names the options it needs instead of importing the application's
    configuration, so it can be built from anything that carries them.
    """

    @property
    def stream_prefix(self) -> str:
        """The prefix of every stream name (``ctxd``)."""
        ...

    @property
    def instance(self) -> str:
        """This process's stable name; reply streams and consumers carry it."""
        ...

    @property
    def block_ms(self) -> int:
        """How long one blocking read waits, in milliseconds."""
        ...


def mailbox_stream(settings: MailboxSettings, kind: str) -> str:
    """The mailbox stream of an actor kind: ``{prefix}:actor:{kind}``."""
    return f"{settings.stream_prefix}:actor:{kind}"


def reply_stream(settings: MailboxSettings) -> str:
    """This instance's reply stream: ``{prefix}:reply:{instance}``."""
    return f"{settings.stream_prefix}:reply:{settings.instance}"


class ActorError(CtxdError):
    """An actor answered an ask with an error (its handler failed, or it gave up).

    Attributes:
        kind: the actor kind asked.
        consumer: the worker that answered.
    """

    def __init__(self, message: str, *, kind: str, consumer: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.consumer = consumer


@dataclass(frozen=True, slots=True)
class ActorRequest:
    """One mailbox entry.

    Attributes:
        id: correlation id (unique per request).
        kind: the actor kind.
        payload: the request as JSON text.
        reply_to: the stream to answer on; empty for a ``tell``.
        deadline: epoch seconds after which nobody waits for the answer.
        trace: ``traceparent``/``tracestate`` of the asker's span.
    """

    id: str
    kind: str
    payload: str
    reply_to: str
    deadline: float
    trace: Mapping[str, str] = field(default_factory=dict)

    def to_fields(self) -> dict[str, str]:
        """The stream entry's fields."""
        return {
            "id": self.id,
            "kind": self.kind,
            "payload": self.payload,
            "reply_to": self.reply_to,
            "deadline": repr(self.deadline),
            **self.trace,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> ActorRequest:
        """Parse a stream entry (decoded); raises KeyError/ValueError when malformed."""
        return cls(
            id=fields["id"],
            kind=fields["kind"],
            payload=fields["payload"],
            reply_to=fields.get("reply_to", ""),
            deadline=float(fields["deadline"]),
            trace={k: fields[k] for k in ("traceparent", "tracestate") if k in fields},
        )


@dataclass(frozen=True, slots=True)
class ActorReply:
    """One reply-stream entry.

    Attributes:
        id: the request's correlation id.
        ok: whether the handler succeeded.
        body: the reply as JSON text when ok, else the error message.
        consumer: the worker that served the request (``instance:kind:slot``).
    """

    id: str
    ok: bool
    body: str
    consumer: str

    def to_fields(self) -> dict[str, str]:
        """The stream entry's fields."""
        return {
            "id": self.id,
            "ok": "1" if self.ok else "0",
            "body": self.body,
            "consumer": self.consumer,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> ActorReply:
        """Parse a reply entry (decoded)."""
        return cls(
            fields["id"],
            fields.get("ok") == "1",
            fields.get("body", ""),
            fields.get("consumer", ""),
        )


@dataclass(frozen=True)
class MailboxStatistics:
    """A snapshot of the asking side.

    Attributes:
        waiting: asks waiting for their reply.
        replies: replies received since start.
        orphans: replies nobody waited for any more (their ask had timed out).
    """

    waiting: int
    replies: int
    orphans: int


class _Slot:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reply: ActorReply | None = None


class Mailbox:
    """Sends requests to actor mailboxes and routes replies back to their askers.

    Run :meth:`run` (one task) before asking.

    Args:
        redis: the client (bytes replies).
        settings: stream names, block time.
        tracer: for the ``send`` spans; the global one by default.
        availability: the process's Redis monitor; the reply reader waits out outages
            with it instead of crashing (it raises them when None).
    """

    def __init__(
        self,
        redis: Redis,
        settings: MailboxSettings,
        *,
        tracer: Tracer | None = None,
        availability: RedisAvailability | None = None,
    ) -> None:
        self._redis = redis
        self._availability = availability
        self._settings = settings
        self._tracer = tracer or trace.get_tracer("ctxd.actors")
        self._reply_stream = reply_stream(settings)
        self._waiting: dict[str, _Slot] = {}
        self._replies = 0
        self._orphans = 0
        self._ready = anyio.Event()

    @property
    def reply_stream(self) -> str:
        """Where this mailbox's replies arrive."""
        return self._reply_stream

    def statistics(self) -> MailboxStatistics:
        """A snapshot of the counters."""
        return MailboxStatistics(len(self._waiting), self._replies, self._orphans)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Read the reply stream and wake the askers, until cancelled."""
        availability = self._availability
        if not self._ready.is_set():
            # Replies to an earlier process of the same instance name are nobody's; on a
            # restart by the supervisor, what arrived meanwhile is kept and read.
            if availability is not None:
                await availability.call(lambda: self._redis.delete(self._reply_stream))
            else:
                await self._redis.delete(self._reply_stream)
            self._ready.set()
        last = "0-0"
        read_since_trim = 0
        task_status.started()
        block = self._settings.block_ms
        while True:
            try:
                reply = cast(
                    "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None",
                    await self._redis.xread({self._reply_stream: last}, block=block, count=512),
                )
                if not reply:
                    continue
                entries = reply[0][1]
                for entry_id, raw in entries:
                    last = text(entry_id)
                    try:
                        answer = ActorReply.from_fields({text(k): text(v) for k, v in raw.items()})
                    except (UnicodeDecodeError, KeyError) as exc:
                        # Not written by a worker (workers write text with an id): skipped,
                        # or this reader would crash on it after every restart.
                        self._orphans += 1
                        _log.warning(
                            "unreadable reply skipped",
                            stream=self._reply_stream,
                            entry_id=last,
                            error=f"{type(exc).__name__}: {str(exc)[:200]}",
                        )
                        continue
                    self._deliver(answer)
                read_since_trim += len(entries)
                if read_since_trim >= _TRIM_EVERY:
                    # Read replies are nobody's business any more: keep the stream short.
                    await self._redis.xtrim(self._reply_stream, minid=last)
                    read_since_trim = 0
            except Exception as exc:
                if availability is None or not is_outage(exc):
                    raise
                availability.report(exc)  # an outage is not a crash of the reader
                await availability.wait_available()

    def _deliver(self, reply: ActorReply) -> None:
        self._replies += 1
        slot = self._waiting.pop(reply.id, None)
        if slot is None:
            self._orphans += 1
            return
        slot.reply = reply
        slot.event.set()

    async def tell(self, kind: str, payload: Mapping[str, JSON], *, ttl: float = 3600.0) -> str:
        """Send ``payload`` to ``kind`` without waiting for an answer; return the entry id."""
        stream = mailbox_stream(self._settings, kind)
        with send_span(self._tracer, stream=stream) as span:
            request = ActorRequest(
                id=uuid.uuid4().hex,
                kind=kind,
                payload=json.dumps(payload),
                reply_to="",
                deadline=time.time() + ttl,
                trace=inject_fields(),
            )
            entry_id = text(await self._redis.xadd(stream, request.to_fields()))  # type: ignore[arg-type]
            set_message_id(span, entry_id)
        return entry_id

    async def ask_reply(
        self,
        kind: str,
        payload: Mapping[str, JSON],
        timeout: float,  # noqa: ASYNC109
    ) -> ActorReply:
        """Send ``payload`` to ``kind`` and wait for the reply entry itself.

        Raises:
            TimeoutError: no reply within ``timeout`` seconds (the request stays in the
                mailbox; a late reply is dropped).
        """
        stream = mailbox_stream(self._settings, kind)
        correlation = uuid.uuid4().hex
        slot = _Slot()
        self._waiting[correlation] = slot
        try:
            with send_span(self._tracer, stream=stream) as span:
                request = ActorRequest(
                    id=correlation,
                    kind=kind,
                    payload=json.dumps(payload),
                    reply_to=self._reply_stream,
                    deadline=time.time() + timeout,
                    trace=inject_fields(),
                )
                with anyio.fail_after(timeout):
                    entry_id = await self._redis.xadd(stream, request.to_fields())  # type: ignore[arg-type]
                    set_message_id(span, entry_id)
                    await slot.event.wait()
        finally:
            self._waiting.pop(correlation, None)
        assert slot.reply is not None
        return slot.reply

    async def ask(
        self,
        kind: str,
        payload: Mapping[str, JSON],
        timeout: float,  # noqa: ASYNC109
    ) -> dict[str, JSON]:
        """Send ``payload`` to ``kind`` and return its JSON answer.

        Raises:
            TimeoutError: no reply within ``timeout`` seconds.
            ActorError: the actor answered with an error.
        """
        reply = await self.ask_reply(kind, payload, timeout)
        if not reply.ok:
            raise ActorError(
                f"actor {kind!r} ({reply.consumer}) failed: {reply.body}",
                kind=kind,
                consumer=reply.consumer,
            )
        return cast(dict[str, JSON], json.loads(reply.body))
