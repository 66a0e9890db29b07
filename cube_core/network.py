"""The network driver contract: one network slot (namespace, tap, host link) per sandbox."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, ClassVar

from cube_core.errors import UnsupportedOperation
from cube_core.models import EgressRule, NetworkPolicy, NicHandle

CAP_HTTP_RULES = "http_rules"
"""The driver applies :attr:`NetworkPolicy.rules` (header transforms on outbound HTTP)."""

SecretSource = Callable[[str, str], Awaitable[str]]
"""``(slot_id, name) -> value``: the current value of secret ``name`` of the team whose sandbox
holds network slot ``slot_id``, read when a request needs it. Raises a
:class:`~cube_core.errors.CubeError` (its message is safe to show that sandbox) when there is no
such secret or it cannot be read here. The node agent gives it to the driver
(:meth:`NetworkDriver.use_secrets`)."""


class NetworkDriver(abc.ABC):
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def use_secrets(self, source: SecretSource) -> None:  # noqa: B027 - optional hook, empty by default
        """Where ``${e2b.secrets.<name>}`` placeholders of :attr:`NetworkPolicy.rules` are
        resolved; called once by the node agent, before :meth:`start`. Only a driver with
        :data:`CAP_HTTP_RULES` uses it."""

    async def start(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Prepare host-wide networking (and sweep orphans of a crashed run)."""

    def guest_trust(self) -> str | None:
        """PEM certificates this node's guests must trust, or ``None``: the CA of a driver that
        inspects their HTTPS (to apply :attr:`NetworkPolicy.rules`). Known after :meth:`start`.
        The node sends it to a guest when it makes the guest a sandbox (pool join, personalize),
        never into a template snapshot: each node has its own."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release driver-wide resources; slots of live sandboxes stay."""

    @abc.abstractmethod
    async def allocate(self, owner_id: str, policy: NetworkPolicy,
                       extra_rules: Sequence[EgressRule] = ()) -> NicHandle:
        """Create (or take from a pool) a slot for ``owner_id`` and apply ``policy``."""

    @abc.abstractmethod
    async def release(self, nic: NicHandle) -> None:
        """Tear a slot down; idempotent."""

    @abc.abstractmethod
    async def sweep(self, live: Iterable[str]) -> int:
        """Remove every slot whose ``slot_id`` is not in ``live``; return how many went."""

    async def recreate(self, nic: NicHandle, policy: NetworkPolicy,
                       extra_rules: Sequence[EgressRule] = ()) -> NicHandle:
        """Make sure the slot of ``nic`` exists, as after :meth:`allocate`: one a host reboot
        removed is built again with the same ``slot_id``, guest address and MAC, and ``policy``;
        one that exists is left as it is. Answers the slot's handle now (driver data such as
        interface indexes may differ). Called by the node for sandboxes that outlive their VM
        (written out to disk, paused without memory) before their VM starts again."""
        raise UnsupportedOperation(driver=type(self).__name__, operation="recreate")

    async def update_policy(self, nic: NicHandle, policy: NetworkPolicy,
                            extra_rules: Sequence[EgressRule] = ()) -> None:
        raise UnsupportedOperation(driver=type(self).__name__, operation="update_policy")

    async def audit(self, nic: NicHandle, *, limit: int = 1000) -> list[dict[str, Any]]:
        raise UnsupportedOperation(driver=type(self).__name__, operation="audit")
