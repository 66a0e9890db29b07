"""Serving the app for domain mode: one Hypercorn server, TLS (h2 + HTTP/1.1 by ALPN) on the
domain's port and plain HTTP/1.1 on the API port, sharing one app and one lifespan.

uvicorn speaks no HTTP/2, and the SDK uses h2 over TLS by default (E2B_PROTOCOL.md §2.4), so
``cube serve`` uses :func:`serve` when a domain is configured. Clients trust ``ca.pem``
(``SSL_CERT_FILE``) and resolve ``*.<domain>`` to this host (docs/api.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

__all__ = ["KEEP_ALIVE_S", "HypercornConfig", "hypercorn_config", "run", "serve"]

from cube_api_e2b.tls import TlsFiles

#: Longest idle keep-alive on the edge; upstream E2B uses 620 s, above the SDK's 60 s timeouts.
KEEP_ALIVE_S = 620


def hypercorn_config(*, host: str, port: int | None, tls: TlsFiles | None, tls_port: int | None,
                     keep_alive_s: float = KEEP_ALIVE_S) -> HypercornConfig:
    """Binds: TLS on ``host:tls_port`` when ``tls`` is given, plain HTTP on ``host:port`` when given."""
    config = HypercornConfig()
    config.accesslog = None
    config.keep_alive_timeout = keep_alive_s
    config.graceful_timeout = 5
    config.h2_max_concurrent_streams = 250
    config.websocket_max_message_size = 64 * 1024 * 1024
    plain = [f"{host}:{port}"] if port is not None else []
    if tls is not None:
        if tls_port is None:
            raise ValueError("tls_port is required with tls")
        config.certfile = str(tls.cert)
        config.keyfile = str(tls.key)
        config.alpn_protocols = ["h2", "http/1.1"]
        config.bind = [f"{host}:{tls_port}"]
        config.insecure_bind = plain
    else:
        config.bind = plain
    if not config.bind:
        raise ValueError("nothing to listen on")
    return config


async def serve(app: Any, config: HypercornConfig,
                shutdown_trigger: Callable[..., Awaitable[Any]] | None = None) -> None:
    """Run ``app`` until ``shutdown_trigger`` returns (default: SIGINT/SIGTERM)."""
    if shutdown_trigger is None:
        await hypercorn_serve(app, config)
    else:
        await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)


def run(app: Any, config: HypercornConfig) -> None:
    """Blocking form for the CLI."""
    asyncio.run(serve(app, config))
