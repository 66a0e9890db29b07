"""An older SDK generation (e2b 2.45.1, legacy endpoints) against the same server, from its own venv."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cube_e2e import CubeServer

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

LEGACY = "2.45.1"
VENV = Path(os.environ.get("CUBE_CACHE", "/var/cache/cube")) / "venvs" / f"e2b-{LEGACY}"

SCRIPT = r'''
import sys, time, uuid
import e2b
from e2b import Sandbox

assert e2b.__version__ if hasattr(e2b, "__version__") else True
tag = uuid.uuid4().hex
sbx = Sandbox.create(template="base", timeout=120, metadata={"tag": tag}, envs={"LEGACY": "yes"})
try:
    out = sbx.commands.run("echo $LEGACY $(uname -r)")
    assert out.stdout.startswith("yes "), out
    sbx.files.write("/home/user/legacy.txt", "from 2.45")
    assert sbx.files.read("/home/user/legacy.txt") == "from 2.45"
    listed = [s.sandbox_id for s in Sandbox.list(query=e2b.SandboxQuery(metadata={"tag": tag})).next_items()]
    assert listed == [sbx.sandbox_id], listed
    sbx.set_timeout(300)
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    bg = sbx.commands.run("sleep 600", background=True)
    sbx.pause()
    again = Sandbox.connect(sbx.sandbox_id)
    assert bg.pid in [p.pid for p in again.commands.list()]
finally:
    sbx.kill()
assert not sbx.is_running()
print("LEGACY-OK")
'''


@pytest.fixture(scope="module")
def legacy_python() -> Path:
    python = VENV / "bin" / "python"
    marker = VENV / ".complete"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"e2b=={LEGACY}"], check=True, timeout=600)
        marker.touch()
    return python


def test_legacy_sdk_generation(cube_server: CubeServer, legacy_python: Path, tmp_path: Path) -> None:
    version = subprocess.run([str(legacy_python), "-c", "import importlib.metadata as m; print(m.version('e2b'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == LEGACY
    script = tmp_path / "legacy.py"
    script.write_text(SCRIPT)
    result = subprocess.run([str(legacy_python), str(script)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **cube_server.env()})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "LEGACY-OK" in result.stdout
    log = cube_server.log.read_text()
    assert '"POST /sandboxes ' in log or "POST /sandboxes HTTP" in log  # the legacy create endpoint was used
