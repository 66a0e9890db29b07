"""A guest that gives itself IPv6 (root in the guest can) is refused at once, never let out.

The guest namespace gets a global address and a default route via a link-local gateway, as in
``tests/e2e/test_e2e_network.py::test_ipv6_is_denied``. Its neighbour solicitation for the
gateway is answered by the filter (so no ~3 s neighbour discovery timeout), and its packets get
a RST (TCP) or ICMPv6 "administratively prohibited". The target exists in the test internet and
the host reaches it, so anything that got out would arrive there (an nftables counter there
counts every packet for it that did not come from the host).
"""

from __future__ import annotations

import asyncio
import errno
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import nettools
import pytest
from cube_core import NetworkPolicy

from cube_net_ebpf.addressing import TAP_MAC

pytestmark = [pytest.mark.root, pytest.mark.ebpf]

TARGET6 = "2001:db8:18::10"
HOST_SIDE6, INET_SIDE6 = "2001:db8:19::1", "2001:db8:19::2"
GUEST6 = "2001:db8:ffff:5::2"
GATEWAY6 = "fe80::5a:ff:fe00:1"  # the EUI-64 link-local of tap0's MAC; tap0 has no IPv6 at all
FAST_S = 0.5

SERVER6 = r"""
import socket, sys, threading
addr = sys.argv[1]
def tcp():
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 80)); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(b"hello\n"); c.close()
def udp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind((addr, 7777))
    while True:
        data, peer = s.recvfrom(512); s.sendto(data, peer)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
tcp()
"""

PROBE6 = r"""
import json, socket, sys, time
target, out = sys.argv[1], []
for kind in ("tcp", "udp"):
    t = time.monotonic()
    try:
        if kind == "tcp":
            socket.create_connection((target, 80), timeout=3).close()
        else:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(3)
            s.connect((target, 7777)); s.send(b"x"); s.recv(64)
        out.append({"kind": kind, "ok": True, "s": round(time.monotonic() - t, 3)})
    except OSError as e:
        out.append({"kind": kind, "ok": False, "errno": e.errno, "s": round(time.monotonic() - t, 3)})
print(json.dumps(out))
"""

# every packet for TARGET6 that does not come from the host, counted where it would arrive
COUNTER = f"""
table ip6 ctprobe {{
  chain pre {{
    type filter hook prerouting priority -300;
    ip6 daddr {TARGET6} ip6 saddr != {HOST_SIDE6} counter
  }}
}}
"""


class Internet6:
    def __init__(self, netns: str) -> None:
        self.netns = netns

    def foreign_packets(self) -> int:
        """Packets for the target that did not come from the host, since the fixture began."""
        out = nettools.sh("ip", "netns", "exec", self.netns, "nft", "-j", "list", "table", "ip6",
                          "ctprobe").stdout
        counters = [e["counter"] for rule in json.loads(out)["nftables"] if "rule" in rule
                    for e in rule["rule"]["expr"] if "counter" in e]
        assert len(counters) == 1, out
        return int(counters[0]["packets"])

    def host_reaches_target(self) -> None:
        """The target answers the host over TCP and UDP: a way out would arrive."""
        out = nettools.sh(sys.executable, "-c", PROBE6, TARGET6).stdout
        assert all(r["ok"] for r in json.loads(out)), out


@pytest.fixture(scope="module")
def internet6(internet: str) -> Iterator[Internet6]:
    """IPv6 for the test internet: TARGET6 (TCP :80, UDP :7777), routed from the host."""
    sh = nettools.sh
    sh("ip", "-n", internet, "-6", "addr", "add", f"{TARGET6}/128", "dev", "lo")
    sh("ip", "-n", internet, "-6", "addr", "add", f"{INET_SIDE6}/64", "dev", "eth0", "nodad")
    sh("ip", "-6", "addr", "add", f"{HOST_SIDE6}/64", "dev", "ctinet0", "nodad")
    sh("ip", "-6", "route", "replace", "2001:db8:18::/64", "via", INET_SIDE6)
    subprocess.run(["ip", "netns", "exec", internet, "nft", "-f", "-"], input=COUNTER, text=True,
                   check=True)
    server = subprocess.Popen(["ip", "netns", "exec", internet, sys.executable, "-c", SERVER6,
                               TARGET6], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        world = Internet6(internet)
        world.host_reaches_target()
        yield world
    finally:
        nettools.stop(server)
        sh("ip", "netns", "exec", internet, "nft", "delete", "table", "ip6", "ctprobe", check=False)
        sh("ip", "-6", "route", "del", "2001:db8:18::/64", check=False)
        sh("ip", "-6", "addr", "del", f"{HOST_SIDE6}/64", "dev", "ctinet0", check=False)
        sh("ip", "-n", internet, "-6", "addr", "del", f"{TARGET6}/128", "dev", "lo", check=False)
        sh("ip", "-n", internet, "-6", "addr", "del", f"{INET_SIDE6}/64", "dev", "eth0",
           check=False)


@pytest.fixture
async def v6_guest(net_driver, guests):
    """A slot whose guest configured IPv6 itself: a global address and a default route."""
    made = []

    async def make(policy: NetworkPolicy):
        nic = await net_driver.allocate("v6", policy)
        made.append(nic)
        ns = guests.of(nic)
        nettools.configure_guest(ns)
        nettools.sh("ip", "-n", ns, "-6", "addr", "add", f"{GUEST6}/64", "dev", "eth0", "nodad")
        nettools.sh("ip", "-n", ns, "-6", "route", "add", "default", "via", GATEWAY6,
                    "dev", "eth0")
        return nic, ns

    yield make
    for nic in made:
        await net_driver.release(nic)


def _probe(ns: str) -> dict[str, dict[str, object]]:
    out = nettools.sh("ip", "netns", "exec", ns, sys.executable, "-c", PROBE6, TARGET6).stdout
    return {r["kind"]: r for r in json.loads(out)}


async def _ipv6_events(driver, nic) -> list[dict[str, object]]:
    deadline = time.monotonic() + 2
    while True:
        events = [e for e in await driver.audit(nic)
                  if e.get("kind") == "flow" and e.get("ethertype") == "0x86dd"]
        if len(events) >= 2 or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.05)


