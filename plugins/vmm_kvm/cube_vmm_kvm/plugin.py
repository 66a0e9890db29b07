"""The ``kvm`` VMM plugin (entry point ``cube.vmm: kvm``): configuration and hook wiring only."""

from __future__ import annotations

from cube_core import Check, CoreSettings, VmmDriver, hookimpl

from .checks import doctor_checks
from .config import KvmConfig
from .driver import KvmVmm


class KvmPlugin:
    """QEMU ``microvm`` backend: KVM where the host can run a stock guest, TCG emulation otherwise."""

    Config = KvmConfig

    def __init__(self, config: KvmConfig) -> None:
        self.config = config
        self.driver = KvmVmm(config)

    @hookimpl
    def cube_configure(self, settings: CoreSettings) -> None:
        """Give this node's VMs their own directories and cgroup (from ``[core] node_id``;
        options the operator set stay as set). Runs before the driver starts."""
        config = self.config.for_node(settings.node_id)
        if config != self.config:
            self.config = config
            self.driver = KvmVmm(config)

    @hookimpl
    def cube_vmm_driver(self) -> VmmDriver:
        return self.driver

    @hookimpl
    def cube_doctor_checks(self) -> list[Check]:
        return doctor_checks(self.config)
