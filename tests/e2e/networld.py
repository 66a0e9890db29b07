"""The world around a sandbox for the end-to-end network tests, built with the ``ip`` tool and
plain sockets, independent of the code under test:

* :class:`Internet`: a namespace playing "the internet" on 198.18.0.0/15 (plus one IPv6
  documentation address), routed from the host through a veth, with HTTP servers, a UDP echo
  server and an authoritative DNS server for ``example.test``. It also plays the cloud metadata
  service (169.254.169.254: the host's route to it points into the namespace while the world
  runs, and is put back after), HTTPS on 443 with a certificate of the world's own test CA
  (``Internet.ca_file``; for the names of :data:`TLS_NAMES`), and a private host
  (10.255.255.10, which the tests' operator config makes openable). Every request and query it
  gets is logged, so a test can show that a denied attempt never arrived. Nothing here ever
  sends a packet to a real outside address.
* :class:`HostService`: a TCP server on the host (all addresses) that counts connections.
* :class:`Slot`: a sandbox's network slot as the host sees it (namespace, addresses).
* :func:`guest`: run network probes inside a real guest through the E2B SDK.

Run as ``python networld.py serve LOG SERVER_PEM`` inside the namespace, this file is the servers.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INET_NS = "e2e-inet"
"""Not ``cube-*``: the network plugin sweeps namespaces of that shape it does not know."""
HOST_IF = "e2einet0"
HOST_SIDE = "198.19.255.253"
INET_SIDE = "198.19.255.254"
HOST_SIDE6 = "2001:db8:ffff::1"
INET_SIDE6 = "2001:db8:ffff::2"

WEB = "198.18.0.10"
CDN = "198.18.0.20"
DNS = "198.18.0.53"
API = "198.18.1.30"
EVIL = "198.18.1.31"
SVC = "198.18.1.40"
WEB6 = "2001:db8:18::10"
METADATA = "169.254.169.254"
PRIVATE = "10.255.255.10"
"""Openable by the operator in the tests' config; 10.255.255.11 next to it is not."""
PRIVATE_CLOSED = "10.255.255.11"
ADDRESSES = (WEB, CDN, DNS, API, EVIL, SVC, METADATA, PRIVATE, PRIVATE_CLOSED)
HIJACKED = (f"{METADATA}/32", "10.255.255.10/31")
"""Host routes pointed into the namespace while it runs (the host's own are put back after)."""

ZONE: dict[str, tuple[str, int]] = {
    "api.example.test.": (API, 2),        # short TTL: its address stops being allowed soon
    "evil.example.test.": (EVIL, 60),
    "cdn.example.test.": (CDN, 60),
    "a.svc.example.test.": (SVC, 60),
    "dual.example.test.": (CDN, 60),
    "meta.example.test.": (METADATA, 60),  # a name of the sandbox's choosing (DNS rebinding)
}
ZONE6: dict[str, tuple[str, int]] = {"dual.example.test.": (WEB6, 60)}
UDP_ECHO_PORT = 7777
TLS_NAMES = ("api.example.test", "cdn.example.test", "evil.example.test")
TEST_CA_NAME = "Cube e2e test internet CA"


