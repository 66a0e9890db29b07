"""``cube bench`` comes from the cube-bench distribution (entry point ``cube.cli: bench``); without
it, or with a broken one, ``cube bench ...`` says what is missing and exits 2 (the other commands work)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Runs the real CLI in a fresh interpreter whose entry points in cube.cli are replaced by ``EPS``.
_RUN = """
import importlib.metadata as md, sys
real = md.entry_points
EPS = [md.EntryPoint(name, value, "cube.cli") for name, value in {eps!r}]
md.entry_points = lambda **kw: EPS if kw.get("group") == "cube.cli" else real(**kw)
from cube_core.cli import app
app(sys.argv[1:], prog_name="cube")
"""


def _cube(eps: list[tuple[str, str]], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _RUN.format(eps=eps), *args], capture_output=True, text=True,
                          timeout=60)


def test_installed_bench_adds_its_commands() -> None:
    result = _cube([("bench", "cube_bench.cli:app")], "bench", "--help")
    assert result.returncode == 0, result.stderr
    assert "restore" in result.stdout and "create" in result.stdout


@pytest.mark.parametrize(("eps", "reason"), [
    ([], "cube-bench is not installed"),
    ([("bench", "cube_bench_gone.cli:app")], "cannot load cube_bench_gone.cli:app"),
])
def test_missing_or_broken_bench_says_what_to_install(eps: list[tuple[str, str]], reason: str) -> None:
    result = _cube(eps, "bench", "create", "--n", "3")
    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert "cube bench needs the cube-bench distribution" in message and reason in message
    assert "pip install cube-bench" in message
    other = _cube(eps, "kernel", "--help")  # the rest of the CLI still works
    assert other.returncode == 0 and "build" in other.stdout
