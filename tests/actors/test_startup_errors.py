"""Start-up errors name their real cause in one line, with no password in any output.

Each test provokes one cause against a real server (or a real closed port, or a socket
that never answers) and runs ``ctxd`` as a real subprocess: exit 1, exactly one line on
stderr naming the cause, no traceback, no part of the password.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from redis import Redis
from redis_helpers import free_port, start_redis, start_tls_redis

from actors.app.redis_acl import acl_rules, acl_setuser_line
from tests_support import REPO, ServiceProcess, read_outputs, run_ctxd

pytestmark = pytest.mark.slow

# Every character URL parsing stumbles on, between distinctive pieces.
PASSWORD = "Kq3vT#Wz8xR@Lm5nP:Rt6bQ/Yp9cS%23Hn4dV"
PIECES = ("Kq3vT", "Wz8xR", "Lm5nP", "Rt6bQ", "Yp9cS", "Hn4dV")


def _env(url: str, prefix: str, tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "CTXD_REDIS_URL": url,
        "CTXD_STREAM_PREFIX": prefix,
        "CTXD_STATE_DIR": str(tmp_path / "state"),
        "CTXD_LOG_FORMAT": "json",
        "CTXD_BLOCK_MS": "100",
        "CTXD_EVENT_TIMEOUT": "5",
    }


def _assert_no_password(text: str) -> None:
    assert PASSWORD not in text
    assert quote(PASSWORD, safe="") not in text
    for piece in PIECES:
        assert piece not in text, f"password piece {piece!r} in output:\n{text[-2000:]}"


def _one_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 1, one ``ctxd: …`` line on stderr holding ``words``, no traceback."""
    output = result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, output
    assert len(lines) == 1, output
    assert lines[0].startswith("ctxd: "), output
    assert "Traceback" not in output
    for word in words:
        assert word in lines[0], lines[0]
    _assert_no_password(output)
    return lines[0]


def _encoded_url(base_url: str, user: str, password: str = PASSWORD) -> str:
    return base_url.replace("redis://", f"redis://{quote(user)}:{quote(password, safe='')}@")


@pytest.fixture
def acl_user(redis: Redis, prefix: str) -> Iterator[Callable[..., str]]:
    """Create ACL users with the documented rules (minus some); removed afterwards."""
    names: list[str] = []

    def create(*, without: tuple[str, ...] = (), password: str = PASSWORD) -> str:
        name = f"ctxd-{prefix}-{len(names)}"
        rules = [r for r in acl_rules(prefix) if r not in without]
        assert len(rules) == len(acl_rules(prefix)) - len(without)
        redis.execute_command("ACL", "SETUSER", name, "reset", f">{password}", *rules)  # type: ignore[no-untyped-call]
        names.append(name)
        return name

    yield create
    for name in names:
        redis.acl_deluser(name)


def test_connection_refused_names_host_and_port(prefix: str, tmp_path: Path) -> None:
    port = free_port()  # nothing listens on it
    env = _env(f"redis://u:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0", prefix, tmp_path)
    for args in (["status"], ["send", "wf", "text"], ["state", "wf"]):
        result = run_ctxd(env, *args)
        _one_line(result, f"127.0.0.1:{port}", "connection refused", "is Redis running?")


def test_a_server_that_never_answers_is_a_timeout(prefix: str, tmp_path: Path) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections complete in the kernel; nothing ever answers
        port = silent.getsockname()[1]
        env = _env(f"redis://u:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0", prefix, tmp_path)
        _one_line(run_ctxd(env, "status"), f"127.0.0.1:{port}", "timeout")


def test_wrong_password_is_an_authentication_failure(
    redis_url: str, prefix: str, tmp_path: Path, acl_user: Callable[..., str]
) -> None:
    user = acl_user()
    url = _encoded_url(redis_url, user, PASSWORD.replace("Kq3vT", "Kq3vX"))
    env = _env(url, prefix, tmp_path)
    for args in (["run"], ["status"], ["worker"]):
        _one_line(run_ctxd(env, *args), "authentication failed", repr(user))


def test_missing_modules_are_named(tmp_path: Path, prefix: str) -> None:
    """A Redis Stack server started without --loadmodule: RedisJSON and RediSearch missing."""
    port = free_port()
    server = start_redis(tmp_path / "bare", port, modules=False)
    try:
        env = _env(f"redis://127.0.0.1:{port}/0", prefix, tmp_path)
        for args in (["run"], ["state", "wf"]):
            _one_line(run_ctxd(env, *args), "lacks RedisJSON and RediSearch")
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize(
    ("without", "named"),
    [
        (("+evalsha",), "'evalsha'"),
        (("+json.set",), "JSON.SET"),
        (("+module|list",), "'module|list'"),
        (("~{prefix}:*",), "(needs ~{prefix}:*)"),
    ],
)
def test_acl_denial_names_the_missing_permission(
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    acl_user: Callable[..., str],
    without: tuple[str, ...],
    named: str,
) -> None:
    user = acl_user(without=tuple(w.replace("{prefix}", prefix) for w in without))
    env = _env(_encoded_url(redis_url, user), prefix, tmp_path)
    line = _one_line(run_ctxd(env, "run"), "NOPERM", "docs/operations.md", "Redis ACL")
    assert named.replace("{prefix}", prefix) in line


