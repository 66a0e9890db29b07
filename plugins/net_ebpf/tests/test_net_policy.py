"""Phase 2: eBPF egress policy, DNS-based domain rules and audit, against a namespace playing
"the internet" (198.18.0.0/15; never a real outside address)."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import subprocess
import sys
import time

import nettools
import pytest
from cube_core import EgressRule, NetworkError, NetworkPolicy

pytestmark = [pytest.mark.root, pytest.mark.ebpf]

WEB = "198.18.0.10"
WEB2 = "198.18.0.20"
PRIVATE = "10.255.255.10"
REFUSED = errno.ECONNREFUSED


@pytest.fixture
async def sandbox(net_driver, guests):
    """A fresh slot with a configured guest; yields (nic, guest namespace); released after."""
    made = []

    async def make(policy=None, rules=()):
        policy = policy or NetworkPolicy()
        nic = await net_driver.allocate("pol", policy, rules)
        ns = guests.of(nic)
        nettools.configure_guest(ns)
        made.append(nic)
        return nic, ns

    yield make
    for nic in made:
        await net_driver.release(nic)


def _refused_fast(result, limit=0.5):
    return (not result["ok"]) and result["errno"] == REFUSED and result["s"] < limit


async def _events(driver, nic, kind="flow", wait=1.0):
    deadline = time.monotonic() + wait
    while True:
        events = [e for e in await driver.audit(nic) if e.get("kind") == kind]
        if events or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.05)


async def test_default_allows_internet_and_audits_the_flow(net_driver, sandbox):
    nic, ns = await sandbox()
    [r] = nettools.guest(ns, f"tcp={WEB}:80")
    assert r["ok"] and r["body"] == f"hello from {WEB}:80", r
    events = await _events(net_driver, nic)
    assert any(e["verdict"] == "allow" and e["dst"] == f"{WEB}:80" and e["proto"] == "tcp"
               and e["reason"] == "default_allow" for e in events), events


async def test_no_internet_access_denies_fast_with_rst_and_audits(net_driver, sandbox):
    nic, ns = await sandbox(NetworkPolicy(allow_internet_access=False))
    tcp, udp = nettools.guest(ns, f"tcp={WEB}:80", f"udp={WEB}:9999")
    assert _refused_fast(tcp), tcp
    # denied UDP gets ICMP "administratively prohibited": the socket errors at once
    assert not udp["ok"] and udp["errno"] in (errno.EHOSTUNREACH, REFUSED) and udp["s"] < 0.5, udp
    events = await _events(net_driver, nic)
    assert any(e["verdict"] == "deny" and e["dst"] == f"{WEB}:80" and e["reason"] == "default_deny"
               for e in events), events
    assert net_driver.stats()["rejects"] >= 2


async def test_cidr_and_port_rules_allow_beats_deny(sandbox):
    rules = (EgressRule(action="allow", target=f"{WEB}/32", protocol="tcp", port=8080),)
    nic, ns = await sandbox(NetworkPolicy(deny_out=(f"{WEB}/32",)), rules)
    deny80, allow8080, other = nettools.guest(ns, f"tcp={WEB}:80", f"tcp={WEB}:8080",
                                              f"tcp={WEB2}:80")
    assert _refused_fast(deny80), deny80
    assert allow8080["ok"] and allow8080["body"] == f"hello from {WEB}:8080", allow8080
    assert other["ok"], other


async def test_allow_list_with_deny_all(sandbox):
    nic, ns = await sandbox(NetworkPolicy(allow_out=(WEB,), deny_out=("0.0.0.0/0",)))
    ok, denied = nettools.guest(ns, f"tcp={WEB}:80", f"tcp={WEB2}:80")
    assert ok["ok"], ok
    assert _refused_fast(denied), denied


async def test_always_denied_ranges_stay_shut_whatever_the_rules_say(net_driver, sandbox,
                                                                     two_other):
    """No allow rule opens cloud metadata, private ranges, other sandboxes or loopback: one that
    lies inside such a range is refused, a wider one leaves them shut. The fake metadata server
    answers the host, so a way out would reach it."""
    with socket.create_connection((nettools.METADATA, 80), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert b"hello from 169.254.169.254:80" in b"".join(iter(lambda: conn.recv(200), b""))
    nic, ns = await sandbox()
    other = two_other
    targets = (f"tcp={PRIVATE}:80", f"tcp={nettools.METADATA}:80",
               f"tcp={other.guest_address}:18080", "tcp=127.0.0.1:80")
    results = nettools.guest(ns, *targets)
    for r in results[:3]:
        assert _refused_fast(r), results
    assert not results[3]["ok"]
    events = await _events(net_driver, nic)
    assert any(e["reason"] == "always_denied" and e["dst"] == f"{PRIVATE}:80" for e in events)
    for allow_out, bad in ((("169.254.169.254", "10.0.0.0/8"), 0), (("8.8.8.8", "192.168.0.0/16"), 1),
                           ((f"{other.guest_address}/32",), 0), (("fe80::/64",), 0)):
        with pytest.raises(NetworkError) as refused:
            await net_driver.update_policy(nic, NetworkPolicy(allow_out=allow_out))
        assert refused.value.fields["field"] == f"allow_out[{bad}]", refused.value
        assert "always-denied" in refused.value.message
        with pytest.raises(NetworkError):
            await net_driver.allocate("bad", NetworkPolicy(allow_out=allow_out))
    # the whole internet: the always-denied parts stay shut (10.255.255.10 is openable in this
    # session, its neighbour is not)
    await net_driver.update_policy(nic, NetworkPolicy(allow_out=("0.0.0.0/0", "0.0.0.0/1")))
    results = nettools.guest(ns, "tcp=10.255.255.11:80", *targets[1:3], f"tcp={WEB}:80")
    for r in results[:3]:
        assert _refused_fast(r), results
    assert results[3]["ok"], results


async def test_operator_opens_a_range_then_allow_out_reaches_it(net_driver, sandbox):
    """The session's driver has ``openable_ranges = ["10.255.255.10/32"]``: still denied by
    default, open to an allow rule naming it; its neighbour 10.255.255.11 is not."""
    assert net_driver.config.openable_ranges == (f"{PRIVATE}/32",)
    nic, ns = await sandbox()
    [r] = nettools.guest(ns, f"tcp={PRIVATE}:80")
    assert _refused_fast(r), r
    await net_driver.update_policy(nic, NetworkPolicy(allow_out=(f"{PRIVATE}/32",)))
    ok, neighbour = nettools.guest(ns, f"tcp={PRIVATE}:80", "tcp=10.255.255.11:80")
    assert ok["ok"] and ok["body"] == f"hello from {PRIVATE}:80", ok
    assert _refused_fast(neighbour), neighbour
    # a wider rule opens only the openable part of it
    await net_driver.update_policy(nic, NetworkPolicy(allow_out=("10.255.255.0/24",)))
    ok, neighbour = nettools.guest(ns, f"tcp={PRIVATE}:80", "tcp=10.255.255.11:80")
    assert ok["ok"] and _refused_fast(neighbour), (ok, neighbour)
    with pytest.raises(NetworkError):
        await net_driver.update_policy(nic, NetworkPolicy(allow_out=("10.255.255.11",)))


async def test_dns_answers_never_open_always_denied_ranges(net_driver, sandbox):
    """A name whose A record is the metadata address (DNS rebinding): the address is removed
    from the answer and never learned."""
    policy = NetworkPolicy(allow_out=("meta.example.test",), deny_out=("0.0.0.0/0",))
    nic, ns = await sandbox(policy)
    meta, direct = nettools.guest(ns, "dns=meta.example.test", f"tcp={nettools.METADATA}:80")
    assert meta["rcode"] == "NOERROR" and meta["ips"] == [], meta
    assert _refused_fast(direct), direct
    dns_events = await _events(net_driver, nic, kind="dns")
    assert any(e.get("removed_always_denied") == [nettools.METADATA] for e in dns_events), dns_events


@pytest.fixture
async def two_other(net_driver):
    nic = await net_driver.allocate("other", NetworkPolicy())
    yield nic
    await net_driver.release(nic)


async def test_domains_through_cube_resolver(net_driver, sandbox):
    policy = NetworkPolicy(allow_out=("api.example.test",), deny_out=("0.0.0.0/0",))
    nic, ns = await sandbox(policy)
    resolved_before = time.monotonic()
    api, web, evil, evil_ip, direct_dns = nettools.guest(
        ns, "dns=api.example.test", "tcp=198.18.1.30:80", "dns=evil.example.test",
        "tcp=198.18.1.31:80", "dns=api.example.test@198.18.0.53", timeout=1.0)
    assert api["ok"] and api["ips"] == ["198.18.1.30"] and api["ttls"] == [2], api
    assert web["ok"] and web["body"] == "hello from 198.18.1.30:80", web
    assert evil["rcode"] == "NXDOMAIN", evil
    assert _refused_fast(evil_ip), evil_ip
    assert not direct_dns["ok"], direct_dns  # only Cube's resolver answers a sandbox
    dns_events = await _events(net_driver, nic, kind="dns")
    assert {(e["name"], e["verdict"]) for e in dns_events} >= {
        ("api.example.test", "allow"), ("evil.example.test", "deny")}
    # the answer's TTL (2 s, min 1) + grace (0.5 s) bound the learned entry
    time.sleep(max(0.0, resolved_before + 3.0 - time.monotonic()))
    [expired] = nettools.guest(ns, "tcp=198.18.1.30:80")
    assert _refused_fast(expired), expired
    events = await _events(net_driver, nic)
    assert any(e["reason"] == "expired" for e in events), events
    again, web2 = nettools.guest(ns, "dns=api.example.test", "tcp=198.18.1.30:80")
    assert again["ok"] and web2["ok"], (again, web2)


async def test_names_resolve_by_default_and_denied_domain_gets_nxdomain(sandbox):
    rules = (EgressRule(action="deny", target="*.example.test"),)
    _nic, ns = await sandbox(NetworkPolicy(allow_out=("cdn.example.test",)), rules)
    cdn, api = nettools.guest(ns, "dns=cdn.example.test", "dns=api.example.test")
    assert cdn["ok"] and cdn["ips"] == [WEB2], cdn
    assert api["rcode"] == "NXDOMAIN", api


SLOW_DOWNLOAD = (
    "import socket,sys,time\n"
    "s=socket.create_connection((sys.argv[1],80),timeout=8)\n"
    "s.sendall(('GET /slow/'+sys.argv[2]+' HTTP/1.0\\r\\n\\r\\n').encode())\n"
    "d=s.recv(4096)\n"
    "print('flowing', flush=True)\n"
    "end='eof'\n"
    "try:\n"
    "    while True:\n"
    "        c=s.recv(4096)\n"
    "        if not c: break\n"
    "        d+=c\n"
    "except OSError as e:\n"
    "    end=type(e).__name__\n"
    "print(d.count(b'tick'), end, flush=True)\n")


def _slow_download(ns: str, host: str, seconds: float) -> subprocess.Popen[str]:
    """A download streaming a line every 0.2 s for ``seconds``; returns once it is flowing."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SLOW_DOWNLOAD, host,
                             str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "flowing\n"
    return proc


