"""The one place that configures structlog: JSON in production, pretty on a terminal.

Every line that concerns a request, a team or a sandbox carries its ids (``request_id``,
``team_id``, ``sandbox_id``, ``node_id``) from :mod:`structlog.contextvars`: the API middleware
binds the request id (:class:`cube_core.requestctx.RequestContext`), the routes the team and
sandbox, and the service's and node agent's operations the ids of what they act on
(:func:`with_ids`). docs/observability.md describes the fields.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import re
import sys
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import structlog

if TYPE_CHECKING:
    from cube_core.config import TelemetrySettings

_configured = False

P = ParamSpec("P")
R = TypeVar("R")

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
ID_FIELDS = ("request_id", "team_id", "sandbox_id", "node_id")


def configure_logging(*, level: str | None = None, json: bool | None = None,
                      settings: TelemetrySettings | None = None) -> None:
    """Configure structlog and the stdlib root logger (idempotent).

    Precedence: ``$CUBE_LOG_LEVEL``/``$CUBE_LOG_FORMAT``, then the arguments, then ``settings``
    (``[telemetry]``), then info and auto (console on a terminal, JSON otherwise)."""
    global _configured
    level_name = (os.environ.get("CUBE_LOG_LEVEL") or level or (settings.log_level if settings else "info")).upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    fmt = os.environ.get("CUBE_LOG_FORMAT") or ("json" if json else "console" if json is False else None) \
        or (settings.log_format if settings else "auto")
    as_json = fmt == "json" or (fmt not in ("json", "console") and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (structlog.processors.JSONRenderer() if as_json
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric)
    for noisy in ("httpx", "httpcore", "stevedore", "qemu.qmp", "pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    _configured = True


def is_configured() -> bool:
    return _configured


# -- ids on every line ---------------------------------------------------------------------------


def request_id_from(value: str | None) -> str:
    """The request id to use: the caller's ``x-request-id`` when it is a sane token (up to 128
    characters of ``[A-Za-z0-9._:/+=-]``), else a new one."""
    if value and _REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def current_ids() -> dict[str, str]:
    """The ids bound in this context (for headers to other processes)."""
    bound = structlog.contextvars.get_contextvars()
    return {k: str(bound[k]) for k in ID_FIELDS if bound.get(k) is not None}


def bound_ids(**ids: str | None) -> Any:
    """``with bound_ids(sandbox_id=..., team_id=...)``: log lines inside carry them (None skipped);
    the previous values come back on exit."""
    return structlog.contextvars.bound_contextvars(**{k: v for k, v in ids.items() if v is not None})


def _ids_of(arguments: dict[str, Any]) -> dict[str, str | None]:
    ids: dict[str, str | None] = {}
    for name, value in arguments.items():
        if name in ("sandbox_id", "team_id", "node_id") and isinstance(value, str):
            ids[name] = value
        elif name in ("sandbox", "sb", "request", "spec"):
            target = getattr(value, "sandbox", value)
            for field in ("sandbox_id", "team_id", "node_id"):
                found = getattr(target, field, None)
                if isinstance(found, str):
                    ids.setdefault(field, found)
    return ids


@contextlib.contextmanager
def ids_scope(**ids: str | None) -> Iterator[None]:
    """Like :func:`bound_ids`, and whatever the block binds itself (``bind_ids(sandbox_id=...)``
    once the id is known) is undone on exit too."""
    saved = structlog.contextvars.get_contextvars()
    bind_ids(**ids)
    try:
        yield
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**saved)


def bind_ids(**ids: str | None) -> None:
    """Bind ids for the rest of the current scope (None skipped)."""
    structlog.contextvars.bind_contextvars(**{k: v for k, v in ids.items() if v is not None})


def with_ids(func: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Decorate an async operation so that its log lines (and those of everything it awaits)
    carry the ids of its arguments: ``sandbox_id``/``team_id``/``node_id`` parameters, or those
    fields of a ``sandbox``/``sb``/``request``/``spec`` argument. Ids the operation binds itself
    (:func:`bind_ids`) end with it."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        arguments: dict[str, Any]
        try:
            arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
        except TypeError:
            arguments = {}
        with ids_scope(**_ids_of(arguments)):
            return await func(*args, **kwargs)

    return wrapper
