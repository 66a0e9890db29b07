"""A restart of `cube serve` (the node agent) while sandboxes run: they are all still usable after."""

from __future__ import annotations

import signal

import httpx
import pytest
from cube_e2e import CubeServer
from e2b import Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


def test_sandboxes_survive_a_restart(cube_server: CubeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in cube_server.env().items():
        monkeypatch.setenv(name, value)
    sandboxes = [Sandbox.create(template="base", timeout=600) for _ in range(5)]
    try:
        for i, sbx in enumerate(sandboxes):
            sbx.files.write("/home/user/who.txt", str(i))
            sbx.commands.run("sleep 3600", background=True)
        boot_ids = [s.commands.run("cat /proc/sys/kernel/random/boot_id").stdout for s in sandboxes]

        cube_server.stop(signal.SIGTERM)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{cube_server.url}/health", timeout=2)
        cube_server.start()

        for i, sbx in enumerate(sandboxes):
            again = Sandbox.connect(sbx.sandbox_id)
            assert again.files.read("/home/user/who.txt") == str(i)
            assert again.commands.run("cat /proc/sys/kernel/random/boot_id").stdout == boot_ids[i]
            assert "sleep 3600" in again.commands.run("ps -eo args").stdout
    finally:
        for sbx in sandboxes:
            try:
                sbx.kill()
            except Exception:
                pass
