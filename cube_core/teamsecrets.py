"""A team's secrets (``/secrets``): write-only values, sealed at rest with ``[core] secrets_key``.

A value is sealed with AES-256-GCM under the configured key, with a fresh 96-bit nonce per
version and the record's identity (team, secret id, version) as associated data: a sealed value
copied into another record (another team's, another version) does not open. The records keep only
the sealed value; nothing here logs, returns or stores a value in clear. No API route reveals a
value: :meth:`TeamSecrets.reveal` is for :class:`~cube_core.nodesecrets.PlacedSecrets`, which
answers a node's egress proxy resolving the ``${e2b.secrets.<name>}`` placeholders of a
sandbox's ``network.rules`` per request (docs/api.md "Secrets in outbound requests"). Only the
control plane holds the key; nodes ask it.

Names are lower-cased before storage (the canonical form the API returns); ``sec_`` is reserved
for ids, so a route's ``{secretID}`` is an id when it starts with ``sec_`` and a name otherwise.
Each update appends a version: the record keeps the current one (``version``) only.
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cube_core import ids
from cube_core.config import CoreSettings, resolve_secrets
from cube_core.credentials import (
    CredentialError,
    CredentialNotFoundError,
    SecretExistsError,
    SecretRecord,
    SecretsDisabledError,
)
from cube_core.errors import ConfigError
from cube_core.models import utcnow
from cube_core.store import StateStore

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
ID_PREFIX = "sec_"
MAX_VALUE_BYTES = 64 * 1024
MAX_METADATA_ENTRIES, MAX_METADATA_KEY, MAX_METADATA_VALUE, MAX_METADATA_TOTAL = 32, 128, 1024, 8192


class SecretRequestError(CredentialError):
    """A secret's name, value or metadata is not acceptable (HTTP 400); names the field."""

    msg_fmt = "{field}: {reason}"


def parse_key(text: str) -> bytes:
    """32 bytes from 64 hex digits or base64 (standard or URL-safe); ``ConfigError`` otherwise.
    The message never shows the text."""
    text = text.strip()
    raw: bytes | None = None
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raw = bytes.fromhex(text)
    else:
        try:
            raw = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != 32:
        raise ConfigError("[core] secrets_key: expected 32 random bytes in base64 (`openssl rand -base64 32`) "
                          "or 64 hex digits")
    return raw


