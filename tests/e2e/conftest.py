from __future__ import annotations

from cluster_e2e import cube_cluster  # noqa: F401 - fixture
from cube_e2e import cube_server, e2b_env  # noqa: F401 - fixtures
