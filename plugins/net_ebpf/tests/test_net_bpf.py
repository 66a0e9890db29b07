"""The egress program itself, run with BPF_PROG_TEST_RUN on crafted frames (own maps)."""

from __future__ import annotations

import shutil
import socket
import struct
import time
from pathlib import Path

import pytest
from cube_core import NetworkPolicy

from cube_net_ebpf import bpfobject, libbpf
from cube_net_ebpf.addressing import TAP_MAC
from cube_net_ebpf.bpffilter import FLOW_KEY, FLOW_VAL, EgressFilter
from cube_net_ebpf.policy import compile_policy
from cube_net_ebpf.ranges import ALWAYS_DENIED, ALWAYS_DENIED6, DeniedRanges, parse_networks

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


def ipv4_tcp_syn(src: str, dst: str, dport: int, flags: int = 0x02, ack: int = 0) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, dport, 1, ack, 5 << 4, flags, 64240, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return DST_MAC + SRC_MAC + b"\x08\x00" + ip + tcp


def ipv4_udp(src: str, dst: str, sport: int, dport: int) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + 4, 0) + b"ping"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return DST_MAC + SRC_MAC + b"\x08\x00" + ip + udp


def ipv6_frame() -> bytes:
    payload = b"\0" * 8
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(payload), 59, 64,
                      socket.inet_pton(socket.AF_INET6, "fe80::1"),
                      socket.inet_pton(socket.AF_INET6, "2001:db8::1"))
    return DST_MAC + SRC_MAC + b"\x86\xdd" + ip6 + payload


GUEST6, GATEWAY6, TARGET6 = "2001:db8:ffff:5::2", "fe80::5a:ff:fe00:1", "2001:db8:18::10"
GW_MAC = bytes.fromhex(TAP_MAC.replace(":", ""))


def _a6(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, addr)


def _pseudo6(src: bytes, dst: bytes, length: int, nexthdr: int) -> bytes:
    return src + dst + struct.pack("!IxxxB", length, nexthdr)


def ipv6_packet(src: str, dst: str, nexthdr: int, l4: bytes, hop_limit: int = 64,
                dst_mac: bytes = DST_MAC) -> bytes:
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(l4), nexthdr, hop_limit, _a6(src), _a6(dst))
    return dst_mac + SRC_MAC + b"\x86\xdd" + ip6 + l4


def icmp6(src: str, dst: str, body: bytes) -> bytes:
    """An ICMPv6 message (``body`` starts with type and code) with its checksum filled in."""
    msg = body[:2] + b"\0\0" + body[4:]
    check = _csum(_pseudo6(_a6(src), _a6(dst), len(msg), 58) + msg)
    return msg[:2] + struct.pack("!H", check) + msg[4:]


def solicited_node(addr: str) -> str:
    return socket.inet_ntop(socket.AF_INET6, _a6("ff02::1:ff00:0")[:13] + _a6(addr)[13:])


def neighbor_solicitation(src: str, target: str, hop_limit: int = 255) -> bytes:
    dst = solicited_node(target)
    body = struct.pack("!BBHI16s", 135, 0, 0, 0, _a6(target)) + b"\x01\x01" + SRC_MAC
    return ipv6_packet(src, dst, 58, icmp6(src, dst, body), hop_limit,
                       dst_mac=b"\x33\x33" + _a6(dst)[12:])


def ipv6_tcp_syn(src: str, dst: str, dport: int) -> bytes:
    opts = bytes.fromhex("020405a0") + b"\x01" * 16  # MSS + padding: a 40-byte header as Linux sends
    tcp = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 10 << 4, 0x02, 64240, 0, 0) + opts
    check = _csum(_pseudo6(_a6(src), _a6(dst), len(tcp), 6) + tcp)
    return ipv6_packet(src, dst, 6, tcp[:16] + struct.pack("!H", check) + tcp[18:])


