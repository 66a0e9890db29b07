"""Calling a guest agent from the core: every reply is validated with a ``*Reply`` model.

A guest is root inside its VM and may replace the agent, so its replies are hostile input. The VMM
driver caps their size and time-boxes each call (a total deadline); this module checks their shape
and types before any of it reaches a record or a log.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import ValidationError

from cube_core import telemetry
from cube_core.errors import GuestProtocolError
from cube_core.models import GuestReply, VmHandle
from cube_core.vmm import VmmDriver

R = TypeVar("R", bound=GuestReply)


async def guest_call(vmm: VmmDriver, vm: VmHandle, op: str, params: dict[str, Any] | None, model: type[R], *,
                     timeout: float) -> R:
    """Call the guest agent and validate its reply with ``model``; a reply that does not fit raises
    :class:`GuestProtocolError` (whose reason names the fields, never their guest-chosen values)."""
    with telemetry.child_span(f"guest.{op}", vm_id=vm.vm_id):
        reply = await vmm.guest_call(vm, op, params, timeout=timeout)
    try:
        return model.model_validate(reply)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])[:80]}: {e['msg']}" for e in exc.errors()[:3])
        raise GuestProtocolError(vm_id=vm.vm_id, reason=f"invalid {op} reply ({problems})"[:500]) from None
