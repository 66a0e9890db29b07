"""The built-in templates' login profile spawns nothing, and still does what Debian's stock one does.

The stock files are the host's own Debian ``base-files`` copies; they are sourced by the real bash and
dash, with ``id`` and ``mesg`` shadowed by scripts that record each call.
"""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
from pathlib import Path

import pytest

from cube_storage_cow.login import quiet_profiles

STOCK_PROFILE = Path("/usr/share/base-files/profile")
STOCK_ROOT_PROFILE = Path("/usr/share/base-files/dot.profile")

pytestmark = pytest.mark.skipif(not (STOCK_PROFILE.is_file() and STOCK_ROOT_PROFILE.is_file()
                                     and shutil.which("dash")), reason="needs Debian base-files and dash")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    (root / "root").mkdir()
    shutil.copy(STOCK_PROFILE, root / "etc/profile")
    shutil.copy(STOCK_ROOT_PROFILE, root / "root/.profile")
    return root


@pytest.fixture
def spies(tmp_path: Path) -> Path:
    """A PATH directory whose ``id`` and ``mesg`` log their calls to ``calls`` and act like the real ones."""
    bin_dir = tmp_path / "spy-bin"
    bin_dir.mkdir()
    for name in ("id", "mesg"):
        real = shutil.which(name)
        assert real, name
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho {name} >> "{tmp_path}/calls"\nexec {real} "$@"\n')
        script.chmod(0o755)
    return bin_dir


def _source(shell: str, file: Path, spies: Path, *, stdin: int = subprocess.DEVNULL) -> tuple[str, list[str]]:
    calls = spies.parent / "calls"
    calls.unlink(missing_ok=True)
    argv = [shell, "-c", f'. "{file}"; echo "$PATH"']
    out = subprocess.run(argv, env={"PATH": f"{spies}:/usr/bin:/bin", "HOME": str(file.parent)},
                         stdin=stdin, capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip(), calls.read_text().split() if calls.exists() else []


def test_stock_profile_spawns_id_and_mesg(tree: Path, spies: Path):
    """The baseline the rewrite removes: Debian's files fork+exec on every login shell."""
    _, calls = _source("bash", tree / "etc/profile", spies)
    assert calls == ["id"]
    _, calls = _source("bash", tree / "root/.profile", spies)
    assert calls == ["mesg"]


def test_rewritten_profile_spawns_nothing_in_bash_and_keeps_path(tree: Path, spies: Path):
    assert quiet_profiles(tree) == ["/etc/profile", "/root/.profile"]
    path, calls = _source("bash", tree / "etc/profile", spies)
    assert calls == []
    stock_path, _ = _source("bash", STOCK_PROFILE, spies)
    assert path == stock_path.replace(f"{spies}:", "")
    _, calls = _source("bash", tree / "root/.profile", spies)
    assert calls == []


def test_rewritten_profile_still_works_without_bash(tree: Path, spies: Path):
    """dash has no EUID: it falls back to ``id``, as before."""
    quiet_profiles(tree)
    path, calls = _source("dash", tree / "etc/profile", spies)
    assert calls == ["id"]
    assert path.startswith("/usr/local/")


def test_mesg_still_runs_on_a_terminal(tree: Path, spies: Path):
    quiet_profiles(tree)
    master, slave = pty.openpty()
    try:
        _, calls = _source("bash", tree / "root/.profile", spies, stdin=slave)
    finally:
        os.close(master)
        os.close(slave)
    assert calls == ["mesg"]


def test_files_without_the_stock_lines_are_left_alone(tree: Path):
    custom = "# mine\nmesg y\nPATH=/opt/bin:$PATH\n"
    (tree / "etc/profile").write_text(custom)
    (tree / "root/.profile").unlink()
    assert quiet_profiles(tree) == []
    assert (tree / "etc/profile").read_text() == custom
    assert quiet_profiles(tree) == []  # and the rewrite is idempotent
