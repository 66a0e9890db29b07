"""Teams and API keys. Keys look like ``e2b_<40 hex>``; only their SHA-256 is stored."""

from __future__ import annotations

from cube_core import ids
from cube_core.errors import AuthError
from cube_core.models import ApiKey, Team
from cube_core.store import StateStore, hash_key


def create_key(store: StateStore, team_name: str) -> tuple[ApiKey, str]:
    """Create a key for ``team_name`` (creating the team if new); return (record, secret)."""
    if not team_name.strip():
        raise AuthError("a team name is required")
    team = store.find_team(team_name)
    if team is None:
        team = Team(team_id=ids.short_id("team_"), name=team_name)
        store.put_team(team)
    secret = ids.api_key()
    key = ApiKey(key_id=ids.short_id("key_"), team_id=team.team_id, key_hash=hash_key(secret),
                 prefix=secret[:10])
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
