"""An in-process OTLP receiver (gRPC and HTTP/protobuf) for tests.

Import it from :mod:`telemetry.testing`.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from telemetry._otlp_records import (
    ReceivedMetric,
    ReceivedSpan,
    Transport,
    decode_metrics,
    decode_spans,
)

__all__ = ["MetricsPredicate", "OtlpReceiver", "SpansPredicate"]


class _GrpcTraceService:
    """Duck-typed ``TraceServiceServicer`` (importing the real one imports grpc)."""

    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(  # named as in the generated servicer
        self, request: ExportTraceServiceRequest, context: object
    ) -> ExportTraceServiceResponse:
        self._receiver._add_traces(request, "grpc")
        return ExportTraceServiceResponse()


class _GrpcMetricsService:
    """Duck-typed ``MetricsServiceServicer``."""

    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(  # named as in the generated servicer
        self, request: ExportMetricsServiceRequest, context: object
    ) -> ExportMetricsServiceResponse:
        self._receiver._add_metrics(request, "grpc")
        return ExportMetricsServiceResponse()


def _http_handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            encoding = (self.headers.get("Content-Encoding") or "").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            if "protobuf" not in (self.headers.get("Content-Type") or ""):
                self._reply(415, b"only application/x-protobuf is supported")
                return
            path = self.path.split("?", 1)[0]
            if path == "/v1/traces":
                receiver._add_traces(ExportTraceServiceRequest.FromString(body), "http")
                self._reply(200, ExportTraceServiceResponse().SerializeToString())
            elif path == "/v1/metrics" and receiver._accept_metrics:
                receiver._add_metrics(ExportMetricsServiceRequest.FromString(body), "http")
                self._reply(200, ExportMetricsServiceResponse().SerializeToString())
            else:
                self._reply(404, b"unknown OTLP path")

        def _reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Keep test output quiet."""

    return Handler


SpansPredicate = Callable[[Sequence[ReceivedSpan]], bool]
MetricsPredicate = Callable[[Sequence[ReceivedMetric]], bool]


