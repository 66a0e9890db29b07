"""The agent's own log of what happened in the sandbox: process starts, exits and errors.

A bounded ring in memory (the oldest entries go first). Each entry has a sequence number that only
grows, so the host reads it with a cursor (``since(seq)``: control op ``observe``) and stores it;
E2B's ``/sandboxes/{id}/logs`` serve what the host stored. ``personalize`` clears the ring: what a
warm-pool member or the sandbox a snapshot was taken from did is not this sandbox's log.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Literal

Level = Literal["debug", "info", "warn", "error"]
Entry = dict[str, Any]

KEEP = 2000
MAX_MESSAGE = 1024
MAX_FIELD = 512


class EventLog:
    def __init__(self, keep: int = KEEP) -> None:
        self._entries: collections.deque[Entry] = collections.deque(maxlen=keep)
        self._seq = 0

    def add(self, level: Level, message: str, **fields: object) -> Entry:
        self._seq += 1
        entry: Entry = {
            "seq": self._seq,
            "ts_ms": int(time.time() * 1000),
            "level": level,
            "message": message[:MAX_MESSAGE],
            "fields": {k: str(v)[:MAX_FIELD] for k, v in fields.items() if v is not None},
        }
        self._entries.append(entry)
        return entry

    def since(self, seq: int, limit: int = 500) -> list[Entry]:
        """The entries after ``seq``, oldest first, at most ``limit``."""
        return [e for e in self._entries if e["seq"] > seq][:max(limit, 0)]

    def clear(self) -> None:
        """Forget every entry; the sequence keeps growing (a reader's cursor stays valid)."""
        self._entries.clear()

    @property
    def last_seq(self) -> int:
        return self._seq
