"""Redis ACL user + password and ``rediss://`` TLS from the URL; secrets never logged."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis
from redis_helpers import free_port, start_tls_redis

from tests_support import REPO, ServiceProcess, read_outputs

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-Pa55-do-not-log"


@pytest.fixture
def acl_user(redis: Redis, prefix: str) -> Iterator[str]:
    """An ACL user with a password and no dangerous commands; removed afterwards."""
    name = f"ctxd-{prefix}"
    redis.acl_setuser(
        name,
        enabled=True,
        passwords=[f"+{PASSWORD}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-@dangerous", "+info", "+module|list", "+client|setinfo"],
    )
    yield name
    redis.acl_deluser(name)


def test_acl_user_and_password_from_the_url_and_never_logged(
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    redis_url: str,
    prefix: str,
    acl_user: str,
) -> None:
    """ctxd runs as an ACL user (redis://user:pass@...); the password is in no log line."""
    url = redis_url.replace("redis://", f"redis://{acl_user}:{PASSWORD}@")
    service = start_service("run", env={"CTXD_REDIS_URL": url, "CTXD_LOG_LEVEL": "debug"})
    service.wait_ready()
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-acl", "content": "over an ACL user"})
    outputs = read_outputs(redis, f"{prefix}:out", 1)
    assert outputs[0][1]["workflow_id"] == "wf-acl"
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
    log = "\n".join(service.lines)
    assert "***@" in log  # the URL was logged, redacted
    assert PASSWORD not in log

    # A wrong password: a clear error, exit 1, and the password still not printed.
    bad = url.replace(PASSWORD, PASSWORD + "-wrong")
    result = subprocess.run(
        [sys.executable, "-m", "actors.app.cli", "run"],
        cwd=REPO,
        env={"CTXD_REDIS_URL": bad, "CTXD_STREAM_PREFIX": prefix, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert PASSWORD not in result.stdout + result.stderr


def _certificates(directory: Path) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1, made with openssl."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=ctxd-test-ca",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    )
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    )
    return directory  # fmt: skip


def test_tls_with_a_verified_ca(
    start_service: Callable[..., ServiceProcess], tmp_path: Path, prefix: str
) -> None:
    """The embedded redis-server supports TLS: ctxd runs over rediss:// with the test's
    CA; without the CA the certificate is refused (exit 1)."""
    certs = _certificates(tmp_path / "certs")
    port = free_port()
    server = start_tls_redis(
        tmp_path / "tls-redis", port, certs, "--tls-ca-cert-file", str(certs / "ca.crt")
    )
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs / 'ca.crt'}"
        client = Redis.from_url(url, decode_responses=True)
        service = start_service("run", env={"CTXD_REDIS_URL": url})
        service.wait_ready()
        client.xadd(f"{prefix}:in", {"workflow_id": "wf-tls", "content": "over TLS"})
        outputs = read_outputs(client, f"{prefix}:out", 1)
        assert outputs[0][1]["workflow_id"] == "wf-tls"
        service.signal(signal.SIGTERM)
        assert service.wait() == 0
        client.close()

        unverified = subprocess.run(
            [sys.executable, "-m", "actors.app.cli", "run"],
            cwd=REPO,
            env={"CTXD_REDIS_URL": f"rediss://127.0.0.1:{port}/0", "CTXD_STREAM_PREFIX": prefix},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert unverified.returncode == 1
        assert "certificate verify failed" in unverified.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
