"""Test scaffolding built with the ``ip`` tool and subprocesses, independent of the code under
test: guest namespaces, a responder "guest", probes, and a namespace playing "the internet"."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

GUEST_ADDR = "169.254.0.21"
GATEWAY = "169.254.0.22"
GUEST_MAC = "52:54:00:00:00:21"

RESPONDER = r"""
import socket, sys, threading
token, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, peer = s.accept()
        c.sendall(f"{token} {port} {peer[0]}\n".encode()); c.close()
for p in ports[1:]:
    threading.Thread(target=serve, args=(p,), daemon=True).start()
print("ready", flush=True)
serve(ports[0])
"""

PROBE = r"""
import json, socket, sys, time
out = []
for target in sys.argv[2:]:
    host, port = target.rsplit(":", 1)
    t = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=float(sys.argv[1])) as s:
            s.settimeout(float(sys.argv[1]))
            data = s.recv(200).decode().strip()
        out.append({"target": target, "ok": True, "data": data})
    except OSError as e:
        out.append({"target": target, "ok": False, "error": type(e).__name__, "errno": e.errno,
                    "s": round(time.monotonic() - t, 3)})
print(json.dumps(out))
"""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # errors="replace": nft 1.0.6 prints a set of interface wildcards (node local's vh0*..vh9*)
    # as bytes that are not UTF-8; the kernel matches them right (test_net_nodenames)
    return subprocess.run(args, capture_output=True, text=True, errors="replace", check=check)


def netns_list() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()]


def links() -> list[str]:
    return [json_link["ifname"] for json_link in json.loads(sh("ip", "-j", "link").stdout)]


def add_netns(name: str) -> None:
    sh("ip", "netns", "add", name)


def del_netns(name: str) -> None:
    sh("ip", "netns", "del", name, check=False)


def configure_guest(ns: str) -> None:
    """The guest side of a test slot: eth0 as the VM's NIC would be configured by ip=."""
    for cmd in (["link", "set", "lo", "up"],
                ["link", "set", "eth0", "address", GUEST_MAC],
                ["addr", "add", f"{GUEST_ADDR}/30", "dev", "eth0"],
                ["link", "set", "eth0", "up"],
                ["route", "add", "default", "via", GATEWAY]):
        sh("ip", "-n", ns, *cmd)


