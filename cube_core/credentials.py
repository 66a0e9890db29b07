"""Records and errors of a team's credentials: secrets, API key labels, access tokens.

The records are kept by the :class:`~cube_core.store.StateStore`; the logic lives in
:mod:`cube_core.teamsecrets` (secrets, sealed with ``[core] secrets_key``) and
:mod:`cube_core.keys` (API keys and access tokens, of which only a SHA-256 is stored).

Errors, all :class:`~cube_core.errors.CubeError`::

    CubeError
    └── CredentialError
        ├── CredentialNotFoundError   (another team's is "not found" too)
        ├── SecretExistsError
        ├── SecretsDisabledError      ([core] secrets_key is not set)
        ├── SecretLookupLimitedError  (a sandbox's egress proxy asks too often)
        └── SecretLookupUnavailableError (a node reached no master to ask)
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from cube_core.errors import CubeError
from cube_core.models import Frozen as _Record
from cube_core.models import utcnow as _now


class SecretRecord(_Record):
    """A team's secret: metadata in clear, the value only sealed (AES-256-GCM, see teamsecrets)."""

    secret_id: str
    team_id: str
    name: str
    """Canonical (lower-case) name, unique within the team."""
    version: int = 1
    metadata: dict[str, str] = Field(default_factory=dict)
    sealed: str
    """base64(nonce + ciphertext + tag) of the current version's value; never the value."""
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)


class KeyLabel(_Record):
    """What the API shows of an API key beyond its record: a name and the last 4 characters."""

    key_id: str
    team_id: str
    name: str = ""
    suffix: str = ""


class AccessToken(_Record):
    """A team's access token (``sk_e2b_<40 hex>``); only its SHA-256 is stored."""

    token_id: str
    team_id: str
    name: str
    token_hash: str
    masked_prefix: str
    masked_suffix: str
    length: int
    created_at: datetime = Field(default_factory=_now)


class CredentialError(CubeError):
    """A secret, API key or access token request that cannot be served."""


class CredentialNotFoundError(CredentialError):
    msg_fmt = "{kind} {ident!r} not found"


class SecretExistsError(CredentialError):
    msg_fmt = "a secret named {name!r} already exists"


class SecretsDisabledError(CredentialError):
    msg_fmt = ("secrets are disabled on this server: its operator must set a key to encrypt them, "
               '[core] secrets_key = {{ env = "CUBE_SECRETS_KEY" }} (32 random bytes in base64, '
               "e.g. `openssl rand -base64 32`)")


class SecretLookupLimitedError(CredentialError):
    """A sandbox caused more secret look-ups than ``[cluster] secret_lookups_per_s`` allows."""

    msg_fmt = "too many secret look-ups from this sandbox (at most {rate:g} a second): try again later"


class SecretLookupUnavailableError(CredentialError):
    """A node could not ask a master for a secret (none configured, or none answered). The
    message is shown to the guest: it names no master; ``detail`` is for the node's log."""

    msg_fmt = "this node could not ask the control plane for it ({reason}); try again later"
