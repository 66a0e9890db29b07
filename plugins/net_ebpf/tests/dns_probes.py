"""DNS abuse from a guest namespace, run as ``python dns_probes.py OP [ARG]`` inside it; prints
one JSON result. The resolver is the guest's gateway (169.254.0.22:53).

OPs: ``update``, ``notify``, ``axfr``, ``multi`` (two questions), ``answer`` (a query carrying an
answer record), ``flood N`` (N UDP queries at once; counts the rcodes), ``trickle N HOLD`` (N TCP
connections that send one byte of a query and then one more byte every 0.5 s for HOLD seconds;
reports when the server closed each), ``resolve N`` (N lookups of cdn.example.test, UDP and TCP
alternately, with their latencies).
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rrset
import dns.update

SERVER = "169.254.0.22"


def _udp(wire: bytes, timeout: float = 2.0) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    try:
        sock.sendto(wire, (SERVER, 53))
        data = sock.recv(4096)
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__}
    finally:
        sock.close()
    return _describe(data)


def _describe(data: bytes) -> dict[str, object]:
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", data[:12])
    return {"ok": True, "id": qid, "rcode": dns.rcode.to_text(dns.rcode.Rcode(flags & 0xF)),
            "opcode": dns.opcode.to_text(dns.opcode.Opcode((flags >> 11) & 0xF)),
            "counts": [qd, an, ns, ar]}


def update() -> dict[str, object]:
    msg = dns.update.UpdateMessage("example.test")
    msg.add("pwned", 60, "A", "198.18.0.66")
    return _udp(msg.to_wire())


def notify() -> dict[str, object]:
    msg = dns.message.make_query("example.test", "SOA")
    msg.set_opcode(dns.opcode.NOTIFY)
    return _udp(msg.to_wire())


def axfr() -> dict[str, object]:
    msg = dns.message.make_query("example.test", "AXFR")
    try:
        response = dns.query.tcp(msg, SERVER, timeout=3)
    except Exception as exc:  # noqa: BLE001 - any failure is reported
        return {"ok": False, "error": type(exc).__name__}
    return {"ok": True, "rcode": dns.rcode.to_text(response.rcode()), "answers": len(response.answer)}


def multi() -> dict[str, object]:
    one = dns.message.make_query("cdn.example.test", "A").to_wire()
    question = one[12:]
    two = dns.message.make_query("api.example.test", "A").to_wire()[12:]
    header = one[:4] + struct.pack("!HHHH", 2, 0, 0, 0)
    return _udp(header + question + two)


def answer() -> dict[str, object]:
    msg = dns.message.make_query("cdn.example.test", "A")
    msg.answer.append(dns.rrset.from_text("cdn.example.test.", 60, "IN", "A", "198.18.0.66"))
    return _udp(msg.to_wire())


def flood(count: int) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.5)
    for i in range(count):
        msg = dns.message.make_query("cdn.example.test", "A")
        msg.id = i
        sock.sendto(msg.to_wire(), (SERVER, 53))
    rcodes: dict[str, int] = {}
    try:
        while sum(rcodes.values()) < count:
            rcode = str(_describe(sock.recv(4096))["rcode"])
            rcodes[rcode] = rcodes.get(rcode, 0) + 1
    except OSError:
        pass
    sock.close()
    return {"ok": True, "rcodes": rcodes}


def trickle(count: int, hold: float) -> dict[str, object]:
    query = dns.message.make_query("cdn.example.test", "A").to_wire()
    wire = struct.pack("!H", len(query)) + query
    conns = []
    for _ in range(count):
        sock = socket.create_connection((SERVER, 53), timeout=3)
        sock.setblocking(False)
        conns.append(sock)
    start = time.monotonic()
    closed: list[float | None] = [None] * count
    sent = [0] * count
    while time.monotonic() - start < hold and None in closed:
        for i, sock in enumerate(conns):
            if closed[i] is not None:
                continue
            try:
                if sock.recv(4096) == b"":
                    closed[i] = round(time.monotonic() - start, 2)
                    continue
            except BlockingIOError:
                pass
            except OSError:
                closed[i] = round(time.monotonic() - start, 2)
                continue
            if sent[i] < len(wire) - 1:  # never the last byte: the query is never complete
                try:
                    sock.send(wire[sent[i]:sent[i] + 1])
                    sent[i] += 1
                except OSError:
                    closed[i] = round(time.monotonic() - start, 2)
        time.sleep(0.5)
    for sock in conns:
        sock.close()
    return {"ok": True, "closed_after_s": closed}


def resolve(count: int) -> dict[str, object]:
    times, rcodes = [], []
    for i in range(count):
        msg = dns.message.make_query("cdn.example.test", "A")
        started = time.monotonic()
        try:
            if i % 2:
                response = dns.query.tcp(msg, SERVER, timeout=3)
            else:
                response = dns.query.udp(msg, SERVER, timeout=3)
            rcodes.append(dns.rcode.to_text(response.rcode()))
        except Exception as exc:  # noqa: BLE001
            rcodes.append(type(exc).__name__)
        times.append(round(time.monotonic() - started, 3))
    return {"ok": True, "rcodes": rcodes, "max_s": max(times)}


if __name__ == "__main__":
    op, args = sys.argv[1], [float(a) for a in sys.argv[2:]]
    funcs = {"update": update, "notify": notify, "axfr": axfr, "multi": multi, "answer": answer}
    if op in funcs:
        result = funcs[op]()
    elif op == "flood":
        result = flood(int(args[0]))
    elif op == "trickle":
        result = trickle(int(args[0]), args[1])
    else:
        result = resolve(int(args[0]))
    print(json.dumps(result), flush=True)
