"""What went wrong talking to Redis, in one line a person can act on.

redis-py reports a refused connection, a timeout, a wrong password, a failed TLS
handshake and an ACL denial with a handful of exception classes whose messages name
neither the cause in plain words nor what to do. :func:`describe_redis_error` is the one
place that turns them (and the exceptions wrapping them, such as redisvl's) into a
:class:`RedisStartupError` with a short ``cause`` tag and one line naming the server,
the cause and the fix. It never prints the URL's password: the address it names comes
from a parsed URL, and every message is scrubbed of the URL's secrets.
"""

from __future__ import annotations

import errno
import socket
import ssl
from typing import Final
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    NoPermissionError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from graph.errors import (
    CheckpointStoreError,
    ConfigError,
    CtxdError,
    RedisModulesMissingError,
    exception_chain,
)

__all__ = [
    "ACL_DOCS",
    "RedisStartupError",
    "check_redis_url",
    "describe_redis_error",
    "find_redis_error",
    "url_secrets",
]

ACL_DOCS: Final = "docs/operations.md, section 'Redis ACL'"
"""Where the ACL rules ctxd needs are written (named in every NOPERM message)."""

_MAX_DETAIL: Final = 200
_URL_HELP: Final = (
    "characters such as # / ? @ : % in a user name or password must be percent-encoded "
    "(%23 %2F %3F %40 %3A %25)"
)


class RedisStartupError(CtxdError):
    """Redis could not be used: the server, the cause and what to do, in one line.

    Attributes:
        cause: ``refused``, ``unreachable``, ``timeout``, ``auth``, ``tls``, ``noperm``,
            ``modules``, ``checkpoint_store``, ``loading`` or ``other``; callers that
            wait out outages (refused, unreachable, timeout, loading) decide on it.
    """

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


def check_redis_url(name: str, url: str) -> str:
    """Refuse a Redis URL that URL parsing would split in the wrong place.

    ``#`` starts a URL fragment and ``/`` or ``?`` end the host part, so a password
    holding one of them is cut and its first part read as a port, a host or a database
    number: connecting then fails with an error that shows that part. The error raised
    here names no part of the URL after its scheme.

    Args:
        name: the setting, for the message (``CTXD_REDIS_URL``).
        url: a ``redis://``, ``rediss://`` or ``unix://`` URL.

    Returns:
        ``url`` unchanged.

    Raises:
        ConfigError: the URL has a fragment, a bad port or (``redis``/``rediss``) a path
            that is not a database number.
    """
    scheme = url.split("://", 1)[0]
    problem = ""
    if "#" in url:
        problem = "it contains '#', which URL parsing takes as the start of a fragment"
    else:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            problem = "its host part does not parse (a port that is not a number?)"
        else:
            path = parts.path.strip("/")
            if scheme in ("redis", "rediss") and path and not path.isdigit():
                problem = "its path is not a database number"
    if problem:
        raise ConfigError(
            f"{name} ({scheme}://…, not shown: it may hold a password) cannot be used: "
            f"{problem}; {_URL_HELP}"
        )
    return url


def url_secrets(url: str | None) -> tuple[str, ...]:
    """The password strings of ``url`` (raw and percent-decoded), to scrub from output.

    The user information with its password, the password alone and a ``password=``
    query value; a user name alone is not a secret (masking ``ctxd`` would mangle every
    line). Empty when the URL has no password.
    """
    if not url:
        return ()
    found: set[str] = set()
    _, sep, rest = url.partition("://")
    if sep:
        # Everything up to the last "@" is user information, whatever it holds.
        userinfo = rest.rpartition("@")[0] if "@" in rest else ""
        _, colon, password = userinfo.partition(":")
        if colon and password:
            found.update((password, userinfo))
        query = rest.partition("?")[2]
        for key, value in parse_qsl(query.partition("#")[0], keep_blank_values=True):
            if key.lower() == "password" and value:
                found.add(value)
    found.update({unquote(s) for s in found})
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _address(url: str | None) -> str:
    """``host:port`` or ``unix socket PATH`` of ``url``, without user information."""
    if not url:
        return "the configured Redis"
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return f"unix socket {unquote(parts.path)}"
        host = parts.hostname or "localhost"
        return f"{host}:{parts.port or 6379}"
    except ValueError:
        return "the configured Redis"


def _user(url: str | None) -> str:
    """The ACL user the URL logs in as (``default`` when it names none)."""
    try:
        parts = urlsplit(url or "")
        user = parts.username or dict(parse_qsl(parts.query)).get("username")
    except ValueError:
        user = None
    return repr(unquote(user)) if user else "'default'"


def find_redis_error(exc: BaseException) -> BaseException | None:
    """The first Redis or TLS error in ``exc``'s chain (or its groups' members), if any."""
    for candidate in exception_chain(exc):
        if isinstance(candidate, RedisModulesMissingError | RedisStartupError):
            return candidate
        if isinstance(candidate, RedisError | ssl.SSLError):
            return candidate
    return None


