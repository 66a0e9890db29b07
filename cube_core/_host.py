"""PluginHost: stevedore finds and imports the plugins plugins.toml names; pluggy wires them.

Loading order:
1. parse plugins.toml (``config.load_config``);
2. for each slot (vmm, network, storage, scheduler), then each ``[[api]]``, then extensions:
   stevedore imports exactly the named entry point (an import error is re-raised, never only
   logged); the plugin's ``Config`` validates its options; the plugin object is constructed;
3. ``pm.register(obj, name="<slot>:<plugin>")``; ``cube_addhooks`` runs for it (historic);
4. ``pm.check_pending()`` so a misspelled ``@hookimpl`` fails at start-up;
5. every provider hook has exactly one implementation;
6. ``cube_configure(settings)`` (historic).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, cast

import pluggy
import stevedore
import structlog
from pydantic import BaseModel, ValidationError

from cube_core import hookspecs
from cube_core.config import NAMESPACES, SLOTS, LoadedConfig, SlotSection, resolve_secrets
from cube_core.doctor import Check
from cube_core.errors import (
    ConfigError,
    PluginConflictError,
    PluginError,
    PluginLoadError,
    PluginMissingError,
    PluginNotFoundError,
)
from cube_core.models import EgressRule, Rejection, Sandbox, SandboxSpec, SnapshotRef, StopReason
from cube_core.network import NetworkDriver
from cube_core.scheduler import Scheduler
from cube_core.storage import StorageDriver
from cube_core.vmm import VmmDriver

log = structlog.get_logger(__name__)

PROVIDER_HOOKS: dict[str, str] = {
    "vmm": "cube_vmm_driver",
    "network": "cube_network_driver",
    "storage": "cube_storage_driver",
    "scheduler": "cube_scheduler",
}


@dataclass(frozen=True)
class InstalledPlugin:
    slot: str
    name: str
    namespace: str
    value: str
    distribution: str
    version: str


def installed_plugins(slot: str | None = None) -> list[InstalledPlugin]:
    """Every plugin entry point installed, optionally for one slot."""
    found: list[InstalledPlugin] = []
    for s, ns in NAMESPACES.items():
        if slot is not None and s != slot:
            continue
        for ep in metadata.entry_points(group=ns):
            dist = ep.dist
            found.append(InstalledPlugin(
                slot=s, name=ep.name, namespace=ns, value=ep.value,
                distribution=dist.metadata["Name"] if dist else "?",
                version=dist.version if dist else "?",
            ))
    return sorted(found, key=lambda p: (list(NAMESPACES).index(p.slot), p.name))


def _raise_load_error(manager: Any, entrypoint: Any, exc: BaseException) -> None:
    raise PluginLoadError(name=entrypoint.name, namespace=manager.namespace,
                          reason=f"{type(exc).__name__}: {exc}") from exc


def _import_plugin(namespace: str, name: str) -> type[Any]:
    installed = sorted({ep.name for ep in metadata.entry_points(group=namespace)})
    if name not in installed:
        raise PluginNotFoundError(name=name, namespace=namespace,
                                  installed=", ".join(installed) or "none")
    try:
        mgr = stevedore.DriverManager(
            namespace, name, invoke_on_load=False,
            on_load_failure_callback=_raise_load_error,
        )
    except PluginError:
        raise
    except stevedore.exception.MultipleMatches as exc:
        raise PluginConflictError(slot=namespace, providers=f"several entry points named {name!r}") from exc
    except stevedore.exception.NoMatches as exc:  # pragma: no cover - checked above
        raise PluginNotFoundError(name=name, namespace=namespace,
                                  installed=", ".join(installed) or "none") from exc
    plugin_cls = mgr.driver
    if not inspect.isclass(plugin_cls):
        raise PluginLoadError(name=name, namespace=namespace,
                              reason=f"entry point must name a class, got {type(plugin_cls).__name__}")
    return plugin_cls


def build_plugin(slot: str, section: SlotSection, config: LoadedConfig | None = None) -> object:
    """Import, validate the options of, and construct one plugin."""
    namespace = NAMESPACES[slot]
    plugin_cls = _import_plugin(namespace, section.plugin)
    config_model: type[BaseModel] | None = getattr(plugin_cls, "Config", None)
    options = resolve_secrets(section.options, where=f"[{slot}] options")
    if config_model is None:
        if options:
            raise ConfigError(f"[{slot}] plugin {section.plugin!r} takes no options, got: "
                              f"{', '.join(sorted(options))}")
        return plugin_cls()
    try:
        validated = config_model.model_validate(options)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(options)"
            line = config.line_of(slot, str(err["loc"][0])) if (config and err["loc"]) else None
            where = f"{config.path}:{line}: " if (config and config.path and line) else ""
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown option; allowed: " + ", ".join(sorted(config_model.model_fields))
            problems.append(f"{where}[{slot}] plugin {section.plugin!r}: option {key!r}: {msg}")
        raise ConfigError("\n".join(problems)) from exc
    return plugin_cls(validated)


class Hooks:
    """Typed facade over ``pm.hook``: core code calls these, never ``pm.hook`` directly."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm

    def vmm_driver(self) -> VmmDriver:
        return cast(VmmDriver, _provided(self._pm.hook.cube_vmm_driver(), VmmDriver, "vmm"))

    def network_driver(self) -> NetworkDriver:
        return cast(NetworkDriver, _provided(self._pm.hook.cube_network_driver(), NetworkDriver, "network"))

    def storage_driver(self) -> StorageDriver:
        return cast(StorageDriver, _provided(self._pm.hook.cube_storage_driver(), StorageDriver, "storage"))

    def scheduler(self) -> Scheduler:
        return cast(Scheduler, _provided(self._pm.hook.cube_scheduler(), Scheduler, "scheduler"))

    def http_server(self, app: Any, settings: Any) -> Awaitable[None] | None:
        result: Awaitable[None] | None = self._pm.hook.cube_http_server(app=app, settings=settings)
        return result

    def node_edge(self, resolve: Callable[[str, int], Awaitable[tuple[str, int]]]) -> Any | None:
        return self._pm.hook.cube_node_edge(resolve=resolve)

    def api_routers(self, service: Any) -> list[Any]:
        return [r for routers in self._pm.hook.cube_api_routers(service=service) for r in routers]

    def asgi_middleware(self, service: Any) -> list[Any]:
        return [m for mws in self._pm.hook.cube_asgi_middleware(service=service) for m in mws]

    def egress_rules(self, spec: SandboxSpec) -> list[EgressRule]:
        return [r for rules in self._pm.hook.cube_egress_rules(spec=spec) for r in rules]

    def doctor_checks(self) -> list[tuple[str, Check]]:
        """Every plugin's checks as ``(plugin name, check)``; a plugin whose hook raises gets one
        failed check saying so (the other plugins' checks are still run)."""
        found: list[tuple[str, Check]] = []
        for impl in reversed(self._pm.hook.cube_doctor_checks.get_hookimpls()):
            try:
                checks = list(cast(Sequence[Check], impl.function()))
            except Exception as exc:
                checks = [Check("checks", "fail", f"the plugin's checks raised {type(exc).__name__}: {exc}",
                                "report this as a bug of the plugin")]
            found += [(impl.plugin_name, c) for c in checks]
        return found

    def admit_sandbox(self, spec: SandboxSpec) -> Rejection | None:
        result: Rejection | None = self._pm.hook.cube_admit_sandbox(spec=spec)
        return result

    async def sandbox_created(self, sandbox: Sandbox) -> None:
        await _notify(self._pm.hook.cube_sandbox_created, sandbox=sandbox)

    async def sandbox_stopped(self, sandbox: Sandbox, reason: StopReason) -> None:
        await _notify(self._pm.hook.cube_sandbox_stopped, sandbox=sandbox, reason=reason)

    async def snapshot_taken(self, sandbox: Sandbox, snapshot: SnapshotRef) -> None:
        await _notify(self._pm.hook.cube_snapshot_taken, sandbox=sandbox, snapshot=snapshot)

    async def pool_member_warm_up(self, sandbox: Sandbox, address: str) -> None:
        await _notify(self._pm.hook.cube_pool_member_warm_up, sandbox=sandbox, address=address)

    async def sandbox_restored(self, sandbox: Sandbox, snapshot: SnapshotRef) -> None:
        await _notify(self._pm.hook.cube_sandbox_restored, sandbox=sandbox, snapshot=snapshot)


