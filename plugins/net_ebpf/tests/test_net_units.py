"""Unit tests of the pure parts: addressing, policy compilation, nft scripts, audit decoding."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.update
import pytest
from cube_core import EgressRule, NetworkError, NetworkPolicy
from pydantic import ValidationError

from cube_net_ebpf import EbpfNetConfig
from cube_net_ebpf.addressing import (
    AddressPlan,
    SlotIndexes,
    index_of_host_if,
    index_of_slot,
    slot_id_for,
    slot_of_netns,
)
from cube_net_ebpf.audit import EVENT, decode_event
from cube_net_ebpf.dns import _check_query as check_query
from cube_net_ebpf.dns import _header_reply as header_reply
from cube_net_ebpf.dnslimits import Admission, DnsLimits
from cube_net_ebpf.nat import HostRules, host_ruleset, slot_ruleset
from cube_net_ebpf.policy import CidrRule, compile_policy
from cube_net_ebpf.ranges import ALWAYS_DENIED, ALWAYS_DENIED6, DeniedRanges, parse_networks


def test_address_plan():
    plan = AddressPlan("100.64.0.0/10")
    a = plan.slot(1)
    assert (a.host_if, a.host_addr, a.ns_addr) == ("vh1", "100.64.0.5", "100.64.0.6")
    assert plan.resolver_addr == "100.64.0.1"
    last = plan.slot(plan.max_index)
    assert last.ns_addr == "100.127.255.254"
    assert plan.index_of_addr("100.64.0.6") == 1 and plan.index_of_addr("100.64.0.5") == 1
    assert plan.index_of_addr("100.64.0.1") is None and plan.index_of_addr("8.8.8.8") is None
    with pytest.raises(ValueError):
        plan.slot(0)


def test_slot_names_round_trip():
    slot_id = slot_id_for("iABC-def/ghi", 42)
    assert slot_id == "iabc_def_ghi-42"
    assert index_of_slot(slot_id) == 42
    assert slot_of_netns(f"cube-{slot_id}") == slot_id
    assert slot_of_netns("cube-noindex") is None and slot_of_netns("other-1") is None
    assert index_of_host_if("vh17") == 17 and index_of_host_if("vhx") is None


def test_slot_indexes_next_fit_and_refusal():
    idx = SlotIndexes(5)
    assert idx.take() == 1 and idx.take() == 2
    idx.free(1)
    assert idx.take() == 3  # next-fit: a freed index is reused late
    idx.mark_used(4)
    assert idx.take(lambda i: i != 5) == 1
    with pytest.raises(LookupError):
        idx.take(lambda i: False)


def test_config_rejects_private_subnets_and_unknown_options():
    with pytest.raises(ValidationError):
        EbpfNetConfig(subnet="10.0.0.0/16")
    with pytest.raises(ValidationError):
        EbpfNetConfig(bogus=1)


def test_policy_defaults_and_precedence():
    p = compile_policy(NetworkPolicy())
    assert p.default_allow and not p.allow and not p.deny and p.names_default_allow
    p = compile_policy(NetworkPolicy(allow_internet_access=False))
    assert not p.default_allow and not p.names_default_allow
    p = compile_policy(NetworkPolicy(allow_out=("198.18.0.10", "api.example.test", "::/0"),
                                     deny_out=("0.0.0.0/0",)),
                       [EgressRule(action="allow", target="198.18.0.0/24", protocol="tcp",
                                   port=443)], resolver="100.64.0.1")
    assert CidrRule("198.18.0.10/32") in p.allow
    assert CidrRule("198.18.0.0/24", 6, 443) in p.allow
    assert CidrRule("100.64.0.1/32", 17, 53) in p.allow  # the resolver
    assert CidrRule("0.0.0.0/0", 17, 53) in p.deny  # no other DNS server
    assert CidrRule("0.0.0.0/0") in p.deny
    assert p.allow_ipv6
    assert not p.names_default_allow  # deny-all: only allowed names resolve
    assert p.resolve_verdict("API.example.test.")[0]
    assert not p.resolve_verdict("other.example.test")[0]


def test_domain_wildcards_and_denied_names():
    p = compile_policy(NetworkPolicy(allow_out=("*.good.test",)),
                       [EgressRule(action="deny", target="*.example.test")])
    assert p.resolve_verdict("a.good.test")[0] and p.resolve_verdict("good.test")[0]
    assert not p.resolve_verdict("x.example.test")[0]
    assert p.resolve_verdict("unrelated.test")[0]  # default allow


@pytest.mark.parametrize("target", ["not a host!", "1.2.3.999", ""])
def test_bad_targets(target):
    with pytest.raises(NetworkError):
        compile_policy(NetworkPolicy(allow_out=(target,)))


def test_port_needs_protocol():
    with pytest.raises(NetworkError):
        compile_policy(NetworkPolicy(), [EgressRule(action="allow", target="1.2.3.4", port=80)])


def test_nft_scripts_mention_what_they_must():
    slot = slot_ruleset("100.64.0.6", "100.64.0.1")
    assert 'iifname "vg0" ip daddr 100.64.0.6 meta l4proto tcp dnat to 169.254.0.21' in slot
    assert "dnat to 100.64.0.1" in slot and 'oifname "vg0" masquerade' in slot
    assert "delete table" not in slot  # a new namespace needs no delete (it costs ~15 ms)
    assert "dnat to 100.64.0.1" not in slot_ruleset("100.64.0.6", None)
    host = host_ruleset(HostRules("100.64.0.0/10", "100.64.0.1", forward_only_sandboxes=True))
    own = '{ "vh0*", "vh1*", "vh2*", "vh3*", "vh4*", "vh5*", "vh6*", "vh7*", "vh8*", "vh9*" }'  # node local's links
    assert f"iifname {own} meta l4proto tcp reject with tcp reset" in host
    assert f"iifname {own} reject with icmpx admin-prohibited" in host
    assert 'iifname "vh*" oifname "vh*" drop' in host
    assert host.rstrip().endswith("}") and "\n    drop\n" in host
    assert "\n    drop\n" not in host_ruleset(HostRules("100.64.0.0/10", None, False))


def test_decode_event():
    raw = EVENT.pack(123, 7, 7, socket.inet_aton("100.64.0.6"), socket.inet_aton("198.18.0.10"),
                     struct.pack("!H", 40000), struct.pack("!H", 80), 6, 0, 2, 2, 5, 0x0800, 0)
    ifindex, event = decode_event(raw, lambda i, r: f"rule {i}/{r}")
    assert ifindex == 7
    assert event["verdict"] == "deny" and event["reason"] == "default_deny"
    assert event["src"] == "100.64.0.6:40000" and event["dst"] == "198.18.0.10:80"
    assert event["proto"] == "tcp" and event["rule"] == "rule 7/5"


DENIED = DeniedRanges(always=parse_networks((*ALWAYS_DENIED, *ALWAYS_DENIED6, "100.64.0.0/10",
                                             "192.0.2.2/32")),
                      openable=parse_networks(("10.20.0.0/16", "fd00:1::/64")))


@pytest.mark.parametrize(("allow_out", "field", "range_"), [
    (("169.254.169.254", "10.0.0.0/8"), "allow_out[0]", "169.254.0.0/16"),
    (("198.18.0.10", "10.128.0.0/9"), "allow_out[1]", "10.0.0.0/8"),
    (("100.64.0.6",), "allow_out[0]", "100.64.0.0/10"),  # another sandbox
    (("127.0.0.1",), "allow_out[0]", "127.0.0.0/8"),
    (("fd00:ec2::254",), "allow_out[0]", "fc00::/7"),
    (("::ffff:169.254.169.254",), "allow_out[0]", "::ffff:0:0/96"),
])
def test_allow_rules_inside_always_denied_ranges_are_refused(allow_out, field, range_):
    with pytest.raises(NetworkError) as refused:
        compile_policy(NetworkPolicy(allow_out=allow_out), denied=DENIED)
    assert refused.value.fields["field"] == field
    assert range_ in refused.value.message and field in refused.value.message
    with pytest.raises(NetworkError):  # plugin rules too
        compile_policy(NetworkPolicy(), [EgressRule(action="allow", target=allow_out[int(field[10])])],
                       denied=DENIED)


def test_wider_and_openable_allow_rules_are_accepted():
    for allow_out in (("0.0.0.0/0",), ("::/0",), ("10.20.1.2",), ("10.0.0.0/8",), ("fd00:1::5",),
                      ("192.0.2.0/24",), ("169.254.169.254.example.test",)):
        compile_policy(NetworkPolicy(allow_out=allow_out), denied=DENIED)
    # deny rules are never refused; without `denied` (a restarted Cube) nothing is
    compile_policy(NetworkPolicy(deny_out=("169.254.169.254",)), denied=DENIED)
    compile_policy(NetworkPolicy(allow_out=("169.254.169.254",)))
    assert DENIED.always_denied("169.254.169.254") and DENIED.always_denied("192.0.2.2")
    assert not DENIED.always_denied("10.20.0.1") and not DENIED.always_denied("198.18.0.1")
    assert DENIED.always_denied("fe80::1") and not DENIED.always_denied("2001:db8:18::10")


def test_ipv6_rules_are_compiled_apart():
    p = compile_policy(NetworkPolicy(allow_out=("2001:db8:18::10",), deny_out=("2001:db8::/32",)))
    assert p.allow6 == (CidrRule("2001:db8:18::10/128"),) and p.deny6 == (CidrRule("2001:db8::/32"),)
    assert p.allow_ipv6 and not p.allow and not p.deny
    only_deny = compile_policy(NetworkPolicy(deny_out=("::/0",)))
    assert not only_deny.allow_ipv6 and only_deny.deny6  # a deny rule never enables IPv6


def test_config_refuses_opening_the_slot_subnet():
    with pytest.raises(ValidationError):
        EbpfNetConfig(openable_ranges=("100.64.0.0/16",))
    assert EbpfNetConfig(openable_ranges=("10.1.2.3",)).openable_ranges == ("10.1.2.3/32",)


def _wire(build) -> bytes:
    msg = dns.message.make_query("cdn.example.test", "A")
    build(msg)
    return msg.to_wire()


def test_guest_queries_are_rebuilt_or_refused():
    def edns_and_cookie(m):
        m.use_edns(0, payload=4096, options=[dns.edns.GenericOption(10, b"12345678")])
        m.flags |= dns.flags.CD

    rebuilt = check_query(_wire(edns_and_cookie))
    assert isinstance(rebuilt, dns.message.Message)
    assert rebuilt.flags == dns.flags.RD and rebuilt.edns == 0 and not rebuilt.options
    assert rebuilt.payload == 1232 and len(rebuilt.question) == 1 and not rebuilt.additional
    update = dns.update.UpdateMessage("example.test")
    update.add("x", 60, "A", "1.2.3.4")
    assert check_query(update.to_wire())[0] == dns.rcode.NOTIMP
    assert check_query(_wire(lambda m: m.set_opcode(dns.opcode.NOTIFY)))[0] == dns.rcode.NOTIMP
    two = _wire(lambda m: None)
    two = two[:4] + struct.pack("!H", 2) + two[6:] + two[12:]
    assert check_query(two)[0] == dns.rcode.FORMERR
    assert check_query(b"\x00\x01")[0] == dns.rcode.FORMERR
    chaos = dns.message.make_query("version.bind", "TXT", rdclass=dns.rdataclass.CH).to_wire()
    assert check_query(chaos)[0] == dns.rcode.REFUSED
    reply = header_reply(update.to_wire(), dns.rcode.NOTIMP)
    assert reply is not None and struct.unpack("!HHHHHH", reply)[1:] == (0x8000 | 5 << 11 | 4, 0, 0, 0, 0)


def test_admission_limits_per_sandbox():
    adm = Admission(DnsLimits(rate=10, burst=3, in_flight=2, queue=3, tcp_per_sandbox=1))
    assert [adm.admit("a"), adm.admit("a"), adm.admit("a")] == ["ok", "ok", "too_many_in_flight"]
    adm.done("a")
    assert adm.admit("a") == "ok"
    adm.done("a")
    adm.done("a")
    assert adm.admit("a") == "rate_limited"  # 3 tokens spent
    assert adm.admit("b") == "ok" and adm.admit("b") == "ok"
    assert adm.admit("c") == "ok" and adm.admit("d") == "queue_full"  # the shared queue holds 3
    assert adm.open_tcp("a") and not adm.open_tcp("a") and adm.open_tcp("b")
    adm.close_tcp("a")
    assert adm.open_tcp("a")


def test_doctor_checks(tmp_path: Path) -> None:
    from cube_net_ebpf.checks import check_bpf_object, check_nftables

    missing = check_bpf_object(EbpfNetConfig(bpf_object=tmp_path / "nope.o"))
    assert missing.status == "fail" and "does not exist" in missing.detail
    (tmp_path / "egress.o").write_bytes(b"\x7fELF")
    assert check_bpf_object(EbpfNetConfig(bpf_object=tmp_path / "egress.o")).status == "ok"
    assert check_nftables().status == "ok"  # libnftables is installed by make install
