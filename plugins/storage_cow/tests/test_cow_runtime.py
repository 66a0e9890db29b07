"""The agent runtime bundle for images without python3 (:mod:`cube_storage_cow.runtime`)."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from cube_core import RootfsRecipe, TemplateBuildError

from cube_storage_cow import runtime

SHARED_CACHE = Path("/var/cache/cube")
GUEST = Path(__file__).resolve().parents[3] / "guest"


def busybox_tree(root: Path) -> Path:
    """A root with a static busybox only: no libc, no python3."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "env", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    return root


async def test_a_tree_without_bin_sh_is_refused(tmp_path: Path, make_driver) -> None:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/passwd").write_text("root:x:0:0::/root:/bin/false\n")
    with pytest.raises(TemplateBuildError, match="no /bin/sh"):
        await make_driver(agent_runtime=True).build_rootfs(RootfsRecipe(name="nosh", source="dir", path=src))


@pytest.mark.slow
@pytest.mark.root
def test_the_agent_runs_on_the_bundle_in_a_tree_without_libc(tmp_path: Path) -> None:
    tree = busybox_tree(tmp_path / "tree")
    assert not runtime.usable_python(tree)
    lines: list[str] = []
    runtime.install(tree, cache_dir=SHARED_CACHE, mirror=None, cancel=threading.Event(), log_lines=lines,
                    progress=lambda _s, _f: None)
    assert any("agent runtime" in line for line in lines), lines
    assert not (tree / "usr/bin/python3").exists() and not (tree / "lib").exists()  # nothing outside /opt/cube
    shutil.copytree(GUEST / "cube_guest", tree / "opt/cube/guest/cube_guest")
    # what cube-init runs, then what a process the agent spawns sees
    script = ('import os, subprocess, aiohttp, cube_guest.agent\n'
              'from cube_guest.__main__ import drop_runtime_env\n'
              'drop_runtime_env(os.environ)\n'
              'print(subprocess.run(["/bin/env"], capture_output=True, text=True).stdout)')
    rt = runtime.RUNTIME_DIR
    out = subprocess.run(["chroot", tree, "/bin/env", "-i", "PATH=/bin", f"CUBE_RUNTIME={rt}", f"PYTHONHOME={rt}",
                          f"PYTHONPATH=/opt/cube/guest:{rt}/lib/python3/dist-packages",
                          f"{rt}/lib64/ld.so", "--library-path", f"{rt}/lib64", f"{rt}/bin/python3", "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["PATH=/bin"], out.stdout
