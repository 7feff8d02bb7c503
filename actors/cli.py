"""The ``ctxd`` command line: the root parser and the error policy of every command.

Each command lives in its own ``actors/cmd_*.py`` module, which registers its parser
and handler. Configuration comes from ``CTXD_*`` variables and an optional TOML file
(``--config``); a bad value ends the command with exit code 2 and one line saying what
to fix; any other ctxd or Redis failure exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from redis.exceptions import RedisError

from actors.config import load_settings
from graph.errors import CtxdError

__all__ = ["main"]

_EXIT_CONFIG = 2
_EXIT_FATAL = 1

# One module per group of commands; each has register(subcommands).
_COMMAND_MODULES = (
    "actors.cmd_run",
    "actors.cmd_events",
    "actors.cmd_state",
    "actors.cmd_worker",
    "actors.cmd_ops",
    "actors.cmd_forget",
)

_DESCRIPTION = """\
ctxd runs a contextual-processing feedback loop for every event that producers append
to a Redis stream (ctxd:in), keeps each workflow's context durable in Redis, decides
with a multi-factor routing engine and writes one result per event to ctxd:out.

Settings: CTXD_* environment variables or a TOML file (--config); OTEL_* for tracing.
With no CTXD_REDIS_URL, `ctxd run` starts an embedded Redis with RedisJSON and
RediSearch (data in CTXD_STATE_DIR) and the other commands use it.
"""


def _parser() -> argparse.ArgumentParser:
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
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(config_file=args.config)
        code: int = args.handler(settings, args)
    except CtxdError as exc:
        print(f"ctxd: {exc}", file=sys.stderr)
        return _EXIT_CONFIG if isinstance(exc, ValueError) else _EXIT_FATAL
    except RedisError as exc:
        print(f"ctxd: Redis error: {exc}", file=sys.stderr)
        return _EXIT_FATAL
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
