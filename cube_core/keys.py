"""Teams, API keys and access tokens. Keys look like ``e2b_<40 hex>``, access tokens like
``sk_e2b_<40 hex>``; only their SHA-256 is stored, and their secret is shown once, at creation.

The ``/api-keys`` and ``/access-tokens`` routes work on the caller's team only: another team's
key or token is "not found", like an id that does not exist. A deleted API key is revoked (the
record stays for ``cube keys ls``) and no longer listed.
"""

from __future__ import annotations

import secrets
import uuid

from cube_core import ids
from cube_core.credentials import AccessToken, CredentialNotFoundError, KeyLabel
from cube_core.errors import AuthError
from cube_core.models import ApiKey, Team
from cube_core.store import StateStore, hash_key

API_KEY_PREFIX = "e2b_"
ACCESS_TOKEN_PREFIX = "sk_e2b_"


def create_key(store: StateStore, team_name: str) -> tuple[ApiKey, str]:
    """Create a key for ``team_name`` (creating the team if new); return (record, secret)."""
    if not team_name.strip():
        raise AuthError("a team name is required")
    team = store.find_team(team_name)
    if team is None:
        team = Team(team_id=ids.short_id("team_"), name=team_name)
        store.put_team(team)
    return _new_key(store, team)


def _new_key(store: StateStore, team: Team, name: str = "") -> tuple[ApiKey, str]:
    secret = ids.api_key()
    key = ApiKey(key_id=ids.short_id("key_"), team_id=team.team_id, key_hash=hash_key(secret),
                 prefix=secret[:10])
    store.put_key_label(KeyLabel(key_id=key.key_id, team_id=team.team_id, name=name, suffix=secret[-4:]))
    store.put_api_key(key)
    return key, secret


def authenticate(store: StateStore, secret: str | None) -> Team:
    if not secret:
        raise AuthError("missing API key: set the X-API-Key header (E2B_API_KEY)")
    if not secret.startswith("e2b_") or len(secret) < 12:
        raise AuthError("malformed API key: expected e2b_<hex>")
    key = store.find_api_key(hash_key(secret))
    if key is None or key.revoked:
        raise AuthError("invalid API key")
    team = store.get_team(key.team_id)
    if team is None:
        raise AuthError("invalid API key")
    return team


def revoke_key(store: StateStore, key_id: str) -> ApiKey:
    """Revoke the key whose id is exactly ``key_id`` (``key_...``, as ``cube keys ls`` shows it).

    Never by the secret's visible prefix (``e2b_`` + 6 hex digits: 24 bits, shared by chance
    between keys): revoking the wrong key, or a key one only guessed at, must not be possible.
    """
    wanted = key_id.strip()
    for key in store.list_api_keys():
        if wanted == key.key_id:
            revoked = key.model_copy(update={"revoked": True})
            store.put_api_key(revoked)
            return revoked
    if wanted.startswith("e2b_"):
        raise AuthError(f"{wanted[:10]!r}... is (part of) a key's secret, not its id: revoke by the full key id "
                        "(key_...) that `cube keys ls` shows")
    raise AuthError(f"no API key with id {wanted!r}: give the full key id (key_...) that `cube keys ls` shows")


def list_keys(store: StateStore) -> list[tuple[ApiKey, Team | None]]:
    return [(k, store.get_team(k.team_id)) for k in store.list_api_keys()]


# -- the caller's team (``/api-keys``, ``/access-tokens``) -------------------------------------------


def team_keys(store: StateStore, team_id: str) -> list[tuple[ApiKey, KeyLabel]]:
    """The team's live (not revoked) keys with their labels (an empty one for keys made before labels)."""
    labels = {label.key_id: label for label in store.list_key_labels(team_id)}
    return [(k, labels.get(k.key_id) or KeyLabel(key_id=k.key_id, team_id=team_id))
            for k in store.list_api_keys(team_id=team_id) if not k.revoked]


def _team_key(store: StateStore, team_id: str, key_id: str) -> tuple[ApiKey, KeyLabel]:
    for key, label in team_keys(store, team_id):
        if key.key_id == key_id:
            return key, label
    raise CredentialNotFoundError(kind="API key", ident=key_id)


def create_team_key(store: StateStore, team: Team, name: str) -> tuple[ApiKey, KeyLabel, str]:
    """A new key of ``team`` named ``name``: (record, label, secret); the secret is never stored."""
    key, secret = _new_key(store, team, name)
    return key, KeyLabel(key_id=key.key_id, team_id=team.team_id, name=name, suffix=secret[-4:]), secret


def rename_team_key(store: StateStore, team_id: str, key_id: str, name: str) -> None:
    _, label = _team_key(store, team_id, key_id)
    store.put_key_label(label.evolve(name=name))


def delete_team_key(store: StateStore, team_id: str, key_id: str) -> None:
    key, _ = _team_key(store, team_id, key_id)
    store.put_api_key(key.evolve(revoked=True))


def create_access_token(store: StateStore, team_id: str, name: str) -> tuple[AccessToken, str]:
    """A new access token of the team: (record, token); the token is never stored."""
    token = ACCESS_TOKEN_PREFIX + secrets.token_hex(20)
    body = token[len(ACCESS_TOKEN_PREFIX):]
    record = AccessToken(token_id=str(uuid.uuid4()), team_id=team_id, name=name, token_hash=hash_key(token),
                         masked_prefix=body[:2], masked_suffix=body[-4:], length=len(body))
    store.put_access_token(record)
    return record, token


def delete_access_token(store: StateStore, team_id: str, token_id: str) -> None:
    if not store.delete_access_token(team_id, token_id):
        raise CredentialNotFoundError(kind="access token", ident=token_id)
