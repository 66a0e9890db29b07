from __future__ import annotations

import pytest

from cube_core.errors import InvalidStateError
from cube_core.state import SandboxState, check_transition, require, required_states


def test_legal_and_illegal_moves() -> None:
    check_transition("s", SandboxState.RUNNING, SandboxState.PAUSED)
    check_transition("s", SandboxState.PAUSED, SandboxState.RUNNING)
    with pytest.raises(InvalidStateError) as info:
        check_transition("s", SandboxState.KILLED, SandboxState.RUNNING)
    assert info.value.state == "killed"
    with pytest.raises(InvalidStateError):
        check_transition("s", SandboxState.PAUSED, SandboxState.PAUSED)


class Box:
    def __init__(self, state: SandboxState) -> None:
        self.state = state

    async def current_state(self, sandbox_id: str) -> SandboxState:
        return self.state

    @require(SandboxState.RUNNING)
    async def pause(self, sandbox_id: str) -> str:
        return "paused " + sandbox_id


async def test_require_guard() -> None:
    assert await Box(SandboxState.RUNNING).pause("x") == "paused x"
    with pytest.raises(InvalidStateError) as info:
        await Box(SandboxState.PAUSED).pause("x")
    assert (info.value.sandbox_id, info.value.state, info.value.required) == ("x", "paused", "running")
    assert required_states(Box.pause) == (SandboxState.RUNNING,)