async def test_self_configured_ipv6_is_refused_fast(net_driver, v6_guest, internet6):
    nic, ns = await v6_guest(NetworkPolicy())
    before = net_driver.stats()
    results = _probe(ns)
    tcp, udp = results["tcp"], results["udp"]
    # TCP gets a RST, UDP ICMPv6 "administratively prohibited" (EACCES on the connected socket)
    assert not tcp["ok"] and tcp["errno"] == errno.ECONNREFUSED and tcp["s"] < FAST_S, results
    assert not udp["ok"] and udp["errno"] == errno.EACCES and udp["s"] < FAST_S, results
    assert internet6.foreign_packets() == 0
    internet6.host_reaches_target()  # still there: the guest was refused, the target was not down
    after = net_driver.stats()
    assert after["nd_answers"] > before["nd_answers"], (before, after)
    assert after["rejects"] >= before["rejects"] + 2, (before, after)
    # the guest resolved its gateway to tap0's MAC, from the filter's advertisement
    neigh = json.loads(nettools.sh("ip", "-n", ns, "-6", "-j", "neigh", "show", GATEWAY6).stdout)
    assert [n.get("lladdr") for n in neigh] == [TAP_MAC], neigh
    # duplicate address detection of the guest's own link-local address was not answered
    addrs = nettools.sh("ip", "-n", ns, "-6", "addr", "show", "dev", "eth0").stdout
    assert "fe80::" in addrs and "dadfailed" not in addrs, addrs
    events = await _ipv6_events(net_driver, nic)
    assert {(e["verdict"], e["reason"], e.get("proto"), e.get("dst_port")) for e in events} >= {
        ("deny", "not_ipv4", "tcp", 80), ("deny", "not_ipv4", "udp", 7777)}, events


async def test_ipv6_allowed_by_policy_still_has_no_way_out(v6_guest, internet6):
    """With an IPv6 allow rule the filter passes the frames, but slots have no IPv6 datapath:
    nothing arrives (and, with nobody answering neighbour discovery, the guest waits)."""
    _, ns = await v6_guest(NetworkPolicy(allow_out=("::/0",)))
    results = _probe(ns)
    assert not results["tcp"]["ok"] and not results["udp"]["ok"], results
    assert internet6.foreign_packets() == 0


CONNECT6 = r"""
import json, socket, sys, time
out = []
for target in sys.argv[1:]:
    t = time.monotonic()
    try:
        socket.create_connection((target, 80), timeout=0.5).close()
        out.append({"ok": True})
    except OSError as e:
        out.append({"ok": False, "error": type(e).__name__, "errno": e.errno,
                    "s": round(time.monotonic() - t, 3)})
print(json.dumps(out))
"""


async def test_ipv6_rules_open_only_what_they_name(net_driver, v6_guest, internet6):
    """allow_out names one IPv6 address and a deny rule another: the named one is passed by the
    filter (it then goes nowhere: no IPv6 datapath, so the connect times out), everything else
    is refused at once, with the deny rule or as not allowed."""
    denied, unnamed = "2001:db8:18::20", "2001:db8:18::30"
    nic, ns = await v6_guest(NetworkPolicy(allow_out=(TARGET6,), deny_out=(denied,)))
    out = nettools.sh("ip", "netns", "exec", ns, sys.executable, "-c", CONNECT6, TARGET6, denied,
                      unnamed, "fe80::1%eth0", "::ffff:169.254.169.254").stdout
    passed, by_rule, not_named, link_local, mapped = json.loads(out)
    assert passed["error"] == "TimeoutError", passed  # let through, not refused
    for result in (by_rule, not_named):
        assert result["errno"] == errno.ECONNREFUSED and result["s"] < FAST_S, out
    assert not link_local["ok"] and not mapped["ok"], out
    events = await _ipv6_events(net_driver, nic)
    seen = {(e["verdict"], e["reason"], e.get("rule")) for e in events}
    assert ("allow", "rule", f"allow {TARGET6}") in seen, events
    assert ("deny", "deny_rule", f"deny {denied}") in seen, events
    assert ("deny", "not_ipv4", None) in seen, events
    assert internet6.foreign_packets() == 0
