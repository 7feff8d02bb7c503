"""The Redis ACL rules ctxd needs, and a start-up check that the user has them.

A user missing one permission would otherwise start, then fail deep inside an actor
or the checkpointer with a raw traceback. :func:`check_redis_access` asks the server,
before anything runs, whether the configured user may run each command ctxd sends, on
keys of each family ctxd writes (``redis.acl_check_cmd`` in a Lua script: nothing is
executed), and names what is missing in one line.

:data:`ACL_RULES` is the rule list ``docs/operations.md`` prints (a test keeps the two
equal and runs the service as a user with exactly these rules).
"""

from __future__ import annotations

from typing import Final
from urllib.parse import parse_qsl, urlsplit

import anyio
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from actors.runtime import scripts
from actors.runtime.redis_errors import ACL_DOCS, RedisStartupError, describe_redis_error
from graph.checkpointer import check_redis_modules, refuse_cluster_store
from graph.errors import CtxdError
from telemetry.logging import redact_url

__all__ = [
    "ACL_RULES",
    "acl_rules",
    "acl_setuser_line",
    "check_redis_access",
    "check_redis_for_service",
]

_log = structlog.get_logger("ctxd.redis")

ACL_RULES: Final[tuple[tuple[str, str], ...]] = (
    ("on", "enable the user"),
    ("resetkeys", "forget any earlier key patterns"),
    ("~{prefix}:*", "every key ctxd and its checkpointer write starts with CTXD_STREAM_PREFIX"),
    ("resetchannels", "ctxd uses no pub/sub"),
    ("-@all", "start from nothing"),
    ("+@stream", "input, partition, output, DLQ and actor mailbox streams (XADD, XREADGROUP…)"),
    ("+@string", "leases, dedupe keys and the partition epoch (GET, SET, INCR)"),
    ("+@hash", "heartbeats and attempt counters (HINCRBY, HMGET, HDEL)"),
    ("+@sortedset", "the instance registry and the checkpointer's write registry"),
    (
        "+@keyspace",
        "DEL, UNLINK, EXISTS, EXPIRE, PEXPIRE, SCAN on ctxd's own keys "
        "(pruning, `ctxd forget`, `ctxd status`)",
    ),
    ("+@transaction", "MULTI/EXEC pipelines (heartbeats, checkpoint writes)"),
    ("+@connection", "HELLO, AUTH, PING, SELECT, CLIENT SETINFO, WAITAOF"),
    ("+evalsha", "commits, leases and DLQ moves are Lua scripts"),
    ("+script|load", "redis-py loads a script when the server does not know it yet"),
    ("+script|exists", "redis-py checks for loaded scripts"),
    ("-@dangerous", "no FLUSH*, KEYS, CONFIG, DEBUG, CLIENT KILL, SHUTDOWN…"),
    ("+info", "server state (memory, loading) for start-up and `ctxd status`"),
    ("+time", "heartbeats and liveness use Redis's clock, one clock for every host"),
    ("+module|list", "the start-up check that RedisJSON and RediSearch are loaded"),
    ("+memory|usage", "`ctxd status` sizes what is kept (sampled MEMORY USAGE)"),
    ("+json.get", "checkpoints are RedisJSON documents"),
    ("+json.set", "checkpoints are RedisJSON documents"),
    ("+json.merge", "the checkpointer marks a checkpoint that has writes"),
    ("+json.del", "the checkpointer deletes a thread's documents"),
    ("+ft.create", "the checkpointer's search indexes, created at start-up"),
    ("+ft.info", "the checkpointer checks its indexes exist"),
    ("+ft.search", "checkpoint history and lookups (`ctxd state`, rollback)"),
)
"""Each rule with why ctxd needs it. ``{prefix}`` is ``CTXD_STREAM_PREFIX``.

RediSearch checks an ``FT.*`` command against the key patterns of the index's key
prefixes (``{prefix}:checkpoint:``, ``{prefix}:checkpoint_write:``), which
``~{prefix}:*`` covers; the index names themselves are not keys.
"""