class OtlpReceiver:
    """An in-process OTLP receiver: gRPC and HTTP/protobuf on loopback, ephemeral ports.

    Point the real exporters at :attr:`grpc_endpoint` or :attr:`http_endpoint`, flush
    them, and read back decoded spans and metrics. Each instance has its own servers
    and storage::

        with OtlpReceiver() as receiver:
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint}
            ...
            spans = receiver.wait_for_spans(lambda s: len(s) >= 3)

    With ``accept_metrics=False`` it behaves like Jaeger, which accepts traces only: gRPC
    answers ``UNIMPLEMENTED`` and HTTP ``404`` to metric exports.

    grpc is imported when the receiver starts, not when this module is imported.

    Args:
        accept_metrics: serve the metrics service as well as the trace service.
    """

    def __init__(self, *, accept_metrics: bool = True) -> None:
        self._accept_metrics = accept_metrics
        self._condition = threading.Condition()
        self._trace_requests: list[tuple[ExportTraceServiceRequest, Transport]] = []
        self._metric_requests: list[tuple[ExportMetricsServiceRequest, Transport]] = []
        self._stop_grpc: Callable[[], None] | None = None
        self._http_server: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._grpc_port = 0
        self._http_port = 0

    # lifecycle

    def start(self) -> OtlpReceiver:
        """Start both servers.

        Returns:
            The receiver itself.

        Raises:
            RuntimeError: it is already started.
        """
        if self._http_server is not None:
            raise RuntimeError("this OtlpReceiver is already started")
        import grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-receiver-grpc")
        server = grpc.server(executor)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _GrpcTraceService(self), server
        )
        if self._accept_metrics:
            metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
                _GrpcMetricsService(self), server
            )
        self._grpc_port = int(server.add_insecure_port("127.0.0.1:0"))
        server.start()

        def stop_grpc() -> None:
            server.stop(grace=None).wait()
            executor.shutdown(wait=True)

        self._stop_grpc = stop_grpc

        http_server = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(self))
        http_server.daemon_threads = True
        self._http_port = int(http_server.server_address[1])
        # serve_forever checks for shutdown once per poll interval (0.5 s by default).
        self._http_thread = threading.Thread(
            target=http_server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="otlp-receiver-http",
            daemon=True,
        )
        self._http_thread.start()
        self._http_server = http_server
        return self

    def stop(self) -> None:
        """Stop both servers and wait for them; calling it again does nothing."""
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        if self._http_thread is not None:
            self._http_thread.join()
            self._http_thread = None
        if self._stop_grpc is not None:
            self._stop_grpc()
            self._stop_grpc = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # addresses

    @property
    def grpc_endpoint(self) -> str:
        """``http://127.0.0.1:<port>`` of the gRPC server (``http`` means plaintext)."""
        self._require_started()
        return f"http://127.0.0.1:{self._grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """Base URL of the HTTP server; it serves ``/v1/traces`` and ``/v1/metrics``."""
        self._require_started()
        return f"http://127.0.0.1:{self._http_port}"

    def _require_started(self) -> None:
        if self._http_server is None:
            raise RuntimeError("start the OtlpReceiver first (use it as a context manager)")

    # storage

    def _add_traces(self, request: ExportTraceServiceRequest, transport: Transport) -> None:
        with self._condition:
            self._trace_requests.append((request, transport))
            self._condition.notify_all()

    def _add_metrics(self, request: ExportMetricsServiceRequest, transport: Transport) -> None:
        with self._condition:
            self._metric_requests.append((request, transport))
            self._condition.notify_all()

    def clear(self) -> None:
        """Forget everything received so far."""
        with self._condition:
            self._trace_requests.clear()
            self._metric_requests.clear()

    def trace_requests(self) -> list[ExportTraceServiceRequest]:
        """The raw trace export requests, in arrival order."""
        with self._condition:
            return [request for request, _ in self._trace_requests]

    def metric_requests(self) -> list[ExportMetricsServiceRequest]:
        """The raw metric export requests, in arrival order."""
        with self._condition:
            return [request for request, _ in self._metric_requests]

    def spans(self) -> list[ReceivedSpan]:
        """Every span received, decoded, in arrival order."""
        with self._condition:
            return self._spans_locked()

    def metrics(self) -> list[ReceivedMetric]:
        """Every metric received, decoded, one record per metric per export."""
        with self._condition:
            return self._metrics_locked()

    def metric_names(self) -> set[str]:
        """The names of every metric received."""
        return {metric.name for metric in self.metrics()}

    def _spans_locked(self) -> list[ReceivedSpan]:
        return [s for request, via in self._trace_requests for s in decode_spans(request, via)]

    def _metrics_locked(self) -> list[ReceivedMetric]:
        return [m for request, via in self._metric_requests for m in decode_metrics(request, via)]

    # waiting

    def wait_for_spans(
        self, predicate: SpansPredicate, timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        """Block until the spans received so far satisfy ``predicate``.

        Args:
            predicate: called with all spans received so far, after each export.
            timeout: seconds to wait at most.

        Returns:
            All spans received so far.

        Raises:
            TimeoutError: ``predicate`` was still false after ``timeout``.
        """
        with self._condition:
            if not self._condition.wait_for(lambda: predicate(self._spans_locked()), timeout):
                names = [span.name for span in self._spans_locked()]
                raise TimeoutError(f"spans did not arrive within {timeout}s; received {names}")
            return self._spans_locked()

    def wait_for_metrics(
        self, predicate: MetricsPredicate, timeout: float = 10.0
    ) -> list[ReceivedMetric]:
        """Block until the metrics received so far satisfy ``predicate``.

        Args:
            predicate: called with all metrics received so far, after each export.
            timeout: seconds to wait at most.

        Returns:
            All metrics received so far.

        Raises:
            TimeoutError: ``predicate`` was still false after ``timeout``.
        """
        with self._condition:
            if not self._condition.wait_for(lambda: predicate(self._metrics_locked()), timeout):
                names = sorted({metric.name for metric in self._metrics_locked()})
                raise TimeoutError(f"metrics did not arrive within {timeout}s; received {names}")
            return self._metrics_locked()
