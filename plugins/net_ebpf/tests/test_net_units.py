"""Unit tests of the pure parts: addressing, policy compilation, nft scripts, audit decoding."""

from __future__ import annotations

import socket
import struct

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
from cube_net_ebpf.nat import HostRules, host_ruleset, slot_ruleset
from cube_net_ebpf.policy import CidrRule, compile_policy


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
    assert 'iifname "vh*" meta l4proto tcp reject with tcp reset' in host
    assert 'iifname "vh*" reject with icmpx admin-prohibited' in host
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
