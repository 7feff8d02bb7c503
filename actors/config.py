"""ctxd's settings: defaults, then an optional TOML file, then ``CTXD_*`` variables.

Every bad value stops start-up with one line naming the setting, the value and what is
allowed (a :class:`~graph.errors.ConfigError`). The TOML file holds the same keys as
the environment, lower-cased and without the prefix, in a ``[ctxd]`` table, plus the
``[routing]`` and ``[analyzer]`` tables that graph/ reads::

    [ctxd]
    redis_url = "redis://ctxd:secret@redis:6379/0"
    concurrency = 32

    [routing.thresholds.high_quality]
    quality = 0.92
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, TypeVar, get_args

from actors.runtime.redis_errors import check_redis_url
from graph.errors import ConfigError
from graph.features import AnalyzerPolicy
from graph.routing import RoutingConfig

__all__ = [
    "CheckpointerName",
    "DispatchMode",
    "DurabilityMode",
    "LogFormat",
    "LogLevel",
    "MultitaskPolicy",
    "Settings",
    "load_settings",
    "split_cluster_option",
]

_T = TypeVar("_T")
_C = TypeVar("_C", bound=str)
_ENV_PREFIX = "CTXD_"

CheckpointerName = Literal["redis", "memory", "postgres"]
"""``CTXD_CHECKPOINTER``: where workflow state is kept."""

DurabilityMode = Literal["sync", "async", "exit"]
"""``CTXD_DURABILITY``: LangGraph's durability mode (``langgraph.types.Durability``)."""

MultitaskPolicy = Literal["enqueue", "reject", "interrupt", "rollback"]
"""``CTXD_MULTITASK``: what an event for a busy workflow does."""

LogLevel = Literal["debug", "info", "warning", "error"]
"""``CTXD_LOG_LEVEL``."""

LogFormat = Literal["auto", "json", "console"]
"""``CTXD_LOG_FORMAT``: JSON lines, console, or by whether stderr is a terminal."""

DispatchMode = Literal["actors", "local"]
"""``CTXD_DISPATCH``: work through the actor mailboxes, or in-process."""


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ctxd"


@dataclass(frozen=True)
class Settings:
    """Everything the daemon and the CLI need to know, validated.

    Attributes mirror the ``CTXD_*`` variables (``redis_url`` ↔ ``CTXD_REDIS_URL``);
    ``routing`` and ``analyzer_policy`` are the config file's ``[routing]`` and
    ``[analyzer]`` tables, parsed and validated when the settings are loaded.
    """

    redis_url: str | None = None
    redis_max_outage: float = 0.0
    state_dir: Path = field(default_factory=_default_state_dir)
    embedded_port: int = 0
    stream_prefix: str = "ctxd"
    group: str = "ctxd"
    instance: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    checkpointer: CheckpointerName = "redis"
    checkpoint_url: str | None = None
    """``CTXD_CHECKPOINT_URL``: the Redis of checkpoints when it is not the service Redis
    (a standalone Redis with the modules beside a Redis Cluster); the service Redis if None."""
    postgres_url: str | None = None
    durability: DurabilityMode = "exit"
    concurrency: int = 16
    batch_size: int = 128
    read_count: int = 128
    block_ms: int = 1000
    event_timeout: float = 30.0
    max_deliveries: int = 5
    max_content_bytes: int = 65536
    max_fields: int = 32
    max_entry_bytes: int = 128 * 1024
    dlq_field_bytes: int = 4096
    dedupe_ttl: int = 24 * 3600
    retain_checkpoints: int = 20
    idle_workflow_ttl: int = 30 * 24 * 3600
    output_maxlen: int = 100_000
    dlq_maxlen: int = 10_000
    reply_maxlen: int = 10_000
    parked_maxlen: int = 10_000
    partitions: int = 64
    lease_ttl: float = 1.5
    multitask: MultitaskPolicy = "enqueue"
    drain_budget: float = 20.0
    trim_interval: float = 60.0
    wait_aof: bool = False
    analyzer: str = "graph.analysis:heuristic_analyzer"
    escalation_pauses: bool = False
    log_level: LogLevel = "info"
    log_format: LogFormat = "auto"
    dispatch: DispatchMode = "actors"
    ask_timeout: float = 10.0
    actor_workers: int = 2
    actor_read_count: int = 16
    max_asks_in_flight: int = 256
    breaker_window: int = 50
    breaker_minimum_calls: int = 20
    breaker_failure_rate: float = 0.5
    breaker_open_wait: float = 30.0
    breaker_half_open_calls: int = 3
    restart_intensity: int = 5
    restart_period: float = 30.0
    restart_backoff: float = 0.2
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    analyzer_policy: AnalyzerPolicy = field(default_factory=AnalyzerPolicy)
    cluster: bool = False
    """Whether ``CTXD_REDIS_URL`` names a Redis Cluster (found when the client connects)."""

    @property
    def input_stream(self) -> str:
        """The stream producers append to (``ctxd:in``)."""
        return f"{self.stream_prefix}:in"

    @property
    def output_stream(self) -> str:
        """One result per event (``ctxd:out``)."""
        return f"{self.stream_prefix}:out"

    @property
    def dlq_stream(self) -> str:
        """Dead letters: invalid or poison entries (``ctxd:dlq``)."""
        return f"{self.stream_prefix}:dlq"

    def key(self, *parts: str) -> str:
        """A Redis key under the common prefix: ``key("done", id)`` → ``ctxd:done:id``."""
        return ":".join((self.stream_prefix, *parts))


