"""Who is calling: API keys on the control plane, access tokens on the edge.

* Control plane: ``X-API-Key: e2b_...`` (what every SDK sends); ``Authorization: Bearer <key>`` is
  accepted as well (old SDKs sent access tokens that way for template calls). The key is checked by
  ``service.authenticate``; any failure is an :class:`cube_core.AuthError` (HTTP 401).
* Edge: a sandbox created with ``network.allowPublicTraffic = false`` gets a *traffic access token*;
  requests to its non-envd ports must carry it in ``E2B-Traffic-Access-Token``. The token is an
  HMAC of the sandbox id under a server secret, so it needs no storage and survives restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import structlog
from cube_core import AuthError, ConfigError, Team

from cube_api_e2b.service import ControlPlane

log = structlog.get_logger(__name__)

API_KEY_HEADER = "x-api-key"
TRAFFIC_TOKEN_HEADER = "e2b-traffic-access-token"
ACCESS_TOKEN_HEADER = "x-access-token"


def api_key_from(headers: Mapping[str, str]) -> str | None:
    """The API key of a request (``headers`` must be case-insensitive, e.g. Starlette's)."""
    key = headers.get(API_KEY_HEADER)
    if key:
        return key.strip()
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def authenticate(service: ControlPlane, headers: Mapping[str, str]) -> Team:
    """The team of the caller; raises :class:`AuthError` (-> 401) when the key is missing or bad."""
    team = service.authenticate(api_key_from(headers))
    if not isinstance(team, Team):  # a service double that forgets to raise must not let anyone in
        raise AuthError("invalid API key")
    return team


class TrafficTokens:
    """Derive and check traffic access tokens (``E2B-Traffic-Access-Token``)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ConfigError("traffic_token_secret must be at least 16 bytes")
        self._secret = secret

    def token_for(self, sandbox_id: str) -> str:
        return hmac.new(self._secret, f"traffic:{sandbox_id}".encode(), hashlib.sha256).hexdigest()[:40]

    def check(self, sandbox_id: str, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.token_for(sandbox_id).encode())


def load_traffic_secret(configured: str | None, state_dir: Path) -> bytes:
    """The configured secret, else a random one kept (mode 0600) under ``state_dir``."""
    if configured:
        return configured.encode()
    path = state_dir / "api_e2b" / "traffic.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the traffic token key {path}: {exc}") from exc
    secret = secrets.token_bytes(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret.hex())
    except FileExistsError:  # another process won the race: use its key
        return bytes.fromhex(path.read_text().strip())
    except OSError as exc:
        raise ConfigError(f"cannot write the traffic token key {path}: {exc}") from exc
    log.info("created traffic token key", path=str(path))
    return secret