def _documented_acl_line() -> str:
    text = (REPO / "docs" / "operations.md").read_text()
    lines = [x.strip() for x in text.splitlines() if x.strip().startswith("ACL SETUSER ctxd ")]
    assert len(lines) == 1, "docs/operations.md shows one ACL SETUSER line"
    return lines[0]


def test_the_documented_acl_line_is_the_one_the_code_checks() -> None:
    assert _documented_acl_line() == acl_setuser_line("ctxd", "CHANGE-ME", "ctxd")


def test_the_service_runs_as_a_user_with_exactly_the_documented_rules(
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    """`ctxd run`, `worker`, `send`, `status`, `state`, `tail` and `dlq` as that user;
    the password (with # @ : / %23 in it) appears in no output."""
    user = f"ctxd-{prefix}"
    documented = _documented_acl_line().split()
    assert documented[:4] == ["ACL", "SETUSER", "ctxd", "on"]
    rules = [
        rule.replace("~ctxd:*", f"~{prefix}:*").replace(">CHANGE-ME", f">{PASSWORD}")
        for rule in documented[3:]
    ]
    redis.execute_command("ACL", "SETUSER", user, "reset", *rules)  # type: ignore[no-untyped-call]
    try:
        url = _encoded_url(redis_url, user)
        env = _env(url, prefix, tmp_path)
        service = start_service("run", env={**env, "CTXD_LOG_LEVEL": "debug"})
        worker = start_service("worker", "--kinds", "analysis", env=env)
        service.wait_ready()
        worker.wait_ready()
        outputs = [run_ctxd(env, "send", "wf-acl", f"event {n} over an ACL user") for n in (1, 2)]
        redis.xadd(f"{prefix}:in", {"content": "no workflow id"})
        assert [r.returncode for r in outputs] == [0, 0]
        entries = read_outputs(redis, f"{prefix}:out", 2)
        assert [e[1]["workflow_id"] for e in entries] == ["wf-acl", "wf-acl"]
        for args in (
            ["status"],
            ["state", "wf-acl"],
            ["state", "wf-acl", "--history"],
            ["tail", "--last", "5"],
            ["dlq", "list"],
            ["dlq", "replay", "--all"],
            ["forget", "wf-acl", "--force"],
        ):
            result = run_ctxd(env, *args)
            outputs.append(result)
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        assert "wf-acl" in outputs[3].stdout  # state
        service.signal(signal.SIGTERM)
        worker.signal(signal.SIGTERM)
        assert service.wait() == 0
        assert worker.wait() == 0
        log = "\n".join(service.lines + worker.lines)
        assert "***@" in log  # the URL was logged, redacted
        assert not [x for x in service.lines if '"level": "error"' in x]
        _assert_no_password(log + "".join(r.stdout + r.stderr for r in outputs))
    finally:
        redis.acl_deluser(user)


def _self_signed(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
         "-keyout", "server.key", "-out", "server.crt", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=directory, check=True, capture_output=True,
    )  # fmt: skip
    return directory


def test_tls_to_a_plain_port_is_a_timeout_that_says_so(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """The plain server waits for the end of a command line that the TLS client hello
    never sends: a timeout, with the hint that the port is not a TLS port."""
    url = redis_url.replace("redis://", "rediss://")
    _one_line(run_ctxd(_env(url, prefix, tmp_path), "status"), "timeout", "tls-port")


def test_tls_verification_failure_and_the_unverified_warning(
    start_service: Callable[..., ServiceProcess], tmp_path: Path, prefix: str
) -> None:
    """A self-signed server certificate: refused with one line when verified; with
    ssl_cert_reqs=none the service runs and logs one warning saying so."""
    certs = _self_signed(tmp_path / "certs")
    port = free_port()
    server = start_tls_redis(tmp_path / "tls-redis", port, certs)
    try:
        url = f"rediss://127.0.0.1:{port}/0"
        line = _one_line(run_ctxd(_env(url, prefix, tmp_path), "run"), "TLS certificate")
        assert "certificate verify failed" in line
        assert "ssl_ca_certs" in line
        _one_line(run_ctxd(_env(url, prefix, tmp_path), "status"), "TLS certificate")

        unverified = f"{url}?ssl_cert_reqs=none"
        service = start_service("run", env={"CTXD_REDIS_URL": unverified})
        service.wait_ready()
        client = Redis.from_url(unverified, decode_responses=True)
        client.xadd(f"{prefix}:in", {"workflow_id": "wf-tls", "content": "unverified TLS"})
        assert read_outputs(client, f"{prefix}:out", 1)[0][1]["workflow_id"] == "wf-tls"
        client.close()
        service.signal(signal.SIGTERM)
        assert service.wait() == 0
        warnings = [x for x in service.lines if re.search("certificate verification is off", x)]
        assert len(warnings) == 1
        assert '"level": "warning"' in warnings[0]
    finally:
        server.terminate()
        server.wait(timeout=10)
