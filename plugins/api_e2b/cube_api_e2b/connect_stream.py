"""Connect streaming framing, as far as the edge needs it (E2B_PROTOCOL.md §5.2).

A Connect stream response (``application/connect+json`` / ``+proto``) is a run of envelopes: one
flags byte, a 4-byte big-endian length, then that many bytes; flag ``0x02`` marks the
end-of-stream message, a JSON ``{"error"?: {"code", "message"}}``. When a sandbox stops under an
open stream, the edge ends the stream the way E2B does, with an ``unavailable`` end-of-stream
error, so the SDK probes the sandbox (whose edge answer is then 502 "... was not found") and
reports it killed; an aborted HTTP/2 stream would leave the client waiting instead.
"""

from __future__ import annotations

import json

CONNECT_STREAM_TYPES = ("application/connect+json", "application/connect+proto")
END_STREAM_FLAG = 0x02
HEADER_LEN = 5


def is_connect_stream(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() in CONNECT_STREAM_TYPES


def end_of_stream_error(code: str, message: str) -> bytes:
    """One end-of-stream envelope carrying a Connect error."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return bytes([END_STREAM_FLAG]) + len(body).to_bytes(4, "big") + body


class EnvelopeTracker:
    """Follows the envelopes of a stream passing through in arbitrary chunks (no copies)."""

    def __init__(self) -> None:
        self._header = b""
        self._left = 0
        self.ended = False
        """An end-of-stream envelope has started: the stream carries its own ending."""

    def feed(self, chunk: bytes) -> None:
        i, n = 0, len(chunk)
        while i < n:
            if self._left:
                take = min(self._left, n - i)
                self._left -= take
                i += take
                continue
            want = HEADER_LEN - len(self._header)
            self._header += chunk[i:i + want]
            i += min(want, n - i)
            if len(self._header) == HEADER_LEN:
                self.ended = self.ended or bool(self._header[0] & END_STREAM_FLAG)
                self._left = int.from_bytes(self._header[1:], "big")
                self._header = b""

    @property
    def at_boundary(self) -> bool:
        """Between two envelopes: another envelope can be appended without breaking the framing."""
        return not self._header and not self._left
