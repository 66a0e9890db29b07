"""``cube events``: follow the running server's event stream (``GET /events``, server-sent events).

A team's API key (``--key``/``$E2B_API_KEY``) sees its team's events; the operator token
(``--token``/``$CUBE_OPERATOR_TOKEN``, ``[core] operator_token``) sees every team's and the nodes'.
The stream is followed until interrupted; a dropped connection is opened again (events of the gap
are not replayed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.markup import escape

from cube_core.cli_common import ConfigOpt, JsonOpt, UrlOpt, api_url, err, fail, out, print_json

KeyOpt = Annotated[str | None, typer.Option("--key", envvar="E2B_API_KEY",
                                            help="a team's API key: that team's events (default: $E2B_API_KEY)")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="CUBE_OPERATOR_TOKEN",
                                              help="the operator token: every team's events "
                                                   "(default: $CUBE_OPERATOR_TOKEN)")]


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str, str]]:
    """``(id, event, data)`` per server-sent event of ``lines`` (comments and retry skipped)."""
    event_id: str | None = None
    event, data = "message", list[str]()
    for line in lines:
        if line == "":
            if data:
                yield event_id, event, "\n".join(data)
            event, data = "message", list[str]()
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
        elif field == "id":
            event_id = value


def _show(event: dict[str, Any]) -> None:
    at = str(event.get("at", ""))[11:23]
    ids = " ".join(f"{k.removesuffix('_id')}={event[k]}" for k in ("sandbox_id", "team_id", "node_id")
                   if event.get(k))
    data = event.get("data") or {}
    details = " ".join(f"{k}={v}" for k, v in data.items()) if isinstance(data, dict) else str(data)
    out.print(f"{at} [bold]{escape(str(event.get('type', '?'))):24}[/] {escape(ids)} [dim]{escape(details)}[/]",
              highlight=False, soft_wrap=True)


def events(key: KeyOpt = None, token: TokenOpt = None, url: UrlOpt = None, config: ConfigOpt = None,
           as_json: JsonOpt = False,
           types: Annotated[list[str] | None, typer.Option(
               "--type", help="only events whose type starts with this (repeatable): sandbox., node.down")] = None,
           count: Annotated[int | None, typer.Option("--count", help="stop after this many events")] = None) -> None:
    """Follow live events (sandbox created/paused/resumed/killed/expired, node up/down, template
    builds) from the running server, one per line; ``--json`` prints each event as JSON."""
    import httpx

    if not (key or token):
        raise fail("cube events needs --key (a team's events) or --token (the operator token: every team's)")
    base = api_url(config, url)
    headers = {"Accept": "text/event-stream"}
    headers.update({"Authorization": f"Bearer {token}"} if token else {"X-API-Key": key or ""})
    last_id: str | None = None
    shown, delay = 0, 0.5
    while True:
        try:
            with httpx.stream("GET", f"{base}/events", trust_env=False, headers=headers,
                              timeout=httpx.Timeout(10.0, read=None)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise fail(f"{resp.status_code}: {_message(resp)}")
                delay = 0.5
                for event_id, _kind, data in parse_sse(resp.iter_lines()):
                    last_id = event_id or last_id
                    try:
                        event = json.loads(data)
                    except ValueError:
                        continue
                    kind = str(event.get("type", ""))
                    if kind == "stream.lost":  # this client read too slowly: the server dropped some
                        err.print(f"[yellow]events lost: {escape(json.dumps(event.get('data', {})))}[/yellow]",
                                  highlight=False)
                        continue
                    if types and not any(kind.startswith(t) for t in types):
                        continue
                    if as_json:
                        print_json(event)
                    else:
                        _show(event)
                    shown += 1
                    if count is not None and shown >= count:
                        return
        except KeyboardInterrupt:
            return
        except httpx.HTTPError as exc:
            if last_id is None and shown == 0:
                raise fail(f"cannot reach {base}: {exc}") from None
            err.print(f"[yellow]stream interrupted ({escape(str(exc))}); resuming[/yellow]", highlight=False)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _message(resp: Any) -> str:
    try:
        return str(resp.json().get("message") or resp.text)
    except ValueError:
        return str(resp.text)
