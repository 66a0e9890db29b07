"""Per-sandbox mutable state shared by envd, the interpreter and the control channel."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .eventlog import EventLog
from .users import UserInfo, lookup_user


def read_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return str(uuid.uuid4())


@dataclass
class AgentState:
    default_user: str = "user"
    home_override: str | None = None
    default_workdir: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)
    access_token: str | None = None
    sandbox_id: str | None = None
    template_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    boot_id: str = field(default_factory=read_boot_id)
    started: float = field(default_factory=time.monotonic)
    # Bumped whenever env_vars change, so interpreter contexts can re-apply them.
    env_generation: int = 0
    # What happened in the sandbox (process starts and exits), read by the host (op ``observe``).
    events: EventLog = field(default_factory=EventLog)

    def user(self, name: str | None = None) -> UserInfo:
        """Resolve ``name`` (default user when None/empty); raises UnknownUserError."""
        name = name or self.default_user
        override = self.home_override if name == self.default_user else None
        return lookup_user(name, override)

    def workdir(self, user: UserInfo) -> str:
        return self.default_workdir or user.home

    def update_env(self, values: dict[str, str], replace: bool = False) -> None:
        if replace:
            self.env_vars = dict(values)
        else:
            self.env_vars.update(values)
        self.env_generation += 1

    def token_ok(self, presented: str | None) -> bool:
        """True when no token is set, or ``presented`` matches it."""
        if not self.access_token:
            return True
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode(), self.access_token.encode())

    def signature_ok(
        self, path: str, operation: str, username: str, signature: str, expiration: str | None
    ) -> bool:
        """Check a signed /files URL (E2B_PROTOCOL.md §5.4)."""
        if not self.access_token:
            return True
        raw = f"{path}:{operation}:{username}:{self.access_token}"
        if expiration:
            raw += f":{expiration}"
        expected = "v1_" + _b64_nopad(hashlib.sha256(raw.encode()).digest())
        return hmac.compare_digest(expected.encode(), signature.encode())

    def uptime(self) -> float:
        return time.monotonic() - self.started


def _b64_nopad(data: bytes) -> str:
    return base64.b64encode(data).rstrip(b"=").decode("ascii")
