"""Checkpointer factory: ``redis`` (the default), ``memory`` and ``postgres``.

Every saver gets a strict serializer: no pickle fallback and msgpack restricted to
LangGraph's safe types, because anyone who can write the checkpoint store could
otherwise make ctxd run code when it loads a checkpoint. ctxd's state is plain JSON,
so nothing else needs reviving.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from graph.errors import CheckpointStoreError, ConfigError, RedisModulesMissingError

if TYPE_CHECKING:
    from langgraph.checkpoint.redis.aio import AsyncRedisSaver

__all__ = [
    "PointerWriter",
    "check_redis_modules",
    "checkpoint_key_prefixes",
    "cluster_store_refusal",
    "open_checkpointer",
    "refuse_cluster_store",
    "strict_serializer",
]

_REQUIRED_MODULES = {"ReJSON": "RedisJSON", "search": "RediSearch"}

PointerWriter = Callable[[Redis, str, str], Awaitable[object]]
"""Writes a thread's latest-checkpoint pointer: ``(client, pointer key, checkpoint key)``.

The Redis saver stores each checkpoint under its own key and then moves one pointer per
thread to it; reads without a checkpoint id follow the pointer. The pointer is therefore
the one write that decides what the workflow's state *is*. The service passes a writer
that moves it only while the run's partition lease still holds, in the same script
(:func:`actors.service.lease.fenced_pointer_writer`), so an instance that paused past its
lease cannot move a workflow's state back under the new owner.
"""


def strict_serializer(
    kind: type[JsonPlusSerializer] = JsonPlusSerializer,
) -> JsonPlusSerializer:
    """The serializer for every saver: no pickle, msgpack limited to the safe allowlist.

    Args:
        kind: the saver's own serializer class (the Redis saver needs its subclass).
    """
    return kind(pickle_fallback=False, allowed_msgpack_modules=None, allowed_json_modules=None)


def _strict_redis_serializer_class() -> type[JsonPlusSerializer]:
    from langgraph.checkpoint.redis.jsonplus_redis import JsonPlusRedisSerializer

    class StrictRedisSerializer(JsonPlusRedisSerializer):
        """The Redis saver's JSON serializer without its own object revival.

        ``JsonPlusRedisSerializer`` imports the module named in any JSON constructor
        envelope and calls dataclass constructors itself, around the allowlist. Here no
        envelope is resolved that way: envelopes go to LangGraph's allowlist-checked
        reviver, which revives only its safe types and returns anything else inert.
        LangGraph's own markers (interrupts, sends) are not envelopes and still load.
        """

        def _constructor_class(self, obj: dict[str, object]) -> type[object]:
            raise ValueError(f"constructor envelope {obj.get('id')!r} is not revived")

    return StrictRedisSerializer


def checkpoint_key_prefixes(namespace: str) -> tuple[str, str, str]:
    """The Redis key prefixes of checkpoints, their writes and the write registry.

    Every key ctxd writes lives under its ``CTXD_STREAM_PREFIX`` (``namespace``), so two
    deployments with different prefixes on one Redis never see each other's state; the
    saver's search indexes are named after these prefixes too.

    Returns:
        ``(checkpoints, writes, write registry)``, e.g. ``ctxd:checkpoint``,
        ``ctxd:checkpoint_write``, ``ctxd:write_keys_zset``.
    """
    return (
        f"{namespace}:checkpoint",
        f"{namespace}:checkpoint_write",
        f"{namespace}:write_keys_zset",
    )


def _pointer_guarded(client: Redis, pointer_prefix: str, write: PointerWriter) -> Redis:
    """A client on ``client``'s pool whose plain ``SET`` of a pointer key goes to ``write``.

    The saver writes the latest-checkpoint pointer with a bare ``SET`` and offers no hook;
    this is the narrowest place to put one. Every other command is ``client``'s own.
    """

    class PointerGuardedRedis(Redis):
        def set(self, name: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
            key = name.decode() if isinstance(name, bytes) else name
            if isinstance(key, str) and key.startswith(pointer_prefix) and not args and not kwargs:
                target = value.decode() if isinstance(value, bytes) else str(value)
                return write(client, key, target)
            return super().set(name, value, *args, **kwargs)

    return PointerGuardedRedis(connection_pool=client.connection_pool)


def _namespaced_redis_saver(
    redis_url: str,
    namespace: str,
    redis_client: Redis | None = None,
    pointer_writer: PointerWriter | None = None,
) -> AsyncRedisSaver:
    """An ``AsyncRedisSaver`` whose every key and index lives under ``namespace``.

    The saver takes prefixes for checkpoint and write keys, but names the per-checkpoint
    registry of write keys (``write_keys_zset:…``) with a fixed prefix; a subclass of its
    registry supplies the namespaced one.
    """
    from langgraph.checkpoint.redis.aio import AsyncRedisSaver
    from langgraph.checkpoint.redis.key_registry import AsyncCheckpointKeyRegistry

    checkpoints, writes, registry_prefix = checkpoint_key_prefixes(namespace)

    class NamespacedRegistry(AsyncCheckpointKeyRegistry):
        def make_write_keys_zset_key(  # type: ignore[override]
            self, thread_id: str, checkpoint_ns: str, checkpoint_id: str
        ) -> str:
            key = AsyncCheckpointKeyRegistry.make_write_keys_zset_key(
                thread_id, checkpoint_ns, checkpoint_id
            )
            return registry_prefix + key.removeprefix("write_keys_zset")

    class NamespacedRedisSaver(AsyncRedisSaver):
        async def asetup(self) -> None:
            await super().asetup()
            self._key_registry = NamespacedRegistry(self._redis)

    if redis_client is not None:  # shared with the service (and not closed by the saver)
        if pointer_writer is not None:
            pointer_prefix = f"{checkpoints}_latest:"
            redis_client = _pointer_guarded(redis_client, pointer_prefix, pointer_writer)
        return NamespacedRedisSaver(
            redis_client=redis_client,
            checkpoint_prefix=checkpoints,
            checkpoint_write_prefix=writes,
        )
    return NamespacedRedisSaver(
        redis_url, checkpoint_prefix=checkpoints, checkpoint_write_prefix=writes
    )


async def check_redis_modules(client: Redis) -> None:
    """Raise :class:`RedisModulesMissingError` unless RedisJSON and RediSearch are loaded.

    Only a server that does not know ``MODULE LIST`` counts as lacking the modules. A
    refused connection, a timeout, a wrong password, a TLS failure or an ACL denial
    (NOPERM) propagates as redis-py raised it, so the caller can name the real cause
    (``actors.runtime.redis_errors.describe_redis_error``).
    """
    try:
        modules = await client.module_list()
    except ResponseError as exc:
        if isinstance(exc, NoPermissionError):
            raise
        raise RedisModulesMissingError(
            f"the configured Redis cannot list its modules (MODULE LIST: {str(exc)[:200]}); "
            "the checkpointer needs RedisJSON and RediSearch: use Redis 8 or Redis Stack "
            "7.4, or unset CTXD_REDIS_URL to use the embedded Redis"
        ) from None
    loaded = set()
    for module in modules:
        name = module.get(b"name", module.get("name", b""))
        loaded.add(name.decode() if isinstance(name, bytes) else str(name))
    missing = [label for name, label in _REQUIRED_MODULES.items() if name not in loaded]
    if missing:
        raise RedisModulesMissingError(
            f"the configured Redis lacks {' and '.join(missing)}, which the checkpointer "
            "needs: use Redis 8 (JSON and Search built in) or Redis Stack 7.4, "
            "or unset CTXD_REDIS_URL to use the embedded Redis"
        )


async def refuse_cluster_store(client: Redis, *, url_setting: str = "CTXD_REDIS_URL") -> None:
    """Raise :class:`CheckpointStoreError` if ``client`` is a node of a Redis Cluster.

    The saver finds state history, rollback targets and a workflow's writes with
    RediSearch queries. OSS RediSearch 2.10 (Redis Stack 7.4) has no cluster coordinator:
    on a cluster each shard's index sees only that shard's documents, so a query answers
    part of the history and state would be lost without an error. ``INFO cluster``
    answers on every node (it touches no key) and says ``cluster_enabled:1`` on a
    cluster node.

    Args:
        client: a client of the checkpoint store.
        url_setting: the setting the store's URL came from, named in the message
            (``CTXD_REDIS_URL`` when checkpoints default to the service Redis).
    """
    info = await client.info("cluster")
    if str(info.get("cluster_enabled", 0)) == "1":
        raise cluster_store_refusal(url_setting)


def cluster_store_refusal(url_setting: str) -> CheckpointStoreError:
    """The one-line refusal of a Redis Cluster as checkpoint store.

    Args:
        url_setting: where the store's URL came from; ``CTXD_REDIS_URL`` means
            checkpoints defaulted to a service Redis that is a cluster.
    """
    if url_setting == "CTXD_REDIS_URL":
        where = (
            "CTXD_REDIS_URL is a Redis Cluster and checkpoints default to it "
            "(CTXD_CHECKPOINT_URL is unset)"
        )
    else:
        where = f"the checkpoint store {url_setting} is a Redis Cluster"
    return CheckpointStoreError(
        f"{where}: its search indexes see only their own shard, so state history, "
        "rollback and recovery cannot work there; set CTXD_CHECKPOINT_URL to a standalone "
        "Redis with RedisJSON and RediSearch, or use CTXD_CHECKPOINTER=postgres "
        '(docs/operations.md, "Checkpoints on a cluster")'
    )


async def _create_indexes(saver: AsyncRedisSaver, attempts: int = 6) -> None:
    """Create the saver's RediSearch indexes, also when other instances do it at once.

    The saver checks that an index is missing and then creates it; two instances
    starting together on a fresh Redis (``docker-compose up --scale``) both see it
    missing, and the second ``FT.CREATE`` fails with "Index already exists". That
    failure means the index is there now, so setting up again at once finds it and goes
    on to the next one; no wait is needed, and each round gets at least one index further.
    """
    from redisvl.exceptions import RedisSearchError

    for attempt in range(attempts):
        try:
            await saver.asetup()
            return
        except RedisSearchError as exc:
            if "already exists" not in str(exc) or attempt == attempts - 1:
                raise


async def _postgres_schema(postgres_url: str, namespace: str) -> str:
    """Create the namespace's schema and return a conninfo whose search_path is it.

    Each ``CTXD_STREAM_PREFIX`` keeps its checkpoint tables in its own PostgreSQL
    schema (named exactly like the prefix), so deployments sharing a database never
    share state.
    """
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(namespace))
        )
    quoted = namespace.replace('"', '""')
    return make_conninfo(postgres_url, options=f'-c search_path="{quoted}"')


@contextlib.asynccontextmanager
async def open_checkpointer(
    kind: str,
    *,
    namespace: str,
    redis_url: str | None = None,
    postgres_url: str | None = None,
    redis_client: Redis | None = None,
    pointer_writer: PointerWriter | None = None,
    url_setting: str = "CTXD_REDIS_URL",
) -> AsyncIterator[BaseCheckpointSaver[str]]:
    """Open the checkpointer of ``kind`` with the strict serializer.

    Args:
        kind: ``redis``, ``memory`` or ``postgres``.
        namespace: the deployment's ``CTXD_STREAM_PREFIX``; Redis keys and search
            indexes are named under it (:func:`checkpoint_key_prefixes`).
        redis_url: for ``redis``.
        postgres_url: for ``postgres`` (needs the ``postgres`` extra).
        redis_client: for ``redis``, a client the saver shares (and does not close),
            so the service's connection pool is sized for both; its own if None.
        pointer_writer: for ``redis`` with ``redis_client``, how the latest-checkpoint
            pointer is written (:data:`PointerWriter`); a plain ``SET`` if None.

    Raises:
        ConfigError: unknown kind, missing URL or missing extra.
        RedisModulesMissingError: the Redis lacks RedisJSON or RediSearch.
    """
    if kind == "memory":
        yield InMemorySaver(serde=strict_serializer())
    elif kind == "redis":
        if not redis_url:
            raise ConfigError("the redis checkpointer needs a Redis URL")
        probe = Redis.from_url(redis_url, socket_connect_timeout=10, socket_timeout=10)
        try:
            await refuse_cluster_store(probe, url_setting=url_setting)
            await check_redis_modules(probe)
        finally:
            await probe.aclose()
        if pointer_writer is not None and redis_client is None:
            raise ConfigError("a checkpoint pointer writer needs the service's redis_client")
        saver = _namespaced_redis_saver(redis_url, namespace, redis_client, pointer_writer)
        try:
            await _create_indexes(saver)
        except BaseException:
            await saver.__aexit__(None, None, None)  # closes the client it opened
            raise
        async with saver:
            saver.serde = strict_serializer(_strict_redis_serializer_class())
            yield saver
    elif kind == "postgres":
        if not postgres_url:
            raise ConfigError("the postgres checkpointer needs CTXD_POSTGRES_URL")
        try:
            from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        except ImportError:
            raise ConfigError(
                "CTXD_CHECKPOINTER=postgres needs the postgres extra: pip install 'ctxd[postgres]'"
            ) from None
        conninfo = await _postgres_schema(postgres_url, namespace)
        async with AsyncPostgresSaver.from_conn_string(conninfo) as pg_saver:
            pg_saver.serde = strict_serializer()
            await pg_saver.setup()
            yield pg_saver
    else:
        raise ConfigError(f"checkpointer {kind!r} is unknown: expected redis, memory or postgres")
