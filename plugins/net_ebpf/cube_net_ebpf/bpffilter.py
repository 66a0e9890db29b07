"""The loaded egress filter: one BPF object, its maps, and their user-space bookkeeping.

Sandboxes are keyed by the ifindex of their host-side veth (an ifindex is not reused soon, so
stale flows of a released slot can never match a new one). All methods are synchronous and
thread-safe; map updates take microseconds.
"""

from __future__ import annotations

import ipaddress
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cube_net_ebpf.addressing import TAP_MAC
from cube_net_ebpf.libbpf import BPF_ANY, BpfMap, BpfObject, RingBuffer
from cube_net_ebpf.policy import CidrRule, CompiledPolicy
from cube_net_ebpf.ranges import DeniedRanges

log = structlog.get_logger(__name__)

SBX_F_REJECT = 1
SBX_F_DEFAULT_ALLOW = 2
SBX_F_ALLOW_IPV6 = 4

SBX_VAL = struct.Struct("<II4sI6s2x")   # sbx_id, flags, host_addr, gen, gw_mac
RULE_KEY = struct.Struct("<IIBB2s4s")   # prefixlen, sbx_id, proto, pad, dport(BE), daddr
RULE6_KEY = struct.Struct("<IIBB2s16s")
RULE_VAL = struct.Struct("<QII")        # expires_ns, rule_id, flags
RULE_F_SYSTEM = 1
BLOCK_KEY = struct.Struct("<I4s")
BLOCK6_KEY = struct.Struct("<I16s")
FLOW_KEY = struct.Struct("<I4s4s2s2sB3x")
FLOW_VAL = struct.Struct("<QQII")       # last_seen_ns, expires_ns, rule_id, gen
U32 = struct.Struct("<I")

PROG_EGRESS = "sandbox_egress"
PROG_INGRESS = "sandbox_ingress"
PROG_RELAY = "slot_ipv6_relay"
TC_INGRESS = "ffff:fff2"
TC_EGRESS = "ffff:fff3"
ETH_P_IPV6 = 0x86DD
DNS_RULE_BASE = 1 << 24


def boottime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def rule_key(sbx: int, rule: CidrRule) -> bytes:
    net = ipaddress.ip_network(rule.cidr)
    key = RULE6_KEY if net.version == 6 else RULE_KEY
    return key.pack(64 + net.prefixlen, sbx, rule.proto, 0, struct.pack("!H", rule.port),
                    net.network_address.packed)


def _empty_tables() -> dict[str, dict[bytes, bytes]]:
    return {"allow": {}, "deny": {}, "allow6": {}, "deny6": {}}


def _flags(policy: CompiledPolicy) -> int:
    flags = SBX_F_REJECT
    if policy.default_allow:
        flags |= SBX_F_DEFAULT_ALLOW
    if policy.allow_ipv6:
        flags |= SBX_F_ALLOW_IPV6
    return flags


def _possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last) - int(first) + 1 if last else 1
    return count


@dataclass
class _Learned:
    expires_ns: int
    rule_id: int
    domain: str


