"""Every hook Cube defines. Each docstring here is the reference documentation of its hook
(docs/plugins/hooks.md is checked against this module by tests/docs/test_hooks_documented.py).

Hooks are for wiring, notifications, contributions and decisions. Hot-path work goes through the
typed driver objects that the provider hooks return.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from cube_core.config import CoreSettings
    from cube_core.doctor import Check
    from cube_core.models import EgressRule, Rejection, Sandbox, SandboxSpec, SnapshotRef, StopReason
    from cube_core.network import NetworkDriver
    from cube_core.scheduler import Scheduler
    from cube_core.service import SandboxService
    from cube_core.storage import StorageDriver
    from cube_core.vmm import VmmDriver

hookspec = pluggy.HookspecMarker("cube")

# -- Bootstrapping (historic: late-registered plugins still receive them) ---------------------


@hookspec(historic=True)
def cube_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Add new hook specifications, so plugins can define hooks for other plugins.

    Called once per plugin, right after the plugin is registered (historic: plugins registered
    later still receive it). Many implementers. Returns nothing; may raise only for a programming
    error, which aborts start-up.

    :param pluginmanager: the pluggy manager; call ``pluginmanager.add_hookspecs(module)``.

    .. versionadded:: 0.1
    """


@hookspec(historic=True)
def cube_configure(settings: CoreSettings) -> None:
    """Receive the validated core settings after every plugin is loaded.

    Called once at start-up (historic). Many implementers. Returns nothing; should not raise.

    :param settings: the parsed ``plugins.toml`` core section (state directory, ports, ...).

    .. versionadded:: 0.1
    """


# -- Providers: exactly one implementation per slot; the core enforces it ----------------------


