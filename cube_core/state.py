"""The sandbox state machine and the ``@require`` guard for service methods [qemu.qmp ``require``].

::

    creating ──> running <──> paused
        │           │            │
        └───────────┴─────┬──────┘
                          v
                 killed   (or error)
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast

from cube_core.errors import InvalidStateError


class SandboxState(enum.StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    KILLED = "killed"
    ERROR = "error"


TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    SandboxState.CREATING: frozenset({SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.KILLED,
                                      SandboxState.ERROR}),
    SandboxState.RUNNING: frozenset({SandboxState.PAUSED, SandboxState.KILLED, SandboxState.ERROR}),
    SandboxState.PAUSED: frozenset({SandboxState.RUNNING, SandboxState.KILLED, SandboxState.ERROR}),
    SandboxState.KILLED: frozenset(),
    SandboxState.ERROR: frozenset({SandboxState.KILLED}),
}


def check_transition(sandbox_id: str, current: SandboxState, target: SandboxState) -> None:
    """Raise :class:`InvalidStateError` unless ``current -> target`` is a legal move."""
    if target not in TRANSITIONS[current]:
        allowed = sorted(s.value for s in SandboxState if target in TRANSITIONS[s])
        raise InvalidStateError(sandbox_id=sandbox_id, state=current.value,
                                required=" or ".join(allowed) or "nothing")


class _HasState(Protocol):
    async def current_state(self, sandbox_id: str) -> SandboxState: ...


P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound=_HasState)


def require(*states: SandboxState) -> Callable[
    [Callable[Concatenate[S, str, P], Coroutine[Any, Any, R]]], Callable[Concatenate[S, str, P], Coroutine[Any, Any, R]]
]:
    """Guard an async service method ``(self, sandbox_id, ...)`` by the sandbox's current state."""

    def decorator(
        func: Callable[Concatenate[S, str, P], Coroutine[Any, Any, R]],
    ) -> Callable[Concatenate[S, str, P], Coroutine[Any, Any, R]]:
        @functools.wraps(func)
        async def wrapper(self: S, sandbox_id: str, *args: P.args, **kwargs: P.kwargs) -> R:
            state = await self.current_state(sandbox_id)
            if state not in states:
                raise InvalidStateError(sandbox_id=sandbox_id, state=state.value,
                                        required=" or ".join(s.value for s in states))
            return await func(self, sandbox_id, *args, **kwargs)

        wrapper.__cube_requires__ = states  # type: ignore[attr-defined]
        return cast(Callable[Concatenate[S, str, P], Coroutine[Any, Any, R]], wrapper)

    return decorator


def required_states(func: Any) -> tuple[SandboxState, ...]:
    """The states a ``@require``-guarded method accepts (for docs and tests)."""
    return tuple(getattr(func, "__cube_requires__", ()))