def _finished(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=15)
    ticks, end = out.split()
    return int(ticks), end


async def test_policy_change_revokes_only_the_flows_it_denies(net_driver, sandbox):
    nic, ns = await sandbox()
    # both flows are established and moving when the rules change
    denied, kept = _slow_download(ns, WEB, 2), _slow_download(ns, WEB2, 2)
    started = time.perf_counter()
    await net_driver.update_policy(nic, NetworkPolicy(deny_out=(f"{WEB}/32",)))
    update_ms = (time.perf_counter() - started) * 1000
    [new] = nettools.guest(ns, f"tcp={WEB}:80")
    assert _refused_fast(new), new
    ticks, end = _finished(denied)
    assert end == "ConnectionResetError" and ticks < 6, (ticks, end)  # cut at its next packet
    ticks, end = _finished(kept)
    assert end == "eof" and ticks >= 9, (ticks, end)  # ~10 ticks in 2 s: untouched
    events = await _events(net_driver, nic)
    revoked = [e for e in events if e["reason"] == "revoked"]
    assert revoked and {e["dst"] for e in revoked} == {f"{WEB}:80"}, events
    assert revoked[0]["rule"] == f"deny {WEB}/32", revoked
    print(f"update_policy took {update_ms:.2f} ms")


async def test_dns_ttl_expiry_revokes_established_flows(net_driver, sandbox):
    """api.example.test has a 2 s TTL (+0.5 s grace): a download from its address started
    within the TTL is cut when the learned entry expires and nobody resolved the name again."""
    nic, ns = await sandbox(NetworkPolicy(allow_out=("api.example.test",),
                                          deny_out=("0.0.0.0/0",)))
    [api] = nettools.guest(ns, "dns=api.example.test")
    assert api["ok"] and api["ttls"] == [2], api
    resolved = time.monotonic()
    download = _slow_download(ns, "198.18.1.30", 6)
    ticks, end = _finished(download)
    lasted = time.monotonic() - resolved
    assert end == "ConnectionResetError", (ticks, end)
    assert 2.3 < lasted < 4.0 and 8 <= ticks <= 20, (lasted, ticks)  # not the full 30 ticks
    events = await _events(net_driver, nic)
    assert any(e["reason"] == "revoked" and e["dst"] == "198.18.1.30:80" for e in events), events