# What ctxd sends, as (command…, key-or-None) probes; ``{k}`` is a key of the family.
_PROBES: Final[tuple[tuple[str, ...], ...]] = (
    ("XADD", "{k}", "*", "f", "v"),
    ("XREADGROUP", "GROUP", "g", "c", "STREAMS", "{k}", ">"),
    ("XACK", "{k}", "g", "0-1"),
    ("XAUTOCLAIM", "{k}", "g", "c", "0", "0-0"),
    ("XGROUP", "CREATE", "{k}", "g", "$", "MKSTREAM"),
    ("XINFO", "GROUPS", "{k}"),
    ("XRANGE", "{k}", "-", "+"),
    ("XREVRANGE", "{k}", "+", "-"),
    ("XREAD", "STREAMS", "{k}", "0"),
    ("XLEN", "{k}"),
    ("XDEL", "{k}", "0-1"),
    ("XTRIM", "{k}", "MINID", "0"),
    ("XPENDING", "{k}", "g"),
    ("GET", "{k}"),
    ("SET", "{k}", "v"),
    ("INCR", "{k}"),
    ("HINCRBY", "{k}", "f", "1"),
    ("HMGET", "{k}", "f"),
    ("HDEL", "{k}", "f"),
    ("ZADD", "{k}", "1", "m"),
    ("ZRANGE", "{k}", "0", "-1"),
    ("ZREM", "{k}", "m"),
    ("ZREMRANGEBYSCORE", "{k}", "0", "1"),
    ("ZCARD", "{k}"),
    ("ZRANGEBYSCORE", "{k}", "0", "1"),
    ("DEL", "{k}"),
    ("UNLINK", "{k}"),
    ("SCAN", "0"),
    ("MEMORY", "USAGE", "{k}"),
    ("EXISTS", "{k}"),
    ("EXPIRE", "{k}", "1"),
    ("PEXPIRE", "{k}", "1"),
    ("MULTI",),
    ("EXEC",),
    ("EVALSHA", "0000000000000000000000000000000000000000", "1", "{k}"),
    ("SCRIPT", "LOAD", "return 1"),
    ("SCRIPT", "EXISTS", "0000000000000000000000000000000000000000"),
    ("INFO",),
    ("MODULE", "LIST"),
    ("JSON.GET", "{k}"),
    ("JSON.SET", "{k}", "$", "1"),
    ("JSON.MERGE", "{k}", "$", "1"),
    ("JSON.DEL", "{k}"),
    ("FT.SEARCH", "{prefix}:checkpoint", "*"),
    ("FT.INFO", "{prefix}:checkpoint"),
    ("FT.CREATE", "{prefix}:checkpoint", "ON", "JSON", "SCHEMA", "$.a", "AS", "a", "TAG"),
)

# Keys of each family ctxd writes, as (key probed, pattern shown). The probes run
# nothing, so real key names are safe to name here.
_KEY_FAMILIES: Final = (
    ("{prefix}:in", "{prefix}:in"),
    ("{prefix}:dlq", "{prefix}:dlq"),
    ("{prefix}:checkpoint:acl-check", "{prefix}:checkpoint:*"),
    ("{prefix}:checkpoint_write:acl-check", "{prefix}:checkpoint_write:*"),
    ("{prefix}:write_keys_zset:acl-check", "{prefix}:write_keys_zset:*"),
)


def acl_rules(prefix: str) -> tuple[str, ...]:
    """The ACL rules for a deployment whose ``CTXD_STREAM_PREFIX`` is ``prefix``."""
    return tuple(rule.replace("{prefix}", prefix) for rule, _ in ACL_RULES)


def acl_setuser_line(user: str, password: str, prefix: str) -> str:
    """The ready-to-paste ``ACL SETUSER`` line (``docs/operations.md`` prints it)."""
    rules = acl_rules(prefix)
    return f"ACL SETUSER {user} {rules[0]} >{password} {' '.join(rules[1:])}"


def _probes(prefix: str) -> list[tuple[int, str, tuple[str, ...]]]:
    """Every probe as (index in _PROBES, key family pattern or "", arguments)."""
    probes: list[tuple[int, str, tuple[str, ...]]] = []
    for index, probe in enumerate(_PROBES):
        keyed = any("{k}" in part for part in probe)
        for key, pattern in _KEY_FAMILIES if keyed else (("", ""),):
            name = key.replace("{prefix}", prefix)
            args = tuple(part.replace("{k}", name).replace("{prefix}", prefix) for part in probe)
            probes.append((index, pattern.replace("{prefix}", prefix), args))
    return probes


def _command_name(probe: tuple[str, ...]) -> str:
    if probe[0] in ("XGROUP", "XINFO", "SCRIPT", "MODULE"):
        return " ".join(probe[:2])
    return probe[0]