def _parse_int(minimum: int, maximum: int | None = None) -> Callable[[str, object], int]:
    def parse(name: str, raw: object) -> int:
        try:
            value = int(raw) if isinstance(raw, int) else int(str(raw).strip())
        except ValueError:
            value = None
        if value is None or isinstance(raw, bool):
            raise ConfigError(f"{name}={raw!r} is not a whole number")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            raise ConfigError(f"{name}={raw!r} is out of range: expected >= {minimum}{upper}")
        return value

    return parse


def _parse_int_or_off(minimum: int) -> Callable[[str, object], int]:
    """A retention bound: 0 turns it off, anything else must be at least ``minimum``."""
    parse_int = _parse_int(0)

    def parse(name: str, raw: object) -> int:
        value = parse_int(name, raw)
        if 0 < value < minimum:
            raise ConfigError(
                f"{name}={raw!r} is out of range: expected 0 (no bound) or >= {minimum}"
            )
        return value

    return parse


def _parse_retain(name: str, raw: object) -> int:
    value = _parse_int(0)(name, raw)
    if value == 1:
        raise ConfigError(
            f"{name}={raw!r} is out of range: expected 0 (keep every checkpoint) or >= 2 "
            "(integrity recovery rolls a tampered latest checkpoint back to the one before)"
        )
    return value


def _parse_float(minimum: float) -> Callable[[str, object], float]:
    def parse(name: str, raw: object) -> float:
        try:
            value = float(raw) if isinstance(raw, int | float) else float(str(raw).strip())
        except ValueError:
            value = None
        if value is None or isinstance(raw, bool):
            raise ConfigError(f"{name}={raw!r} is not a number")
        if not value >= minimum or value == float("inf"):
            raise ConfigError(f"{name}={raw!r} is out of range: expected a number >= {minimum}")
        return value

    return parse


def _parse_fraction(name: str, raw: object) -> float:
    value = _parse_float(0.0)(name, raw)
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name}={raw!r} is out of range: expected a number in (0, 1]")
    return value


def _parse_choice(choices: tuple[_C, ...]) -> Callable[[str, object], _C]:
    """A parser of one of ``choices`` (a ``Literal``'s arguments), returning that Literal."""

    def parse(name: str, raw: object) -> _C:
        value = str(raw).strip().lower()
        for choice in choices:
            if value == choice:
                return choice
        raise ConfigError(f"{name}={raw!r} is not allowed: expected one of {', '.join(choices)}")

    return parse


_CHECKPOINTERS: tuple[CheckpointerName, ...] = get_args(CheckpointerName)
_DURABILITIES: tuple[DurabilityMode, ...] = get_args(DurabilityMode)
_MULTITASK_POLICIES: tuple[MultitaskPolicy, ...] = get_args(MultitaskPolicy)
_LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
_LOG_FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
_DISPATCH_MODES: tuple[DispatchMode, ...] = get_args(DispatchMode)


