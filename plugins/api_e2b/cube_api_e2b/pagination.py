"""Cursor pagination for ``GET /v2/sandboxes``: ``limit`` + ``nextToken`` in, ``X-Next-Token`` out.

The token is opaque to clients: URL-safe base64 of the (startedAt, sandboxID) sort key of the last
item served. Items are ordered by that key (``desc`` by default, as upstream), so a page boundary
stays stable while sandboxes come and go.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from cube_core import Sandbox

from cube_api_e2b.errors import InvalidRequestError

Order = Literal["asc", "desc"]
DEFAULT_LIMIT = 100
MAX_LIMIT = 100

SortKey = tuple[datetime, str]


def sort_key(sandbox: Sandbox) -> SortKey:
    return sandbox.started_at, sandbox.sandbox_id


def encode_token(key: SortKey) -> str:
    raw = json.dumps([key[0].isoformat(), key[1]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> SortKey:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        started, sandbox_id = json.loads(raw)
        key = (datetime.fromisoformat(started), str(sandbox_id))
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(field="nextToken", reason="invalid pagination token") from exc
    if key[0].tzinfo is None:
        raise InvalidRequestError(field="nextToken", reason="invalid pagination token")
    return key


def paginate(items: Sequence[Sandbox], *, order: Order = "desc", limit: int = DEFAULT_LIMIT,
             next_token: str | None = None) -> tuple[list[Sandbox], str | None]:
    """One page of ``items`` and the token of the next page (None on the last page)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequestError(field="limit", reason=f"must be between 1 and {MAX_LIMIT}")
    ordered = sorted(items, key=sort_key, reverse=(order == "desc"))
    if next_token:
        after = decode_token(next_token)
        if order == "desc":
            ordered = [s for s in ordered if sort_key(s) < after]
        else:
            ordered = [s for s in ordered if sort_key(s) > after]
    page = ordered[:limit]
    more = len(ordered) > limit
    return page, (encode_token(sort_key(page[-1])) if more and page else None)
