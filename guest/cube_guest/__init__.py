"""Cube guest agent: envd (port 49983) and code interpreter (port 49999) inside a sandbox VM.

The agent speaks E2B's in-sandbox protocols so that the unmodified ``e2b`` and
``e2b-code-interpreter`` SDKs work against it, plus a JSON-lines control channel
on a virtio-serial port for the host (see ``control.py`` and README.md).
"""

from __future__ import annotations

__all__ = ["AGENT_VERSION", "ENVD_VERSION"]

AGENT_VERSION = "0.1.0"
# The envd protocol level implemented (gates SDK features, E2B_PROTOCOL.md §5.9).
ENVD_VERSION = "0.6.4"
