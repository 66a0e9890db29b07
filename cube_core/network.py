"""The network driver contract: one network slot (namespace, tap, host link) per sandbox."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from cube_core.errors import UnsupportedOperation
from cube_core.models import EgressRule, NetworkPolicy, NicHandle


class NetworkDriver(abc.ABC):
    capabilities: ClassVar[frozenset[str]] = frozenset()

    async def start(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Prepare host-wide networking (and sweep orphans of a crashed run)."""

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

    async def update_policy(self, nic: NicHandle, policy: NetworkPolicy,
                            extra_rules: Sequence[EgressRule] = ()) -> None:
        raise UnsupportedOperation(driver=type(self).__name__, operation="update_policy")

    async def audit(self, nic: NicHandle, *, limit: int = 1000) -> list[dict[str, Any]]:
        raise UnsupportedOperation(driver=type(self).__name__, operation="audit")
