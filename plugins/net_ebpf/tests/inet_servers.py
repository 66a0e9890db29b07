"""Servers of the test "internet" namespace: HTTP on :80 and :8080 of every address (``/`` says
who answered, ``/slow/<s>`` streams a line every 0.2 s) and an authoritative DNS server for the
test zone on 198.18.0.53:53. Run inside the namespace; prints "ready"."""

from __future__ import annotations

import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dns.message
import dns.rcode
import dns.rrset

ZONE = {
    "api.example.test.": ("198.18.1.30", 2),
    "evil.example.test.": ("198.18.1.31", 60),
    "cdn.example.test.": ("198.18.0.20", 60),
    "meta.example.test.": ("169.254.169.254", 60),  # a name of the sandbox's choosing
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        host, port = self.connection.getsockname()[:2]
        if self.path.startswith("/slow/"):
            seconds = float(self.path.rsplit("/", 1)[1])
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


def http(port: int) -> None:
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()


def dns_server(addr: str = "198.18.0.53") -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, 53))
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            name = str(query.question[0].name).lower()
            if name in ZONE and query.question[0].rdtype == 1:
                ip, ttl = ZONE[name]
                response.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", ip))
            elif name not in ZONE:
                response.set_rcode(dns.rcode.NXDOMAIN)
            sock.sendto(response.to_wire(), peer)
        except Exception as exc:  # keep serving
            print("dns error", exc, file=sys.stderr)


if __name__ == "__main__":
    for p in (80, 8080):
        threading.Thread(target=http, args=(p,), daemon=True).start()
    threading.Thread(target=dns_server, daemon=True).start()
    time.sleep(0.2)
    print("ready", flush=True)
    while True:
        time.sleep(3600)