async def test_unsolicited_inbound_is_dropped(net_driver, sandbox):
    nic, ns = await sandbox()
    responder = nettools.start_responder(ns, "guest", 18200)
    try:
        ok = nettools.probe(None, f"{nic.guest_address}:18200")
        assert all(r["ok"] for r in ok.values()), ok
        # the same port from a source that is not the slot's host address: a forged "outside"
        forged = subprocess.run(
            [sys.executable, "-c",
             "import socket\n"
             "s=socket.socket(); s.settimeout(1)\n"
             "s.setsockopt(socket.SOL_IP, 15, 1)\n"  # IP_FREEBIND
             "s.bind(('198.19.255.253', 0))\n"
             f"s.connect(('{nic.guest_address}', 18200)); print('connected')\n"],
            capture_output=True, text=True)
        assert "connected" not in forged.stdout, forged
    finally:
        nettools.stop(responder)
    events = await _events(net_driver, nic)
    assert any(e["reason"] == "inbound" for e in events), events


async def test_bad_targets_are_rejected(net_driver):
    with pytest.raises(NetworkError):
        await net_driver.allocate("bad", NetworkPolicy(allow_out=("not a host!",)))


async def test_filter_stays_attached_when_cube_dies(net_driver, guests):
    """A separate process builds a deny-all slot and is SIGKILLed: the filter keeps denying."""
    code = (
        "import asyncio, json, subprocess, sys\n"
        "from cube_core import NetworkPolicy\n"
        "from cube_net_ebpf import EbpfNetConfig, EbpfNetwork\n"
        "def guest(i):\n"
        "    subprocess.run(['ip','netns','del',f'ctg-{i}'],capture_output=True)\n"
        "    subprocess.run(['ip','netns','add',f'ctg-{i}'],check=True); return f'ctg-{i}'\n"
        "async def main():\n"
        "    d = EbpfNetwork(EbpfNetConfig(pool_size=0, dns=False), test_guest_netns=guest)\n"
        "    await d.start()\n"
        "    nic = await d.allocate('doomed', NetworkPolicy(allow_internet_access=False))\n"
        "    print(json.dumps(nic.model_dump()), flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        while line and not line.startswith("{"):  # skip log lines
            line = proc.stdout.readline()
        nic = json.loads(line)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    ns = f"ctg-{nic['data']['index']}"
    guests.created[nic["data"]["index"]] = ns
    try:
        nettools.configure_guest(ns)
        filters = nettools.sh("tc", "filter", "show", "dev", nic["data"]["host_if"], "ingress").stdout
        assert "sandbox_egress" in filters
        [r] = nettools.guest(ns, f"tcp={WEB}:80")
        assert _refused_fast(r), r
    finally:
        live = {s for s in net_driver._slots}
        await net_driver.sweep(live)
    assert nic["netns"] not in nettools.netns_list()
