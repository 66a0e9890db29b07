"""The ``cow`` storage plugin (entry point ``cube.storage: cow``)."""

from __future__ import annotations

from cube_core import Check, CoreSettings, StorageDriver, hookimpl

from cube_storage_cow.checks import doctor_checks
from cube_storage_cow.config import CowConfig
from cube_storage_cow.driver import CowStorage


class CowPlugin:
    """Template images, copy-on-write sandbox disks and snapshot layers on a local filesystem."""

    Config = CowConfig

    def __init__(self, config: CowConfig) -> None:
        self.config = config
        self._driver: CowStorage | None = None

    @hookimpl
    def cube_configure(self, settings: CoreSettings) -> None:
        """A node other than ``local`` keeps its storage under its own ``[core] state_dir``."""
        if self._driver is None:
            self.config = self.config.for_node(settings.node_id, settings.state_dir)

    @hookimpl
    def cube_storage_driver(self) -> StorageDriver:
        if self._driver is None:
            self._driver = CowStorage(self.config)
        return self._driver

    @hookimpl
    def cube_doctor_checks(self) -> list[Check]:
        return doctor_checks(self.config)
