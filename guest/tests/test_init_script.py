"""Static checks of the VM init script (it is PID 1; it cannot run on the host)."""

from __future__ import annotations

import subprocess
from pathlib import Path

INIT = Path(__file__).resolve().parent.parent / "init" / "cube-init"


def test_init_is_valid_posix_sh() -> None:
    subprocess.run(["sh", "-n", str(INIT)], check=True)
    assert INIT.stat().st_mode & 0o111


def test_init_starts_agent_and_reports() -> None:
    text = INIT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert "CUBE_USERSPACE_UP" in text
    assert 'PYTHONPATH="/opt/cube/guest' in text and "-m cube_guest" in text
    assert "runtime=/opt/cube/runtime" in text and "$runtime/lib64/ld.so --library-path" in text
    assert "ptmxmode=0666" in text and "cube.interpreter=" in text


def test_the_agent_drops_the_runtime_bundle_variables() -> None:
    """On the runtime bundle (images without python3) nothing the agent spawns may see it."""
    from cube_guest.__main__ import drop_runtime_env

    env = {"CUBE_RUNTIME": "/opt/cube/runtime", "PYTHONHOME": "/opt/cube/runtime",
           "PYTHONPATH": "/x", "PATH": "/bin"}
    drop_runtime_env(env)
    assert env == {"PATH": "/bin"}
    # the image's own python3: unchanged
    image_python = {"PYTHONPATH": "/opt/cube/guest", "PATH": "/bin"}
    drop_runtime_env(image_python)
    assert image_python == {"PYTHONPATH": "/opt/cube/guest", "PATH": "/bin"}