def _denial(denied: list[tuple[int, str, tuple[str, ...]]], prefix: str) -> str:
    """What the user lacks: commands denied on every key, and key families denied."""
    by_command: dict[int, set[str]] = {}
    for index, pattern, _ in denied:
        by_command.setdefault(index, set()).add(pattern)
    all_families = {pattern.replace("{prefix}", prefix) for _, pattern in _KEY_FAMILIES}
    everywhere = {i for i, patterns in by_command.items() if patterns in ({""}, all_families)}
    keyed = {
        index
        for index, probe in enumerate(_PROBES)
        if any(part.startswith(("{k}", "{prefix}:")) for part in probe)
    }
    no_keys = keyed <= everywhere  # nothing under the prefix is allowed at all
    commands = [
        _command_name(_PROBES[index])
        for index in sorted(everywhere)
        if not (no_keys and index in keyed)
    ]
    keys = sorted(
        {
            family
            for patterns in by_command.values()
            if patterns != all_families
            for family in patterns
            if family
        }
    )
    if no_keys:
        keys = [f"{prefix}:*"]
    parts = []
    if commands:
        shown = ", ".join(dict.fromkeys(commands[:8]))
        more = f" and {len(commands) - 8} more" if len(commands) > 8 else ""
        parts.append(f"may not run {shown}{more}")
    if keys:
        parts.append(f"may not use the keys {', '.join(keys)} (needs ~{prefix}:*)")
    return " and ".join(parts)


async def check_redis_access(client: Redis, prefix: str) -> None:
    """Raise unless the connected user may run every command ctxd sends on its keys.

    The check runs nothing but one Lua script (``EVALSHA``, loaded with ``SCRIPT LOAD``
    if needed), so it needs only what ctxd needs anyway; without those two, the server's
    own NOPERM names them.

    Raises:
        RedisStartupError: ``cause="noperm"``, naming each missing command or key.
        redis.exceptions.RedisError: the server could not be asked (classified by the
            caller with :func:`actors.runtime.redis_errors.describe_redis_error`).
    """
    argv: list[str] = []
    offsets: dict[int, tuple[int, str, tuple[str, ...]]] = {}
    for probe in _probes(prefix):
        offsets[len(argv)] = probe
        argv += [str(len(probe[2])), *probe[2]]
    script = client.register_script(scripts.ACL_CHECK)  # which probes are denied
    denied_offsets = await script(keys=[], args=argv)
    denied = [offsets[int(x)] for x in denied_offsets]
    if not denied:
        return
    raise RedisStartupError(
        "noperm",
        f"the Redis user {_denial(denied, prefix)} (NOPERM: its ACL rules deny it); grant "
        f"the ACL rules in {ACL_DOCS}",
    )


def warn_if_unverified_tls(url: str) -> bool:
    """Log one warning when a ``rediss://`` URL turns certificate checks off.

    ``ssl_cert_reqs=none`` accepts any certificate, so anyone on the path can pose as
    the server and read the password; it is allowed (self-signed test set-ups) but
    never silently.

    Returns:
        True if a warning was logged.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return False
    query = {k.lower(): v.strip().lower() for k, v in parse_qsl(parts.query)}
    off = []
    if query.get("ssl_cert_reqs") == "none":
        off.append("certificate verification is off (ssl_cert_reqs=none)")
    if query.get("ssl_check_hostname") in ("false", "0", "no"):
        off.append("the host name is not checked (ssl_check_hostname=false)")
    if not off:
        return False
    _log.warning(
        f"TLS to Redis is not verified: {' and '.join(off)}; anyone between ctxd and the "
        "server can pose as it and read the password: give the CA with ssl_ca_certs instead",
        redis=redact_url(url),
    )
    return True


async def check_redis_for_service(
    url: str,
    prefix: str,
    *,
    modules: bool,
    access: bool = True,
    url_setting: str = "CTXD_REDIS_URL",
    wait: float = 15.0,
) -> None:
    """The start-up check of ``ctxd run`` and ``ctxd worker``: reachable, credentials,
    TLS, modules (``modules``) and ACL, each failure as one classified line.

    Args:
        url: the Redis URL.
        prefix: ``CTXD_STREAM_PREFIX``.
        modules: this Redis is the checkpoint store: refuse a Redis Cluster and require
            RedisJSON and RediSearch (the Redis checkpointer).
        access: check the ACL rules (the service Redis; a separate checkpoint store
            needs only the checkpointer's commands, which opening it exercises).
        url_setting: the setting ``url`` came from, named in a refusal.
        wait: seconds for the whole check; a server that accepts connections but
            never answers fails with ``cause="timeout"``.

    Raises:
        RedisStartupError: the cause (``refused``, ``timeout``, ``auth``, ``tls``,
            ``modules``, ``noperm``…) in :attr:`~RedisStartupError.cause`.
    """
    warn_if_unverified_tls(url)
    client = Redis.from_url(url, socket_connect_timeout=wait, socket_timeout=wait, retry=None)
    try:
        with anyio.fail_after(wait):
            await client.ping()
            if modules:
                await refuse_cluster_store(client, url_setting=url_setting)
                await check_redis_modules(client)
            if access:
                await check_redis_access(client, prefix)
    except RedisStartupError:
        raise
    except (RedisError, OSError, TimeoutError, CtxdError) as exc:
        raise describe_redis_error(exc, url, setting=url_setting) from None
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()