@hookspec(firstresult=True)
def cube_vmm_driver() -> VmmDriver | None:
    """Provide the VMM driver of this node.

    Called once at start-up. Exactly one implementer (the ``vmm`` slot); stops at the first
    non-None result. Returns a :class:`cube_core.VmmDriver`; raising aborts start-up.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def cube_network_driver() -> NetworkDriver | None:
    """Provide the network driver of this node.

    Called once at start-up. Exactly one implementer (the ``network`` slot); stops at the first
    non-None result. Returns a :class:`cube_core.NetworkDriver`; raising aborts start-up.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def cube_storage_driver() -> StorageDriver | None:
    """Provide the storage driver of this node.

    Called once at start-up. Exactly one implementer (the ``storage`` slot); stops at the first
    non-None result. Returns a :class:`cube_core.StorageDriver`; raising aborts start-up.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def cube_scheduler() -> Scheduler | None:
    """Provide the placement policy.

    Called once at start-up. Exactly one implementer (the ``scheduler`` slot); stops at the first
    non-None result. Returns a :class:`cube_core.Scheduler`; raising aborts start-up.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def cube_http_server(app: Any, settings: CoreSettings) -> Awaitable[None] | None:
    """Serve the HTTP app (e.g. with TLS and HTTP/2 in the API plugin's domain mode).

    Called once by ``cube serve`` after the app is built. At most one implementer should answer;
    stops at the first non-None result. Return an awaitable that serves until SIGINT/SIGTERM, or
    None to let the core serve plain HTTP/1.1 with uvicorn on ``settings.host:settings.port``.

    :param app: the ASGI app from ``create_app``.
    :param settings: the core settings (host, port, admin port, domain).

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def cube_node_edge(resolve: Callable[[str, int], Awaitable[tuple[str, int]]]) -> Any | None:
    """The ASGI app with which ``cube node`` forwards sandbox traffic that a master's edge proxy
    sends it (the master authenticated the client; the node checks the cluster token first).

    Called once when ``cube node`` builds its HTTP app. At most one implementer should answer
    (the API plugin whose edge proxy the masters run); stops at the first non-None result. The
    app gets requests carrying ``x-cube-sandbox-id`` and ``x-cube-sandbox-port`` and forwards
    them (HTTP, streaming, websockets) to ``resolve(sandbox_id, port)``; ``resolve`` raises a
    :class:`cube_core.CubeError` (e.g. ``SandboxNotFoundError``) for a sandbox the node does not run.
    The app answers a request without both headers with 400, and never passes the ``x-cube-*``
    headers (``x-cube-cluster-token`` included) on to the guest. It gets ``http`` and ``websocket``
    scopes only (the node's server keeps the lifespan).

    :param resolve: ``async (sandbox_id, port) -> (host, port)`` of the guest, reachable from the
        node; it answers once the sandbox's guest applied its create message (a sandbox just taken
        from the warm pool), so a sandbox's first request never overtakes it.

    .. versionadded:: 0.2
    .. versionchanged:: 0.3 ``resolve`` is a coroutine function.
    """


# -- Contributions: many implementations, results concatenated ---------------------------------


@hookspec
def cube_api_routers(service: SandboxService) -> Sequence[Any]:
    """Contribute FastAPI ``APIRouter`` objects to the HTTP app.

    Called once when the app is built. Many implementers (every ``[[api]]`` plugin and any
    extension); the routers of all of them are mounted in registration order. Returns a sequence
    of routers; raising aborts start-up.

    :param service: the :class:`cube_core.SandboxService`, the only object routes may call.

    .. versionadded:: 0.1
    """


@hookspec
def cube_asgi_middleware(service: SandboxService) -> Sequence[Any]:
    """Contribute ASGI middleware that wraps the whole HTTP app (e.g. the edge proxy, which must
    see sandbox traffic before routing).

    Called once when the app is built. Many implementers; each returns a sequence of callables
    ``factory(app) -> asgi_app``; the first one returned ends up outermost. Raising aborts start-up.

    :param service: the :class:`cube_core.SandboxService`.

    .. versionadded:: 0.1
    """


@hookspec
def cube_egress_rules(spec: SandboxSpec) -> Sequence[EgressRule]:
    """Contribute egress rules for a new sandbox, on top of its own network policy.

    Called once per sandbox create, before its network slot is allocated, and again when its
    slot's policy is set anew (a policy update; a slot re-created after a host reboot, with a
    spec holding the sandbox's template, team and network policy). Many implementers; the
    rules are concatenated (a deny wins over an allow for the same target). Should not raise.

    :param spec: the sandbox being created.

    .. versionadded:: 0.1
    """


@hookspec
def cube_doctor_checks() -> Sequence[Check]:
    """Contribute host checks to ``cube doctor``: whatever this plugin needs from the host
    (the VMM plugin: KVM, TCG, QEMU; the network plugin: BPF, nftables; storage: its tools).

    Called once per ``cube doctor`` run, on plugins that were constructed but not started. Many
    implementers; the checks are shown after the core's own (Python, root, state directory). Any
    ``fail`` makes ``cube doctor`` exit 1. Returns a sequence of :class:`cube_core.Check`; should
    not raise (an exception is shown as a failed check of that plugin).

    .. versionadded:: 0.2
    """


# -- Decisions: the first non-None result wins ------------------------------------------------


@hookspec(firstresult=True)
def cube_admit_sandbox(spec: SandboxSpec) -> Rejection | None:
    """Decide whether a sandbox may be created (quotas, policy).

    Called once per create request, before placement. Many implementers; stops at the first
    non-None result. Return a :class:`cube_core.Rejection` to refuse, or None to let it pass.

    :param spec: the requested sandbox.

    .. versionadded:: 0.1
    """


# -- Lifecycle notifications: return None or an awaitable --------------------------------------


@hookspec
def cube_sandbox_created(sandbox: Sandbox) -> Awaitable[None] | None:
    """Notification: a sandbox is running and its guest answered.

    Called once per sandbox, after the create answer is decided. Many implementers; each may
    return an awaitable, which the core awaits. Must not raise (errors are logged and dropped).

    :param sandbox: the new sandbox record.

    .. versionadded:: 0.1
    """


@hookspec
def cube_sandbox_stopped(sandbox: Sandbox, reason: StopReason) -> Awaitable[None] | None:
    """Notification: a sandbox is gone (killed, timed out, failed, or the node shut down).

    Called once per sandbox, after its resources were freed. Many implementers; each may return
    an awaitable. Must not raise (errors are logged and dropped).

    :param sandbox: the final sandbox record.
    :param reason: why it stopped.

    .. versionadded:: 0.1
    """


@hookspec
def cube_snapshot_taken(sandbox: Sandbox, snapshot: SnapshotRef) -> Awaitable[None] | None:
    """Notification: a snapshot of a sandbox was saved (pause, fork or explicit snapshot).

    Called once per snapshot. Many implementers; each may return an awaitable. Must not raise.

    :param sandbox: the sandbox the snapshot was taken from.
    :param snapshot: the saved snapshot.

    .. versionadded:: 0.1
    """


@hookspec
def cube_pool_member_warm_up(sandbox: Sandbox, address: str) -> Awaitable[None] | None:
    """Warm up a warm-pool member over its network path before it is paused: do once what the
    first request to a new sandbox will do (the E2B API plugin reaches envd, whose port and
    protocol only it knows), so that under TCG the guest's network and server code is already
    translated when a user's first request comes.

    Called once per pool member when ``[core] pool.warm_up`` is on, after the guest agent's own
    ``warm_up`` and before the pause. Many implementers; each may return an awaitable, which the
    core awaits. Must not raise (errors are logged and dropped; the member still serves).

    :param sandbox: the member's record (team ``__pool__``; a create will adopt it).
    :param address: the guest's address on its sandbox network.

    .. versionadded:: 0.2
    """


@hookspec
def cube_sandbox_restored(sandbox: Sandbox, snapshot: SnapshotRef) -> Awaitable[None] | None:
    """Notification: a sandbox's VM was replaced by a restore of one of its snapshots (rollback).

    The sandbox keeps its id, token and address, but the guest is the one of the snapshot: its
    network connections from after the snapshot are gone (a proxy must drop the connections it
    keeps open to the sandbox). Called once per rollback, after the new VM answered. Many
    implementers; each may return an awaitable. Must not raise.

    :param sandbox: the sandbox record after the rollback.
    :param snapshot: the snapshot it was put back to.

    .. versionadded:: 0.2
    """
