"""Sandbox records parsed once, for both state stores.

The node's heartbeat (every ``[cluster] heartbeat_s``) and sampler (every ``[core]
sample_interval_s``) read every live sandbox record, and most of them have not changed since the
last read. Parsing a record (``Sandbox.model_validate_json``, ~35 us for a ~3 KB record) was most
of what an idle node's agent spent its CPU on; a look-up by the record's body text costs ~1 us.

Keyed by the whole body, so a changed record is a miss (parsed, remembered) and nothing needs
invalidating; a body not read for a while falls out, oldest first, once more than twice the
longest list read (at least :data:`MIN_ENTRIES`) are held. The parsed models are shared between
callers: they are frozen, and no caller changes one in place (a change is ``evolve`` + ``put``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from cube_core.models import Sandbox

MIN_ENTRIES = 1024


class SandboxRecords:
    def __init__(self) -> None:
        self._by_body: dict[str, Sandbox] = {}
        self._limit = MIN_ENTRIES
        self._lock = threading.Lock()

    def parse(self, body: str) -> Sandbox:
        found = self._by_body.get(body)
        if found is None:
            found = Sandbox.model_validate_json(body)
            with self._lock:
                self._by_body[body] = found
                while len(self._by_body) > self._limit:
                    del self._by_body[next(iter(self._by_body))]
        return found

    def parse_all(self, bodies: Sequence[str]) -> list[Sandbox]:
        self._limit = max(self._limit, 2 * len(bodies))
        return [self.parse(b) for b in bodies]

    def __len__(self) -> int:
        return len(self._by_body)
