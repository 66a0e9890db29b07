"""What the ``cube`` command groups share: the consoles, the common options, the ``CubeError``
guard, JSON output, the state store, and calls to a running server's API."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape

from cube_core.config import load_config
from cube_core.errors import CubeError

T = TypeVar("T")

out = Console()
err = Console(stderr=True)
state: dict[str, Any] = {"debug": False}

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="plugins.toml (default: $CUBE_CONFIG "
                                                 "or the embedded default)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON (one object per line) instead of a table")]
KeyOpt = Annotated[str | None, typer.Option("--key", envvar="E2B_API_KEY",
                                            help="an API key of the sandbox's team (default: $E2B_API_KEY)")]
UrlOpt = Annotated[str | None, typer.Option("--url", envvar="CUBE_URL",
                                            help="the Cube API (default: $CUBE_URL, else host and port from "
                                                 "plugins.toml)")]


def guard(func: Callable[[], T]) -> T:
    """``func()``; a ``CubeError`` becomes one clear message and exit code 2 (``--debug``: raised)."""
    try:
        return func()
    except CubeError as exc:
        if state["debug"]:
            raise
        err.print(f"[red]error:[/red] {escape(exc.message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def fail(message: str) -> typer.Exit:
    """Print ``message`` as an error; ``raise fail(...)`` exits with code 2."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def open_store(config: Path | None) -> Any:
    from cube_core.store import open_store as open_

    return open_(load_config(config).data.core)


def print_json(item: BaseModel | dict[str, Any] | list[Any]) -> None:
    """One JSON document on one line of stdout."""
    if isinstance(item, BaseModel):
        print(item.model_dump_json(), flush=True)
    else:
        print(json.dumps(item, default=str), flush=True)


def print_json_lines(items: Iterable[BaseModel | dict[str, Any]]) -> None:
    for item in items:
        print_json(item)


# -- a running server's API ------------------------------------------------------------------------


def api_url(config: Path | None, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    core = guard(lambda: load_config(config)).data.core
    host = "127.0.0.1" if core.host in ("0.0.0.0", "::") else core.host
    return f"http://{host}:{core.port}"


def api_call(method: str, url: str, path: str, *, key: str | None, timeout: float = 30.0,
             **kwargs: Any) -> Any:
    """``method`` ``url+path`` with the API key; the answer (httpx.Response) when 2xx, else a clear
    message and exit 2 (the server's E2B error message, or why it cannot be reached)."""
    import httpx

    if not key:
        raise fail("this command needs an API key of the sandbox's team: --key or $E2B_API_KEY "
                   "(`cube keys create --team NAME` makes one)")
    try:
        resp = httpx.request(method, f"{url}{path}", headers={"X-API-Key": key}, timeout=timeout,
                             trust_env=False, **kwargs)
    except httpx.HTTPError as exc:
        raise fail(f"cannot reach {url}: {exc}") from None
    if resp.status_code >= 400:
        try:
            message = resp.json().get("message") or resp.text
        except ValueError:
            message = resp.text
        raise fail(f"{resp.status_code}: {message}")
    return resp


def is_terminal() -> bool:
    return out.is_terminal and not os.environ.get("CUBE_NO_TTY")