def ipv6_udp(src: str, dst: str, dport: int, payload: bytes = b"hi") -> bytes:
    udp = struct.pack("!HHHH", 40001, dport, 8 + len(payload), 0) + payload
    check = _csum(_pseudo6(_a6(src), _a6(dst), len(udp), 17) + udp)
    return ipv6_packet(src, dst, 17, udp[:6] + struct.pack("!H", check) + udp[8:])


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
    filt.set_blocked(DeniedRanges(always=parse_networks(["10.0.0.0/8"])))
    # denied TCP is turned into a RST and redirected back out of the interface
    assert run(filt, ipv4_tcp_syn("100.64.0.6", "10.1.2.3", 80)) == TC_ACT_REDIRECT
    filt.apply(LO, compile_policy(NetworkPolicy(deny_out=("198.18.0.0/15",))))
    assert run(filt, ipv4_tcp_syn("100.64.0.6", "198.18.0.10", 80)) == TC_ACT_REDIRECT
    assert run(filt, ipv4_tcp_syn("100.64.0.6", "10.1.2.3", 80)) == TC_ACT_REDIRECT


def test_allow_rules_never_open_always_denied_ranges(filt):
    """An allow rule inside an always-denied range (compiled without the check, as a restarted
    Cube does with an old policy) opens nothing; one in a range the operator made openable
    does; Cube's own resolver rule reaches its always-denied address."""
    filt.set_blocked(DeniedRanges(always=parse_networks([*ALWAYS_DENIED, "100.64.0.0/10"]),
                                  openable=parse_networks(["10.20.0.0/16"])))
    try:
        filt.register(LO, "100.64.0.5", compile_policy(
            NetworkPolicy(allow_out=("169.254.169.254", "10.0.0.0/8", "0.0.0.0/0")),
            resolver="100.64.0.1"))
        for dst in ("169.254.169.254", "10.1.2.3", "192.168.1.1", "100.64.0.9", "127.0.0.1"):
            assert run(filt, ipv4_tcp_syn("100.64.0.6", dst, 80)) == TC_ACT_REDIRECT, dst
        assert run(filt, ipv4_tcp_syn("100.64.0.6", "10.20.3.4", 80)) == TC_ACT_OK  # openable
        assert run(filt, ipv4_tcp_syn("100.64.0.6", "198.18.0.10", 80)) == TC_ACT_OK
        assert run(filt, ipv4_tcp_syn("100.64.0.6", "100.64.0.1", 53)) == TC_ACT_OK  # resolver
        assert run(filt, ipv4_tcp_syn("100.64.0.6", "100.64.0.1", 80)) == TC_ACT_REDIRECT
        # openable is still denied by default: only an allow rule naming it opens it
        filt.apply(LO, compile_policy(NetworkPolicy(), resolver="100.64.0.1"))
        assert run(filt, ipv4_tcp_syn("100.64.0.6", "10.20.3.4", 80)) == TC_ACT_REDIRECT
        # a DNS-learned address is a rule like any other: never in an always-denied range
        filt.learn(LO, "169.254.169.254", 0, 0, 30, "meta.example.test")
        assert run(filt, ipv4_tcp_syn("100.64.0.6", "169.254.169.254", 80)) == TC_ACT_REDIRECT
    finally:
        filt.set_blocked(DeniedRanges(always=parse_networks(["10.0.0.0/8"])))


def _flow_of(filt, dst: str, dport: int):
    for key in filt.flows.keys():
        _sbx, _src, daddr, _sport, port, _proto = FLOW_KEY.unpack(key)
        if daddr == socket.inet_aton(dst) and port == struct.pack("!H", dport):
            return FLOW_VAL.unpack(filt.flows.lookup(key))
    return None