class EgressFilter:
    """One program pair + maps shared by every sandbox on this host."""

    def __init__(self, obj_path: Path, pin_dir: Path | None) -> None:
        self.obj = BpfObject(obj_path, pin_dir)
        self.prog_egress = self.obj.prog_fd(PROG_EGRESS)
        self.prog_ingress = self.obj.prog_fd(PROG_INGRESS)
        self.prog_relay = self.obj.prog_fd(PROG_RELAY)
        self.sandboxes = BpfMap(self.obj.map_fd("sandboxes"), 4, SBX_VAL.size)
        self.allow = BpfMap(self.obj.map_fd("allow_rules"), RULE_KEY.size, RULE_VAL.size)
        self.deny = BpfMap(self.obj.map_fd("deny_rules"), RULE_KEY.size, RULE_VAL.size)
        self.blocked = BpfMap(self.obj.map_fd("blocked"), BLOCK_KEY.size, 4)
        self.allow6 = BpfMap(self.obj.map_fd("allow6_rules"), RULE6_KEY.size, RULE_VAL.size)
        self.deny6 = BpfMap(self.obj.map_fd("deny6_rules"), RULE6_KEY.size, RULE_VAL.size)
        self.blocked6 = BpfMap(self.obj.map_fd("blocked6"), BLOCK6_KEY.size, 4)
        self.flows = BpfMap(self.obj.map_fd("flows"), FLOW_KEY.size, FLOW_VAL.size)
        self._ncpu = _possible_cpus()
        self.stats_map = BpfMap(self.obj.map_fd("stats"), 4, 8 * self._ncpu)
        self.events_fd = self.obj.map_fd("events")
        self._lock = threading.RLock()
        self._static: dict[int, dict[str, dict[bytes, bytes]]] = {}
        """ifindex -> {"allow"/"deny": {key: value}} written from policies"""
        self._learned: dict[int, dict[bytes, _Learned]] = {}
        self._labels: dict[int, dict[int, str]] = {}
        """ifindex -> rule id -> human label (for audit)"""
        self._next_rule_id = 1
        self._gen = (boottime_ns() >> 20) & 0xFFFFFFFF
        """Policy generations: every policy write takes the next one (flows decided under an
        older generation are decided again). Started from the clock so that a restarted Cube
        does not reuse the numbers of the last one."""
        self._recover()

    def _tables(self) -> tuple[tuple[str, BpfMap], ...]:
        return (("allow", self.allow), ("deny", self.deny), ("allow6", self.allow6),
                ("deny6", self.deny6))

    def _recover(self) -> None:
        """Rebuild the bookkeeping from pinned maps written by an earlier process."""
        for name, bpf_map in self._tables():
            for key, value in bpf_map.items():
                sbx = U32.unpack(key[4:8])[0]
                expires, rule_id, _flags = RULE_VAL.unpack(value)
                if expires:
                    self._learned.setdefault(sbx, {})[key] = _Learned(expires, rule_id, "")
                else:
                    self._static.setdefault(sbx, _empty_tables())[name][key] = value
                self._next_rule_id = max(self._next_rule_id, (rule_id % DNS_RULE_BASE) + 1)

    # -- host-wide ------------------------------------------------------------------------------

    def set_blocked(self, ranges: DeniedRanges) -> None:
        """Write the always-denied ranges and the operator's openings (value: ranges.KIND_*)."""
        want: dict[str, dict[bytes, bytes]] = {"4": {}, "6": {}}
        for net, kind in ranges.entries():
            key_fmt = BLOCK6_KEY if net.version == 6 else BLOCK_KEY
            key = key_fmt.pack(net.prefixlen, net.network_address.packed)
            want[str(net.version)][key] = U32.pack(kind)
        with self._lock:
            for version, bpf_map in (("4", self.blocked), ("6", self.blocked6)):
                for key in list(bpf_map.keys()):
                    if key not in want[version]:
                        bpf_map.delete(key)
                for key, value in want[version].items():
                    bpf_map.update(key, value)

    # -- sandboxes ------------------------------------------------------------------------------

    def register(self, ifindex: int, host_addr: str, policy: CompiledPolicy,
                 gateway_mac: str = TAP_MAC) -> None:
        """Write a sandbox's policy and then its interface entry (before the filter is attached
        and the link goes up). ``gateway_mac`` is the MAC the guest sees as its gateway (tap0's):
        the filter's answers to the guest's IPv6 frames come from it."""
        with self._lock:
            self.apply(ifindex, policy)
            self.sandboxes.update(U32.pack(ifindex), SBX_VAL.pack(
                ifindex, _flags(policy), ipaddress.IPv4Address(host_addr).packed,
                self._next_gen(), bytes.fromhex(gateway_mac.replace(":", ""))))

    def _next_gen(self) -> int:
        self._gen = (self._gen + 1) & 0xFFFFFFFF
        return self._gen

    def set_flags(self, ifindex: int, policy: CompiledPolicy) -> None:
        """Write the sandbox's flags with a new policy generation: its established flows are
        decided again by their next packet, and those the policy now denies are revoked."""
        with self._lock:
            raw = self.sandboxes.lookup(U32.pack(ifindex))
            if raw is None:
                return
            sbx, _old, host, _gen, gw_mac = SBX_VAL.unpack(raw)
            self.sandboxes.update(U32.pack(ifindex), SBX_VAL.pack(
                sbx, _flags(policy), host, self._next_gen(), gw_mac))

    def registered(self) -> list[int]:
        return [U32.unpack(k)[0] for k in self.sandboxes.keys()]

    def unregister(self, ifindex: int) -> None:
        """Forget a sandbox: its interface entry, rules and learned addresses (flows age out of
        the LRU table; they are keyed by this ifindex and can never match another slot)."""
        with self._lock:
            self.sandboxes.delete(U32.pack(ifindex))
            maps = dict(self._tables())
            for name, entries in self._static.pop(ifindex, {}).items():
                bpf_map = maps[name]
                for key in entries:
                    bpf_map.delete(key)
            for key in self._learned.pop(ifindex, {}):
                self.allow.delete(key)
            self._labels.pop(ifindex, None)

    def apply(self, ifindex: int, policy: CompiledPolicy) -> None:
        """Make the sandbox's static rules equal to ``policy`` (a diff: only changes are written)
        and start a new policy generation: established flows the new rules deny are revoked."""
        with self._lock:
            labels = self._labels.setdefault(ifindex, {})
            current = self._static.setdefault(ifindex, _empty_tables())
            for name, rules, bpf_map in (("allow", policy.allow, self.allow),
                                         ("deny", policy.deny, self.deny),
                                         ("allow6", policy.allow6, self.allow6),
                                         ("deny6", policy.deny6, self.deny6)):
                want: dict[bytes, CidrRule] = {rule_key(ifindex, r): r for r in rules}
                have = current.setdefault(name, {})
                for key in [k for k in have if k not in want]:
                    learned = self._learned.get(ifindex, {}).get(key) if name == "allow" else None
                    if learned is not None:
                        bpf_map.update(key, RULE_VAL.pack(learned.expires_ns, learned.rule_id, 0))
                    else:
                        bpf_map.delete(key)
                    del have[key]
                for key, rule in want.items():
                    flags = RULE_F_SYSTEM if rule in policy.system and name == "allow" else 0
                    if key in have and RULE_VAL.unpack(have[key])[2] == flags:
                        continue
                    rule_id = self._next_rule_id
                    self._next_rule_id += 1
                    value = RULE_VAL.pack(0, rule_id, flags)
                    bpf_map.update(key, value, BPF_ANY)
                    have[key] = value
                    labels[rule_id] = policy.labels.get(rule, f"{name} {rule.cidr}")
            # learned addresses of domains no longer allowed go away
            domains = {d.pattern for d in policy.allow_domains}
            learned_now = self._learned.get(ifindex, {})
            for key in [k for k, v in learned_now.items() if v.domain and v.domain not in domains]:
                if key not in current["allow"]:
                    self.allow.delete(key)
                del learned_now[key]
            self.set_flags(ifindex, policy)  # last: flows are decided again on the final rules

    def learn(self, ifindex: int, address: str, proto: int, port: int, ttl_s: float,
              domain: str) -> int:
        """Allow ``address`` for ``ttl_s`` seconds (a DNS answer for an allowed domain)."""
        rule = CidrRule(f"{address}/32", proto, port)
        key = rule_key(ifindex, rule)
        expires = boottime_ns() + int(ttl_s * 1e9)
        with self._lock:
            if key in self._static.get(ifindex, {}).get("allow", {}):
                return int(RULE_VAL.unpack(self._static[ifindex]["allow"][key])[1])
            learned = self._learned.setdefault(ifindex, {})
            old = learned.get(key)
            rule_id = old.rule_id if old else DNS_RULE_BASE + self._next_rule_id
            if not old:
                self._next_rule_id += 1
            if old and old.expires_ns > expires:
                return rule_id
            self.allow.update(key, RULE_VAL.pack(expires, rule_id, 0))
            learned[key] = _Learned(expires, rule_id, domain)
            self._labels.setdefault(ifindex, {})[rule_id] = f"allow {domain} ({address})"
            return rule_id

    def expire_learned(self, keep_s: float = 60.0) -> int:
        """Delete DNS-learned entries expired more than ``keep_s`` ago (the kernel already
        ignores them; until then a denied attempt is reported as "expired")."""
        now = boottime_ns() - int(keep_s * 1e9)
        removed = 0
        with self._lock:
            for ifindex, learned in self._learned.items():
                static = self._static.get(ifindex, {}).get("allow", {})
                for key in [k for k, v in learned.items() if v.expires_ns < now]:
                    if key not in static:
                        self.allow.delete(key)
                    del learned[key]
                    removed += 1
        return removed

    def label(self, ifindex: int, rule_id: int) -> str | None:
        return self._labels.get(ifindex, {}).get(rule_id)

    def flow_count(self, ifindex: int) -> int:
        return sum(1 for key in self.flows.keys() if FLOW_KEY.unpack(key)[0] == ifindex)

    def kill_flows(self, ifindex: int) -> int:
        count = 0
        for key in list(self.flows.keys()):
            if FLOW_KEY.unpack(key)[0] == ifindex:
                count += self.flows.delete(key)
        return count

    def stats(self) -> dict[str, int]:
        names = ("allow_pkts", "deny_pkts", "events_lost", "rejects", "nd_answers")
        out = {}
        for i, name in enumerate(names):
            raw = self.stats_map.lookup(U32.pack(i))
            out[name] = sum(struct.unpack(f"<{self._ncpu}Q", raw)) if raw else 0
        return out

    def ring_buffer(self, callback: Callable[[bytes], None]) -> RingBuffer:
        return RingBuffer(self.events_fd, callback)

    # -- attach ---------------------------------------------------------------------------------

    def attach(self, ipr: IPRoute, ifindex: int) -> None:
        """clsact + the two direct-action filters on the host end of a sandbox's veth. They stay
        attached if Cube dies, so the sandbox stays filtered (fail closed)."""
        try:
            ipr.tc("add", "clsact", ifindex)
        except NetlinkError as exc:
            if exc.code != 17:  # EEXIST
                raise
        ipr.tc("add-filter", "bpf", ifindex, ":1", fd=self.prog_egress, name=PROG_EGRESS,
               parent=TC_INGRESS, classid=1, direct_action=True)
        ipr.tc("add-filter", "bpf", ifindex, ":1", fd=self.prog_ingress, name=PROG_INGRESS,
               parent=TC_EGRESS, classid=1, direct_action=True)

    @staticmethod
    def detach(ipr: IPRoute, ifindex: int) -> None:
        """Remove the clsact qdisc of ``ifindex`` and every filter on it (benchmarks only: a
        sandbox link must never be left without its filter)."""
        try:
            ipr.tc("del", "clsact", ifindex)
        except NetlinkError as exc:
            if exc.code not in (2, 22):  # ENOENT, EINVAL: no clsact there
                raise

    def attach_ipv6_relay(self, ipr: IPRoute, tap_index: int, veth_index: int) -> None:
        """Inside a slot's namespace (``ipr`` opened there): relay IPv6 frames between tap0 and
        the namespace end of the veth, so that the host-side filter sees the guest's IPv6 and
        its answers get back (the namespace itself has no IPv6 stack). The relay's target
        ifindex travels in the filter's classid (its minor, 16 bits)."""
        for dev, to in ((tap_index, veth_index), (veth_index, tap_index)):
            if not 0 < to <= 0xFFFF:
                raise ValueError(f"ifindex {to} does not fit a classid minor")
            try:
                ipr.tc("add", "clsact", dev)
            except NetlinkError as exc:
                if exc.code != 17:  # EEXIST
                    raise
            ipr.tc("add-filter", "bpf", dev, ":1", fd=self.prog_relay, name=PROG_RELAY,
                   parent=TC_INGRESS, classid=(1 << 16) | to, direct_action=True,
                   protocol=ETH_P_IPV6)

    def close(self) -> None:
        self.obj.close()
