from __future__ import annotations

from cube_e2e import cube_server, e2b_env  # noqa: F401 - fixtures
