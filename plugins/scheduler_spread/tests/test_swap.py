"""binpack and spread are swapped by one line of plugins.toml: both loaded through the real plugin
host (stevedore entry points, options validated by each plugin's Config), the same three nodes,
different choices. Needs cube-scheduler-binpack installed too (the Makefile installs every plugin)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cube_core import ConfigError, NoCapacityError, Node, NodeStatus, SandboxSpec
from cube_core.config import load_config
from cube_core.testing.fakes import FAKE_CONFIG

NODES = [
    # fits, nearly full on memory: binpack's choice (keep empty nodes empty)
    Node(node_id="busy", cpu_total=4, memory_mb_total=16384, cpu_used=8, memory_mb_used=50_000),
    # fits, empty: spread's choice (most room left)
    Node(node_id="idle", cpu_total=4, memory_mb_total=16384),
    # the emptiest, but draining (takes no new sandboxes): neither may choose it
    Node(node_id="sick", cpu_total=64, memory_mb_total=262_144, status=NodeStatus.DRAINING),
]
SPEC = SandboxSpec(template_id="base", team_id="t", memory_mb=512, cpu_count=1)


def plugins_toml(tmp_path: Path, scheduler: str, options: str = "") -> Path:
    text = FAKE_CONFIG.format(state_dir=tmp_path / "state").replace(
        '[scheduler]\nplugin = "fake"', f'[scheduler]\nplugin = "{scheduler}"\n{options}')
    assert f'plugin = "{scheduler}"' in text
    path = tmp_path / f"plugins-{scheduler}.toml"
    path.write_text(text)
    return path


def place_with(plugin_host: Callable[..., Any], path: Path, nodes: list[Node]) -> tuple[str, str]:
    host = plugin_host(load_config(path))
    scheduler = host.hooks.scheduler()
    return type(scheduler).__module__, scheduler.place(SPEC, nodes).node_id


def test_binpack_and_spread_choose_different_nodes(plugin_host: Callable[..., Any], tmp_path: Path) -> None:
    before = [n.model_copy(deep=True) for n in NODES]
    assert place_with(plugin_host, plugins_toml(tmp_path, "binpack"), NODES) == (
        "cube_scheduler_binpack.plugin", "busy")
    assert place_with(plugin_host, plugins_toml(tmp_path, "spread"), NODES) == (
        "cube_scheduler_spread.plugin", "idle")
    assert NODES == before


def test_spread_options_come_from_plugins_toml(plugin_host: Callable[..., Any], tmp_path: Path) -> None:
    # 20 GiB fits only "idle", and only with the default memory overcommit (4x)
    big = SandboxSpec(template_id="base", team_id="t", memory_mb=20_000, cpu_count=1)
    default = plugin_host(load_config(plugins_toml(tmp_path, "spread")))
    assert default.hooks.scheduler().place(big, NODES).node_id == "idle"
    tight = plugin_host(load_config(plugins_toml(
        tmp_path, "spread", "options = { memory_overcommit = 1.0, reserved_memory_mb = 0 }")))
    with pytest.raises(NoCapacityError):
        tight.hooks.scheduler().place(big, NODES)


def test_unknown_spread_option_is_refused(plugin_host: Callable[..., Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="locality_bonus"):
        plugin_host(load_config(plugins_toml(tmp_path, "spread", "options = { locality = 0.5 }")))
