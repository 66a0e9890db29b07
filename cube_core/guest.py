"""Calling a guest agent from the core: every reply is validated with a ``*Reply`` model.

A guest is root inside its VM and may replace the agent, so its replies are hostile input. The VMM
driver caps their size and time-boxes each call (a total deadline); this module checks their shape
and types before any of it reaches a record or a log.
"""

from __future__ import annotations

import base64
import os
import time
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from cube_core import telemetry
from cube_core.errors import GuestProtocolError
from cube_core.models import GuestReply, VmHandle
from cube_core.vmm import VmmDriver

if TYPE_CHECKING:
    from cube_core.network import NetworkDriver

R = TypeVar("R", bound=GuestReply)


def personalize_params(vmm: VmmDriver, network: NetworkDriver, *, sandbox_id: str, template_id: str,
                       access_token: str | None, env_vars: dict[str, str] | None = None,
                       metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``personalize`` message that makes a guest the sandbox ``sandbox_id``: its identity
    (hostname = the id's first 16 characters), fresh entropy and the clock, and what this node
    decides for every guest (the CA it must trust, whether it randomizes process layouts)."""
    return {"sandbox_id": sandbox_id, "template_id": template_id, "env_vars": env_vars or {},
            "access_token": access_token, "hostname": sandbox_id[:16], "clock_ns": time.time_ns(),
            "metadata": metadata or {}, "entropy": base64.b64encode(os.urandom(64)).decode(),
            "trust_pem": network.guest_trust(), "aslr": vmm.guest_aslr}


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