def _provided(value: object, kind: Any, slot: str) -> Any:
    if value is None:
        raise PluginMissingError(slot=slot, hook=PROVIDER_HOOKS[slot])
    if not isinstance(value, kind):
        raise PluginLoadError(name=slot, namespace=NAMESPACES[slot],
                              reason=f"provider returned {type(value).__name__}, not a {kind.__name__}")
    return value


async def await_maybe(value: object) -> None:
    if inspect.isawaitable(value):
        await value


async def _notify(hook: Any, **kwargs: Any) -> None:
    """Call every implementation of a notification hook on its own, so one that raises does not
    skip the others (plain pluggy stops at the first exception); await awaitables; log errors."""
    for impl in reversed(hook.get_hookimpls()):
        try:
            result = impl.function(*[kwargs[name] for name in impl.argnames])
            await await_maybe(result)
        except Exception:
            log.exception("notification hook failed", hook=hook.name, plugin=impl.plugin_name)


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("cube")
    pm.add_hookspecs(hookspecs)
    if os.environ.get("CUBE_TRACE_HOOKS") == "1":
        def before(hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
            log.debug("hook call", hook=hook_name, impls=[i.plugin_name for i in hook_impls])

        def after(outcome: pluggy.Result[Any], hook_name: str, hook_impls: Sequence[pluggy.HookImpl],
                  kwargs: Mapping[str, Any]) -> None:
            log.debug("hook done", hook=hook_name)

        pm.add_hookcall_monitoring(before, after)
    return pm


class PluginHost:
    """Loads, registers and checks the configured plugins; exposes the typed ``hooks``."""

    def __init__(self, config: LoadedConfig, pm: pluggy.PluginManager | None = None) -> None:
        self.config = config
        self.pm = pm or new_plugin_manager()
        self.hooks = Hooks(self.pm)
        self.plugins: dict[str, object] = {}
        # Historic: every plugin registered from now on receives it at registration.
        self.pm.hook.cube_addhooks.call_historic(kwargs={"pluginmanager": self.pm})

    @property
    def settings(self) -> Any:
        return self.config.data.core

    def load(self) -> PluginHost:
        data = self.config.data
        for slot in SLOTS:
            section: SlotSection = getattr(data, slot)
            self.register(build_plugin(slot, section, self.config), f"{slot}:{section.plugin}")
        for api in data.api:
            self.register(build_plugin("api", api, self.config), f"api:{api.plugin}")
        for ext in data.extensions.enabled:
            self.register(build_plugin("extensions", SlotSection(plugin=ext), self.config),
                          f"extension:{ext}")
        self.check()
        self.pm.hook.cube_configure.call_historic(kwargs={"settings": data.core})
        return self

    def register(self, plugin: object, name: str) -> None:
        if inspect.isclass(plugin):
            raise PluginLoadError(name=name, namespace="register",
                                  reason="got a class; register an instance (forgot the ()?)")
        self.pm.register(plugin, name=name)
        self.plugins[name] = plugin

    def unregister(self, name: str) -> None:
        plugin = self.plugins.pop(name, None)
        if plugin is not None:
            self.pm.unregister(plugin, name=name)

    def check(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(name=str(exc.plugin), namespace="hooks", reason=str(exc)) from exc
        for slot, hook_name in PROVIDER_HOOKS.items():
            impls = getattr(self.pm.hook, hook_name).get_hookimpls()
            names = [i.plugin_name for i in impls]
            if len(names) > 1:
                raise PluginConflictError(slot=slot, providers=", ".join(names))
            if not names:
                raise PluginMissingError(slot=slot, hook=hook_name)
