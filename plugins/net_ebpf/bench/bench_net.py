"""Benchmarks of the ebpf network driver (run as root; not part of the test suite).

    python plugins/net_ebpf/bench/bench_net.py [N]

- slot_build: namespace + tap + veth + NAT + filter attach, one at a time (pool off);
- allocate_from_pool: ``allocate`` when a pre-built slot is waiting (rename + policy write);
- update_policy: rewriting a 20-rule policy of a live slot (map writes);
- release: ``release`` (namespace unmount; the kernel removes the links afterwards).
Prints JSON (milliseconds) and the host load, since the numbers depend on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time

from cube_core import NetworkPolicy

from cube_net_ebpf import EbpfNetConfig, EbpfNetwork


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median_ms": round(statistics.median(ordered), 3),
            "p90_ms": round(ordered[max(0, int(len(ordered) * 0.9) - 1)], 3),
            "max_ms": round(ordered[-1], 3), "n": len(ordered)}


def _policy(i: int) -> NetworkPolicy:
    return NetworkPolicy(allow_out=tuple(f"198.18.{(i + k) % 250}.0/24" for k in range(20)),
                         deny_out=("0.0.0.0/0",))


async def main(n: int) -> dict[str, object]:
    load_before = os.getloadavg()
    driver = EbpfNetwork(EbpfNetConfig(pool_size=0, dns=False))
    await driver.start()
    nics, release = [], []
    try:
        for i in range(n):
            nics.append(await driver.allocate(f"bench{i}", NetworkPolicy()))
        build = list(driver.setup_ms[-n:])
        update = []
        for i in range(n):
            t = time.perf_counter()
            await driver.update_policy(nics[i % len(nics)], _policy(i))
            update.append((time.perf_counter() - t) * 1000)
    finally:
        for nic in nics:
            t = time.perf_counter()
            await driver.release(nic)
            release.append((time.perf_counter() - t) * 1000)
        await driver.close()

    pooled = EbpfNetwork(EbpfNetConfig(pool_size=1, dns=False))
    await pooled.start()
    from_pool: list[float] = []
    try:
        for i in range(min(n, 20)):
            while not pooled._pool:  # wait for the refill (not timed)
                await asyncio.sleep(0.005)
            t = time.perf_counter()
            nic = await pooled.allocate(f"pool{i}", NetworkPolicy())
            from_pool.append((time.perf_counter() - t) * 1000)
            await pooled.release(nic)
    finally:
        await pooled.close()
    return {"loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "slot_build": _summary(build), "allocate_from_pool": _summary(from_pool),
            "update_policy_20_rules": _summary(update), "release": _summary(release)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)), indent=1))
