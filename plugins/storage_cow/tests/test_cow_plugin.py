"""The plugin object, its config model, its entry point, and the small building blocks."""

from __future__ import annotations

import asyncio
import importlib.metadata
import threading
import time
from pathlib import Path

import pydantic
import pytest
from cube_core import RootfsRecipe, StorageDriver, StorageError, TemplateNotFoundError

import cube_storage_cow.rootfs as rootfs_mod
from cube_storage_cow import BASE, CODE_INTERPRETER, CowConfig, CowPlugin, CowStorage, recipe_for
from cube_storage_cow.commands import Cancelled, run
from cube_storage_cow.inroot import resolve_in_root, write_file


def test_entry_point_loads_the_plugin():
    eps = importlib.metadata.entry_points(group="cube.storage", name="cow")
    assert [ep.load() for ep in eps] == [CowPlugin]


def test_config_defaults_and_forbids_unknown_options():
    cfg = CowConfig()
    assert (cfg.root, cfg.cache, cfg.reflink, cfg.image_size_mb) == (
        Path("/var/lib/cube/storage"), Path("/var/cache/cube"), "auto", 2048)
    with pytest.raises(pydantic.ValidationError):
        CowConfig.model_validate({"roots": "/x"})
    with pytest.raises(pydantic.ValidationError):
        CowConfig.model_validate({"reflink": "sometimes"})


def test_hook_returns_one_driver(tmp_path: Path):
    plugin = CowPlugin(CowPlugin.Config(root=tmp_path))
    driver = plugin.cube_storage_driver()
    assert isinstance(driver, StorageDriver) and isinstance(driver, CowStorage)
    assert plugin.cube_storage_driver() is driver and driver.root == tmp_path
    assert CowStorage().settings.guest_src.name in ("guest", "guest-src")


def test_builtin_recipes():
    assert recipe_for("base") is BASE and not BASE.interpreter and BASE.source == "debootstrap"
    assert recipe_for("code-interpreter-v1") is CODE_INTERPRETER and CODE_INTERPRETER.interpreter
    with pytest.raises(TemplateNotFoundError):
        recipe_for("nope")


def test_resolve_in_root_never_leaves_the_root(tmp_path: Path):
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "abs").symlink_to("/usr/lib")
    (root / "up").symlink_to("../../../../..")
    (root / "loop").symlink_to("loop")
    assert resolve_in_root(root, "/lib/x") == root / "usr/lib/x"
    assert resolve_in_root(root, "/abs/x") == root / "usr/lib/x"
    assert resolve_in_root(root, "/up/etc/passwd") == root / "etc/passwd"
    assert resolve_in_root(root, "/../../etc/passwd") == root / "etc/passwd"
    assert resolve_in_root(root, "/lib", follow_final=False) == root / "lib"
    with pytest.raises(StorageError, match="too many levels"):
        resolve_in_root(root, "/loop/x")
    victim = tmp_path / "victim"
    victim.write_text("host\n")
    (root / "etc").mkdir()
    (root / "etc/hostname").symlink_to(victim)
    write_file(root, "/etc/hostname", b"cube\n")
    assert victim.read_text() == "host\n" and (root / "etc/hostname").read_bytes() == b"cube\n"
    assert not (root / "etc/hostname").is_symlink()


def test_run_reports_failures_and_can_be_cancelled():
    assert run(["sh", "-c", "echo out; echo err >&2"]) == "out\nerr\n"
    with pytest.raises(StorageError, match="exited with 3: boom"):
        run(["sh", "-c", "echo boom; exit 3"])
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        run(["sh", "-c", "sleep 30 & wait"], cancel=cancel)
    assert time.monotonic() - started < 5


async def test_cancelling_a_build_kills_it(tmp_path: Path, make_driver, monkeypatch):
    """A cancelled build_rootfs stops its worker (here a slow cp of a 'dir' source) and cleans up."""
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    driver = make_driver()
    await driver.start()
    real_populate = rootfs_mod._populate

    def slow_populate(p, tree, settings, progress, cancel, lines):
        run(["sleep", "30"], cancel=cancel)
        real_populate(p, tree, settings, progress, cancel, lines)

    monkeypatch.setattr(rootfs_mod, "_populate", slow_populate)
    task = asyncio.create_task(driver.build_rootfs(RootfsRecipe(name="slow", source="dir", path=src)))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 5
    assert list((driver.root / "build").iterdir()) == []
    assert driver.images() == []


def test_loaded_by_the_plugin_host_from_plugins_toml(plugin_host, cube_config_factory):
    host = plugin_host(cube_config_factory(storage="cow"))
    driver = host.hooks.storage_driver()
    assert isinstance(driver, CowStorage)
    assert driver.root.name == "storage"


def test_doctor_checks(tmp_path: Path) -> None:
    from cube_storage_cow.checks import check_space, check_tools, doctor_checks

    missing = check_tools({"mkfs.ext4": "e2fsprogs", "no-such-image-tool": "cube-missing"})
    assert missing.status == "fail" and "no-such-image-tool" in missing.detail and "cube-missing" in missing.hint
    assert "mkfs.ext4" not in missing.detail
    assert check_space(tmp_path / "not" / "yet", min_free_gb=0).detail.endswith(str(tmp_path))
    assert check_space(tmp_path, min_free_gb=1e9).status == "warn"
    assert [c.name for c in doctor_checks(CowConfig(root=tmp_path))] == ["image-tools", "storage-space"]
