"""Audit events: the filter's ring buffer (new allowed flows, denied attempts) and the
resolver's decisions, kept per sandbox (bounded, newest last) and optionally appended to
``<audit_dir>/<slot_id>.jsonl``."""

from __future__ import annotations

import collections
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from cube_net_ebpf.bpffilter import EgressFilter, boottime_ns
from cube_net_ebpf.policy import PROTO_NAMES

log = structlog.get_logger(__name__)

EVENT = struct.Struct("<QII4s4s2s2sBBBBIHH")
REASONS = {0: "rule", 1: "flow", 2: "default_deny", 3: "expired", 4: "unknown_interface",
           5: "not_ipv4", 6: "malformed", 7: "inbound", 8: "deny_rule", 9: "always_denied",
           10: "default_allow", 11: "revoked"}
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPV6_NEXT_HEADERS = {**PROTO_NAMES, 58: "icmpv6"}


def _iso(wall_ns: int) -> str:
    return datetime.fromtimestamp(wall_ns / 1e9, UTC).isoformat(timespec="milliseconds")


class AuditLog:
    """Per-slot bounded event lists (thread-safe)."""

    def __init__(self, max_events: int, directory: Path | None = None) -> None:
        self.max_events = max_events
        self.directory = directory
        self._events: dict[str, collections.deque[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def open(self, slot_id: str) -> None:
        with self._lock:
            self._events.setdefault(slot_id, collections.deque(maxlen=self.max_events))

    def close(self, slot_id: str) -> None:
        with self._lock:
            self._events.pop(slot_id, None)

    def rename(self, old: str, new: str) -> None:
        with self._lock:
            events = self._events.pop(old, None)
            if events is not None:
                self._events[new] = events

    def add(self, slot_id: str, event: dict[str, Any]) -> None:
        if "ts" not in event:
            event = {"ts": _iso(time.time_ns()), **event}
        with self._lock:
            events = self._events.get(slot_id)
            if events is None:
                return
            events.append(event)
        if self.directory is not None:
            with open(self.directory / f"{slot_id}.jsonl", "a") as handle:
                handle.write(json.dumps(event) + "\n")

    def recent(self, slot_id: str, limit: int) -> list[dict[str, Any]]:
        with self._lock:
            events = list(self._events.get(slot_id, ()))
        return events[-limit:] if limit > 0 else []


def decode_event(raw: bytes, label: Callable[[int, int], str | None]) -> tuple[int, dict[str, Any]]:
    """(ifindex, event dict) from one ring buffer record."""
    (ts, sbx, _ifindex, saddr, daddr, sport, dport, proto, verdict, reason, tcp_flags, rule_id,
     ethertype, _pad) = EVENT.unpack(raw[:EVENT.size])
    wall = time.time_ns() - (boottime_ns() - ts)
    event: dict[str, Any] = {
        "ts": _iso(wall), "kind": "flow", "verdict": "allow" if verdict else "deny",
        "reason": REASONS.get(reason, str(reason)),
    }
    if ethertype == ETH_P_IP:
        src = f"{socket.inet_ntoa(saddr)}:{struct.unpack('!H', sport)[0]}"
        dst = f"{socket.inet_ntoa(daddr)}:{struct.unpack('!H', dport)[0]}"
        if reason == 7:  # inbound: the key was reversed
            src, dst = dst, src
        event.update(proto=PROTO_NAMES.get(proto, str(proto)), src=src, dst=dst,
                     tcp_flags=tcp_flags)
    else:
        event["ethertype"] = f"0x{ethertype:04x}"
        if ethertype == ETH_P_IPV6 and proto != 255:  # the filter reports no IPv6 addresses
            event["proto"] = IPV6_NEXT_HEADERS.get(proto, str(proto))
            if proto in (6, 17):
                event["dst_port"] = struct.unpack("!H", dport)[0]
    if rule_id:
        event["rule"] = label(sbx, rule_id) or rule_id
    return sbx, event


class AuditReader(threading.Thread):
    """Polls the filter's ring buffer and expires DNS-learned entries, until ``stop()``."""

    def __init__(self, filt: EgressFilter, log_: AuditLog,
                 slot_of_ifindex: Callable[[int], str | None], gc_interval_s: float = 5.0) -> None:
        super().__init__(name="cube-net-audit", daemon=True)
        self._filter = filt
        self._log = log_
        self._slot_of = slot_of_ifindex
        self._gc_interval = gc_interval_s
        self._stop_event = threading.Event()
        self._poll_lock = threading.Lock()  # libbpf's ring buffer takes one consumer at a time
        self._rb = filt.ring_buffer(self._on_event)

    def _on_event(self, raw: bytes) -> None:
        ifindex, event = decode_event(raw, self._filter.label)
        slot_id = self._slot_of(ifindex)
        if slot_id is not None:
            self._log.add(slot_id, event)

    def run(self) -> None:
        next_gc = time.monotonic() + self._gc_interval
        while not self._stop_event.is_set():
            try:
                with self._poll_lock:
                    self._rb.poll(50)
                if time.monotonic() >= next_gc:
                    self._filter.expire_learned()
                    next_gc = time.monotonic() + self._gc_interval
            except Exception:
                log.exception("audit reader failed; retrying")
                time.sleep(0.5)

    def drain(self) -> None:
        """Read what is pending now (tests and ``audit()`` call this for fresh results)."""
        with self._poll_lock:
            self._rb.poll(0)

    def stop(self) -> None:
        self._stop_event.set()
        if self.ident is not None:  # started
            self.join(timeout=2)
        with self._poll_lock:
            self._rb.close()