def start_responder(ns: str | None, token: str, *ports: int) -> subprocess.Popen[str]:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    proc = subprocess.Popen([*prefix, sys.executable, "-c", RESPONDER, token, *map(str, ports)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def probe(ns: str | None, *targets: str, timeout: float = 1.0) -> dict[str, dict[str, object]]:
    """TCP-connect to each ``host:port`` from namespace ``ns`` (None: the host); return results."""
    prefix = ["ip", "netns", "exec", ns] if ns else []
    out = sh(*prefix, sys.executable, "-c", PROBE, str(timeout), *targets).stdout
    return {r["target"]: r for r in json.loads(out)}


def wait_until(pred: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return bool(pred())  # type: ignore[operator]


METADATA = "169.254.169.254"
"""A fake cloud metadata server in the test internet: the host's route to the real one is
replaced for the session and put back after (:func:`hijack_route`)."""
INET_ADDRS = ("198.18.0.10", "198.18.0.20", "198.18.0.53", "198.18.1.30", "198.18.1.31",
              "10.255.255.10", "10.255.255.11", METADATA)


@contextlib.contextmanager
def hijack_route(prefix: str, via: str, dev: str):
    """Route ``prefix`` to ``via`` while the block runs, then restore the host's own route to it
    (if it had one): test traffic to ``prefix`` never reaches a real service."""
    saved = sh("ip", "route", "show", "exact", prefix).stdout.split()
    sh("ip", "route", "replace", prefix, "via", via, "dev", dev)
    try:
        yield
    finally:
        sh("ip", "route", "del", prefix, check=False)
        if saved:
            sh("ip", "route", "replace", prefix, *saved[1:], check=False)


@contextlib.contextmanager
def internet(name: str = "ctinet", host_if: str = "ctinet0"):
    """A namespace playing "the internet" on 198.18.0.0/15 (plus one private address,
    10.255.255.10), routed from the host, with HTTP and DNS servers (inet_servers.py)."""
    del_netns(name)
    sh("ip", "link", "del", host_if, check=False)
    add_netns(name)
    server = None
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", name)
        sh("ip", "addr", "add", "198.19.255.253/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", name, "addr", "add", "198.19.255.254/30", "dev", "eth0")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        sh("ip", "-n", name, "link", "set", "lo", "up")
        for addr in INET_ADDRS:
            sh("ip", "-n", name, "addr", "add", f"{addr}/32", "dev", "lo")
        sh("ip", "route", "replace", "198.18.0.0/16", "via", "198.19.255.254", "dev", host_if)
        sh("ip", "route", "replace", "10.255.255.10/31", "via", "198.19.255.254", "dev", host_if)
        server = subprocess.Popen(["ip", "netns", "exec", name, sys.executable,
                                   str(Path(__file__).with_name("inet_servers.py"))],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        with hijack_route(f"{METADATA}/32", "198.19.255.254", host_if):
            yield name
    finally:
        if server is not None:
            stop(server)
        sh("ip", "route", "del", "198.18.0.0/16", check=False)
        sh("ip", "route", "del", "10.255.255.10/31", check=False)
        sh("ip", "link", "del", host_if, check=False)
        del_netns(name)


GUEST_PY = r"""
import json, socket, sys, time
import dns.message, dns.query, dns.rcode
def tcp(target, timeout):
    host, port = target.rsplit(":", 1)
    t = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return {"ok": True, "body": data.decode(errors="replace").split("\r\n\r\n", 1)[-1].strip(),
                "s": round(time.monotonic() - t, 3)}
    except OSError as e:
        return {"ok": False, "error": type(e).__name__, "errno": e.errno, "s": round(time.monotonic() - t, 3)}
def udp(target, timeout):
    host, port = target.rsplit(":", 1)
    t = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.connect((host, int(port)))
        s.send(b"x" * 12)
        s.recv(512)
        return {"ok": True, "s": round(time.monotonic() - t, 3)}
    except OSError as e:
        return {"ok": False, "error": type(e).__name__, "errno": e.errno, "s": round(time.monotonic() - t, 3)}
    finally:
        s.close()
def resolve(name, server, timeout):
    try:
        r = dns.query.udp(dns.message.make_query(name, "A"), server, timeout=timeout)
    except Exception as e:
        return {"ok": False, "error": type(e).__name__}
    ips = [rd.address for rr in r.answer if rr.rdtype == 1 for rd in rr]
    ttls = [rr.ttl for rr in r.answer]
    return {"ok": r.rcode() == 0 and bool(ips), "rcode": dns.rcode.to_text(r.rcode()), "ips": ips, "ttls": ttls}
out = []
timeout = float(sys.argv[1])
for op in sys.argv[2:]:
    kind, _, arg = op.partition("=")
    if kind == "tcp":
        out.append(tcp(arg, timeout))
    elif kind == "udp":
        out.append(udp(arg, timeout))
    elif kind == "dns":
        name, _, server = arg.partition("@")
        out.append(resolve(name, server or "169.254.0.22", timeout))
    elif kind == "sleep":
        time.sleep(float(arg)); out.append({"ok": True})
print(json.dumps(out))
"""


def guest(ns: str, *ops: str, timeout: float = 2.0) -> list[dict[str, object]]:
    """Run operations from a guest namespace: ``tcp=host:port`` (HTTP GET), ``udp=host:port``,
    ``dns=name[@server]``, ``sleep=s``; one result dict per operation."""
    out = sh("ip", "netns", "exec", ns, sys.executable, "-c", GUEST_PY, str(timeout), *ops).stdout
    return json.loads(out)


def start_guest(ns: str, *ops: str, timeout: float = 10.0) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", GUEST_PY,
                             str(timeout), *ops], stdout=subprocess.PIPE, text=True)