def make_test_ca(workdir: Path) -> tuple[Path, Path]:
    """A CA (``test-ca.pem``) and one server certificate for :data:`TLS_NAMES` signed by it
    (``server.pem``: certificate then key), with ``cryptography`` (not the code under test)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TEST_CA_NAME)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAMES[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in TLS_NAMES]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, server_file = workdir / "test-ca.pem", workdir / "server.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_file, server_file


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=60)


# -- the servers inside the namespace -------------------------------------------------------------


def _serve(log_path: str, server_pem: str) -> None:  # pragma: no cover - runs inside the namespace
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    lock = threading.Lock()
    log_file = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def record(**event: Any) -> None:
        with lock:
            log_file.write(json.dumps({"t": time.time(), **event}) + "\n")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            host, port = self.connection.getsockname()[:2]
            record(kind="http", dst=host, port=port, path=self.path, src=self.client_address[0],
                   headers=dict(self.headers.items()))
            if self.path.startswith("/slow/"):
                seconds = float(self.path.split("/")[2])
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                start, i = time.monotonic(), 0
                while time.monotonic() - start < seconds:
                    self.wfile.write(b"tick %d\n" % i)
                    self.wfile.flush()
                    i += 1
                    time.sleep(0.2)
                self.close_connection = True
                return
            body = f"hello from {host}:{port}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server4(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client that went away (a guest killed mid-request) is not news

    class Server6(Server4):
        address_family = socket.AF_INET6

    def http(server_cls: type[ThreadingHTTPServer], addr: str, port: int) -> None:
        server_cls((addr, port), Handler).serve_forever()

    class TlsServer(Server4):
        def finish_request(self, request: Any, client_address: Any) -> None:
            # the handshake in the request's thread (a stuck client stalls only itself)
            try:
                request.settimeout(10)
                conn = tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
            try:
                super().finish_request(conn, client_address)
            finally:
                conn.close()

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(server_pem)

    def udp_echo(addr: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((addr, UDP_ECHO_PORT))  # one socket per address: replies come from it
        while True:
            data, peer = sock.recvfrom(4096)
            record(kind="udp", dst=addr, port=UDP_ECHO_PORT, data=data.decode(errors="replace"), src=peer[0])
            sock.sendto(data, peer)

    def dns_server() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((DNS, 53))
        while True:
            data, peer = sock.recvfrom(4096)
            try:
                query = dns.message.from_wire(data)
                question = query.question[0]
                name = str(question.name).lower()
                qtype = dns.rdatatype.to_text(question.rdtype)
                record(kind="dns", name=name.rstrip("."), qtype=qtype, src=peer[0])
                response = dns.message.make_response(query)
                response.flags |= dns.flags.AA
                if name in ZONE and question.rdtype == dns.rdatatype.A:
                    ip, ttl = ZONE[name]
                    response.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", ip))
                elif name in ZONE6 and question.rdtype == dns.rdatatype.AAAA:
                    ip, ttl = ZONE6[name]
                    response.answer.append(dns.rrset.from_text(name, ttl, "IN", "AAAA", ip))
                elif name not in ZONE:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                sock.sendto(response.to_wire(), peer)
            except Exception as exc:  # keep serving
                print("dns error", exc, file=sys.stderr, flush=True)

    threads = [threading.Thread(target=http, args=(Server4, "0.0.0.0", p), daemon=True)
               for p in (80, 8080)]
    threads.append(threading.Thread(target=http, args=(TlsServer, "0.0.0.0", 443), daemon=True))
    threads.append(threading.Thread(target=http, args=(Server6, WEB6, 80), daemon=True))
    threads += [threading.Thread(target=udp_echo, args=(addr,), daemon=True) for addr in ADDRESSES]
    threads.append(threading.Thread(target=dns_server, daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


# -- host side ------------------------------------------------------------------------------------


class Internet:
    """The "internet" namespace (``start``/``stop``). Start it before ``cube serve`` so that the
    host's side of the veth is among the host addresses Cube denies to sandboxes."""

    def __init__(self, workdir: Path) -> None:
        self.log = workdir / "internet.jsonl"
        self.ca_file, self.server_pem = make_test_ca(workdir)
        """The test CA of the world's HTTPS servers (trusted by Cube as ``upstream_ca_file``)."""
        self._server: subprocess.Popen[str] | None = None
        self._saved_routes: dict[str, list[str]] = {}

    def start(self) -> None:
        self.stop()
        self.log.write_text("")
        sh("ip", "netns", "add", INET_NS)
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", "eth0", "netns", INET_NS)
        sh("ip", "addr", "add", f"{HOST_SIDE}/30", "dev", HOST_IF)
        sh("ip", "-6", "addr", "add", f"{HOST_SIDE6}/64", "dev", HOST_IF, "nodad")
        sh("ip", "link", "set", HOST_IF, "up")
        sh("ip", "-n", INET_NS, "addr", "add", f"{INET_SIDE}/30", "dev", "eth0")
        sh("ip", "-n", INET_NS, "-6", "addr", "add", f"{INET_SIDE6}/64", "dev", "eth0", "nodad")
        sh("ip", "-n", INET_NS, "link", "set", "eth0", "up")
        sh("ip", "-n", INET_NS, "link", "set", "lo", "up")
        for addr in ADDRESSES:
            sh("ip", "-n", INET_NS, "addr", "add", f"{addr}/32", "dev", "lo")
        sh("ip", "-n", INET_NS, "-6", "addr", "add", f"{WEB6}/128", "dev", "lo")
        sh("ip", "-n", INET_NS, "-6", "route", "add", "default", "via", HOST_SIDE6)
        sh("ip", "route", "replace", "198.18.0.0/15", "via", INET_SIDE, "dev", HOST_IF)
        sh("ip", "-6", "route", "replace", "2001:db8:18::/48", "via", INET_SIDE6, "dev", HOST_IF)
        for prefix in HIJACKED:
            self._saved_routes[prefix] = sh("ip", "route", "show", "exact", prefix).stdout.split()
            sh("ip", "route", "replace", prefix, "via", INET_SIDE, "dev", HOST_IF)
        self._server = subprocess.Popen(
            ["ip", "netns", "exec", INET_NS, sys.executable, __file__, "serve", str(self.log),
             str(self.server_pem)],
            stdout=subprocess.PIPE, text=True)
        assert self._server.stdout is not None
        if self._server.stdout.readline().strip() != "ready":
            raise RuntimeError("the test internet's servers did not start")

    def stop(self) -> None:
        if self._server is not None:
            self._server.kill()
            self._server.wait()
            if self._server.stdout is not None:
                self._server.stdout.close()
            self._server = None
        sh("ip", "route", "del", "198.18.0.0/15", check=False)
        sh("ip", "-6", "route", "del", "2001:db8:18::/48", check=False)
        for prefix, saved in self._saved_routes.items():
            sh("ip", "route", "del", prefix, check=False)
            if saved:  # the host's own route to it, as it was
                sh("ip", "route", "replace", prefix, *saved[1:], check=False)
        self._saved_routes.clear()
        sh("ip", "link", "del", HOST_IF, check=False)
        sh("ip", "netns", "del", INET_NS, check=False)

    def events(self, **match: Any) -> list[dict[str, Any]]:
        """Logged requests/queries whose fields equal ``match`` (``path`` matches as a substring)."""
        out = []
        for line in self.log.read_text().splitlines():
            event = json.loads(line)
            path = match.get("path")
            if path is not None and path not in str(event.get("path", "")):
                continue
            if all(event.get(k) == v for k, v in match.items() if k != "path"):
                out.append(event)
        return out


