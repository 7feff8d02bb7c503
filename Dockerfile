# ctxd as a container: non-root, signals handled (tini as PID 1 forwards SIGTERM to
# ctxd, which drains and exits 0). Redis comes from docker-compose (Redis 8 has JSON
# and Search built in), so the embedded Redis extra is not installed here.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY actors ./actors
COPY graph ./graph
COPY telemetry ./telemetry
RUN pip install --no-cache-dir '.[postgres]'

RUN useradd --system --uid 10001 --home-dir /var/lib/ctxd --create-home ctxd
USER ctxd
ENV CTXD_STATE_DIR=/var/lib/ctxd \
    CTXD_LOG_FORMAT=json \
    LANGGRAPH_STRICT_MSGPACK=true \
    CTXD_DRAIN_BUDGET=20 \
    PYTHONUNBUFFERED=1

# tini is PID 1: it forwards SIGTERM/SIGINT to ctxd (PID 1 itself would ignore signals
# it has no handler for) and reaps zombies. Keep stop_grace_period / --stop-timeout
# above CTXD_DRAIN_BUDGET (20 s by default).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "ctxd"]
CMD ["run"]
