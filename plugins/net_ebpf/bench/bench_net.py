"""Benchmarks of the ebpf network driver (root; under the host lock; not part of the test suite).

    flock /tmp/cube-host.lock .venv/bin/python plugins/net_ebpf/bench/bench_net.py [N]
    flock /tmp/cube-host.lock .venv/bin/python plugins/net_ebpf/bench/bench_net.py --throughput \
        [--runs 5] [--seconds 3] [--rate 300] [--max-conns 2000]

Slot operations (N slots, default 50), in milliseconds:
- slot_build: namespace + tap + veth + NAT + filter attach, one at a time (pool off);
- allocate_from_pool: ``allocate`` when a pre-built slot is waiting (rename + policy write);
- update_policy: rewriting a 20-rule policy of a live slot (map writes);
- release: ``release`` (namespace unmount; the kernel removes the links afterwards).

``--throughput``: traffic from a "guest" namespace behind a slot's tap0 (as the tests build it)
to a server on 198.18.0.10 in a test "internet" namespace (``tests/nettools.py``; never a real
outside address), over the whole slot path: tap0, NAT in the slot namespace, vg0, vh<index>,
host routing and NAT. The same slot is measured with the filter attached (policy: an allow rule
for the target among 20, then deny-all) and detached (the clsact qdiscs of vh<index>, tap0 and vg0
removed, as in a slot built with ``ebpf = false``), alternating, ``--runs`` times each:
- bulk: one TCP stream for ``--seconds``; Gbit/s = bytes the server received / time until the
  server's count came back;
- conn_rate: new TCP connections paced at ``--rate``/s (connect, 1-byte reply, close). Each is a
  new flow, so its SYN takes the verdict path (rule lookups, flow insert, audit event) rather
  than the flow table; latency = connect until the reply byte;
- conn_max: ``--max-conns`` of them back to back (at most ``--seconds``): the highest new-flow
  rate one client reaches.
Connections close from the server's side, so client ports are not held in TIME_WAIT; each still
leaves conntrack entries for 120 s (two NAT layers), which bounds how many a run may open.
The filter's packet counters are checked: they must move in every filtered run and stay still in
every baseline run. Prints a table (stderr) and JSON (stdout): median and p95 (nearest rank) of
per-run values (and of all connection latencies), and filter/baseline ratios of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cube_core import NetworkPolicy, NicHandle
from cube_core.log import configure_logging
from pyroute2 import IPRoute

from cube_net_ebpf import EbpfNetConfig, EbpfNetwork, netns
from cube_net_ebpf.addressing import NS_VETH, TAP_NAME
from cube_net_ebpf.bpffilter import EgressFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import nettools  # noqa: E402  (the tests' namespace scaffolding: guest + "internet")


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


# -- throughput ---------------------------------------------------------------------------------

TARGET = "198.18.0.10"
BULK_PORT, SHORT_PORT = 5201, 5202

SERVER = r"""
import socket, struct, sys, threading
addr = sys.argv[1]
def listener(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(1024); return s
def sink(c):
    buf, total = bytearray(1 << 20), 0
    with c:
        while True:
            n = c.recv_into(buf)
            if not n:
                break
            total += n
        c.sendall(struct.pack("!Q", total))
def bulk(s):
    while True:
        c, _ = s.accept(); threading.Thread(target=sink, args=(c,), daemon=True).start()
def short(s):
    while True:
        c, _ = s.accept(); c.sendall(b"k"); c.close()
b, sh = listener(int(sys.argv[2])), listener(int(sys.argv[3]))
threading.Thread(target=bulk, args=(b,), daemon=True).start()
print("ready", flush=True)
short(sh)
"""

CLIENT = r"""
import json, socket, struct, sys, time
mode, host, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
if mode == "bulk":
    buf = memoryview(bytearray(1 << 20))
    s = socket.create_connection((host, port), timeout=10)
    t0 = time.perf_counter(); end = t0 + seconds
    while time.perf_counter() < end:
        s.sendall(buf)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while len(got) < 8:
        chunk = s.recv(8 - len(got))
        if not chunk:
            raise SystemExit("server closed early")
        got += chunk
    elapsed = time.perf_counter() - t0
    print(json.dumps({"bytes": struct.unpack("!Q", got)[0], "s": elapsed}))
else:
    rate, count = float(sys.argv[5]), int(sys.argv[6])
    lat, fails, i = [], 0, 0
    t0 = time.perf_counter(); end = t0 + seconds
    while i < count:
        if rate:
            due = t0 + i / rate
            if due >= end:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        elif time.perf_counter() >= end:
            break
        i += 1
        t = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=2) as c:
                ok = c.recv(1) == b"k"
                done = time.perf_counter()
                c.recv(1)  # the server's FIN: it closes first, so no TIME_WAIT eats our ports
        except OSError:
            ok = False
        if ok:
            lat.append((done - t) * 1000)
        else:
            fails += 1
    print(json.dumps({"n": len(lat), "fails": fails, "s": time.perf_counter() - t0, "lat_ms": lat}))
