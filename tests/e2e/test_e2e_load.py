"""A burst of creates on a small host: 50 concurrent ``AsyncSandbox.create`` through the real SDK
against real microVMs. They queue (the warm pool serves the first, the rest wait in arrival order
for a VM start) and none fails; every sandbox works; nothing is left running afterwards."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest
from cube_e2e import CubeServer
from e2b import AsyncSandbox

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

BURST = 50


async def _burst(server: CubeServer) -> tuple[list[float], list[AsyncSandbox], list[BaseException]]:
    started = time.perf_counter()

    async def one() -> tuple[float, AsyncSandbox]:
        # retries=0: a refused create must show up as a failure, not be retried away
        sbx = await AsyncSandbox.create(template="base", timeout=600, request_timeout=600, retries=0)
        return (time.perf_counter() - started) * 1000, sbx

    results = await asyncio.gather(*(one() for _ in range(BURST)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    ok = [r for r in results if not isinstance(r, BaseException)]
    return [ms for ms, _ in ok], [sbx for _, sbx in ok], errors


def _live_ids(server: CubeServer) -> set[str]:
    r = httpx.get(f"{server.url}/v2/sandboxes", headers={"X-API-Key": server.key_a}, timeout=30,
                  params={"limit": 100})
    r.raise_for_status()
    return {s["sandboxID"] for s in r.json()}


def test_fifty_concurrent_creates_queue_and_none_fails(e2b_env: CubeServer) -> None:
    before = _live_ids(e2b_env)
    failed_before = e2b_env.log.read_text().count("create failed")

    async def scenario() -> None:
        latencies, sandboxes, errors = await _burst(e2b_env)
        try:
            assert not errors, [repr(e) for e in errors[:5]]
            assert len({s.sandbox_id for s in sandboxes}) == BURST
            assert {s.sandbox_id for s in sandboxes} <= _live_ids(e2b_env)
            ran = await asyncio.gather(*(s.commands.run("cat /proc/sys/kernel/random/boot_id")
                                         for s in sandboxes))
            assert all(r.exit_code == 0 for r in ran)
            ordered = sorted(latencies)
            print(f"{BURST} concurrent creates: first {ordered[0]:.0f} ms, p50 {statistics.median(ordered):.0f} ms, "
                  f"p95 {ordered[int(0.95 * (BURST - 1))]:.0f} ms, last {ordered[-1]:.0f} ms")
        finally:
            await asyncio.gather(*(s.kill() for s in sandboxes), return_exceptions=True)

    asyncio.run(scenario())
    assert _live_ids(e2b_env) == before
    assert e2b_env.log.read_text().count("create failed") == failed_before
