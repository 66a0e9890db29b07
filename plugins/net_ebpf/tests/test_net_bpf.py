"""The egress program itself, run with BPF_PROG_TEST_RUN on crafted frames (own maps)."""

from __future__ import annotations

import shutil
import socket
import struct
from pathlib import Path

import pytest
from cube_core import NetworkPolicy

from cube_net_ebpf import bpfobject, libbpf
from cube_net_ebpf.bpffilter import EgressFilter
from cube_net_ebpf.policy import compile_policy

pytestmark = [pytest.mark.root, pytest.mark.ebpf]

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
SRC_MAC, DST_MAC = bytes.fromhex("02aa00000001"), bytes.fromhex("02aa00000002")


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_tcp_syn(src: str, dst: str, dport: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return DST_MAC + SRC_MAC + b"\x08\x00" + ip + tcp


def ipv6_frame() -> bytes:
    payload = b"\0" * 8
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(payload), 59, 64,
                      socket.inet_pton(socket.AF_INET6, "fe80::1"),
                      socket.inet_pton(socket.AF_INET6, "2001:db8::1"))
    return DST_MAC + SRC_MAC + b"\x86\xdd" + ip6 + payload


def arp_frame() -> bytes:
    return b"\xff" * 6 + SRC_MAC + b"\x08\x06" + b"\0" * 28


@pytest.fixture(scope="module")
def filt(tmp_path_factory):
    obj = bpfobject.find_or_build(Path("/var/cache/cube/bpf"))
    libbpf.ensure_bpffs()
    pins = Path("/sys/fs/bpf") / f"cube-test-{tmp_path_factory.getbasetemp().name}"
    f = EgressFilter(obj, pins)
    yield f
    f.close()
    shutil.rmtree(pins, ignore_errors=True)


LO = 1


def run(filt, frame, ifindex=LO):
    return libbpf.prog_test_run(filt.prog_egress, frame, ifindex=ifindex)[0]


def test_unregistered_interface_fails_closed(filt):
    filt.unregister(LO)
    assert run(filt, ipv4_tcp_syn("100.64.0.6", "198.18.0.10", 80)) == TC_ACT_SHOT
    assert run(filt, arp_frame()) == TC_ACT_SHOT


def test_verdicts_by_policy(filt):
    filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy()))
    assert run(filt, arp_frame()) == TC_ACT_OK
    assert run(filt, ipv4_tcp_syn("100.64.0.6", "198.18.0.10", 80)) == TC_ACT_OK
    assert run(filt, ipv4_tcp_syn("100.64.0.6", "100.64.0.5", 22)) == TC_ACT_OK  # own host end
    filt.set_blocked(["10.0.0.0/8"])
    # denied TCP is turned into a RST and redirected back out of the interface
    assert run(filt, ipv4_tcp_syn("100.64.0.6", "10.1.2.3", 80)) == TC_ACT_REDIRECT
    filt.apply(LO, compile_policy(NetworkPolicy(allow_out=("10.1.2.3",))))
    assert run(filt, ipv4_tcp_syn("100.64.0.6", "10.1.2.3", 80)) == TC_ACT_OK
    filt.apply(LO, compile_policy(NetworkPolicy(deny_out=("198.18.0.0/15",))))
    assert run(filt, ipv4_tcp_syn("100.64.0.6", "198.18.0.10", 80)) == TC_ACT_REDIRECT
    assert run(filt, ipv4_tcp_syn("100.64.0.6", "10.1.2.3", 80)) == TC_ACT_REDIRECT


def test_ipv6_denied_unless_allowed(filt):
    filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy()))
    assert run(filt, ipv6_frame()) == TC_ACT_SHOT
    filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy(allow_out=("::/0",))))
    assert run(filt, ipv6_frame()) == TC_ACT_OK


def test_cost_per_packet(filt):
    filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy(
        allow_out=tuple(f"198.18.{i}.0/24" for i in range(50)), deny_out=("0.0.0.0/0",))))
    rc, ns = libbpf.prog_test_run(filt.prog_egress, ipv4_tcp_syn("100.64.0.6", "198.18.7.9", 80),
                                  ifindex=LO, repeat=2000)
    assert rc == TC_ACT_OK
    print(f"sandbox_egress: {ns} ns per new-flow SYN (BPF_PROG_TEST_RUN, 50 rules)")