def test_policy_change_revokes_established_flows_it_denies(filt):
    filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy()))
    filt.kill_flows(LO)
    syn = ipv4_tcp_syn("100.64.0.6", "198.18.0.10", 80)
    ack = ipv4_tcp_syn("100.64.0.6", "198.18.0.10", 80, flags=0x10, ack=1000)
    ack2 = ipv4_tcp_syn("100.64.0.6", "198.18.0.20", 80, flags=0x10, ack=1000)
    assert run(filt, syn) == TC_ACT_OK and run(filt, ack) == TC_ACT_OK
    assert run(filt, ipv4_tcp_syn("100.64.0.6", "198.18.0.20", 80)) == TC_ACT_OK
    assert _flow_of(filt, "198.18.0.10", 80) is not None
    # a change that still allows the flow keeps it; one that denies it revokes it
    filt.apply(LO, compile_policy(NetworkPolicy(deny_out=("198.18.0.10/32",))))
    assert run(filt, ack2) == TC_ACT_OK
    rc, out = libbpf.prog_test_output(filt.prog_egress, ack, ifindex=LO)
    assert rc == TC_ACT_REDIRECT  # answered with a RST: the guest's connection is reset
    assert struct.unpack("!IIxB", out[34 + 4:34 + 14]) == (1000, 0, 0x04)
    assert _flow_of(filt, "198.18.0.10", 80) is None
    assert _flow_of(filt, "198.18.0.20", 80) is not None
    # a TCP reply still gets in (the guest's ACK of it gets the RST); after that it is dropped
    filt.apply(LO, compile_policy(NetworkPolicy(deny_out=("198.18.0.0/15",))))
    reply = ipv4_tcp_syn("198.18.0.20", "100.64.0.6", 40000, flags=0x10, ack=5)
    reply = reply[:34] + struct.pack("!HH", 80, 40000) + reply[38:]
    assert libbpf.prog_test_run(filt.prog_ingress, reply, ifindex=LO)[0] == TC_ACT_OK
    assert run(filt, ack2) == TC_ACT_REDIRECT
    assert libbpf.prog_test_run(filt.prog_ingress, reply, ifindex=LO)[0] == TC_ACT_SHOT
    assert _flow_of(filt, "198.18.0.20", 80) is None
    # UDP is decided again in both directions: a reply of a now-denied flow is dropped at once
    filt.apply(LO, compile_policy(NetworkPolicy()))
    assert run(filt, ipv4_udp("100.64.0.6", "198.18.0.30", 40001, 7777)) == TC_ACT_OK
    udp_reply = ipv4_udp("198.18.0.30", "100.64.0.6", 7777, 40001)
    assert libbpf.prog_test_run(filt.prog_ingress, udp_reply, ifindex=LO)[0] == TC_ACT_OK
    filt.apply(LO, compile_policy(NetworkPolicy(deny_out=("198.18.0.30/32",))))
    assert libbpf.prog_test_run(filt.prog_ingress, udp_reply, ifindex=LO)[0] == TC_ACT_SHOT
    assert _flow_of(filt, "198.18.0.30", 7777) is None


def test_dns_ttl_expiry_revokes_established_flows(filt):
    filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy(
        allow_out=("api.example.test",), deny_out=("0.0.0.0/0",))))
    filt.kill_flows(LO)
    filt.learn(LO, "198.18.1.30", 0, 0, 0.3, "api.example.test")
    ack = ipv4_tcp_syn("100.64.0.6", "198.18.1.30", 80, flags=0x10, ack=7)
    assert run(filt, ipv4_tcp_syn("100.64.0.6", "198.18.1.30", 80)) == TC_ACT_OK
    assert run(filt, ack) == TC_ACT_OK
    time.sleep(0.35)
    assert run(filt, ack) == TC_ACT_REDIRECT  # the rule that admitted it expired: revoked
    assert _flow_of(filt, "198.18.1.30", 80) is None
    # re-resolved in time: the flow lives on with the new expiry
    filt.learn(LO, "198.18.1.30", 0, 0, 0.3, "api.example.test")
    assert run(filt, ipv4_tcp_syn("100.64.0.6", "198.18.1.30", 80)) == TC_ACT_OK
    time.sleep(0.2)
    filt.learn(LO, "198.18.1.30", 0, 0, 5, "api.example.test")
    time.sleep(0.15)
    assert run(filt, ack) == TC_ACT_OK
    assert _flow_of(filt, "198.18.1.30", 80)[1] > 0  # its expiry moved with the rule's


