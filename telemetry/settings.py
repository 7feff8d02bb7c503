"""Telemetry settings read from the standard ``OTEL_*`` environment variables.

ctxd builds its providers by hand (no auto-configuration), so the variables that only
auto-configuration would read are interpreted here, and every bad value is an error at
start-up rather than an SDK warning followed by a silent default:

* ``OTEL_SDK_DISABLED`` (``true``/``false``): no-op tracer and meter, nothing exported.
* ``OTEL_SERVICE_NAME`` wins over ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``;
  the default is ``ctxd``.
* ``OTEL_RESOURCE_ATTRIBUTES``: ``key=value`` pairs separated by commas, values
  percent-decoded.
* ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: ``otlp``, ``console`` or ``none``.
  **When unset, a signal is exported over OTLP only if an endpoint is configured for it**
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` or the signal's own endpoint); otherwise it is not
  exported at all, so a first run without a collector does not log connection errors.
  ``otlp`` set explicitly with no endpoint uses the OTLP default (``localhost:4317`` for
  gRPC, ``localhost:4318`` for HTTP).
* ``OTEL_EXPORTER_OTLP_PROTOCOL`` and the per-signal ``..._TRACES_PROTOCOL`` /
  ``..._METRICS_PROTOCOL``: ``grpc`` (default) or ``http/protobuf``.
* ``OTEL_EXPORTER_OTLP_ENDPOINT`` is a base URL: for ``http/protobuf`` the signal path
  (``/v1/traces``, ``/v1/metrics``) is appended. A per-signal endpoint is used as is.
  For gRPC an ``http://`` scheme means an insecure (plaintext) channel.
* ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: the SDK's built-in samplers.
* ``OTEL_METRIC_EXPORT_INTERVAL`` / ``OTEL_METRIC_EXPORT_TIMEOUT``: milliseconds.

Other variables (exporter headers, TLS files, compression, timeouts, batch-processor
tuning, span limits) are read by the SDK and exporters from the process environment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, TypeAlias
from urllib.parse import unquote, urlsplit

__all__ = [
    "ExporterKind",
    "OtlpProtocol",
    "SignalExport",
    "TelemetryConfigError",
    "TelemetrySettings",
]

ExporterKind: TypeAlias = Literal["otlp", "console", "none"]
OtlpProtocol: TypeAlias = Literal["grpc", "http/protobuf"]

DEFAULT_SERVICE_NAME: Final = "ctxd"
_EXPORTERS: Final[tuple[ExporterKind, ...]] = ("otlp", "console", "none")
_PROTOCOLS: Final[tuple[OtlpProtocol, ...]] = ("grpc", "http/protobuf")
_DEFAULT_ENDPOINTS: Final[Mapping[OtlpProtocol, str]] = {
    "grpc": "http://localhost:4317",
    "http/protobuf": "http://localhost:4318",
}
_SAMPLERS: Final = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
_RATIO_SAMPLERS: Final = frozenset({"traceidratio", "parentbased_traceidratio"})


class TelemetryConfigError(ValueError):
    """An ``OTEL_*`` variable has a value ctxd cannot use.

    The message names the variable, the offending value and what is allowed.
    """


@dataclass(frozen=True)
class SignalExport:
    """Where and how one signal (traces or metrics) is exported.

    Attributes:
        exporter: ``otlp``, ``console`` or ``none``.
        protocol: the OTLP transport; meaningful only for ``otlp``.
        endpoint: the URL handed to the exporter (for ``http/protobuf`` it already
            includes the signal path); ``None`` unless ``exporter`` is ``otlp``.
    """

    exporter: ExporterKind = "none"
    protocol: OtlpProtocol = "grpc"
    endpoint: str | None = None


@dataclass(frozen=True)
class TelemetrySettings:
    """Everything :func:`telemetry.open_telemetry` needs, usually from :meth:`from_env`.

    Attributes:
        disabled: ``OTEL_SDK_DISABLED``; no-op tracer and meter when true.
        service_name: the resource's ``service.name``.
        resource_attributes: further resource attributes.
        traces: how spans are exported.
        metrics: how metrics are exported.
        sampler: one of the SDK's sampler names (``parentbased_always_on``…).
        sampler_arg: the ratio for the ``*traceidratio`` samplers.
        metric_export_interval: seconds between metric exports.
        metric_export_timeout: seconds one metric export may take.
    """

    disabled: bool = False
    service_name: str = DEFAULT_SERVICE_NAME
    resource_attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    traces: SignalExport = SignalExport()
    metrics: SignalExport = SignalExport()
    sampler: str = "parentbased_always_on"
    sampler_arg: float | None = None
    metric_export_interval: float = 60.0
    metric_export_timeout: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TelemetrySettings:
        """Read the settings from ``OTEL_*`` variables (see the module docstring).

        Empty values count as unset, as the OpenTelemetry specification asks.

        Args:
            environ: the environment, usually ``os.environ``.

        Returns:
            The settings.

        Raises:
            TelemetryConfigError: a variable has a value that is not allowed.
        """
        env = _Env(environ)
        resource_attributes = _parse_resource_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES"))
        service_name = (
            env.get("OTEL_SERVICE_NAME")
            or resource_attributes.get("service.name")
            or DEFAULT_SERVICE_NAME
        )
        sampler = (env.get("OTEL_TRACES_SAMPLER") or "parentbased_always_on").lower()
        if sampler not in _SAMPLERS:
            raise TelemetryConfigError(
                f"OTEL_TRACES_SAMPLER={env.raw('OTEL_TRACES_SAMPLER')!r} is not supported; "
                f"use one of {', '.join(_SAMPLERS)}"
            )
        return cls(
            disabled=env.boolean("OTEL_SDK_DISABLED"),
            service_name=service_name,
            resource_attributes=MappingProxyType(resource_attributes),
            traces=_signal_export(env, "TRACES", "v1/traces"),
            metrics=_signal_export(env, "METRICS", "v1/metrics"),
            sampler=sampler,
            sampler_arg=_sampler_arg(env) if sampler in _RATIO_SAMPLERS else None,
            metric_export_interval=env.milliseconds("OTEL_METRIC_EXPORT_INTERVAL", 60_000, 1),
            metric_export_timeout=env.milliseconds("OTEL_METRIC_EXPORT_TIMEOUT", 30_000, 0),
        )


class _Env:
    """Typed reads of environment variables, empty values counting as unset."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def raw(self, name: str) -> str:
        return self._environ.get(name, "")

    def get(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def boolean(self, name: str) -> bool:
        value = self.get(name)
        if value is None:
            return False
        lowered = value.lower()
        if lowered not in ("true", "false"):
            raise TelemetryConfigError(
                f"{name}={self.raw(name)!r} is not a boolean; use true or false"
            )
        return lowered == "true"

    def choice(self, name: str, allowed: tuple[str, ...]) -> str | None:
        value = self.get(name)
        if value is None:
            return None
        lowered = value.lower()
        if lowered not in allowed:
            raise TelemetryConfigError(
                f"{name}={self.raw(name)!r} is not supported; use one of {', '.join(allowed)}"
            )
        return lowered

    def milliseconds(self, name: str, default: int, minimum: int) -> float:
        """Return the variable's milliseconds as seconds."""
        value = self.get(name)
        if value is None:
            return default / 1000
        try:
            millis = float(value)
        except ValueError:
            millis = math.nan
        if not math.isfinite(millis) or millis < minimum:
            raise TelemetryConfigError(
                f"{name}={self.raw(name)!r} is not a number of milliseconds >= {minimum}"
            )
        return millis / 1000

    def url(self, name: str) -> str | None:
        value = self.get(name)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise TelemetryConfigError(
                f"{name}={self.raw(name)!r} is not an endpoint URL; "
                "use http://host:port or https://host:port"
            )
        return value


def _signal_export(env: _Env, signal: str, http_path: str) -> SignalExport:
    exporter_var = f"OTEL_{signal}_EXPORTER"
    signal_endpoint_var = f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
    signal_endpoint = env.url(signal_endpoint_var)
    base_endpoint = env.url("OTEL_EXPORTER_OTLP_ENDPOINT")
    protocol = _protocol(env, signal)
    exporter = env.choice(exporter_var, _EXPORTERS)
    if exporter is None:
        # No endpoint, no export: a first run without a collector stays quiet.
        exporter = "otlp" if signal_endpoint or base_endpoint else "none"
    if exporter != "otlp":
        return SignalExport(exporter="console" if exporter == "console" else "none")
    if signal_endpoint is not None:
        endpoint = signal_endpoint
    else:
        base = base_endpoint or _DEFAULT_ENDPOINTS[protocol]
        endpoint = f"{base.rstrip('/')}/{http_path}" if protocol == "http/protobuf" else base
    return SignalExport(exporter="otlp", protocol=protocol, endpoint=endpoint)


def _protocol(env: _Env, signal: str) -> OtlpProtocol:
    general = env.choice("OTEL_EXPORTER_OTLP_PROTOCOL", _PROTOCOLS)
    specific = env.choice(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", _PROTOCOLS)
    chosen = specific or general
    return "http/protobuf" if chosen == "http/protobuf" else "grpc"


def _sampler_arg(env: _Env) -> float:
    value = env.get("OTEL_TRACES_SAMPLER_ARG")
    if value is None:
        return 1.0
    try:
        ratio = float(value)
    except ValueError:
        ratio = math.nan
    if not 0.0 <= ratio <= 1.0:
        raise TelemetryConfigError(
            f"OTEL_TRACES_SAMPLER_ARG={env.raw('OTEL_TRACES_SAMPLER_ARG')!r} is not a "
            "sampling ratio; use a number from 0 to 1"
        )
    return ratio


def _parse_resource_attributes(value: str | None) -> dict[str, str]:
    attributes: dict[str, str] = {}
    if value is None:
        return attributes
    for item in value.split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TelemetryConfigError(
                f"OTEL_RESOURCE_ATTRIBUTES has the entry {item!r}, which is not key=value; "
                "use comma-separated key=value pairs (percent-encode ',' and '=' in values)"
            )
        attributes[key.strip()] = unquote(raw.strip())
    return attributes
