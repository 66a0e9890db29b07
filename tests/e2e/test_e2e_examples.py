"""The README's quickstart and the examples run verbatim against a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cube_e2e import CubeServer

pytestmark = [pytest.mark.vm, pytest.mark.e2e]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, server: CubeServer, cwd: Path) -> str:
    env = {**os.environ, **server.env()}
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_hello(cube_server: CubeServer, tmp_path: Path) -> None:
    out = run_example("hello.py", cube_server, tmp_path)
    assert "5050 computed on kernel" in out


def test_commands_example(cube_server: CubeServer, tmp_path: Path) -> None:
    out = run_example("commands.py", cube_server, tmp_path)
    assert "hi from an env var" in out and "listening: 200" in out and "you said: hello" in out


def test_files_example(cube_server: CubeServer, tmp_path: Path) -> None:
    out = run_example("files.py", cube_server, tmp_path)
    assert "['main.py']" in out and "written from the host" in out


def test_chart_example(cube_server: CubeServer, tmp_path: Path) -> None:
    out = run_example("chart.py", cube_server, tmp_path)
    assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")
    assert "chart type: line" in out


def test_pause_resume_example(cube_server: CubeServer, tmp_path: Path) -> None:
    out = run_example("pause_resume.py", cube_server, tmp_path)
    assert out.strip() == "same boot: True | sleep still running: True"
