"""Unit tests of the per-node names (several nodes on one host): derivation, parsing across
nodes, config defaults and the host table of a node other than ``local``."""

from __future__ import annotations

from pathlib import Path

import pytest
from cube_core import CoreSettings
from pydantic import ValidationError

from cube_net_ebpf import EbpfNetConfig
from cube_net_ebpf.addressing import (
    AddressPlan,
    host_if_name,
    index_of_host_if,
    netns_name,
    slot_of_netns,
)
from cube_net_ebpf.nat import HostRules, host_ruleset
from cube_net_ebpf.nodenames import (
    IFNAMSIZ,
    LOCAL,
    TAG_RE,
    HostNames,
    node_path_name,
    node_tag,
)
from cube_net_ebpf.plugin import EbpfNetPlugin


def test_local_keeps_the_historical_names():
    assert node_tag("local") == ""
    assert (LOCAL.netns_prefix, LOCAL.host_if_prefix, LOCAL.nft_table) == ("cube-", "vh", "cube")
    assert EbpfNetConfig().for_node("local") == EbpfNetConfig()
    cfg = EbpfNetConfig().for_node("local")
    assert cfg.state_dir == Path("/run/cube/net") and cfg.bpf_pin_dir == Path("/sys/fs/bpf/cube")


def test_tag_is_stable_short_and_distinct():
    # pinned: changing the rule renames every running node's resources
    assert node_tag("node-a") == "ywoy" and node_tag("node-b") == "anwt"
    tags = {node_tag(f"node-{i}") for i in range(2000)}
    assert all(TAG_RE.match(t) for t in tags)
    assert len(tags) >= 1995  # 26 * 36**3 values: collisions are rare (node_tag overrides them)
    widest = AddressPlan("224.0.0.0/3", HostNames("zzzz"))  # the widest subnet the config allows
    assert len(host_if_name(widest.max_index, widest.names)) <= IFNAMSIZ


def test_path_name_is_the_node_id_when_safe():
    assert node_path_name("node-a") == "node-a"
    assert node_path_name("rack1.host_2") == "rack1.host_2"
    odd = node_path_name("a/b c")
    assert odd.startswith("a_b_c-") and "/" not in odd and odd != node_path_name("a b/c")
    assert node_path_name("..") not in (".", "..") and "/" not in node_path_name("..")


def test_names_of_one_node_never_parse_as_another_nodes():
    a, b = HostNames(node_tag("node-a")), HostNames(node_tag("node-b"))
    for index in (1, 7, 4095):
        for mine in (LOCAL, a, b):
            assert index_of_host_if(host_if_name(index, mine), mine) == index
            for other in {LOCAL, a, b} - {mine}:
                assert index_of_host_if(host_if_name(index, mine), other) is None
    for slot_id in ("sbx_1-3", ".pool-12", "ywoy-5"):
        for mine in (LOCAL, a, b):
            assert slot_of_netns(netns_name(slot_id, mine), mine) == slot_id
            for other in {LOCAL, a, b} - {mine}:
                assert slot_of_netns(netns_name(slot_id, mine), other) is None


def test_bad_tags_are_refused():
    for bad in ("1abc", "abc", "abcde", "ab-c", "ABCD"):
        with pytest.raises(ValidationError):
            EbpfNetConfig(node_tag=bad)
        with pytest.raises(ValueError):
            HostNames(bad)
    with pytest.raises(ValueError):
        HostNames("zzzz").check_index_fits(10**14)


def test_for_node_derives_only_what_the_operator_left_unset():
    cfg = EbpfNetConfig(subnet="100.65.0.0/16").for_node("node-a")
    assert cfg.node_tag == "ywoy"
    assert cfg.state_dir == Path("/run/cube/node-a/net")
    assert cfg.bpf_pin_dir == Path("/sys/fs/bpf/cube-node-a")
    assert cfg.names.nft_table == "cube_ywoy" and cfg.names.netns_prefix == "cube-ywoy-"
    explicit = EbpfNetConfig(node_tag="lab2", state_dir=Path("/srv/net")).for_node("node-a")
    assert explicit.node_tag == "lab2" and explicit.state_dir == Path("/srv/net")
    assert explicit.bpf_pin_dir == Path("/sys/fs/bpf/cube-node-a")
    legacy = EbpfNetConfig(node_tag="").for_node("node-a")  # an operator may keep the old names
    assert legacy.names == LOCAL


def test_plugin_names_its_driver_after_core_node_id():
    plugin = EbpfNetPlugin(EbpfNetConfig(subnet="100.65.0.0/16"))
    plugin.cube_configure(CoreSettings(node_id="node-b"))
    driver = plugin.cube_network_driver()
    assert driver.names == HostNames("anwt")  # type: ignore[attr-defined]
    assert driver.plan.slot(3).host_if == "vhanwt3"  # type: ignore[attr-defined]


def test_host_table_of_another_node():
    rules = HostRules(subnet="100.65.0.0/16", resolver="100.65.0.1", forward_only_sandboxes=True,
                      names=HostNames("ywoy"))
    script = host_ruleset(rules)
    assert "table inet cube_ywoy {" in script and "table inet cube {" not in script
    # its own links: reject towards the host, resolver, masquerade
    assert 'iifname "vhywoy*" meta l4proto tcp reject with tcp reset' in script
    assert 'iifname "vhywoy*" ip daddr 100.65.0.1' in script
    assert 'oifname != "vhywoy*" masquerade' in script
    assert 'iifname "vh*" meta l4proto tcp reject' not in script  # other nodes' links are not its own
    # every node's sandboxes stay apart, and the forwarding guard lets every node's sandboxes out
    assert 'iifname "vh*" oifname "vh*" drop' in script
    guard = script.split("oifname \"vhywoy*\" drop\n", 1)[1]
    assert guard.startswith('    iifname "vh*" accept\n    oifname "vh*" ct state established,related accept\n'
                            "    drop\n")
    # node local's own links are vh<digits> (a tag starts with a letter): its table claims those
    # only, so it never rejects what another node's sandboxes send their resolver or egress proxy
    local = host_ruleset(HostRules(subnet="100.64.0.0/10", resolver="100.64.0.1", forward_only_sandboxes=True))
    own = '{ "vh0*", "vh1*", "vh2*", "vh3*", "vh4*", "vh5*", "vh6*", "vh7*", "vh8*", "vh9*" }'
    assert f"iifname {own} meta l4proto tcp reject with tcp reset" in local
    assert 'iifname "vh*" meta l4proto tcp reject' not in local
    assert f"oifname != {own} masquerade" in local and 'iifname "vh*" oifname "vh*" drop' in local
    assert local.split(f"oifname {own} drop\n", 1)[1].startswith(
        '    iifname "vh*" accept\n    oifname "vh*" ct state established,related accept\n    drop\n')