def test_ipv6_denied_unless_allowed(filt):
    filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy()))
    assert run(filt, ipv6_frame()) == TC_ACT_REDIRECT  # answered with an ICMPv6 error (below)
    filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy(allow_out=("::/0",))))
    assert run(filt, ipv6_frame()) == TC_ACT_OK


def _split6(frame: bytes) -> tuple[bytes, bytes, bytes]:
    """(Ethernet header, IPv6 header, payload as long as the IPv6 header says)."""
    plen = struct.unpack("!H", frame[18:20])[0]
    return frame[:14], frame[14:54], frame[54:54 + plen]


def _icmp6_checksum_ok(ip6: bytes, msg: bytes) -> bool:
    return _csum(_pseudo6(ip6[8:24], ip6[24:40], len(msg), 58) + msg) == 0


def test_neighbor_solicitation_is_answered_with_the_gateway_mac(filt):
    filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy()))
    rc, out = libbpf.prog_test_output(filt.prog_egress, neighbor_solicitation(GUEST6, GATEWAY6),
                                      ifindex=LO)
    assert rc == TC_ACT_REDIRECT
    eth, ip6, na = _split6(out)
    assert len(out) == 14 + 40 + 32
    assert eth == SRC_MAC + GW_MAC + b"\x86\xdd"  # to the guest, from its gateway (tap0)
    version, plen, nexthdr, hop_limit = struct.unpack("!IHBB", ip6[:8])
    assert (version >> 28, plen, nexthdr, hop_limit) == (6, 32, 58, 255)
    assert ip6[8:24] == _a6(GATEWAY6) and ip6[24:40] == _a6(GUEST6)
    na_type, code, _check, flags, target = struct.unpack("!BBHI16s", na[:24])
    assert (na_type, code, flags, target) == (136, 0, 0xE0000000, _a6(GATEWAY6))
    assert na[24:32] == b"\x02\x01" + GW_MAC  # target link-layer address option
    assert _icmp6_checksum_ok(ip6, na)
    # any target (an on-link peer of the guest's own prefix too): tap0 is every neighbour
    rc, out = libbpf.prog_test_output(
        filt.prog_egress, neighbor_solicitation(GUEST6, "2001:db8:ffff:5::99"), ifindex=LO)
    assert rc == TC_ACT_REDIRECT and out[14 + 40 + 8:14 + 40 + 24] == _a6("2001:db8:ffff:5::99")
    assert _icmp6_checksum_ok(out[14:54], out[54:86])


def test_invalid_and_dad_solicitations_are_not_answered(filt):
    filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy()))
    dad = neighbor_solicitation("::", GUEST6)  # would make the guest drop its own address
    assert run(filt, dad) == TC_ACT_SHOT
    assert run(filt, neighbor_solicitation(GUEST6, GATEWAY6, hop_limit=64)) == TC_ACT_SHOT
    assert run(filt, neighbor_solicitation(GUEST6, GUEST6)) == TC_ACT_SHOT
    # other link plumbing: router solicitation, MLDv2 report, link-local multicast (mDNS)
    rs = ipv6_packet(GATEWAY6, "ff02::2", 58, icmp6(GATEWAY6, "ff02::2", b"\x85\0\0\0\0\0\0\0"),
                     255)
    mld = ipv6_packet(GATEWAY6, "ff02::16", 58, icmp6(GATEWAY6, "ff02::16", b"\x8f" + b"\0" * 7), 1)
    assert run(filt, rs) == TC_ACT_SHOT
    assert run(filt, mld) == TC_ACT_SHOT
    assert run(filt, ipv6_udp(GUEST6, "ff02::fb", 5353)) == TC_ACT_SHOT
    # without SBX_F_REJECT nothing is answered
    raw = filt.sandboxes.lookup(struct.pack("<I", LO))
    sbx, flags, *rest = struct.unpack("<II4sI6s2x", raw)
    filt.sandboxes.update(struct.pack("<I", LO), struct.pack("<II4sI6s2x", sbx, 0, *rest))
    try:
        assert run(filt, neighbor_solicitation(GUEST6, GATEWAY6)) == TC_ACT_SHOT
        assert run(filt, ipv6_tcp_syn(GUEST6, TARGET6, 80)) == TC_ACT_SHOT
    finally:
        filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy()))


