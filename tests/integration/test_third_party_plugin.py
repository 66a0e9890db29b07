"""A third-party scheduler plugin, packaged and installed in a temp dir, replaces the first-party
one by changing one line of plugins.toml; switching back restores it. No core change needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cube_core.testing.fakes import FAKE_CONFIG

PLUGIN_SRC = '''
from __future__ import annotations
import os
from cube_core import Scheduler, hookimpl, NoCapacityError
from pydantic import BaseModel, ConfigDict


class RoundRobinConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    log: str


class RoundRobin(Scheduler):
    def __init__(self, log: str) -> None:
        self.log, self.turn = log, 0

    def place(self, spec, nodes):
        if not nodes:
            raise NoCapacityError(cpu=spec.cpu_count, memory_mb=spec.memory_mb)
        node = nodes[self.turn % len(nodes)]
        self.turn += 1
        with open(self.log, "a") as f:
            f.write(f"placed {spec.template_id} on {node.node_id}\\n")
        return node


class RoundRobinPlugin:
    Config = RoundRobinConfig

    def __init__(self, config: RoundRobinConfig) -> None:
        self.scheduler = RoundRobin(config.log)

    @hookimpl
    def cube_scheduler(self):
        return self.scheduler
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "cube-scheduler-roundrobin"
version = "1.2.3"
dependencies = []

[project.entry-points."cube.scheduler"]
roundrobin = "cube_rr:RoundRobinPlugin"

[tool.setuptools]
py-modules = ["cube_rr"]
'''

DRIVE = '''
import asyncio, sys
from pathlib import Path
from cube_core._host import PluginHost
from cube_core.config import load_config
from cube_core.embedded import Embedded
from cube_core.models import SandboxSpec
from cube_core.store import SqliteStore

async def main():
    cfg = load_config(Path(sys.argv[1]))
    cube = Embedded(PluginHost(cfg).load(), SqliteStore(Path(sys.argv[2])))
    await cube.start()
    await cube.agent.ensure_templates(("base",))
    sb = await cube.service.create(SandboxSpec(template_id="base", team_id="t"))
    scheduler = cube.service.scheduler
    print(type(scheduler).__module__, type(scheduler).__name__, sb.state.value)
    await cube.stop()

asyncio.run(main())
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("thirdparty")
    pkg = root / "src"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "cube_rr.py").write_text(PLUGIN_SRC)
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(pkg)], check=True, capture_output=True, text=True)
    assert list(target.glob("cube_scheduler_roundrobin-1.2.3.dist-info"))
    return target


def _config(tmp_path: Path, scheduler: str, options: str = "", name: str = "") -> Path:
    text = FAKE_CONFIG.format(state_dir=tmp_path / "state").replace(
        '[scheduler]\nplugin = "fake"', f'[scheduler]\nplugin = "{scheduler}"\n{options}')
    path = tmp_path / f"plugins-{scheduler}{name}.toml"
    path.write_text(text)
    return path


def _run(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


def test_third_party_scheduler_swaps_in_and_out(site: Path, tmp_path: Path) -> None:
    log = tmp_path / "placements.log"
    rr = _config(tmp_path, "roundrobin", f'options = {{ log = "{log}" }}')
    cube = str(Path(sys.executable).with_name("cube"))

    listed = _run(site, cube, "plugins", "--config", str(rr))
    row = next(line for line in listed.stdout.splitlines() if "roundrobin" in line)
    assert "cube-scheduler-roundrobin" in row and "1.2.3" in row and "yes" in row

    assert _run(site, cube, "config", "check", "--config", str(rr)).returncode == 0
    bad = _config(tmp_path, "roundrobin", "options = { lgo = 'x' }", name="-bad")
    checked = _run(site, cube, "config", "check", "--config", str(bad))
    assert checked.returncode == 2 and "'lgo'" in checked.stderr

    used = _run(site, sys.executable, "-c", DRIVE, str(rr), str(tmp_path / "rr.db"))
    assert used.returncode == 0, used.stderr
    assert used.stdout.splitlines()[-1].split() == ["cube_rr", "RoundRobin", "running"]
    assert log.read_text() == "placed base on local\n"

    back = _config(tmp_path, "binpack")
    restored = _run(site, sys.executable, "-c", DRIVE, str(back), str(tmp_path / "bp.db"))
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.splitlines()[-1].split() == ["cube_scheduler_binpack.plugin", "BinpackScheduler", "running"]
    assert log.read_text() == "placed base on local\n"  # the third-party plugin is no longer called

    without_site = subprocess.run([cube, "config", "check", "--config", str(rr)], capture_output=True, text=True)
    assert without_site.returncode == 2 and "no plugin 'roundrobin' in cube.scheduler" in without_site.stderr


def test_import_error_of_a_plugin_is_reraised(tmp_path: Path) -> None:
    target = tmp_path / "site"
    dist = target / "cube_broken-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cube-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cube.scheduler]\nbroken = cube_broken_mod:Plugin\n")
    (target / "cube_broken_mod.py").write_text("import module_that_does_not_exist_anywhere\n")
    cfg = _config(tmp_path, "broken")
    result = _run(target, str(Path(sys.executable).with_name("cube")), "config", "check", "--config", str(cfg))
    assert result.returncode == 2
    assert "ModuleNotFoundError" in result.stderr and "module_that_does_not_exist_anywhere" in result.stderr