class SecretBox:
    """AES-256-GCM with the record's identity as associated data."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @staticmethod
    def _aad(secret: SecretRecord | tuple[str, str, int]) -> bytes:
        team_id, secret_id, version = ((secret.team_id, secret.secret_id, secret.version)
                                       if isinstance(secret, SecretRecord) else secret)
        return f"cube-secret\0{team_id}\0{secret_id}\0{version}".encode()

    def seal(self, team_id: str, secret_id: str, version: int, value: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, value.encode(), self._aad((team_id, secret_id, version)))
        return base64.b64encode(nonce + sealed).decode()

    def open(self, secret: SecretRecord) -> str:
        return self.unseal(secret.team_id, secret.secret_id, secret.version, secret.sealed)

    def unseal(self, team_id: str, record_id: str, version: int, sealed: str) -> str:
        """The value :meth:`seal` sealed for this record identity (a secret, a webhook's signing secret)."""
        blob = base64.b64decode(sealed)
        try:
            return self._aead.decrypt(blob[:12], blob[12:], self._aad((team_id, record_id, version))).decode()
        except InvalidTag as exc:
            raise ConfigError(f"{record_id} does not decrypt with [core] secrets_key: the key "
                              "changed, or the record was altered") from exc


def secret_box(settings: CoreSettings) -> SecretBox | None:
    """The box of ``[core] secrets_key``, or ``None`` when it is unset. Resolved at start: a bad key
    fails the start, not a request."""
    if settings.secrets_key is None:
        return None
    text = resolve_secrets(settings.secrets_key, where="[core] secrets_key")
    if not isinstance(text, str):
        raise ConfigError('[core] secrets_key: expected a secret reference { env = "NAME" } / '
                          '{ file = "/path" }')
    return SecretBox(parse_key(text))


def _check_value(value: str) -> None:
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise SecretRequestError(field="value", reason=f"at most {MAX_VALUE_BYTES} bytes")


def _check_metadata(metadata: dict[str, str]) -> None:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise SecretRequestError(field="metadata", reason=f"at most {MAX_METADATA_ENTRIES} entries")
    total = 0
    for key, value in metadata.items():
        if len(key.encode()) > MAX_METADATA_KEY:
            raise SecretRequestError(field=f"metadata.{key[:32]}", reason=f"keys are at most {MAX_METADATA_KEY} bytes")
        if len(value.encode()) > MAX_METADATA_VALUE:
            raise SecretRequestError(field=f"metadata.{key}", reason=f"values are at most {MAX_METADATA_VALUE} bytes")
        total += len(key.encode()) + len(value.encode())
    if total > MAX_METADATA_TOTAL:
        raise SecretRequestError(field="metadata", reason=f"at most {MAX_METADATA_TOTAL} bytes in total")


class TeamSecrets:
    """The ``/secrets`` operations of every team, on one store; team-scoped like sandboxes."""

    def __init__(self, store: StateStore, settings: CoreSettings) -> None:
        self.store = store
        self._box = secret_box(settings)

    @property
    def box(self) -> SecretBox:
        if self._box is None:
            raise SecretsDisabledError()
        return self._box

    def list(self, team_id: str) -> list[SecretRecord]:
        self.box  # noqa: B018 - the same answer on every route when disabled
        return self.store.list_secrets(team_id)

    def get(self, team_id: str, secret: str) -> SecretRecord:
        self.box  # noqa: B018
        found = self.store.get_secret(team_id, secret if secret.startswith(ID_PREFIX) else secret.lower())
        if found is None:
            raise CredentialNotFoundError(kind="secret", ident=secret)
        return found

    def create(self, team_id: str, name: str, value: str, metadata: dict[str, str] | None = None) -> SecretRecord:
        box = self.box
        if not NAME.fullmatch(name):
            raise SecretRequestError(field="name", reason="1-128 characters of letters, digits, '_' and '-'")
        canonical = name.lower()
        if canonical.startswith(ID_PREFIX):
            raise SecretRequestError(field="name", reason=f"the {ID_PREFIX} prefix is reserved for secret ids")
        _check_value(value)
        _check_metadata(metadata or {})
        secret_id = ids.short_id(ID_PREFIX)
        record = SecretRecord(secret_id=secret_id, team_id=team_id, name=canonical, version=1,
                              metadata=dict(metadata or {}), sealed=box.seal(team_id, secret_id, 1, value))
        if not self.store.add_secret(record):
            raise SecretExistsError(name=canonical)
        return record

    def update(self, team_id: str, secret: str, value: str, metadata: dict[str, str] | None = None) -> SecretRecord:
        box = self.box
        _check_value(value)
        if metadata is not None:
            _check_metadata(metadata)
        current = self.get(team_id, secret)
        version = current.version + 1
        updated = current.evolve(version=version, updated_at=utcnow(),
                                 sealed=box.seal(team_id, current.secret_id, version, value),
                                 metadata=current.metadata if metadata is None else dict(metadata))
        if not self.store.replace_secret(updated):  # deleted meanwhile
            raise CredentialNotFoundError(kind="secret", ident=secret)
        return updated

    def delete(self, team_id: str, secret: str) -> None:
        current = self.get(team_id, secret)
        if not self.store.delete_secret(team_id, current.secret_id):
            raise CredentialNotFoundError(kind="secret", ident=secret)

    def reveal(self, team_id: str, secret: str) -> str:
        """The current value, for a node's egress proxy only (through ``PlacedSecrets``): no
        API route calls this."""
        return self.box.open(self.get(team_id, secret))
