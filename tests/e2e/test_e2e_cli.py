"""The operator CLI against the real server with real microVMs: a sandbox the SDK created shows in
``cube sandbox ls --json`` and ``inspect``, ``cube sandbox exec`` runs a command in its guest
through the guest agent, ``logs`` shows the guest's events, and after ``cube sandbox kill`` the
SDK's next call says the sandbox is not found."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from cube_e2e import CUBE, CubeServer
from e2b import NotFoundException, Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


def cube(server: CubeServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CUBE, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "E2B_API_KEY": server.key_a, "CUBE_URL": server.url,
                               "CUBE_CONFIG": str(server.config), "COLUMNS": "250"})


def test_sandbox_commands_on_a_real_guest(e2b_env: CubeServer) -> None:
    sbx = Sandbox.create(template="base", timeout=300)
    try:
        listed = cube(e2b_env, "sandbox", "ls", "--json")
        assert listed.returncode == 0, listed.stderr
        row = next(json.loads(line) for line in listed.stdout.splitlines()
                   if json.loads(line)["sandbox_id"] == sbx.sandbox_id)
        assert row["state"] == "running" and row["team_id"]
        detail = json.loads(cube(e2b_env, "sandbox", "inspect", sbx.sandbox_id, "--json").stdout)
        assert detail["isolation"] in ("kvm", "tcg") and "envd_access_token" not in detail
        # [vmm.options] guest_aslr = "auto": off under TCG (each new process is translated again
        # when its addresses are new), the kernel's default under KVM
        aslr = sbx.commands.run("cat /proc/sys/kernel/randomize_va_space").stdout.strip()
        assert aslr == ("0" if detail["isolation"] == "tcg" else "2"), (detail["isolation"], aslr)

        ran = cube(e2b_env, "sandbox", "exec", sbx.sandbox_id, "--", "sh", "-c", "echo cli-$((6*7)); exit 3")
        assert ran.returncode == 3 and ran.stdout == "cli-42\n", (ran.returncode, ran.stdout, ran.stderr)

        sbx.commands.run("echo for-the-log")
        deadline, entries = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            logs = cube(e2b_env, "sandbox", "logs", sbx.sandbox_id, "--json")
            entries = [json.loads(line) for line in logs.stdout.splitlines()]
            if any("for-the-log" in json.dumps(e) for e in entries):
                break
            time.sleep(2)
        assert any("for-the-log" in json.dumps(e) for e in entries), entries

        killed = cube(e2b_env, "sandbox", "kill", sbx.sandbox_id)
        assert killed.returncode == 0, killed.stderr
        with pytest.raises(NotFoundException):
            sbx.get_info()
    finally:
        try:
            sbx.kill()
        except NotFoundException:
            pass
