"""Identifiers and secrets: sandbox ids (lowercase letters and digits), API keys, access tokens."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_lowercase + string.digits


def sandbox_id() -> str:
    """20 characters of ``[a-z0-9]``, as E2B's ids look."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(20))


def short_id(prefix: str) -> str:
    return f"{prefix}{''.join(secrets.choice(_ALPHABET) for _ in range(12))}"


def volume_id() -> str:
    """``vol_`` and 20 characters of ``[a-z0-9]``."""
    return "vol_" + "".join(secrets.choice(_ALPHABET) for _ in range(20))


def api_key() -> str:
    """A new ``e2b_<40 hex>`` API key."""
    return "e2b_" + secrets.token_hex(20)


def access_token() -> str:
    return secrets.token_hex(16)