@pytest.mark.parametrize("kind", ["udp", "udp-short", "echo"])
def test_ipv6_packets_get_icmpv6_admin_prohibited(filt, kind):
    filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy()))
    packet = {
        "udp": lambda: ipv6_udp(GUEST6, TARGET6, 7777, b"x" * 100),
        "udp-short": lambda: ipv6_udp(GUEST6, TARGET6, 7777, b""),
        "echo": lambda: ipv6_packet(GUEST6, TARGET6, 58,
                                    icmp6(GUEST6, TARGET6, b"\x80\0\0\0\0\1\0\1" + b"ping")),
    }[kind]()
    rc, out = libbpf.prog_test_output(filt.prog_egress, packet, ifindex=LO)
    assert rc == TC_ACT_REDIRECT
    eth, ip6, msg = _split6(out)
    assert len(out) == 14 + 40 + 8 + 60
    assert eth == SRC_MAC + GW_MAC + b"\x86\xdd"
    version, plen, nexthdr, _hop = struct.unpack("!IHBB", ip6[:8])
    assert (version >> 28, plen, nexthdr) == (6, 68, 58)
    assert ip6[8:24] == _a6(TARGET6) and ip6[24:40] == _a6(GUEST6)
    assert msg[:2] == b"\x01\x01"  # destination unreachable, administratively prohibited
    quoted = packet[14:14 + 60]
    assert msg[8:] == quoted + b"\0" * (60 - len(quoted))  # the offending packet's start
    assert _icmp6_checksum_ok(ip6, msg)


def test_ipv6_tcp_gets_a_rst(filt):
    filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy()))
    syn = ipv6_tcp_syn(GUEST6, TARGET6, 443)
    rc, out = libbpf.prog_test_output(filt.prog_egress, syn, ifindex=LO)
    assert rc == TC_ACT_REDIRECT
    eth, ip6, tcp = _split6(out)
    assert len(out) == 14 + 40 + 20
    assert eth == SRC_MAC + GW_MAC + b"\x86\xdd"
    version, plen, nexthdr, _hop = struct.unpack("!IHBB", ip6[:8])
    assert (version >> 28, plen, nexthdr) == (6, 20, 6)
    assert ip6[8:24] == _a6(TARGET6) and ip6[24:40] == _a6(GUEST6)
    sport, dport, seq, ack, off, flags = struct.unpack("!HHIIBB", tcp[:14])
    # RFC 9293 3.10.7.1: no ACK in the SYN -> <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>
    assert (sport, dport, seq, ack, off >> 4, flags) == (443, 40000, 0, 2, 5, 0x14)
    assert _csum(_pseudo6(ip6[8:24], ip6[24:40], 20, 6) + tcp) == 0
    # a segment with ACK gets <SEQ=SEG.ACK><CTL=RST>; a RST is never answered
    with_ack = bytearray(syn)
    with_ack[14 + 40 + 8:14 + 40 + 12] = struct.pack("!I", 777)
    with_ack[14 + 40 + 13] = 0x10
    rc, out = libbpf.prog_test_output(filt.prog_egress, bytes(with_ack), ifindex=LO)
    assert rc == TC_ACT_REDIRECT
    assert struct.unpack("!IIxB", out[54 + 4:54 + 14]) == (777, 0, 0x04)
    with_ack[14 + 40 + 13] = 0x04
    assert run(filt, bytes(with_ack)) == TC_ACT_SHOT


