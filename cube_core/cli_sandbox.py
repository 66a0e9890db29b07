"""``cube sandbox ...``: the sandboxes of every team, for operators.

``ls``, ``inspect`` and ``logs`` read the state store (every team; the cluster's when the store is
PostgreSQL) and need no running server; ``kill``, ``exec`` and ``audit`` act through the running
server's API with an API key of the sandbox's team (``--key`` or ``$E2B_API_KEY``).
"""

from __future__ import annotations

import json
import shlex
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from cube_core.cli_common import (
    ConfigOpt,
    JsonOpt,
    KeyOpt,
    UrlOpt,
    api_call,
    api_url,
    guard,
    open_store,
    out,
    print_json,
    print_json_lines,
)
from cube_core.errors import SandboxNotFoundError
from cube_core.pool import POOL_TEAM

if TYPE_CHECKING:
    from cube_core.models import Sandbox

sandbox_app = typer.Typer(no_args_is_help=True, help="Sandboxes of every team (ls, inspect, logs, kill, exec).")

SandboxArg = Annotated[str, typer.Argument(help="the sandbox id")]


def _summary(s: Sandbox) -> dict[str, Any]:
    return {"sandbox_id": s.sandbox_id, "team_id": s.team_id, "template_id": s.template_id,
            "state": s.state.value, "node_id": s.node_id, "isolation": s.isolation,
            "started_at": s.started_at.isoformat(), "end_at": s.end_at.isoformat(),
            "cpu_count": s.cpu_count, "memory_mb": s.memory_mb, "metadata": s.metadata,
            "vm_pid": s.runtime.vm.pid if s.runtime.vm is not None else None}


def _detail(s: Sandbox) -> dict[str, Any]:
    """The whole record, minus secrets: the access token is left out, env var values masked."""
    record = s.model_dump(mode="json", exclude={"envd_access_token"})
    record["env_vars"] = {k: "***" for k in s.env_vars}
    record["secure"] = s.secure
    return record


def _age(since: datetime) -> str:
    seconds = int((datetime.now(UTC) - since).total_seconds())
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


@sandbox_app.command("ls")
def sandbox_ls(config: ConfigOpt = None, as_json: JsonOpt = False,
               team: Annotated[str | None, typer.Option("--team", help="only this team (id)")] = None,
               every: Annotated[bool, typer.Option("--all", help="stopped ones too (killed, error)")] = False
               ) -> None:
    """List the live sandboxes of every team, on every node that shares this state store."""
    from cube_core.service import LIVE_STATES

    def read() -> list[Sandbox]:
        store = open_store(config)
        try:
            return list(store.list_sandboxes(states=None if every else LIVE_STATES))
        finally:
            store.close()

    sandboxes = [s for s in guard(read) if (team is None or s.team_id == team) and s.team_id != POOL_TEAM]
    if as_json:
        print_json_lines(_summary(s) for s in sandboxes)
        return
    table = Table("id", "team", "template", "state", "node", "isolation", "age", "ends")
    for s in sandboxes:
        table.add_row(s.sandbox_id, s.team_id, s.template_id, s.state.value, s.node_id, s.isolation,
                      _age(s.started_at), s.end_at.isoformat(timespec="seconds"))
    out.print(table)


def _get(config: Any, sandbox_id: str) -> Sandbox:
    def read() -> Sandbox:
        store = open_store(config)
        try:
            sb: Sandbox | None = store.get_sandbox(sandbox_id)
        finally:
            store.close()
        if sb is None:
            raise SandboxNotFoundError(sandbox_id=sandbox_id)
        return sb

    return guard(read)


