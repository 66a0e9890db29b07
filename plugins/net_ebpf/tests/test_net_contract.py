"""The core's network driver contract, against the real driver."""

from __future__ import annotations

import pytest
from cube_core.testing.contract import NetworkContract

pytestmark = [pytest.mark.root, pytest.mark.ebpf]


class TestEbpfNetworkContract(NetworkContract):
    @pytest.fixture
    def driver(self, net_driver):
        return net_driver
