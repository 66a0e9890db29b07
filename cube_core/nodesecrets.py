"""Secrets a node's egress proxy needs: asked of the control plane per request, never held.

A sandbox's ``network.rules`` may set headers holding ``${e2b.secrets.<name>}``; the node's
egress proxy resolves them per request (docs/api.md "Secrets in outbound requests"). Only the
control plane holds ``[core] secrets_key``, so the node asks it each time:

* :class:`PlacedSecrets` (control plane): answers the value of secret ``name`` for ``sandbox_id``
  asked by ``node_id`` only when, by the control plane's own records, that sandbox is live and
  placed on that node (not a warm-pool member) and its team has that secret. Every refusal is the
  same :class:`~cube_core.credentials.CredentialNotFoundError` (the asker learns nothing about
  other nodes' sandboxes or other teams); the reason is logged, never a value. ``cube serve``'s
  node agent calls it in-process; a master serves it to its nodes (:mod:`cube_core.masterapi`).
* :class:`MasterSecrets` (``cube node``): asks ``POST /cluster/v1/secrets`` of the masters of
  ``[cluster] masters`` in turn, with the cluster token, a short timeout and nothing cached: the
  next request reads the secret again, so an updated secret is used at once.

Both count look-ups per sandbox (:class:`RateBuckets`, ``[cluster] secret_lookups_per_s`` and
``secret_lookup_burst``): the node before it asks, so a guest hammering a rule host does not turn
into a flood of calls to the masters, and each master before it reads the store (several
masters each allow the rate). The proxy's per-sandbox connection limit bounds how many look-ups
of one sandbox are in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
import structlog
from pydantic import Field

from cube_core.config import ClusterSettings
from cube_core.credentials import CredentialNotFoundError, SecretLookupLimitedError, SecretLookupUnavailableError
from cube_core.errors import CubeError, NodeError
from cube_core.models import Frozen
from cube_core.nodehttp import TOKEN_HEADER, ErrorBody, error_from_body
from cube_core.pool import POOL_TEAM
from cube_core.state import SandboxState
from cube_core.store import StateStore
from cube_core.teamsecrets import TeamSecrets

log = structlog.get_logger(__name__)

CLUSTER_PREFIX = "/cluster/v1"
"""Where a master serves its nodes (behind the cluster token)."""
SECRETS_PATH = CLUSTER_PREFIX + "/secrets"
TIMEOUT = httpx.Timeout(5.0, connect=2.0)
"""Per master asked: the guest's request waits for this at most (then the next master)."""

SecretLookup = Callable[[str, str, str], Awaitable[str]]
"""``(node_id, sandbox_id, name) -> value``: :meth:`PlacedSecrets.reveal` or :meth:`MasterSecrets.reveal`."""


class SecretAsk(Frozen):
    """The body of ``POST /cluster/v1/secrets``."""

    node_id: str = Field(min_length=1, max_length=256)
    sandbox_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)


class SecretAnswer(Frozen):
    value: str


class RateBuckets:
    """Token buckets by key: ``rate`` look-ups a second, up to ``burst`` at once."""

    MAX_KEYS = 100_000

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        """key -> (tokens, when counted)"""

    def take(self, key: str) -> bool:
        now = self.clock()
        tokens, then = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.MAX_KEYS:  # forget the keys whose buckets are full again
            self._buckets = {k: (t, w) for k, (t, w) in self._buckets.items()
                             if t + (now - w) * self.rate < self.burst}
        return allowed

    def check(self, key: str) -> None:
        if not self.take(key):
            raise SecretLookupLimitedError(rate=self.rate)


class PlacedSecrets:
    """The control plane's answer to a node's secret look-up; see the module docstring."""

    def __init__(self, store: StateStore, secrets: TeamSecrets, cluster: ClusterSettings) -> None:
        self.store = store
        self.secrets = secrets
        self.limits = RateBuckets(cluster.secret_lookups_per_s, cluster.secret_lookup_burst)

    async def reveal(self, node_id: str, sandbox_id: str, name: str) -> str:
        self.limits.check(sandbox_id)
        sandbox = await asyncio.to_thread(self.store.get_sandbox, sandbox_id)
        refusal = ("no such sandbox" if sandbox is None
                   else "placed on another node" if sandbox.node_id != node_id
                   else "a warm-pool member" if sandbox.team_id == POOL_TEAM
                   else f"{sandbox.state.value}" if sandbox.state in (SandboxState.KILLED, SandboxState.ERROR)
                   else None)
        if refusal is not None or sandbox is None:
            log.warning("secret look-up refused", node_id=node_id, sandbox_id=sandbox_id, secret=name,
                        reason=refusal)
            raise CredentialNotFoundError(kind="secret", ident=name)
        return await asyncio.to_thread(self.secrets.reveal, sandbox.team_id, name)


class MasterSecrets:
    """A node's :data:`SecretLookup`: asks the masters; see the module docstring. Close it with
    :meth:`aclose`."""

    def __init__(self, masters: tuple[str, ...], token: str, cluster: ClusterSettings, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.masters = list(masters)
        self.limits = RateBuckets(cluster.secret_lookups_per_s, cluster.secret_lookup_burst)
        # trust_env=False: the token (and the value) never go through an HTTP(S)_PROXY
        self._client = httpx.AsyncClient(headers={TOKEN_HEADER: token}, timeout=TIMEOUT, transport=transport,
                                         trust_env=False, follow_redirects=False,
                                         limits=httpx.Limits(max_connections=64, max_keepalive_connections=8))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def reveal(self, node_id: str, sandbox_id: str, name: str) -> str:
        if not self.masters:
            raise SecretLookupUnavailableError(reason="[cluster] masters is not set on this node")
        self.limits.check(sandbox_id)
        ask = SecretAsk(node_id=node_id, sandbox_id=sandbox_id, name=name).model_dump(mode="json")
        for n, master in enumerate(list(self.masters)):
            try:
                resp = await self._client.post(master + SECRETS_PATH, json=ask)
            except httpx.TransportError as exc:
                log.warning("master unreachable for a secret look-up", master=master, sandbox_id=sandbox_id,
                            error=f"{type(exc).__name__}: {exc}")
                continue
            if n and master in self.masters:  # ask the one that answered first next time
                self.masters.remove(master)
                self.masters.insert(0, master)
            return _value(master, resp)
        raise SecretLookupUnavailableError(reason="no master answered")


def _value(master: str, resp: httpx.Response) -> str:
    try:
        if resp.is_success:
            return SecretAnswer.model_validate(resp.json()).value
        error: CubeError = error_from_body(ErrorBody.model_validate(resp.json()))
    except ValueError:
        error = NodeError(f"master {master} answered a secret look-up with HTTP {resp.status_code}")
    if not isinstance(error, CredentialNotFoundError):
        log.warning("secret look-up failed", master=master, status=resp.status_code, error=error.message)
    raise error
