"""What the plugin's outgoing HTTP clients (to guests, and through nodes' edges) share: one TLS
client context.

``httpx.AsyncClient()`` builds a new ``ssl.SSLContext`` and loads the CA bundle into it every
time it is created, whether or not the client ever speaks TLS: ~20 ms of CPU on an idle 2-core
box and ~90 ms under load, on the event loop. The edge creates a client per sandbox (its first
request) and the warm pool one per member; at 50 creates at once that was a quarter of the
server's samples (``cube bench create --profile``). One context built once and passed as
``verify=`` gives every client the same verification (httpx's defaults, without the proxy
environment: the clients all use ``trust_env=False``).
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS client context of every outgoing client of this plugin (built on first use)."""
    return httpx.create_ssl_context(trust_env=False)
