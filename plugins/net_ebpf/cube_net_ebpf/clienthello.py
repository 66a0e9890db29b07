"""The server name (SNI) of a TLS ClientHello, read from the first bytes a client sends.

Pure (bytes in, answer out) so the unit tests cover every case. The egress proxy peeks these
bytes without consuming them (:mod:`.httpproxy`): a connection it does not inspect goes on
byte for byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAX_HELLO = 32 * 1024
"""A ClientHello longer than this is not waited for (TLS allows more; clients send a few KiB,
post-quantum key shares included)."""


class NotTls(ValueError):
    """The bytes are not the start of a TLS ClientHello."""


@dataclass(frozen=True, slots=True)
class Hello:
    server_name: str | None
    """The ``host_name`` of the server_name extension, lower-case without a trailing dot;
    ``None`` when the client sent none."""


def parse(data: bytes) -> Hello | None:
    """The ClientHello in ``data``, or ``None`` while it is incomplete; :class:`NotTls` when
    ``data`` cannot start one (or it would be over :data:`MAX_HELLO`)."""
    body = bytearray()
    pos = 0
    need: int | None = None
    while need is None or len(body) < need:
        if len(data) < pos + 5:
            _check_partial(data, pos)
            return None
        kind, major, length = data[pos], data[pos + 1], struct.unpack_from("!H", data, pos + 3)[0]
        if kind != 0x16 or major != 3 or not 0 < length <= 16384 + 2048:
            raise NotTls("not a TLS handshake record")
        if len(data) < pos + 5 + length:
            return None
        body += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if need is None and len(body) >= 4:
            if body[0] != 1:
                raise NotTls("the first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(body[1:4], "big")
            if need > MAX_HELLO:
                raise NotTls(f"ClientHello over {MAX_HELLO} bytes")
    try:
        return Hello(server_name=_server_name(bytes(body[4:need])))
    except (IndexError, struct.error) as exc:
        raise NotTls("malformed ClientHello") from exc


def _check_partial(data: bytes, pos: int) -> None:
    head = data[pos:pos + 3]
    if head and (head[0] != 0x16 or (len(head) > 1 and head[1] != 3)):
        raise NotTls("not a TLS handshake record")
    if pos > MAX_HELLO:
        raise NotTls(f"ClientHello over {MAX_HELLO} bytes")


def _server_name(hello: bytes) -> str | None:
    pos = 2 + 32  # legacy_version, random
    pos += 1 + hello[pos]  # session id
    pos += 2 + struct.unpack_from("!H", hello, pos)[0]  # cipher suites
    pos += 1 + hello[pos]  # compression methods
    if pos == len(hello):
        return None  # no extensions
    end = pos + 2 + struct.unpack_from("!H", hello, pos)[0]
    if end > len(hello):
        raise NotTls("extensions run past the ClientHello")
    pos += 2
    while pos + 4 <= end:
        ext, length = struct.unpack_from("!HH", hello, pos)
        pos += 4
        if pos + length > end:
            raise NotTls("an extension runs past the ClientHello")
        if ext == 0:  # server_name: list length, then (type, length, name)...
            item = pos + 2
            while item + 3 <= pos + length:
                kind, size = hello[item], struct.unpack_from("!H", hello, item + 1)[0]
                name = hello[item + 3:item + 3 + size]
                if kind == 0:
                    try:
                        text = name.decode("ascii")
                    except UnicodeDecodeError as exc:
                        raise NotTls("server name is not ASCII") from exc
                    return text.lower().rstrip(".") or None
                item += 3 + size
            return None
        pos += length
    return None
