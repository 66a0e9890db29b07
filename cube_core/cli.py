"""The ``cube`` command line.

Errors that Cube raises on purpose (``CubeError``) print one clear message and exit with code 2;
``--debug`` shows the traceback as well.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from cube_core.cli_common import ConfigOpt, JsonOpt, err, guard, open_store, out, print_json, print_json_lines, state
from cube_core.cli_events import events
from cube_core.cli_sandbox import sandbox_app
from cube_core.config import PluginsFile, load_config
from cube_core.errors import CubeError, TemplateNotFoundError

T = TypeVar("T")
app = typer.Typer(no_args_is_help=True, add_completion=False, help="Cube: fast, secure sandboxes for AI agents.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect and validate plugins.toml.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys (e2b_...) and teams.")
template_app = typer.Typer(no_args_is_help=True, help="Template images and snapshots.")
kernel_app = typer.Typer(no_args_is_help=True, help="The guest kernel.")
app.add_typer(config_app, name="config")
app.add_typer(keys_app, name="keys")
app.add_typer(template_app, name="template")
app.add_typer(kernel_app, name="kernel")
app.add_typer(sandbox_app, name="sandbox")

_state = state


@app.callback()
def main_options(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    _state["debug"] = debug


_guard = guard  # guard stays public here for CLI extensions (cube-bench): CubeError -> one message, exit 2
_store = open_store


# -- serve --------------------------------------------------------------------------------------


@app.command()
def serve(config: ConfigOpt = None,
          host: Annotated[str | None, typer.Option(help="listen address")] = None,
          port: Annotated[int | None, typer.Option(help="API port (default 3000)")] = None,
          no_build: Annotated[bool, typer.Option("--no-build", help="do not build templates")] = False) -> None:
    """Run the whole system on this machine: API, edge proxy, scheduler and node agent."""
    from cube_core.app import create_app
    from cube_core.progress import progress_board

    cfg, plugin_host = _guard(lambda: _configured(config, host, port, role="serve"))
    core = cfg.data.core
    with progress_board("build") as progress:
        application = _guard(lambda: create_app(plugin_host, build_templates=not no_build, progress=progress))
        store = application.state.service.store
        if not store.list_api_keys():
            err.print("[yellow]No API keys yet.[/yellow] Create one with: "
                      f"[bold]{sys.argv[0]} keys create --team default[/bold]", highlight=False)
        err.print(f"Cube API on http://{core.host}:{core.port}  (E2B_API_URL=http://{core.host}:{core.port} "
                  f"E2B_SANDBOX_URL=http://{core.host}:{core.port})", highlight=False)
        _serve_http(plugin_host, application, core.host, core.port)


def _serve_http(plugin_host: Any, application: Any, host: str, port: int, *, api: bool = True) -> None:
    import uvicorn

    if api:
        custom = plugin_host.hooks.http_server(application, plugin_host.config.data.core)
        if custom is not None:
            asyncio.run(_await(custom))
            return
    # SDK clients keep connections open between calls; uvicorn's default 5 s idle keep-alive
    # races a client that reuses its connection just then (a reset on write). 620 s as E2B.
    uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_config=None,
                                  lifespan="on", timeout_graceful_shutdown=5,
                                  timeout_keep_alive=620)).run()


def _configured(config: Path | None, host: str | None = None, port: int | None = None, *,
                role: str) -> tuple[Any, Any]:
    """(config, loaded plugin host) of a server; ``host``/``port`` override ``[core]``'s. Logs and
    traces are set up from ``[telemetry]`` first (``role``: serve, master or node)."""
    import atexit

    from cube_core import telemetry
    from cube_core._host import PluginHost
    from cube_core.log import configure_logging

    cfg = load_config(config)
    core = cfg.data.core
    if host or port is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"core": core.model_copy(
            update={k: v for k, v in (("host", host), ("port", port)) if v is not None})})})
    configure_logging(settings=cfg.data.telemetry)
    if telemetry.configure_tracing(cfg.data.telemetry, role=role):
        atexit.register(telemetry.shutdown_tracing)  # the last spans are sent before the process ends
    return cfg, PluginHost(cfg).load()


@app.command()
def master(config: ConfigOpt = None,
           host: Annotated[str | None, typer.Option(help="listen address")] = None,
           port: Annotated[int | None, typer.Option(help="API port (default 3000)")] = None) -> None:
    """Run a control plane: API, edge proxy and scheduler for the nodes registered in the shared
    PostgreSQL state store (run several behind a load balancer)."""
    from cube_core.app import create_master_app

    cfg, plugin_host = _guard(lambda: _configured(config, host, port, role="master"))
    core = cfg.data.core
    if cfg.data.core.state is None:
        err.print("[yellow]warning:[/yellow] [core] state is unset: this master keeps its records in SQLite at "
                  f"{core.state_dir}/cube.db, which no other master or node shares", highlight=False)
    application = _guard(lambda: create_master_app(plugin_host))
    err.print(f"Cube master on http://{core.host}:{core.port}", highlight=False)
    _serve_http(plugin_host, application, core.host, core.port)


node_app = typer.Typer(help="Run this machine's node agent (no sub-command), or manage nodes.",
                       invoke_without_command=True, no_args_is_help=False)
app.add_typer(node_app, name="node")


@node_app.callback()
def node(ctx: typer.Context, config: ConfigOpt = None,
         no_build: Annotated[bool, typer.Option("--no-build", help="do not build templates")] = False) -> None:
    """Run the node agent: VMs, network, disks and warm pool of this machine, for the masters."""
    if ctx.invoked_subcommand is not None:
        return
    from cube_core.app import create_node_app
    from cube_core.progress import progress_board

    cfg, plugin_host = _guard(lambda: _configured(config, role="node"))
    settings = cfg.data.node
    with progress_board("build") as progress:
        application = _guard(lambda: create_node_app(plugin_host, build_templates=not no_build, progress=progress))
        err.print(f"Cube node {cfg.data.core.node_id!r} on http://{settings.host}:{settings.port} "
                  f"(masters reach it at {settings.advertised()})", highlight=False)
        _serve_http(plugin_host, application, settings.host, settings.port, api=False)


def _set_node_status(config: Path | None, name: str, status: Any) -> None:
    from cube_core.events import EventBus
    from cube_core.models import NodeStatus

    def change() -> Any:
        store = _store(config)
        try:
            nodes = {n.node_id: n for n in store.list_nodes()}
            if name not in nodes:
                raise CubeError(f"no node {name!r} is registered (known: {', '.join(sorted(nodes)) or 'none'})")
            node = nodes[name]
            if status == NodeStatus.UP and node.status == NodeStatus.DOWN:
                raise CubeError(f"node {name!r} is down: it is marked up again when it reports")
            store.put_node(node.evolve(status=status))
            if node.status != status:  # masters on the same PostgreSQL store tell their subscribers
                bus = EventBus(store.event_channel())
                bus.emit(f"node.{status.value}", node_id=name, previous=node.status.value)
                bus.flush()
            return node
        finally:
            store.close()

    _guard(change)


@node_app.command("drain")
def node_drain(name: Annotated[str, typer.Argument(help="the node's [core] node_id")],
               config: ConfigOpt = None) -> None:
    """Stop placing new sandboxes on a node; its sandboxes run until they end."""
    from cube_core.models import NodeStatus

    _set_node_status(config, name, NodeStatus.DRAINING)
    out.print(f"{name}: draining (no new sandboxes; `cube node undrain {name}` to undo)")


@node_app.command("undrain")
def node_undrain(name: Annotated[str, typer.Argument(help="the node's [core] node_id")],
                 config: ConfigOpt = None) -> None:
    """Let a drained node take new sandboxes again."""
    from cube_core.models import NodeStatus

    _set_node_status(config, name, NodeStatus.UP)
    out.print(f"{name}: up")


@app.command()
def nodes(config: ConfigOpt = None,
          as_json: Annotated[bool, typer.Option("--json", help="one JSON object per node")] = False) -> None:
    """The registered nodes with their capacity, usage and last heartbeat."""
    from cube_core.models import utcnow

    store = _guard(lambda: _store(config))
    try:
        records = _guard(store.list_nodes)
    finally:
        store.close()
    if as_json:
        for n in records:
            print(n.model_dump_json())
        return
    table = Table("node", "status", "url", "vCPU used/total", "MiB used/total", "sandboxes (paused)", "pool",
                  "templates", "disk free MiB", "heartbeat")
    now = utcnow()
    for n in records:
        table.add_row(n.node_id, n.status.value, n.url or "(in process)", f"{n.cpu_used}/{n.cpu_total}",
                      f"{n.memory_mb_used}/{n.memory_mb_total}", f"{n.sandboxes} ({n.sandboxes_paused})",
                      ", ".join(f"{k}:{v}" for k, v in sorted(n.pool.items())) or "-",
                      ", ".join(n.templates) or "-", str(n.disk_free_mb),
                      f"{(now - n.heartbeat_at).total_seconds():.0f} s ago")
    out.print(table)


async def _await(awaitable: Any) -> None:
    await awaitable


# -- plugins and config ---------------------------------------------------------------------------


@app.command()
def plugins(config: ConfigOpt = None) -> None:
    """List installed plugins and which ones plugins.toml enables."""
    from cube_core._host import installed_plugins

    cfg = _guard(lambda: load_config(config))
    data = cfg.data
    enabled = {(s, getattr(data, s).plugin) for s in ("vmm", "network", "storage", "scheduler")}
    enabled |= {("api", a.plugin) for a in data.api} | {("extensions", e) for e in data.extensions.enabled}
    table = Table("slot", "name", "distribution", "version", "enabled")
    for p in installed_plugins():
        table.add_row(p.slot, p.name, p.distribution, p.version, "yes" if (p.slot, p.name) in enabled else "")
    out.print(table)


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of plugins.toml (core sections + installed plugins' options)."""
    from cube_core._host import installed_plugins

    schema = PluginsFile.model_json_schema()
    options: dict[str, Any] = {}
    for p in installed_plugins():
        try:
            cls = _load_class(p.value)
        except Exception as exc:  # a broken plugin must not break the schema of the others
            options[f"{p.namespace}:{p.name}"] = {"description": f"failed to import: {exc}"}
            continue
        model = getattr(cls, "Config", None)
        if model is not None:
            options[f"{p.namespace}:{p.name}"] = model.model_json_schema()
    schema["x-plugin-options"] = options
    out.print_json(json.dumps(schema))


