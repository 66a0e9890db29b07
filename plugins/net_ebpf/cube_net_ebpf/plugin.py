"""The ``ebpf`` network plugin (entry point ``cube.network: ebpf``)."""

from __future__ import annotations

from cube_core import Check, CoreSettings, NetworkDriver, hookimpl

from cube_net_ebpf.checks import doctor_checks
from cube_net_ebpf.config import EbpfNetConfig
from cube_net_ebpf.driver import EbpfNetwork


class EbpfNetPlugin:
    """Per-sandbox namespace + tap + veth + NAT, with the eBPF egress filter."""

    Config = EbpfNetConfig

    def __init__(self, config: EbpfNetConfig) -> None:
        self.config = config
        self._driver: EbpfNetwork | None = None

    @hookimpl
    def cube_configure(self, settings: CoreSettings) -> None:
        """Name this node's host-global resources after ``[core] node_id`` (options the operator
        set stay as set)."""
        if self._driver is None:
            self.config = self.config.for_node(settings.node_id)
            if self.config.ca_dir is None:
                self.config = self.config.model_copy(update={"ca_dir": settings.state_dir / "egress-ca"})

    @hookimpl
    def cube_network_driver(self) -> NetworkDriver:
        if self._driver is None:
            self._driver = EbpfNetwork(self.config)
        return self._driver

    @hookimpl
    def cube_doctor_checks(self) -> list[Check]:
        return doctor_checks(self.config)