def _parse_bool(name: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    value = str(raw).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean: expected true or false")


def _parse_name(name: str, raw: object) -> str:
    value = str(raw).strip()
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-{}")
    if not value or len(value) > 100 or not set(value) <= allowed:
        raise ConfigError(
            f"{name}={raw!r} is not a valid name: use 1-100 characters of "
            "letters, digits and _ . : - { } (braces for a Redis Cluster hash tag)"
        )
    return value


def _parse_prefix(name: str, raw: object) -> str:
    value = _parse_name(name, raw)
    if "{" in value or "}" in value:
        raise ConfigError(
            f"{name}={raw!r} holds a hash tag: ctxd tags each partition's keys itself "
            "({prefix}:{p<n>}:...) so partitions spread over a cluster's shards, and a tag in "
            "the prefix would put every key in one slot; use a prefix without braces"
        )
    return value


def _parse_url(*schemes: str) -> Callable[[str, object], str | None]:
    def parse(name: str, raw: object) -> str | None:
        value = str(raw).strip()
        if not value:
            return None
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in schemes:
            raise ConfigError(
                f"{name} has scheme {scheme or '(none)'!r}: expected a URL starting with "
                f"{' or '.join(s + '://' for s in schemes)}"
            )
        return value

    return parse


def _parse_redis_url(name: str, raw: object) -> str | None:
    value = _parse_url("redis", "rediss", "unix")(name, raw)
    if value is None:
        return None
    split_cluster_option(value, name=name)  # a bad ?cluster= value is a config error
    return check_redis_url(name, value)


_CLUSTER_OPTION = "cluster"
_CLUSTER_VALUES = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def split_cluster_option(url: str, *, name: str = "CTXD_REDIS_URL") -> tuple[str, bool | None]:
    """``url`` without ctxd's ``cluster`` query option, and the option's value.

    ``?cluster=true`` says the URL names a Redis Cluster (ctxd then uses redis-py's
    cluster client), ``?cluster=false`` a single server; without it ctxd asks the server
    (``INFO cluster``). redis-py does not know the option (it would pass it to the
    connection and fail), so every client is given the URL without it.

    Returns:
        The URL with the option removed (other query options kept as written) and
        True, False or None (not stated).

    Raises:
        ConfigError: the option has a value other than true/false/yes/no/1/0.
    """
    base, sep, query = url.partition("?")
    if not sep:
        return url, None
    kept: list[str] = []
    stated: bool | None = None
    for item in query.split("&"):
        key, _, value = item.partition("=")
        if key != _CLUSTER_OPTION:
            kept.append(item)
            continue
        if value.strip().lower() not in _CLUSTER_VALUES:
            raise ConfigError(
                f"{name}: ?cluster={value!r} is not understood: use ?cluster=true (a Redis "
                "Cluster), ?cluster=false (one server) or leave it out (ctxd asks the server)"
            )
        stated = _CLUSTER_VALUES[value.strip().lower()]
    kept = [item for item in kept if item]
    return (f"{base}?{'&'.join(kept)}" if kept else base), stated


def _parse_text(name: str, raw: object) -> str:
    value = str(raw).strip()
    if not value:
        raise ConfigError(f"{name} is empty: give a value or unset it")
    return value


def _parse_path(name: str, raw: object) -> Path:
    return Path(_parse_text(name, raw)).expanduser()


_PARSERS: dict[str, Callable[[str, object], object]] = {
    "redis_url": _parse_redis_url,
    "redis_max_outage": _parse_float(0.0),
    "state_dir": _parse_path,
    "embedded_port": _parse_int(0, 65535),
    "stream_prefix": _parse_prefix,
    "group": _parse_name,
    "instance": _parse_name,
    "checkpointer": _parse_choice(_CHECKPOINTERS),
    "checkpoint_url": _parse_redis_url,
    "postgres_url": _parse_url("postgresql", "postgres"),
    "durability": _parse_choice(_DURABILITIES),
    "concurrency": _parse_int(1, 4096),
    "batch_size": _parse_int(1, 1000),
    "read_count": _parse_int(1, 10000),
    "block_ms": _parse_int(1, 60000),
    "event_timeout": _parse_float(0.1),
    "max_deliveries": _parse_int(1, 1000),
    "max_content_bytes": _parse_int(1, 512 * 1024 * 1024),
    "max_fields": _parse_int(8, 1000),
    "max_entry_bytes": _parse_int(1024, 1024 * 1024 * 1024),
    "dlq_field_bytes": _parse_int(64, 16 * 1024 * 1024),
    "dedupe_ttl": _parse_int(1),
    "retain_checkpoints": _parse_retain,
    "idle_workflow_ttl": _parse_int_or_off(60),
    "output_maxlen": _parse_int_or_off(100),
    "dlq_maxlen": _parse_int_or_off(100),
    "reply_maxlen": _parse_int_or_off(100),
    "parked_maxlen": _parse_int_or_off(1),
    "partitions": _parse_int(1, 1024),
    "lease_ttl": _parse_float(0.5),
    "multitask": _parse_choice(_MULTITASK_POLICIES),
    "drain_budget": _parse_float(0.0),
    "trim_interval": _parse_float(0.0),
    "wait_aof": _parse_bool,
    "analyzer": _parse_text,
    "escalation_pauses": _parse_bool,
    "log_level": _parse_choice(_LOG_LEVELS),
    "log_format": _parse_choice(_LOG_FORMATS),
    "dispatch": _parse_choice(_DISPATCH_MODES),
    "ask_timeout": _parse_float(0.05),
    "actor_workers": _parse_int(1, 256),
    "actor_read_count": _parse_int(1, 1000),
    "max_asks_in_flight": _parse_int(1, 65536),
    "breaker_window": _parse_int(1, 10000),
    "breaker_minimum_calls": _parse_int(1, 10000),
    "breaker_failure_rate": _parse_fraction,
    "breaker_open_wait": _parse_float(0.001),
    "breaker_half_open_calls": _parse_int(1, 1000),
    "restart_intensity": _parse_int(0, 1000),
    "restart_period": _parse_float(0.001),
    "restart_backoff": _parse_float(0.0),
}


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


def _table(document: Mapping[str, object], section: str) -> Mapping[str, object]:
    table = document.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file: [{section}] must be a table")
    return table


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    config_file: Path | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Build validated settings: defaults < TOML file < ``CTXD_*`` < ``overrides``.

    Args:
        environ: the environment (``os.environ`` by default).
        config_file: a TOML file; ``CTXD_CONFIG`` names one when this is None.
        overrides: values from command-line flags, by setting name.

    Raises:
        ConfigError: naming the setting, the value and what is allowed.
    """
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    if config_file is None and env.get("CTXD_CONFIG"):
        config_file = Path(env["CTXD_CONFIG"])
    if config_file is not None:
        document = _read_toml(config_file)
        unknown_tables = sorted(set(document) - {"ctxd", "routing", "analyzer"})
        if unknown_tables:
            raise ConfigError(
                f"config file {str(config_file)!r} has unknown table(s) {unknown_tables}: "
                "expected [ctxd], [routing] and [analyzer]"
            )
        # Parsed here, once: a bad [routing] or [analyzer] value stops start-up like
        # any other setting, and every user gets the typed record.
        values["routing"] = RoutingConfig.from_mapping(_table(document, "routing"))
        values["analyzer_policy"] = AnalyzerPolicy.from_mapping(_table(document, "analyzer"))
        table = document.get("ctxd", {})
        if not isinstance(table, dict):
            raise ConfigError("config file: [ctxd] must be a table")
        for key, raw in table.items():
            if key not in _PARSERS:
                raise ConfigError(
                    f"config file: [ctxd] {key!r} is not a setting; known: {', '.join(_PARSERS)}"
                )
            values[key] = _PARSERS[key](f"[ctxd] {key}", raw)
    known = {f"{_ENV_PREFIX}{name.upper()}" for name in _PARSERS} | {"CTXD_CONFIG"}
    for variable, raw in env.items():
        if not variable.startswith(_ENV_PREFIX):
            continue
        if variable not in known:
            raise ConfigError(
                f"{variable} is not a ctxd setting; known: {', '.join(sorted(known))}"
            )
        name = variable[len(_ENV_PREFIX) :].lower()
        if name != "config":
            values[name] = _PARSERS[name](variable, raw)
    for name, raw in (overrides or {}).items():
        if raw is not None:
            values[name] = _PARSERS[name](f"--{name.replace('_', '-')}", raw)
    settings = replace(Settings(), **values)  # type: ignore[arg-type]
    settings = _entry_limit(settings, explicit="max_entry_bytes" in values)
    if settings.checkpointer == "postgres" and not settings.postgres_url:
        raise ConfigError(
            "CTXD_CHECKPOINTER=postgres needs CTXD_POSTGRES_URL (postgresql://user@host/db)"
        )
    if settings.checkpoint_url is not None and settings.checkpointer != "redis":
        raise ConfigError(
            f"CTXD_CHECKPOINT_URL is the Redis of CTXD_CHECKPOINTER=redis, but "
            f"CTXD_CHECKPOINTER={settings.checkpointer}: unset one of them"
        )
    if settings.breaker_minimum_calls > settings.breaker_window:
        raise ConfigError(
            f"CTXD_BREAKER_MINIMUM_CALLS={settings.breaker_minimum_calls} exceeds "
            f"CTXD_BREAKER_WINDOW={settings.breaker_window}: the window must hold that many calls"
        )
    return settings


def _entry_limit(settings: Settings, *, explicit: bool) -> Settings:
    """CTXD_MAX_ENTRY_BYTES: when unset, room for a full content plus 64 KiB of other
    fields (metadata, ids, unknown fields); when set, never below the content limit."""
    if not explicit:
        derived = max(Settings.max_entry_bytes, settings.max_content_bytes + 64 * 1024)
        return replace(settings, max_entry_bytes=derived)
    if settings.max_entry_bytes < settings.max_content_bytes:
        raise ConfigError(
            f"CTXD_MAX_ENTRY_BYTES={settings.max_entry_bytes} is below "
            f"CTXD_MAX_CONTENT_BYTES={settings.max_content_bytes}: an entry holds its "
            "content and more, so raise CTXD_MAX_ENTRY_BYTES (or unset it to derive it)"
        )
    return settings


def setting_names() -> tuple[str, ...]:
    """All setting names, for ``--help`` texts and docs."""
    return tuple(f.name for f in fields(Settings) if f.name in _PARSERS)