def _load_class(value: str) -> Any:
    import importlib

    module, _, attr = value.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@config_app.command("check")
def config_check(config: ConfigOpt = None) -> None:
    """Validate plugins.toml: syntax, slots, plugin names and every plugin's options."""
    from cube_core._host import build_plugin

    def check() -> None:
        cfg = load_config(config)
        data = cfg.data
        for slot in ("vmm", "network", "storage", "scheduler"):
            build_plugin(slot, getattr(data, slot), cfg)
        for api in data.api:
            build_plugin("api", api, cfg)
        for ext in data.extensions.enabled:
            from cube_core.config import SlotSection

            build_plugin("extensions", SlotSection(plugin=ext), cfg)

    _guard(check)
    out.print(f"[green]ok[/green]: {config or os.environ.get('CUBE_CONFIG') or 'embedded default'}")


# -- doctor -------------------------------------------------------------------------------------


@app.command()
def doctor(config: ConfigOpt = None) -> None:
    """Check this host: the core's needs (Python, root, disk) and each configured plugin's (QEMU,
    KVM incl. nested PVM, TCG, tun, BPF, nftables, image tools). Exit 1 if any check fails."""
    from cube_core._host import PluginHost
    from cube_core.doctor import core_checks

    cfg = _guard(lambda: load_config(config))
    host = _guard(lambda: PluginHost(cfg).load())
    checks = [("core", c) for c in core_checks(Path(cfg.data.core.state_dir))] + host.hooks.doctor_checks()
    table = Table("check", "from", "status", "detail", "fix")
    colors = {"ok": "green", "warn": "yellow", "fail": "red"}
    for source, c in checks:
        table.add_row(c.name, source, f"[{colors[c.status]}]{c.status}[/]", c.detail, c.hint)
    out.print(table)
    isolation = _guard(lambda: host.hooks.vmm_driver().isolation)
    notes = {"kvm": "kvm", "tcg": "tcg (emulation; not a security boundary)", "none": "none (fake VMM: no VM)"}
    out.print("isolation: " + notes.get(isolation, isolation))
    if any(c.status == "fail" for _, c in checks):
        raise typer.Exit(1)