def test_allowed_ipv6_passes_unchanged(filt):
    filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy(allow_out=("::/0",))))
    try:
        for frame in (ipv6_tcp_syn(GUEST6, TARGET6, 80), ipv6_udp(GUEST6, TARGET6, 7777)):
            rc, out = libbpf.prog_test_output(filt.prog_egress, frame, ifindex=LO)
            assert rc == TC_ACT_OK and out == frame
        # the link's own plumbing is still the filter's: the gateway resolves to tap0
        assert run(filt, neighbor_solicitation(GUEST6, GATEWAY6)) == TC_ACT_REDIRECT
    finally:
        filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy()))


def test_ipv6_rules_open_only_what_they_name(filt):
    other = "2001:db8:18::20"
    filt.set_blocked(DeniedRanges(always=parse_networks([*ALWAYS_DENIED, *ALWAYS_DENIED6])))
    try:
        filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy(
            allow_out=(TARGET6, "2001:db8:19::/48"), deny_out=("2001:db8:19::5", other))))
        assert run(filt, ipv6_tcp_syn(GUEST6, TARGET6, 80)) == TC_ACT_OK
        assert run(filt, ipv6_udp(GUEST6, TARGET6, 7777)) == TC_ACT_OK
        assert run(filt, ipv6_tcp_syn(GUEST6, other, 80)) == TC_ACT_REDIRECT  # deny rule: RST
        assert run(filt, ipv6_tcp_syn(GUEST6, "2001:db8:18::30", 80)) == TC_ACT_REDIRECT  # unnamed
        assert run(filt, ipv6_tcp_syn(GUEST6, "2001:db8:19::7", 80)) == TC_ACT_OK
        assert run(filt, ipv6_tcp_syn(GUEST6, "2001:db8:19::5", 80)) == TC_ACT_OK  # allow wins
        # replies get in only from what the rules name
        reply_ok = ipv6_packet(TARGET6, GUEST6, 6, struct.pack("!HHIIBBHHH", 80, 40000, 1, 2,
                                                                5 << 4, 0x12, 1000, 0, 0))
        reply_other = ipv6_packet(other, GUEST6, 6, reply_ok[54:])
        assert libbpf.prog_test_run(filt.prog_ingress, reply_ok, ifindex=LO)[0] == TC_ACT_OK
        assert libbpf.prog_test_run(filt.prog_ingress, reply_other, ifindex=LO)[0] == TC_ACT_SHOT
        # ::/0 opens the internet, never the always-denied IPv6 ranges
        filt.apply(LO, compile_policy(NetworkPolicy(allow_out=("::/0",))))
        assert run(filt, ipv6_tcp_syn(GUEST6, other, 80)) == TC_ACT_OK
        for dst in ("fd00:ec2::254", "fe80::1", "::1", "::ffff:169.254.169.254", "2002:a9fe:a9fe::1",
                    "64:ff9b::a9fe:a9fe"):
            assert run(filt, ipv6_tcp_syn(GUEST6, dst, 80)) == TC_ACT_REDIRECT, dst
    finally:
        filt.set_blocked(DeniedRanges(always=parse_networks(["10.0.0.0/8"])))
        filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy()))


def test_cost_per_packet(filt):
    filt.register(LO, "100.64.0.5", compile_policy(NetworkPolicy(
        allow_out=tuple(f"198.18.{i}.0/24" for i in range(50)), deny_out=("0.0.0.0/0",))))
    rc, ns = libbpf.prog_test_run(filt.prog_egress, ipv4_tcp_syn("100.64.0.6", "198.18.7.9", 80),
                                  ifindex=LO, repeat=2000)
    assert rc == TC_ACT_OK
    print(f"sandbox_egress: {ns} ns per new-flow SYN (BPF_PROG_TEST_RUN, 50 rules)")