def _first(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    return next((c for c in exception_chain(exc) if isinstance(c, kind)), None)


def _bounded(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "…"


def describe_redis_error(
    exc: BaseException, url: str | None = None, *, setting: str = "CTXD_REDIS_URL"
) -> RedisStartupError:
    """Classify a failure to use Redis and say, in one line, what to do about it.

    Args:
        exc: the exception (redis-py's, redisvl's wrapping one, an exception group…).
        url: the Redis URL in use, for the address in the message and to scrub its
            secrets from any text quoted from the exception.
        setting: the setting ``url`` came from, named where the line says what to check
            (``CTXD_CHECKPOINT_URL`` for a separate checkpoint store).

    Returns:
        A :class:`RedisStartupError` whose ``cause`` is the tag and whose message is the
        line to print.
    """
    secrets = url_secrets(url)
    cause, message = _classify(exc, url)
    if setting != "CTXD_REDIS_URL" and _first(exc, RedisStartupError) is None:
        message = message.replace("CTXD_REDIS_URL", setting)
    return RedisStartupError(cause, _scrub(message, secrets))


def _classify(exc: BaseException, url: str | None) -> tuple[str, str]:
    where = _address(url)
    if (ready := _first(exc, RedisStartupError)) is not None:
        assert isinstance(ready, RedisStartupError)
        return ready.cause, str(ready)
    if (modules := _first(exc, RedisModulesMissingError)) is not None:
        return "modules", str(modules)
    if (store := _first(exc, CheckpointStoreError)) is not None:
        return "checkpoint_store", str(store)
    found = find_redis_error(exc) or exc
    detail = _bounded(str(found) or type(found).__name__)
    if (
        _first(exc, NoPermissionError) is not None
        or "NOPERM" in detail
        or ("no permissions" in detail.lower())
    ):
        denied = _bounded(str(_first(exc, NoPermissionError) or found))
        return "noperm", (
            f"Redis at {where} denied user {_user(url)} a permission ctxd needs "
            f"(NOPERM: {denied.removeprefix('NOPERM ')}); grant the ACL rules in {ACL_DOCS}"
        )
    if "authentication required" in detail.lower() or "NOAUTH" in detail:
        return "auth", (
            f"Redis at {where} requires a password (authentication failed: NOAUTH); put "
            "user:password in CTXD_REDIS_URL (redis://user:password@host:port/0)"
        )
    if isinstance(found, AuthenticationError | AuthorizationError) or "WRONGPASS" in detail:
        return "auth", (
            f"Redis at {where} refused the credentials of user {_user(url)} (authentication "
            "failed: wrong user name or password, or the user is disabled); check the user "
            "and password in CTXD_REDIS_URL"
        )
    if (cert := _first(exc, ssl.SSLCertVerificationError)) is not None or (
        "CERTIFICATE_VERIFY_FAILED" in detail
    ):
        reason = getattr(cert, "verify_message", None) or "certificate verify failed"
        return "tls", (
            f"TLS certificate verification failed for Redis at {where} ({reason}; "
            "certificate verify failed); give the CA that signed the server's certificate "
            "with ?ssl_ca_certs=/path/to/ca.crt in CTXD_REDIS_URL"
        )
    if (tls := _first(exc, ssl.SSLError)) is not None:
        return "tls", (
            f"TLS handshake with Redis at {where} failed ({_bounded(str(tls))}); rediss:// "
            "needs the server's TLS port, redis:// its plain port: check CTXD_REDIS_URL"
        )
    if any(_first(exc, kind) is not None for kind in (RedisTimeoutError, TimeoutError)):
        tls_hint = (
            " (with rediss:// a plain port never completes the TLS handshake: use the "
            "server's tls-port)"
            if (url or "").startswith("rediss://")
            else ""
        )
        return "timeout", (
            f"Redis at {where} did not answer in time (timeout); is it overloaded, stopped "
            f"or behind a firewall? check CTXD_REDIS_URL{tls_hint}"
        )
    if isinstance(found, BusyLoadingError):
        return "loading", f"Redis at {where} is still loading its data set; try again shortly"
    if (refused := _first(exc, ConnectionRefusedError)) is not None or "Error 111" in detail:
        del refused
        return "refused", (
            f"cannot connect to Redis at {where}: connection refused; is Redis running? "
            "check CTXD_REDIS_URL"
        )
    if (dns := _first(exc, socket.gaierror)) is not None:
        return "unreachable", (
            f"cannot resolve the Redis host of {where} ({_bounded(str(dns))}); check the "
            "host name in CTXD_REDIS_URL"
        )
    if (os_error := _first(exc, OSError)) is not None and isinstance(
        found, RedisConnectionError | OSError
    ):
        code = getattr(os_error, "errno", None)
        reason = errno.errorcode.get(code, "") if isinstance(code, int) else ""
        return "unreachable", (
            f"cannot connect to Redis at {where} ({reason or type(os_error).__name__}: "
            f"{_bounded(getattr(os_error, 'strerror', None) or str(os_error))}); is Redis "
            "running and reachable? check CTXD_REDIS_URL"
        )
    if isinstance(found, RedisConnectionError):
        return "unreachable", (
            f"cannot connect to Redis at {where} ({detail}); is Redis running and reachable? "
            "check CTXD_REDIS_URL"
        )
    if isinstance(found, ResponseError):
        return "other", f"Redis at {where} answered with an error: {detail}"
    return "other", f"Redis at {where} failed: {type(found).__name__}: {detail}"
