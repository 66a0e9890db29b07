from __future__ import annotations

from collections.abc import Callable

import pytest

from cube_core import PluginConflictError, PluginLoadError, PluginMissingError, Scheduler, hookimpl
from cube_core._host import PluginHost
from cube_core.config import LoadedConfig
from cube_core.testing.fakes import FirstFitScheduler


def test_loads_only_named_plugins(plugin_host: Callable[..., PluginHost]) -> None:
    host = plugin_host()
    assert sorted(host.plugins) == ["api:fake", "network:fake", "scheduler:fake", "storage:fake", "vmm:fake"]


def test_second_provider_conflicts(plugin_host: Callable[..., PluginHost]) -> None:
    host = plugin_host()

    class Another:
        @hookimpl
        def cube_scheduler(self) -> Scheduler:
            return FirstFitScheduler()

    host.register(Another(), "another")
    with pytest.raises(PluginConflictError, match="scheduler"):
        host.check()


def test_missing_provider(cube_config_factory: Callable[..., LoadedConfig]) -> None:
    host = PluginHost(cube_config_factory())
    with pytest.raises(PluginMissingError, match="vmm"):
        host.check()


def test_misspelled_hookimpl_fails_at_startup(plugin_host: Callable[..., PluginHost]) -> None:
    host = plugin_host()

    class Typo:
        @hookimpl
        def cube_sandbox_craeted(self) -> None: ...

    host.register(Typo(), "typo")
    with pytest.raises(PluginLoadError, match="cube_sandbox_craeted"):
        host.check()


def test_registering_a_class_is_refused(plugin_host: Callable[..., PluginHost]) -> None:
    with pytest.raises(PluginLoadError, match="forgot the"):
        plugin_host().register(FirstFitScheduler, "cls")