@sandbox_app.command("inspect")
def sandbox_inspect(sandbox_id: SandboxArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Everything recorded about one sandbox (any state, any team); secrets left out."""
    detail = _detail(_get(config, sandbox_id))
    if as_json:
        print_json(detail)
        return
    table = Table("field", "value", show_header=False)
    for field, value in detail.items():
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        table.add_row(field, escape(str(shown)))
    out.print(table)


@sandbox_app.command("logs")
def sandbox_logs(sandbox_id: SandboxArg, config: ConfigOpt = None, as_json: JsonOpt = False,
                 follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new entries")] = False,
                 limit: Annotated[int, typer.Option("--limit", help="at most this many (the newest)")] = 100,
                 interval: Annotated[float, typer.Option("--interval", help="seconds between reads with "
                                                                          "--follow")] = 1.0) -> None:
    """The sandbox's log (its guest agent's events: start, each process's start and exit), as the
    nodes sampled it; also after it ended."""
    _get(config, sandbox_id)
    store = guard(lambda: open_store(config))
    try:
        entries = list(reversed(store.log_entries(sandbox_id, limit=limit, backward=True)))
        seen = {e.seq for e in entries}
        _print_entries(entries, as_json)
        while follow:
            time.sleep(interval)
            since = int(entries[-1].at.timestamp() * 1000) if entries else None
            fresh = [e for e in store.log_entries(sandbox_id, cursor_ms=since, limit=1000) if e.seq not in seen]
            seen.update(e.seq for e in fresh)
            entries.extend(fresh)
            _print_entries(fresh, as_json)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()


def _print_entries(entries: list[Any], as_json: bool) -> None:
    for e in entries:
        if as_json:
            print_json(e)
            continue
        fields = " ".join(f"{k}={v}" for k, v in e.fields.items())
        colour = {"error": "red", "warn": "yellow", "debug": "dim"}.get(e.level, "")
        level = f"[{colour}]{e.level:5}[/]" if colour else f"{e.level:5}"
        out.print(f"{e.at.isoformat(timespec='milliseconds')} {level} {escape(e.message)} {escape(fields)}",
                  highlight=False, soft_wrap=True)


@sandbox_app.command("kill")
def sandbox_kill(sandbox_id: SandboxArg, key: KeyOpt = None, url: UrlOpt = None, config: ConfigOpt = None,
                 as_json: JsonOpt = False) -> None:
    """Kill a sandbox through the running server (its VM, network slot and disk are freed)."""
    api_call("DELETE", api_url(config, url), f"/sandboxes/{sandbox_id}", key=key)
    if as_json:
        print_json({"sandbox_id": sandbox_id, "killed": True})
    else:
        out.print(f"killed {sandbox_id}")


@sandbox_app.command("exec")
def sandbox_exec(sandbox_id: SandboxArg,
                 command: Annotated[list[str], typer.Argument(help="the command and its arguments (after --)")],
                 key: KeyOpt = None, url: UrlOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False,
                 timeout: Annotated[float, typer.Option("--timeout", help="seconds")] = 60.0) -> None:
    """Run a command in the sandbox as root over its control channel (not envd) and print its
    output; exits with the command's exit code. ``cube sandbox exec ID -- ls -l /``"""
    resp = api_call("POST", api_url(config, url), f"/sandboxes/{sandbox_id}/exec", key=key,
                    json={"cmd": command, "timeout": timeout}, timeout=timeout + 30)
    reply = resp.json()
    if as_json:
        print_json(reply)
    else:
        if reply.get("stdout"):
            typer.echo(reply["stdout"], nl=False)
        if reply.get("stderr"):
            typer.echo(reply["stderr"], nl=False, err=True)
        if reply.get("truncated"):
            typer.echo(f"(output of {shlex.join(command)} truncated)", err=True)
    code = reply.get("exitCode")
    raise typer.Exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


@sandbox_app.command("audit")
def sandbox_audit(sandbox_id: SandboxArg, key: KeyOpt = None, url: UrlOpt = None,
                  limit: Annotated[int, typer.Option("--limit")] = 100, as_json: JsonOpt = False,
                  config: ConfigOpt = None) -> None:
    """Recent egress decisions of a sandbox (from the running server's network audit log)."""
    resp = api_call("GET", api_url(config, url), f"/sandboxes/{sandbox_id}/network/audit", key=key,
                    params={"limit": limit})
    events: list[dict[str, Any]] = resp.json()["events"]
    if as_json:
        print_json_lines(events)
        return
    table = Table("time", "kind", "verdict", "what", "reason / rule")
    for e in events:
        what = e.get("dst") or e.get("name") or json.dumps(e.get("policy", ""))
        if e["kind"] == "flow":
            what = f"{e.get('proto', e.get('ethertype', '?'))} {what}"
        reason = e.get("rule") or e.get("reason") or ", ".join(e.get("answers", []))
        table.add_row(str(e.get("ts", "")), e["kind"], e.get("verdict", ""), escape(str(what)), escape(str(reason)))
    out.print(table)
