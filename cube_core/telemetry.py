"""OpenTelemetry traces: off (nothing imported, :func:`span` a shared no-op) unless an OTLP
endpoint is configured (``[telemetry] otlp_endpoint`` or ``$OTEL_EXPORTER_OTLP_ENDPOINT``).

A create is one trace: the API request (:class:`cube_core.requestctx.RequestContext`), the
service's ``sandbox.create`` with ``scheduler.place``, the node's ``node.launch`` (over HTTP the
context crosses in a ``traceparent`` header: :func:`inject` in the HTTP node client,
:func:`extract` in the node app) with its ``network.allocate``, ``storage.create_disk``,
``vmm.restore``/``vmm.boot``/``vmm.resume`` and the guest calls (``guest.personalize``,
``guest.apply``). docs/observability.md lists the spans and their attributes.

The tracer provider is this module's own (never the process-global one), so tests can install an
in-memory exporter and remove it again (:func:`configure_tracing` / :func:`shutdown_tracing`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cube_core.config import TelemetrySettings

_NOOP: AbstractContextManager[None] = contextlib.nullcontext()
_tracer: Any = None
_provider: Any = None


def enabled() -> bool:
    return _tracer is not None


def configure_tracing(settings: TelemetrySettings, *, role: str, exporter: Any = None) -> bool:
    """Start exporting spans when an endpoint is configured (or ``exporter`` is given: tests);
    returns whether tracing is on. ``role``: ``serve``, ``master`` or ``node`` (resource
    attribute ``cube.role``)."""
    global _tracer, _provider
    endpoint = settings.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter is None and not endpoint:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    shutdown_tracing()
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name,
                                                        "cube.role": role}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        assert endpoint is not None
        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces",
                                    headers=dict(settings.otlp_headers) or None, timeout=10)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _provider, _tracer = provider, provider.get_tracer("cube")
    return True


def shutdown_tracing() -> None:
    """Flush and stop the exporter (idempotent); spans are no-ops again."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def _attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """``sandbox_id=...`` -> ``cube.sandbox_id``; dotted names (``http.request.method``) as given;
    None left out."""
    return {(k if "." in k else f"cube.{k}"): v for k, v in attributes.items() if v is not None}


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """``with span("vmm.restore", sandbox_id=sid):`` a child of the current span (attribute
    ``cube.sandbox_id``); a shared no-op when tracing is off."""
    if _tracer is None:
        return _NOOP
    started: AbstractContextManager[Any] = _tracer.start_as_current_span(name, attributes=_attributes(attributes))
    return started


def child_span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """:func:`span`, but only inside a trace (background work such as the metrics sampler's guest
    calls makes no traces of its own)."""
    if _tracer is None:
        return _NOOP
    from opentelemetry import trace

    if not trace.get_current_span().is_recording():
        return _NOOP
    return span(name, **attributes)


def server_span(name: str, carrier: Mapping[str, str], **attributes: Any) -> AbstractContextManager[Any]:
    """A server span continuing the trace in ``carrier``'s ``traceparent`` header, if any."""
    if _tracer is None:
        return _NOOP
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract(carrier=dict(carrier))
    started: AbstractContextManager[Any] = _tracer.start_as_current_span(
        name, context=parent, kind=SpanKind.SERVER, attributes=_attributes(attributes))
    return started


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current span's ``traceparent`` to outgoing ``headers`` (nothing when off)."""
    if _tracer is None:
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    TraceContextTextMapPropagator().inject(headers)


def set_attributes(**attributes: Any) -> None:
    """Set attributes on the current span (e.g. the sandbox id once it is known)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(_attributes(attributes))


@contextlib.contextmanager
def recorded(exporter: Any, settings: TelemetrySettings | None = None) -> Iterator[Any]:
    """Tests: tracing into ``exporter`` (e.g. an ``InMemorySpanExporter``) for the block."""
    from cube_core.config import TelemetrySettings

    configure_tracing(settings or TelemetrySettings(), role="test", exporter=exporter)
    try:
        yield exporter
    finally:
        shutdown_tracing()


def rename_current(name: str) -> None:
    """Rename the current span (a server span once routing found the route template)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().update_name(name)