# -- keys ---------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(team: Annotated[str, typer.Option(help="team name (created if new)")],
                config: ConfigOpt = None) -> None:
    """Create an API key for a team and print it (shown once)."""
    from cube_core import keys

    key, secret = _guard(lambda: keys.create_key(_store(config), team))
    err.print(f"created key {key.key_id} for team {team!r}; export E2B_API_KEY=...", highlight=False)
    out.print(secret, highlight=False)


@keys_app.command("ls")
def keys_ls(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List API keys (prefix only)."""
    from cube_core import keys

    if as_json:
        print_json_lines({"key_id": k.key_id, "prefix": k.prefix, "team_id": k.team_id,
                          "team": t.name if t else None, "created_at": k.created_at.isoformat(),
                          "revoked": k.revoked} for k, t in _guard(lambda: keys.list_keys(_store(config))))
        return
    table = Table("key id", "prefix", "team", "created", "revoked")
    for key, team_rec in _guard(lambda: keys.list_keys(_store(config))):
        table.add_row(key.key_id, key.prefix + "…", team_rec.name if team_rec else key.team_id,
                      key.created_at.isoformat(timespec="seconds"), "yes" if key.revoked else "")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="the full key id (key_...), as `keys ls` shows it")],
                config: ConfigOpt = None) -> None:
    """Revoke an API key by its full id (never by the secret's prefix)."""
    from cube_core import keys

    revoked = _guard(lambda: keys.revoke_key(_store(config), key))
    out.print(f"revoked {revoked.key_id}")


# -- kernel and templates -------------------------------------------------------------------------


@kernel_app.command("build")
def kernel_build(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Build (or reuse from the cache) the guest kernel of the configured VMM; prints its path.
    Progress: a bar on a terminal, JSON events on stderr otherwise."""
    from cube_core._host import PluginHost
    from cube_core.log import configure_logging
    from cube_core.progress import progress_reporter
    from cube_core.templates import guest_kernel

    configure_logging()
    cfg = _guard(lambda: load_config(config))
    vmm = _guard(lambda: PluginHost(cfg).load().hooks.vmm_driver())
    with progress_reporter("kernel") as progress:
        kernel, initrd = _guard(lambda: guest_kernel(cfg.data.core.kernel, vmm, progress))
    if as_json:
        print_json({"kernel": str(kernel), "initrd": str(initrd) if initrd else None})
        return
    out.print(str(kernel) + (f" (initrd {initrd})" if initrd else ""))


def with_node(config: Path | None, action: Callable[[Any], Any]) -> Any:
    """Run ``action(agent)`` with this machine's node agent (``cube_core.node.NodeAgent``), its
    drivers started but no pool, heartbeat or reconcile (for commands here and in CLI extensions
    such as cube-bench); ``CubeError`` becomes a clear message and exit code 2."""
    from cube_core._host import PluginHost
    from cube_core.log import configure_logging
    from cube_core.node import NodeAgent
    from cube_core.store import open_store

    configure_logging()

    async def run() -> Any:
        cfg = load_config(config)
        host = PluginHost(cfg).load()
        store = open_store(cfg.data.core)
        agent = NodeAgent(host, store)
        for driver in (agent.storage, agent.network, agent.vmm):
            await driver.start()
        try:
            return await action(agent)
        finally:
            for driver in (agent.vmm, agent.network, agent.storage):
                await driver.close()
            store.close()

    return _guard(lambda: asyncio.run(run()))


@template_app.command("build")
def template_build(name: Annotated[str, typer.Argument(help="base, code-interpreter-v1, or a new name")],
                   from_dir: Annotated[Path | None, typer.Option("--from-dir", help="rootfs directory")] = None,
                   from_oci: Annotated[Path | None, typer.Option("--from-oci",
                                                                 help="OCI image layout tarball")] = None,
                   interpreter: Annotated[bool, typer.Option(help="start the code interpreter")] = False,
                   rebuild: Annotated[bool, typer.Option(help="build even if cached")] = False,
                   config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Build a template: rootfs image, guest kernel, booted and snapshotted. Progress: bars on a
    terminal, JSON events on stderr otherwise."""
    from cube_core.progress import progress_reporter
    from cube_core.storage import RootfsRecipe

    recipe = None
    if from_dir and from_oci:
        err.print("error: give --from-dir or --from-oci, not both")
        raise typer.Exit(2)
    if from_dir:
        recipe = RootfsRecipe(name=name, source="dir", path=from_dir, interpreter=interpreter)
    elif from_oci:
        recipe = RootfsRecipe(name=name, source="oci", path=from_oci, interpreter=interpreter)

    async def action(agent: Any) -> Any:
        with progress_reporter(f"template {name}") as progress:
            return await agent.templates.ensure(name, progress, rebuild=rebuild, recipe=recipe)

    template = with_node(config, action)
    if as_json:
        print_json(template)
        return
    out.print(f"{template.template_id}: {template.status.value} "
              f"(snapshot {template.snapshot.snapshot_id if template.snapshot else '-'})")


@template_app.command("ls")
def template_ls(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List templates."""
    if as_json:
        print_json_lines(_guard(lambda: _store(config).list_templates()))
        return
    table = Table("id", "aliases", "status", "image MiB", "snapshot", "created")
    for t in _guard(lambda: _store(config).list_templates()):
        table.add_row(t.template_id, ", ".join(t.aliases), t.status.value, f"{t.rootfs_bytes / 2**20:.0f}",
                      t.snapshot.snapshot_id if t.snapshot else "-", t.created_at.isoformat(timespec="seconds"))
    out.print(table)


@template_app.command("rm")
def template_rm(name: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Remove a template record and its snapshot files (images stay cached by content hash)."""

    async def action(agent: Any) -> None:
        template = agent.store.get_template(name)
        if template is None:
            raise TemplateNotFoundError(template=name)
        bases = {s.base_state_id for s in agent.store.list_snapshots()}
        if template.snapshot and template.snapshot.snapshot_id in bases:
            out.print(f"keeping the files of snapshot {template.snapshot.snapshot_id}: sandbox snapshots "
                      "are saved as differences from it (garbage collection frees them later)")
        elif template.snapshot:
            await agent.storage.delete_snapshot(template.snapshot.snapshot_id)
        agent.store.delete_template(template.template_id)

    with_node(config, action)
    if as_json:
        print_json({"template": name, "removed": True})
        return
    out.print(f"removed {name}")


# -- sub-commands of other distributions -----------------------------------------------------------

# `cube <name>` sub-apps that other distributions add (entry point group cube.cli: name = a typer.Typer),
# and the distribution that provides each first-party one, named when it is not installed.
CLI_EXTENSIONS = {"bench": "cube-bench"}


def _add_cli_extensions() -> None:
    from importlib.metadata import entry_points

    problems: dict[str, str] = {}
    for ep in sorted(entry_points(group="cube.cli"), key=lambda ep: ep.name):
        try:
            sub_app = ep.load()
        except ImportError as exc:  # installed but broken: the other commands still work
            problems[ep.name] = f"cannot load {ep.value}: {exc}"
            continue
        app.add_typer(sub_app, name=ep.name)
    for name, dist in CLI_EXTENSIONS.items():
        if name in problems or not any(g.name == name for g in app.registered_groups):
            _add_missing(name, dist, problems.get(name))


def _add_missing(name: str, dist: str, problem: str | None) -> None:
    reason = problem or f"{dist} is not installed"

    @app.command(name, help=f"(not available: {reason})", add_help_option=False,
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def missing() -> None:
        err.print(f"[red]error:[/red] cube {name} needs the {dist} distribution ({escape(reason)}): "
                  f"pip install {dist}  (make installs it in the dev venv)", highlight=False, soft_wrap=True)
        raise typer.Exit(2)


app.command("events")(events)
_add_cli_extensions()


def main() -> None:
    app()


__all__ = ["ConfigOpt", "app", "guard", "main", "with_node"]  # what CLI extensions (cube-bench) import
