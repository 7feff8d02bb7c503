"""Checkpointer factory: ``redis`` (the default), ``memory`` and ``postgres``.

Every saver gets a strict serializer: no pickle fallback and msgpack restricted to
LangGraph's safe types, because anyone who can write the checkpoint store could
otherwise make ctxd run code when it loads a checkpoint. ctxd's state is plain JSON,
so nothing else needs reviving.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from redis.asyncio import Redis

from graph.errors import ConfigError, RedisModulesMissingError

if TYPE_CHECKING:
    from langgraph.checkpoint.redis.aio import AsyncRedisSaver

__all__ = ["check_redis_modules", "open_checkpointer", "strict_serializer"]

_REQUIRED_MODULES = {"ReJSON": "RedisJSON", "search": "RediSearch"}


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


async def check_redis_modules(client: Redis) -> None:
    """Raise :class:`RedisModulesMissingError` unless RedisJSON and RediSearch are loaded."""
    try:
        modules = await client.module_list()
    except Exception as exc:
        raise RedisModulesMissingError(
            f"cannot list the Redis server's modules ({type(exc).__name__}: {exc}); the "
            "checkpointer needs RedisJSON and RediSearch: use Redis 8 or Redis Stack 7.4, "
            "or unset CTXD_REDIS_URL to use the embedded Redis"
        ) from exc
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


async def _create_indexes(saver: AsyncRedisSaver, attempts: int = 6) -> None:
    """Create the saver's RediSearch indexes, also when other instances do it at once.

    The saver checks that an index is missing and then creates it; two instances
    starting together on a fresh Redis (``docker-compose up --scale``) both see it
    missing, and the second ``FT.CREATE`` fails with "Index already exists". Trying
    again finds the index there and goes on.
    """
    from redisvl.exceptions import RedisSearchError

    for attempt in range(attempts):
        try:
            await saver.asetup()
            return
        except RedisSearchError as exc:
            if "already exists" not in str(exc) or attempt == attempts - 1:
                raise
            await anyio.sleep(0.02 * 2**attempt)


@contextlib.asynccontextmanager
async def open_checkpointer(
    kind: str,
    *,
    redis_url: str | None = None,
    postgres_url: str | None = None,
    redis_client: Redis | None = None,
) -> AsyncIterator[BaseCheckpointSaver[str]]:
    """Open the checkpointer of ``kind`` with the strict serializer.

    Args:
        kind: ``redis``, ``memory`` or ``postgres``.
        redis_url: for ``redis``.
        postgres_url: for ``postgres`` (needs the ``postgres`` extra).
        redis_client: for ``redis``, a client the saver shares (and does not close),
            so the service's connection pool is sized for both; its own if None.

    Raises:
        ConfigError: unknown kind, missing URL or missing extra.
        RedisModulesMissingError: the Redis lacks RedisJSON or RediSearch.
    """
    if kind == "memory":
        yield InMemorySaver(serde=strict_serializer())
    elif kind == "redis":
        if not redis_url:
            raise ConfigError("the redis checkpointer needs a Redis URL")
        from langgraph.checkpoint.redis.aio import AsyncRedisSaver

        probe = Redis.from_url(redis_url)
        try:
            await check_redis_modules(probe)
        finally:
            await probe.aclose()
        saver = (
            AsyncRedisSaver(redis_url)
            if redis_client is None
            else AsyncRedisSaver(redis_client=redis_client)
        )
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
        async with AsyncPostgresSaver.from_conn_string(postgres_url) as pg_saver:
            pg_saver.serde = strict_serializer()
            await pg_saver.setup()
            yield pg_saver
    else:
        raise ConfigError(f"checkpointer {kind!r} is unknown: expected redis, memory or postgres")
