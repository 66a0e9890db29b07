"""Logs and metrics on real microVMs: the node samples the guest agent every [core] sample_interval_s
(5 s by default); the SDK's get_metrics() reads the history (start/end honoured), the logs routes show
each command's start and exit, team-scoped and kept after the sandbox ends."""

from __future__ import annotations

import time
from datetime import timedelta

import httpx
import pytest
from cube_e2e import CubeServer
from e2b import CommandExitException, Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


def logs(server: CubeServer, sandbox_id: str, key: str | None = None, **params: object) -> httpx.Response:
    return httpx.get(f"{server.url}/v2/sandboxes/{sandbox_id}/logs", params=params,
                     headers={"X-API-Key": key or server.key_a}, timeout=30)


def test_metrics_history_and_process_logs(e2b_env: CubeServer) -> None:
    sbx = Sandbox.create(template="base", timeout=300)
    try:
        assert sbx.commands.run("echo logs-e2e").stdout == "logs-e2e\n"
        with pytest.raises(CommandExitException):
            sbx.commands.run("exit 7")

        deadline = time.monotonic() + 90
        metrics = sbx.get_metrics()
        while len(metrics) < 3 and time.monotonic() < deadline:
            time.sleep(2)
            metrics = sbx.get_metrics()
        assert len(metrics) >= 3, metrics
        stamps = [m.timestamp for m in metrics]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)  # sampled over time, oldest first
        for m in metrics:
            assert m.cpu_count >= 1 and 0 <= m.cpu_used_pct <= 100 * m.cpu_count
            assert 0 < m.mem_used < m.mem_total and 0 < m.disk_used <= m.disk_total
        mid = metrics[1].timestamp
        assert [m.timestamp for m in sbx.get_metrics(start=mid, end=mid)] == [mid]
        assert [m.timestamp for m in sbx.get_metrics(end=metrics[0].timestamp)] == [metrics[0].timestamp]
        assert sbx.get_metrics(end=metrics[0].timestamp - timedelta(seconds=1)) == []
        later = sbx.get_metrics(start=metrics[1].timestamp)
        assert later[0].timestamp == metrics[1].timestamp and len(later) >= len(metrics) - 1

        entries: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            entries = logs(e2b_env, sbx.sandbox_id).json()["logs"]
            if sum(e["message"] == "process exited" for e in entries) >= 2:
                break
            time.sleep(1)
        started = [e["fields"]["cmd"] for e in entries if e["message"] == "process started"]  # type: ignore[index]
        exited = [(e["fields"]["exit_code"], e["level"]) for e in entries  # type: ignore[index]
                  if e["message"] == "process exited"]
        assert "/bin/bash -l -c echo logs-e2e" in started and "/bin/bash -l -c exit 7" in started, entries
        assert ("0", "info") in exited and ("7", "warn") in exited, entries
        newest_first = logs(e2b_env, sbx.sandbox_id, direction="backward", limit=2).json()["logs"]
        assert newest_first == entries[::-1][:2]
        assert logs(e2b_env, sbx.sandbox_id, key=e2b_env.key_b).status_code == 404  # another team's
    finally:
        sbx.kill()
    kept = logs(e2b_env, sbx.sandbox_id)
    assert kept.status_code == 200 and kept.json()["logs"][: len(entries)] == entries
