"""Classifying Redis failures into one line, and URLs that would leak a password."""

from __future__ import annotations

import argparse
import ssl
from urllib.parse import quote

import pytest
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redisvl.exceptions import RedisSearchError

from actors.config import load_settings
from actors.runtime.redis_errors import check_redis_url, describe_redis_error, url_secrets
from graph.errors import ConfigError, RedisModulesMissingError

URL = "redis://ctxd:pa%23ss@db.example:6380/0"


def _chained(outer: Exception, inner: BaseException) -> Exception:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except Exception as exc:
        return exc


def _refused() -> Exception:
    return _chained(
        RedisConnectionError("Error 111 connecting to db.example:6380. Connection refused."),
        ConnectionRefusedError(111, "Connection refused"),
    )


def _cert() -> Exception:
    error = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] self-signed")
    error.verify_message = "self-signed certificate"
    return _chained(RedisConnectionError("Error 1 connecting. certificate verify failed"), error)


@pytest.mark.parametrize(
    ("exc", "cause", "words"),
    [
        (_refused(), "refused", ["db.example:6380", "connection refused", "CTXD_REDIS_URL"]),
        (RedisTimeoutError("Timeout reading from socket"), "timeout", ["timeout"]),
        (
            AuthenticationError("invalid username-password pair or user is disabled."),
            "auth",
            ["authentication failed", "'ctxd'"],
        ),
        (AuthenticationError("Authentication required."), "auth", ["NOAUTH"]),
        (_cert(), "tls", ["certificate verification failed", "self-signed", "ssl_ca_certs"]),
        (
            _chained(RedisConnectionError("Error 1"), ssl.SSLError(1, "WRONG_VERSION_NUMBER")),
            "tls",
            ["TLS handshake", "rediss://"],
        ),
        (
            NoPermissionError("User ctxd has no permissions to run the 'evalsha' command"),
            "noperm",
            ["'evalsha'", "docs/operations.md"],
        ),
        (
            _chained(
                RedisSearchError("Error while fetching x:checkpoint index info: No permissions"),
                NoPermissionError("No permissions to access a key"),
            ),
            "noperm",
            ["access a key", "docs/operations.md"],
        ),
        (
            ExceptionGroup("actors", [ValueError("x"), _refused()]),
            "refused",
            ["connection refused"],
        ),
        (RedisModulesMissingError("the configured Redis lacks RediSearch"), "modules", ["Search"]),
        (ResponseError("ERR something odd"), "other", ["something odd"]),
    ],
)
def test_each_cause_is_named_in_one_line(exc: BaseException, cause: str, words: list[str]) -> None:
    error = describe_redis_error(exc, URL)
    assert error.cause == cause
    message = str(error)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert "pa#ss" not in message
    assert "pa%23ss" not in message


def test_quoted_details_are_scrubbed_of_the_password() -> None:
    error = describe_redis_error(ResponseError("ERR echo pa#ss and pa%23ss"), URL)
    assert "pa#ss" not in str(error)
    assert "pa%23ss" not in str(error)


@pytest.mark.parametrize(
    "url",
    [
        "redis://u:Xq7v#Zk9w@db:6379/0",
        "redis://u:Xq7v/Zk9w@db:6379/0",
        "redis://u:Xq7v?Zk9w@db:6379/0",
        "redis://:Xq7v#@db:6379",
        "rediss://u:4711/Zk9w@db:6379",
    ],
)
def test_urls_that_would_cut_a_password_are_refused_without_showing_it(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"CTXD_REDIS_URL": url})
    message = str(caught.value)
    assert "percent-encoded" in message
    assert "%23" in message
    for part in ("Xq7v", "Zk9w", "4711"):
        assert part not in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://u:p%23a%2Fs%3Fs%25@db:6379/0",
        "redis://u:p@ss:w@db:6379/0",
        "redis://db:6379/0?password=x",
        "unix:///run/redis.sock?db=0",
        "rediss://db:6380/0?ssl_ca_certs=/etc/ca.crt",
    ],
)
def test_well_formed_urls_pass(url: str) -> None:
    assert check_redis_url("CTXD_REDIS_URL", url) == url


def test_url_secrets_include_raw_and_decoded_forms() -> None:
    secrets = url_secrets("redis://alice:p%23a@ss@db:6379/0?password=q%26z")
    assert {"p%23a@ss", "p#a@ss", "q&z"} <= set(secrets)
    assert url_secrets("redis://db:6379/0") == ()
    assert url_secrets("redis://ctxd@db:6379/0") == ()  # a user name is not a secret


def test_an_unexpected_traceback_holds_no_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug's traceback is still printed, with the configured password masked."""
    import actors.app.cli as cli

    secret = "Zr8pQ#w@x:y/Vb2k"
    encoded = quote(secret, safe="")
    monkeypatch.setenv("CTXD_REDIS_URL", f"redis://u:{encoded}@db:6379/0")

    def boom(settings: object, args: object) -> int:
        raise RuntimeError(f"unexpected {secret} and {encoded}")

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.set_defaults(handler=boom)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main([]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: unexpected *** and ***" in err
    assert secret not in err
    assert encoded not in err