class HostService:
    """A TCP server on every host address (``0.0.0.0:port``) that counts the connections it gets."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.peers: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer[0])
            with conn:
                conn.sendall(b"host secret\n")

    def close(self) -> None:
        self.sock.close()


def host_addresses() -> list[str]:
    """The host's own IPv4 addresses other than loopback and Cube's 100.64.0.0/10 links."""
    cgnat = ipaddress.IPv4Network("100.64.0.0/10")
    out = []
    for link in json.loads(sh("ip", "-j", "-4", "addr").stdout):
        for info in link.get("addr_info", []):
            addr = ipaddress.IPv4Address(info["local"])
            if not addr.is_loopback and addr not in cgnat:
                out.append(str(addr))
    return out


@dataclass(frozen=True)
class Slot:
    """A sandbox's network slot as found on the host."""

    netns: str
    host_if: str
    guest_address: str
    """The namespace end of the veth: the host reaches guest TCP ports here."""
    host_address: str
    """The host end of the veth (the host as the sandbox sees it)."""


def token(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


# -- inside the guest -----------------------------------------------------------------------------

GUEST_PROBE = r'''
import json, os, random, socket, struct, sys, time

def http(target, timeout):
    hostport, _, path = target.partition("/")
    host, port = hostport.rsplit(":", 1)
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    t = time.monotonic()
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, int(port)))
        s.sendall(f"GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
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
    finally:
        s.close()

def udp(target, timeout):
    hostport, _, payload = target.partition("/")
    host, port = hostport.rsplit(":", 1)
    t = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.connect((host, int(port)))
        s.send(payload.encode() or b"x")
        data = s.recv(4096)
        return {"ok": True, "data": data.decode(errors="replace"), "s": round(time.monotonic() - t, 3)}
    except OSError as e:
        return {"ok": False, "error": type(e).__name__, "errno": e.errno, "s": round(time.monotonic() - t, 3)}
    finally:
        s.close()

def dns(arg, timeout):
    """A raw DNS query (no resolver library in the guest): rcode and answers with their TTLs."""
    name, _, server = arg.partition("@")
    name, _, qtype = name.partition(":")
    qtype = {"A": 1, "AAAA": 28}[qtype or "A"]
    qid = random.randrange(65536)
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack("!HH", qtype, 1)
    t = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.connect((server or "169.254.0.22", 53))
        s.send(q)
        r = s.recv(4096)
    except OSError as e:
        return {"ok": False, "error": type(e).__name__, "errno": e.errno, "s": round(time.monotonic() - t, 3)}
    finally:
        s.close()
    rcode = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}.get(r[3] & 15, str(r[3] & 15))
    ancount = struct.unpack("!H", r[6:8])[0]
    i = 12
    while r[i]:
        i += r[i] + 1
    i += 5
    answers = []
    for _ in range(ancount):
        if r[i] & 0xC0 == 0xC0:
            i += 2
        else:
            while r[i]:
                i += r[i] + 1
            i += 1
        rtype, _cls, ttl, rdlen = struct.unpack("!HHIH", r[i:i + 10])
        rdata = r[i + 10:i + 10 + rdlen]
        i += 10 + rdlen
        if rtype == 1:
            answers.append([socket.inet_ntop(socket.AF_INET, rdata), ttl])
        elif rtype == 28:
            answers.append([socket.inet_ntop(socket.AF_INET6, rdata), ttl])
    return {"ok": rcode == "NOERROR" and bool(answers), "rcode": rcode, "answers": answers,
            "s": round(time.monotonic() - t, 3)}

RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}

def dnswire(arg, timeout):
    """Any message (hex) to the resolver, over UDP or (``/tcp``) TCP: its rcode and counts."""
    wire, _, proto = arg.partition("/")
    wire = bytes.fromhex(wire)
    t = time.monotonic()
    try:
        if proto == "tcp":
            s = socket.create_connection(("169.254.0.22", 53), timeout=timeout)
            s.sendall(struct.pack("!H", len(wire)) + wire)
            r = b""
            while len(r) < 2 or len(r) < 2 + struct.unpack("!H", r[:2])[0]:
                chunk = s.recv(4096)
                if not chunk:
                    break
                r += chunk
            r = r[2:]
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(timeout)
            s.sendto(wire, ("169.254.0.22", 53))
            r = s.recv(4096)
        s.close()
    except OSError as e:
        return {"ok": False, "error": type(e).__name__, "s": round(time.monotonic() - t, 3)}
    if len(r) < 12:
        return {"ok": False, "error": "short answer", "len": len(r)}
    return {"ok": True, "rcode": RCODES.get(r[3] & 15, str(r[3] & 15)),
            "counts": list(struct.unpack("!HHHH", r[4:12])), "s": round(time.monotonic() - t, 3)}

def dnstrickle(arg, timeout):
    """N TCP connections to the resolver, each sending one byte of a query every 0.5 s (never
    the whole query) for up to HOLD s: when the resolver closed each one."""
    n, _, hold = arg.partition("/")
    q = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\3cdn\7example\4test\0" + struct.pack("!HH", 1, 1)
    wire = struct.pack("!H", len(q)) + q
    conns = []
    for _ in range(int(n)):
        c = socket.create_connection(("169.254.0.22", 53), timeout=timeout)
        c.setblocking(False)
        conns.append(c)
    start = time.monotonic()
    closed = [None] * len(conns)
    sent = [0] * len(conns)
    while time.monotonic() - start < float(hold) and None in closed:
        for i, c in enumerate(conns):
            if closed[i] is not None:
                continue
            try:
                if c.recv(64) == b"":
                    closed[i] = round(time.monotonic() - start, 2)
                    continue
            except BlockingIOError:
                pass
            except OSError:
                closed[i] = round(time.monotonic() - start, 2)
                continue
            if sent[i] < len(wire) - 1:
                try:
                    c.send(wire[sent[i]:sent[i] + 1])
                    sent[i] += 1
                except OSError:
                    closed[i] = round(time.monotonic() - start, 2)
        time.sleep(0.5)
    for c in conns:
        c.close()
    return {"ok": True, "closed_after_s": closed}

def resolve(name, timeout):
    """Through the guest's libc resolver (/etc/resolv.conf)."""
    try:
        infos = socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)
        return {"ok": True, "ips": sorted({i[4][0] for i in infos})}
    except socket.gaierror as e:
        return {"ok": False, "error": "gaierror", "errno": e.errno, "msg": str(e)}

timeout = float(sys.argv[1])
out = []
for op in sys.argv[2:]:
    kind, _, arg = op.partition("=")
    if kind == "http":
        out.append(http(arg, timeout))
    elif kind == "udp":
        out.append(udp(arg, timeout))
    elif kind == "dns":
        out.append(dns(arg, timeout))
    elif kind == "resolve":
        out.append(resolve(arg, timeout))
    elif kind == "dnswire":
        out.append(dnswire(arg, timeout))
    elif kind == "dnstrickle":
        out.append(dnstrickle(arg, timeout))
    elif kind == "sleep":
        time.sleep(float(arg))
        out.append({"ok": True})
    else:
        out.append({"ok": False, "error": "unknown op " + kind})
print(json.dumps(out))
'''
GUEST_PROBE_PATH = "/tmp/cube-netprobe.py"
_probe_written: set[str] = set()


def guest(sbx: Any, *ops: str, timeout: float = 2.0, user: str = "user") -> list[dict[str, Any]]:
    """Run probes in a real guest (an e2b ``Sandbox``): ``http=host:port/path`` (HTTP GET; an
    IPv6 host in brackets), ``udp=host:port/payload``, ``dns=name[:A|AAAA][@server]`` (a raw query,
    default server: the gateway the guest's resolv.conf names), ``resolve=name`` (libc),
    ``dnswire=HEX[/tcp]`` (any message to the resolver), ``dnstrickle=N/HOLD`` (N TCP connections
    trickling an incomplete query), ``sleep=s``. One result dict per op, each with ``ok``."""
    if sbx.sandbox_id not in _probe_written:
        sbx.files.write(GUEST_PROBE_PATH, GUEST_PROBE)
        _probe_written.add(sbx.sandbox_id)
    cmd = " ".join(["python3", GUEST_PROBE_PATH, str(timeout), *(f"'{op}'" for op in ops)])
    result = sbx.commands.run(cmd, user=user, timeout=60 + timeout * len(ops))
    return list(json.loads(result.stdout))


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    _serve(sys.argv[2], sys.argv[3])