"""


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _stats(values: list[float], digits: int = 3) -> dict[str, Any]:
    return {"median": round(statistics.median(values), digits), "p95": round(_p95(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits), "n": len(values)}


def _client(ns: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, *args],
                         capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


def _set_filter(driver: EbpfNetwork, nic: NicHandle, on: bool) -> None:
    """Attach or detach every program of the filter on this slot (host end, tap0, vg0)."""
    filt = driver.filter
    assert filt is not None and nic.netns is not None
    ifindex = int(nic.data["ifindex"])
    with IPRoute() as ipr:
        EgressFilter.detach(ipr, ifindex)
        if on:
            filt.attach(ipr, ifindex)
    with netns.entered(nic.netns), IPRoute() as ipr:
        tap, veth = ipr.link_lookup(ifname=TAP_NAME)[0], ipr.link_lookup(ifname=NS_VETH)[0]
        EgressFilter.detach(ipr, tap)
        EgressFilter.detach(ipr, veth)
        if on:
            filt.attach_ipv6_relay(ipr, tap, veth)


def _tc_programs(nic: NicHandle) -> str:
    return subprocess.run(["tc", "filter", "show", "dev", str(nic.data["host_if"]), "ingress"],
                          capture_output=True, text=True).stdout


async def throughput(runs: int, seconds: float, rate: float, max_conns: int) -> dict[str, Any]:
    guests: list[str] = []

    def guest_ns(index: int) -> str:
        name = f"ctb-{index}"
        nettools.del_netns(name)
        nettools.add_netns(name)
        guests.append(name)
        return name

    load_before = os.getloadavg()
    policy = NetworkPolicy(allow_out=(f"{TARGET}/32", *(f"198.18.{k}.0/24" for k in range(100, 119))),
                           deny_out=("0.0.0.0/0",))
    modes: dict[str, Callable[[], tuple[str, ...]]] = {
        "bulk": lambda: ("bulk", TARGET, str(BULK_PORT), str(seconds)),
        "conn_rate": lambda: ("conn", TARGET, str(SHORT_PORT), str(seconds), str(rate), "1000000"),
        "conn_max": lambda: ("conn", TARGET, str(SHORT_PORT), str(seconds), "0", str(max_conns)),
    }
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {c: {m: [] for m in modes} for c in ("filter", "baseline")}
    counters: dict[str, list[int]] = {"filter": [], "baseline": []}
    with nettools.internet("ctbinet", "ctbinet0") as inet:
        server = subprocess.Popen(["ip", "netns", "exec", inet, sys.executable, "-c", SERVER, TARGET,
                                   str(BULK_PORT), str(SHORT_PORT)],
                                  stdout=subprocess.PIPE, text=True)
        driver = EbpfNetwork(EbpfNetConfig(pool_size=0, dns=False), test_guest_netns=guest_ns)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            await driver.start()
            nic = await driver.allocate("bench", policy)
            try:
                ns = guests[-1]
                nettools.configure_guest(ns)
                _client(ns, "bulk", TARGET, str(BULK_PORT), "0.5")  # warm-up: neighbours, caches
                _client(ns, "conn", TARGET, str(SHORT_PORT), "0.5", "0", "200")
                for i in range(runs):
                    for config in (("filter", "baseline") if i % 2 == 0 else ("baseline", "filter")):
                        await asyncio.to_thread(_set_filter, driver, nic, config == "filter")
                        assert ("sandbox_egress" in _tc_programs(nic)) == (config == "filter")
                        before = driver.stats()["allow_pkts"]
                        for mode, args in modes.items():
                            raw[config][mode].append(_client(ns, *args()))
                        counters[config].append(driver.stats()["allow_pkts"] - before)
            finally:
                await asyncio.to_thread(_set_filter, driver, nic, True)
                await driver.release(nic)
        finally:
            await driver.close()
            nettools.stop(server)
            for name in guests:
                nettools.del_netns(name)
    # the counters prove which runs were filtered: every filtered run counted its packets
    assert all(c > 0 for c in counters["filter"]) and not any(counters["baseline"]), counters

    results: dict[str, Any] = {}
    for config, by_mode in raw.items():
        bulk = [r["bytes"] * 8 / r["s"] / 1e9 for r in by_mode["bulk"]]
        paced = by_mode["conn_rate"]
        closed = by_mode["conn_max"]
        results[config] = {
            "bulk_gbit_s": _stats(bulk),
            "conn_rate_per_s": _stats([r["n"] / r["s"] for r in paced], 1),
            "conn_rate_latency_ms": _stats([x for r in paced for x in r["lat_ms"]]),
            "conn_max_per_s": _stats([r["n"] / r["s"] for r in closed], 1),
            "conn_max_latency_ms": _stats([x for r in closed for x in r["lat_ms"]]),
            "failed_connections": sum(r["fails"] for r in paced + closed),
            "filter_allow_pkts_per_run": counters[config],
            "per_run": {"bulk_gbit_s": [round(x, 3) for x in bulk],
                        "conn_rate_per_s": [round(r["n"] / r["s"], 1) for r in paced],
                        "conn_rate_median_ms": [round(statistics.median(r["lat_ms"]), 3) for r in paced],
                        "conn_max_per_s": [round(r["n"] / r["s"], 1) for r in closed]},
        }
    ratios = {key: round(results["filter"][key]["median"] / results["baseline"][key]["median"], 3)
              for key in ("bulk_gbit_s", "conn_rate_latency_ms", "conn_max_per_s", "conn_max_latency_ms")}
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "cpu": _cpu_model()},
            "params": {"runs": runs, "seconds": seconds, "rate_per_s": rate,
                       "conn_max_connections": max_conns, "target": TARGET,
                       "policy": "allow target (1 of 20 allow rules), deny 0.0.0.0/0"},
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            **results, "ratio_filter_to_baseline": ratios}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def table(result: dict[str, Any]) -> str:
    rows = [("bulk TCP, Gbit/s", "bulk_gbit_s"),
            (f"paced {result['params']['rate_per_s']:g} conn/s: achieved/s", "conn_rate_per_s"),
            ("  latency ms (connect->reply)", "conn_rate_latency_ms"),
            ("back-to-back conn/s", "conn_max_per_s"),
            ("  latency ms", "conn_max_latency_ms")]
    lines = [f"{'':38} {'filter med / p95':>20} {'baseline med / p95':>20} {'ratio':>6}"]
    for label, key in rows:
        f, b = result["filter"][key], result["baseline"][key]
        ratio = result["ratio_filter_to_baseline"].get(key)
        lines.append(f"{label:38} {f['median']:>10g} / {f['p95']:<9g} {b['median']:>10g} / {b['p95']:<9g} "
                     f"{ratio if ratio is not None else '':>6}")
    return "\n".join(lines)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("n", nargs="?", type=int, default=50, help="slots for the slot benchmarks")
    parser.add_argument("--throughput", action="store_true", help="throughput with and without the filter")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=300.0, help="paced new connections per second")
    parser.add_argument("--max-conns", type=int, default=2000,
                        help="connections per back-to-back run (each leaves conntrack entries in "
                             "TIME_WAIT for 120 s in two NAT layers: keep the total well below "
                             "nf_conntrack_max and the 64k NAT ports per destination)")
    args = parser.parse_args()
    configure_logging(level="warning")  # logs to stderr; stdout is the JSON
    if args.throughput:
        result = asyncio.run(throughput(args.runs, args.seconds, args.rate, args.max_conns))
        print(table(result), file=sys.stderr)
    else:
        result = asyncio.run(main(args.n))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    cli()
