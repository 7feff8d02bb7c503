"""The ``ctxd`` command line: the root parser and the error policy of every command.

Each command lives in its own ``actors/app/cli/*.py`` module, which registers its parser
and handler. Configuration comes from ``CTXD_*`` variables and an optional TOML file
(``--config``); a bad value ends the command with exit code 2 and one line saying what
to fix; any other ctxd or Redis failure exits 1, a Redis failure with one line naming
its cause (:func:`actors.runtime.redis_errors.describe_redis_error`). No output of a command
holds the password of its URLs, tracebacks included.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from actors.config import load_settings
from actors.runtime.availability import RedisOutageError
from actors.runtime.redis_errors import (
    RedisStartupError,
    describe_redis_error,
    find_redis_error,
    url_secrets,
)
from graph.errors import CtxdError
from telemetry.logging import register_secrets, scrub_secrets

__all__ = ["build_parser", "main"]

_EXIT_CONFIG = 2
_EXIT_FATAL = 1

# One module per group of commands; each has register(subcommands).
_COMMAND_MODULES = (
    "actors.app.cli.run",
    "actors.app.cli.events",
    "actors.app.cli.state",
    "actors.app.cli.worker",
    "actors.app.cli.ops",
    "actors.app.cli.dlq",
    "actors.app.cli.forget",
    "actors.app.cli.partitions",
)

_DESCRIPTION = """\
ctxd runs a contextual-processing feedback loop for every event that producers append
to a Redis stream (ctxd:in), keeps each workflow's context durable in Redis, decides
with a multi-factor routing engine and writes one result per event to ctxd:out.

Settings: CTXD_* environment variables or a TOML file (--config); OTEL_* for tracing.
With no CTXD_REDIS_URL, `ctxd run` starts an embedded Redis with RedisJSON and
RediSearch (data in CTXD_STATE_DIR) and the other commands use it.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``ctxd`` parser with every command registered; :func:`main` parses with it.

    Public so tools can render the commands' help, and tests can hand :func:`main` a
    parser of their own to check its error policy on any failure.
    """
    parser = argparse.ArgumentParser(
        prog="ctxd", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="TOML settings file (also CTXD_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ctxd`` console script."""
    args = build_parser().parse_args(argv)
    url: str | None = None
    try:
        settings = load_settings(config_file=args.config)
        url = settings.redis_url
        register_secrets(
            *url_secrets(url),
            *url_secrets(settings.checkpoint_url),
            *url_secrets(settings.postgres_url),
        )
        code: int = args.handler(settings, args)
    except (RedisStartupError, RedisOutageError) as exc:
        # Their own line: an outage past CTXD_REDIS_MAX_OUTAGE names the limit (and the
        # cause), which classifying its ConnectionError would hide.
        _error_line(str(exc))
        return _EXIT_FATAL
    except CtxdError as exc:
        if find_redis_error(exc) is not None and not isinstance(exc, ValueError):
            _error_line(str(describe_redis_error(exc, url)))
            return _EXIT_FATAL
        _error_line(str(exc))
        return _EXIT_CONFIG if isinstance(exc, ValueError) else _EXIT_FATAL
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort: a line or a clean traceback
        outage = _outage_in(exc)
        if outage is not None:  # with other errors of the stop it caused
            _error_line(str(outage))
            return _EXIT_FATAL
        if find_redis_error(exc) is not None:
            # redis-py's own errors and those wrapping them (redisvl's, groups).
            _error_line(str(describe_redis_error(exc, url)))
            return _EXIT_FATAL
        # Unexpected: the traceback helps, but never with a password in it.
        text = "".join(traceback.format_exception(exc))
        print(scrub_secrets(text), file=sys.stderr, end="")
        return _EXIT_FATAL
    return code


def _outage_in(exc: BaseException) -> RedisOutageError | None:
    """The :class:`RedisOutageError` in ``exc``'s exception groups, if any."""
    if isinstance(exc, RedisOutageError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _outage_in(inner)
            if found is not None:
                return found
    return None


def _error_line(message: str) -> None:
    print(f"ctxd: {scrub_secrets(' '.join(message.split()))}", file=sys.stderr)
