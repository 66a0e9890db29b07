"""``EbpfNetwork``: the network driver (one namespace + tap + veth + NAT per sandbox, and one
eBPF egress filter shared by all of them)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import json
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import structlog
from cube_core import (
    CAP_HTTP_RULES,
    EgressRule,
    HttpRule,
    NetworkDriver,
    NetworkError,
    NetworkPolicy,
    NicHandle,
    SecretSource,
)
from pyroute2 import IPRoute

from cube_net_ebpf import bpfobject, headerrules, host, libbpf, nat, netns, nftables, slot
from cube_net_ebpf.addressing import (
    GUEST_MAC,
    TAP_NAME,
    AddressPlan,
    SlotAddress,
    SlotIndexes,
    host_if_name,
    index_of_slot,
    netns_name,
    slot_id_for,
)
from cube_net_ebpf.audit import AuditLog, AuditReader
from cube_net_ebpf.bpffilter import EgressFilter
from cube_net_ebpf.config import EbpfNetConfig
from cube_net_ebpf.dns import Client, Resolver, system_upstreams
from cube_net_ebpf.dnslimits import DnsLimits
from cube_net_ebpf.egressca import EgressCa
from cube_net_ebpf.errors import map_network_errors
from cube_net_ebpf.httpproxy import HttpProxy, ProxyClient, TlsInspection, upstream_context
from cube_net_ebpf.policy import CompiledPolicy, compile_policy
from cube_net_ebpf.ranges import DeniedRanges, parse_networks

log = structlog.get_logger(__name__)

T = TypeVar("T")

POOL_PREFIX = ".pool-"
DENY_ALL = NetworkPolicy(allow_internet_access=False)

GuestNetnsFactory = Callable[[int], str]
"""Test only: slot index -> name of an existing namespace that plays the guest (see SlotSpec)."""


def _link_exists(ifname: str) -> bool:
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


@dataclass
class _Slot:
    slot_id: str
    netns: str
    addr: SlotAddress
    ifindex: int
    policy: CompiledPolicy
    source: dict[str, Any]
    """The policy as given (NetworkPolicy + extra rules), persisted for a restarted Cube."""
    rules: tuple[HttpRule, ...] = ()
    """``NetworkPolicy.rules``: its HTTP requests go through the egress proxy while not empty."""

    def nic(self) -> NicHandle:
        return NicHandle(slot_id=self.slot_id, netns=self.netns, tap=TAP_NAME,
                         guest_address=self.addr.ns_addr, guest_mac=GUEST_MAC,
                         data={"index": self.addr.index, "host_if": self.addr.host_if,
                               "host_addr": self.addr.host_addr, "ns_addr": self.addr.ns_addr,
                               "ifindex": self.ifindex})


class EbpfNetwork(NetworkDriver):
    """Network slots for sandboxes; see ARCHITECTURE.md §6.

    Each slot is a namespace ``cube-<slot_id>`` holding ``tap0`` (169.254.0.22/30, the guest's
    gateway) and ``vg0``, the namespace end of a veth pair whose host end is ``vh<index>``. The
    host reaches guest TCP port P at ``NicHandle.guest_address:P``. The egress filter sits on
    ``vh<index>``; the sandbox's DNS goes to Cube's resolver. On a node other than ``local``
    the names carry the node's tag (``cube-<tag>-<slot_id>``, ``vh<tag><index>``; see
    :mod:`.nodenames`), and start-up cleanup and ``sweep`` only ever see this node's names.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset({"update_policy", "audit", CAP_HTTP_RULES})

    def __init__(self, config: EbpfNetConfig, *,
                 test_guest_netns: GuestNetnsFactory | None = None) -> None:
        self.config = config
        self.names = config.names
        """This node's host-global names; build the driver from ``config.for_node(node_id)``."""
        self.plan = AddressPlan(config.subnet, self.names)
        self.indexes = SlotIndexes(self.plan.max_index)
        self.setup_ms: list[float] = []
        """Wall time of the last slot builds (namespace + tap + veth + NAT + filter)."""
        self.filter: EgressFilter | None = None
        self._configured_denied = DeniedRanges(
            always=parse_networks((*config.always_denied, *config.always_denied6, config.subnet)),
            openable=parse_networks(config.openable_ranges))
        self.denied = self._configured_denied
        """What no sandbox rule opens; the host's own addresses are added at start."""
        self.audit_log = AuditLog(config.audit_max_events, config.audit_dir)
        self._test_guest_netns = test_guest_netns
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self._slots: dict[str, _Slot] = {}
        self._by_ifindex: dict[int, str] = {}
        self._by_index: dict[int, str] = {}
        self._pool: collections.deque[_Slot] = collections.deque()
        self._pool_building = 0
        self._draining: set[int] = set()
        """Indexes released by this process whose host link may still be going away."""
        self._host_netlink = slot.HostNetlink()
        self._reader: AuditReader | None = None
        self._resolver: Resolver | None = None
        self._proxy: HttpProxy | None = None
        self._secrets: SecretSource | None = None
        self.ca: EgressCa | None = None
        """The node's egress CA, while HTTPS rules are on (``https_ports``)."""
        self._http_slots: set[str] = set()
        """Namespace addresses now in the host table's ``http_rule_slots`` set."""
        self._started = False
        self._closing = False
        self._start_lock = asyncio.Lock()

    # -- plumbing -------------------------------------------------------------------------------

    def _pool_executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.config.workers,
                                                thread_name_prefix="cube-net")
        return self._executor

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool_executor(), functools.partial(func, *args))

    def use_secrets(self, source: SecretSource) -> None:
        self._secrets = source
        if self._proxy is not None:
            self._proxy.secrets = source

    @property
    def http_proxy(self) -> tuple[str, int] | None:
        return (self.plan.resolver_addr, self.config.http_proxy_port) if self.config.http_rules else None

    @property
    def https_proxy_port(self) -> int | None:
        return self.config.https_proxy_port if self.config.http_rules and self.config.https_ports else None

    def guest_trust(self) -> str | None:
        """The node's egress CA (PEM) while HTTPS rules are on: guests must trust it for the
        proxy's inspection of their HTTPS to rule hosts."""
        return self.ca.pem if self.ca is not None else None

    @property
    def resolver(self) -> str | None:
        return self.plan.resolver_addr if self.config.dns else None

    def _state_file(self, slot_id: str) -> Path:
        return self.config.state_dir / f"{slot_id}.json"

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._start_lock:
            if not self._started:
                await self._run(self._start_sync)
                if self.http_proxy is not None and self._proxy is None:
                    await self._start_proxy(*self.http_proxy)
                self._started = True

    async def _start_proxy(self, address: str, port: int) -> None:
        tls = None
        if self.ca is not None and self.https_proxy_port is not None:
            try:
                tls = TlsInspection(self.ca, self.https_proxy_port, upstream_context(self.config.upstream_ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise NetworkError(f"egress proxy: upstream_ca_file {self.config.upstream_ca_file}: {exc}") from exc
        proxy = HttpProxy(address, port, self._proxy_client, self._addresses, self.audit_log.add, tls=tls)
        proxy.secrets = self._secrets
        try:
            await proxy.start()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise NetworkError(f"egress proxy: cannot listen on {address}:{port}: {exc}") from exc
            # another process of this node (a CLI command beside `cube serve`) serves it; its
            # slots are this node's too, and the host table sends their requests there
            log.warning("egress proxy address in use: another Cube process of this node serves it",
                        address=address, port=port)
            return
        self._proxy = proxy

    def _start_sync(self) -> None:
        with map_network_errors("network start"):
            host.raise_open_files_limit()
            nftables.ensure_loaded()  # its low descriptors, while they are free
            if self.http_proxy is not None:
                host.ensure_local_address(self.http_proxy[0])
            host.prepare(self.config.subnet, self.resolver, self.config.manage_forwarding,
                         self.names, self.http_proxy, self.config.http_ports,
                         self.https_proxy_port, self.config.https_ports)
            if self.https_proxy_port is not None and self.ca is None:
                self.ca = EgressCa.load_or_create(self.config.ca_dir or self.config.state_dir / "egress-ca",
                                                  f"Cube egress CA of {socket.gethostname()[:40]}")
            self._http_slots.clear()  # the table (and its set) was just made again
            own = parse_networks(host.own_addresses(self.config.subnet))
            self.denied = DeniedRanges(always=(*self._configured_denied.always, *own),
                                       openable=self._configured_denied.openable)
            self.config.state_dir.mkdir(parents=True, exist_ok=True)
            if self.config.ebpf:
                self._start_filter()
            inv = host.inventory(self.names)
            for index in inv.indexes():
                self.indexes.mark_used(index)
            removed = self._remove_incomplete(inv)
            recovered = self._recover(host.inventory(self.names))
            if self._reader is not None:
                # only now: events the filter queued while no Cube ran belong to recovered slots
                self._reader.start()
            if self.config.dns:
                self._start_resolver()
        log.info("network driver started", slots_recovered=recovered, incomplete_removed=removed,
                 ebpf=self.filter is not None, dns=self._resolver is not None)
        self._schedule_pool_fill()

    def _start_filter(self) -> None:
        obj = bpfobject.find_or_build(self.config.bpf_cache_dir, self.config.bpf_object)
        libbpf.ensure_bpffs(self.config.bpf_pin_dir.parent)
        pin_dir = self.config.bpf_pin_dir / obj.stem
        _unpin_other_objects(self.config.bpf_pin_dir, keep=pin_dir)
        self.filter = EgressFilter(obj, pin_dir)
        self.filter.set_blocked(self.denied)
        self._reader = AuditReader(self.filter, self.audit_log, self._by_ifindex.get)

    def _start_resolver(self) -> None:
        assert self.resolver is not None
        host.ensure_local_address(self.resolver)
        upstreams = self.config.dns_upstreams or system_upstreams()
        self._resolver = Resolver(
            self.resolver, self._dns_client, self._dns_learn, self.audit_log.add,
            upstreams=upstreams, min_ttl=self.config.dns_min_ttl, max_ttl=self.config.dns_max_ttl,
            grace_s=self.config.dns_grace_s, always_denied=self.denied.always_denied,
            limits=DnsLimits(rate=self.config.dns_rate, burst=self.config.dns_burst,
                             in_flight=self.config.dns_in_flight, queue=self.config.dns_queue,
                             tcp_per_sandbox=self.config.dns_tcp_per_sandbox))
        self._resolver.start()

    def _remove_incomplete(self, inv: host.Inventory) -> int:
        """Remove what a crash left half-built (a namespace without its host link, a host link
        without its namespace) and unused pool slots. Complete slots stay: their sandboxes may
        still be live, and the service's ``sweep(live)`` decides about those."""
        removed = 0
        ns_indexes = {index_of_slot(s) for s in inv.namespaces}
        for slot_id, name in inv.namespaces.items():
            index = index_of_slot(slot_id)
            if index is None:
                continue
            if index not in inv.host_links or slot_id.startswith(POOL_PREFIX):
                netns.remove(name)
                removed += 1
        with IPRoute() as ipr:
            for index, ifname in inv.host_links.items():
                if index not in ns_indexes:
                    slot.delete_link(ipr, ifname)
                    removed += 1
        return removed

    def _recover(self, inv: host.Inventory) -> int:
        """Take back the complete slots of an earlier run (policy from their state files)."""
        recovered = 0
        for slot_id in inv.namespaces:
            index = index_of_slot(slot_id)
            if index is None or index not in inv.host_links:
                continue
            addr = self.plan.slot(index)
            try:
                ifindex = socket.if_nametoindex(addr.host_if)
                source = json.loads(self._state_file(slot_id).read_text())
                policy = NetworkPolicy.model_validate(source["policy"])
                rules = [EgressRule.model_validate(r) for r in source.get("extra_rules", ())]
            except (OSError, ValueError, KeyError) as exc:
                log.warning("slot without usable state; its filter entries stay as they are",
                            slot_id=slot_id, error=str(exc))
                continue
            # not checked against the always-denied ranges: a rule the operator no longer allows
            # is kept (the filter ignores it) rather than leaving the slot unmanaged
            compiled = compile_policy(policy, rules, resolver=self.resolver)
            rec = _Slot(slot_id, netns_name(slot_id, self.names), addr, ifindex, compiled, source,
                        policy.rules)
            if self.filter is not None:
                self.filter.register(ifindex, addr.host_addr, compiled)
            self._remember(rec)
            self._sync_http(rec)
            recovered += 1
        if self.filter is not None:
            alive = set(self._by_ifindex)
            for ifindex in self.filter.registered():
                if ifindex not in alive and not _ifindex_exists(ifindex):
                    self.filter.unregister(ifindex)
        return recovered

    async def close(self) -> None:
        """Stop the resolver, the egress proxy and the audit reader and drop the pool; slots of
        live sandboxes and their filters stay (they keep enforcing policy while Cube is down)."""
        if self._proxy is not None:
            await self._proxy.close()
            self._proxy = None
        if self._executor is not None:
            self._closing = True
            try:
                await self._run(self._close_sync)
                await self._close_worker_sockets()
                self._executor.shutdown(wait=True)  # pool builds still running release themselves
                self._host_netlink.close()
            finally:
                self._executor = None
                self._closing = False
        self._started = False

    async def _close_worker_sockets(self) -> None:
        """Run one task on every worker thread (a barrier keeps them on distinct threads) so each
        closes its own netlink socket."""
        workers = self.config.workers
        barrier = threading.Barrier(workers)

        def close_own() -> None:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=5)
            self._host_netlink.close_current()

        await asyncio.gather(*(self._run(close_own) for _ in range(workers)))

    def _close_sync(self) -> None:
        with self._lock:
            pool = list(self._pool)
            self._pool.clear()
        for rec in pool:
            self._release_sync(rec.slot_id)
        if self._resolver is not None:
            self._resolver.stop()
            self._resolver = None
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        if self.filter is not None:
            self.filter.close()
            self.filter = None

    # -- records --------------------------------------------------------------------------------

    def _remember(self, rec: _Slot) -> None:
        with self._lock:
            self._slots[rec.slot_id] = rec
            self._by_ifindex[rec.ifindex] = rec.slot_id
            self._by_index[rec.addr.index] = rec.slot_id
        self.indexes.mark_used(rec.addr.index)
        self.audit_log.open(rec.slot_id)

    def _forget(self, slot_id: str) -> _Slot | None:
        with self._lock:
            rec = self._slots.pop(slot_id, None)
            if rec is not None:
                self._by_ifindex.pop(rec.ifindex, None)
                self._by_index.pop(rec.addr.index, None)
        self.audit_log.close(slot_id)
        return rec

    def _persist(self, rec: _Slot) -> None:
        path = self._state_file(rec.slot_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec.source))
        tmp.replace(path)

    # -- DNS callbacks (resolver threads) --------------------------------------------------------

    def _peer_slot(self, peer_ip: str) -> _Slot | None:
        """The slot whose guest side has the address ``peer_ip``; the caller holds ``_lock``."""
        index = self.plan.index_of_addr(peer_ip)
        slot_id = self._by_index.get(index) if index is not None else None
        rec = self._slots.get(slot_id) if slot_id else None
        return rec if rec is not None and rec.addr.ns_addr == peer_ip else None

    def _dns_client(self, peer_ip: str) -> Client | None:
        with self._lock:
            rec = self._peer_slot(peer_ip)
            return None if rec is None else Client(slot_id=rec.slot_id, ifindex=rec.ifindex, policy=rec.policy)

    # -- egress proxy callbacks (event loop) ------------------------------------------------------

    def _proxy_client(self, peer_ip: str) -> ProxyClient | None:
        with self._lock:
            rec = self._peer_slot(peer_ip)
            return None if rec is None else ProxyClient(slot_id=rec.slot_id, rules=rec.rules)

    async def _addresses(self, name: str) -> set[str]:
        resolver = self._resolver
        if resolver is not None:
            return await asyncio.to_thread(resolver.addresses, name)
        infos = await asyncio.get_running_loop().getaddrinfo(name, None, family=socket.AF_INET)
        return {str(info[4][0]) for info in infos}

    def _sync_http(self, rec: _Slot) -> None:
        """Put the slot's address in the proxy's set exactly while it has rules (worker thread,
        host namespace)."""
        if self.http_proxy is None:
            return
        want = bool(rec.rules)
        with self._lock:
            have = rec.addr.ns_addr in self._http_slots
            if want == have:
                return
            with map_network_errors("egress proxy redirect", slot_id=rec.slot_id):
                nat.set_http_slot(self.names, rec.addr.ns_addr, want)
            (self._http_slots.add if want else self._http_slots.discard)(rec.addr.ns_addr)

    def _check_http_rules(self, policy: NetworkPolicy) -> None:
        for i, rule in enumerate(policy.rules):
            if self.http_proxy is None:
                raise NetworkError("network rules are turned off on this node "
                                   "([network.options] http_rules = false)",
                                   field=f"rules[{i}]", reason="not supported by this node")
            why = headerrules.check_rule(rule)
            if why is not None:
                raise NetworkError(f"rules[{rule.host}]: {why}", field=f"rules.{rule.host}", reason=why)

    def _dns_learn(self, ifindex: int, address: str, proto: int, port: int, ttl_s: float,
                   domain: str) -> int:
        if self.filter is None:
            return 0
        return self.filter.learn(ifindex, address, proto, port, ttl_s, domain)

    # -- slots ----------------------------------------------------------------------------------

    def _index_is_free(self, index: int) -> bool:
        return not _link_exists(host_if_name(index, self.names))

    def _build(self, owner_id: str | None, policy: CompiledPolicy, source: dict[str, Any],
               at: tuple[int, str] | None = None) -> _Slot:
        """Build a slot for ``owner_id`` (None: a pool slot), or at ``at`` (an index the
        caller reserved, and the slot id to give it)."""
        if at is not None:
            index, slot_id = at
        else:
            try:
                index = self.indexes.take(self._index_is_free)
            except LookupError as exc:
                raise NetworkError("no free network slot", owner_id=owner_id) from exc
            slot_id = slot_id_for(owner_id, index) if owner_id is not None else f"{POOL_PREFIX}{index}"
        addr = self.plan.slot(index)
        guest_ns = self._test_guest_netns(index) if self._test_guest_netns else None
        spec = slot.SlotSpec(netns=netns_name(slot_id, self.names), addr=addr, resolver=self.resolver,
                             guest_veth_netns=guest_ns)
        filt = self.filter

        def before_up(ipr: IPRoute, ifindex: int) -> None:
            if filt is not None:
                filt.register(ifindex, addr.host_addr, policy)
                filt.attach(ipr, ifindex)

        started = time.perf_counter()
        try:
            with map_network_errors("slot setup", owner_id=owner_id, slot_id=slot_id):
                ifindex = slot.build(spec, before_up, self._host_netlink,
                                     filt.attach_ipv6_relay if filt is not None else None)
        except BaseException:
            self.indexes.free(index)
            raise
        elapsed = (time.perf_counter() - started) * 1000
        with self._lock:
            self.setup_ms.append(elapsed)
            del self.setup_ms[:-1000]
        log.debug("slot built", slot_id=slot_id, ms=round(elapsed, 2))
        return _Slot(slot_id, spec.netns, addr, ifindex, policy, source)

    async def allocate(self, owner_id: str, policy: NetworkPolicy,
                       extra_rules: Sequence[EgressRule] = ()) -> NicHandle:
        await self.start()
        return await self._run(self._allocate_sync, owner_id, policy, tuple(extra_rules))

    def _allocate_sync(self, owner_id: str, policy: NetworkPolicy,
                       extra_rules: tuple[EgressRule, ...]) -> NicHandle:
        self._check_http_rules(policy)
        compiled = compile_policy(policy, extra_rules, resolver=self.resolver, denied=self.denied)
        source = {"policy": policy.model_dump(mode="json"),
                  "extra_rules": [r.model_dump(mode="json") for r in extra_rules]}
        rec = self._take_from_pool(owner_id, compiled, source)
        if rec is None:
            rec = self._build(owner_id, compiled, source)
        rec.rules = policy.rules
        self._persist(rec)
        self._remember(rec)
        self._sync_http(rec)
        self._schedule_pool_fill()
        return rec.nic()

    def _take_from_pool(self, owner_id: str, policy: CompiledPolicy,
                        source: dict[str, Any]) -> _Slot | None:
        with self._lock:
            if not self._pool:
                return None
            pooled = self._pool.popleft()
        return self._adopt_pooled(pooled, slot_id_for(owner_id, pooled.addr.index), policy, source)

    def _adopt_pooled(self, pooled: _Slot, slot_id: str, policy: CompiledPolicy,
                      source: dict[str, Any]) -> _Slot | None:
        """Make a slot taken out of the pool ``slot_id``'s (None: it broke and was released)."""
        try:
            with map_network_errors("slot from pool", slot_id=slot_id):
                netns.rename(pooled.netns, netns_name(slot_id, self.names))
                if self.filter is not None:
                    self.filter.register(pooled.ifindex, pooled.addr.host_addr, policy)
        except NetworkError:
            self._forget(pooled.slot_id)
            self._release_sync(pooled.slot_id)
            return None
        self._forget(pooled.slot_id)
        return _Slot(slot_id, netns_name(slot_id, self.names), pooled.addr, pooled.ifindex, policy,
                     source)

    def _schedule_pool_fill(self) -> None:
        if self._executor is None or self._closing:
            return
        with self._lock:
            missing = self.config.pool_size - len(self._pool) - self._pool_building
            self._pool_building += max(missing, 0)
        for _ in range(max(missing, 0)):
            future: Future[None] = self._executor.submit(self._fill_one)
            future.add_done_callback(_log_failure)

    def _fill_one(self) -> None:
        try:
            compiled = compile_policy(DENY_ALL)
            rec = self._build(None, compiled, {"policy": DENY_ALL.model_dump(mode="json")})
            self._remember(rec)
            with self._lock:
                if not self._closing:
                    self._pool.append(rec)
                    return
            self._release_sync(rec.slot_id)
        finally:
            with self._lock:
                self._pool_building -= 1

    async def recreate(self, nic: NicHandle, policy: NetworkPolicy,
                       extra_rules: Sequence[EgressRule] = ()) -> NicHandle:
        await self.start()
        return await self._run(self._recreate_sync, nic.slot_id, policy, tuple(extra_rules))

    def _recreate_sync(self, slot_id: str, policy: NetworkPolicy,
                       extra_rules: tuple[EgressRule, ...]) -> NicHandle:
        """The slot ``slot_id`` again, at its own index (so the same addresses), after a host
        reboot removed it. A pool slot built meanwhile at that index (every index looked free
        then) is taken over: it has the very addresses."""
        with self._lock:
            known = self._slots.get(slot_id)
        if known is not None:
            return known.nic()
        index = index_of_slot(slot_id)
        if index is None or slot_id.startswith(POOL_PREFIX):
            raise NetworkError(f"not a sandbox's network slot: {slot_id}", slot_id=slot_id)
        if netns.path_of(netns_name(slot_id, self.names)).exists():  # without its state: built anew
            self._release_sync(slot_id)
            self._draining.discard(index)
        compiled = compile_policy(policy, extra_rules, resolver=self.resolver, denied=self.denied)
        source = {"policy": policy.model_dump(mode="json"),
                  "extra_rules": [r.model_dump(mode="json") for r in extra_rules]}
        rec: _Slot | None = None
        deadline = time.monotonic() + 10.0
        while rec is None:
            with self._lock:
                holder = self._slots.get(self._by_index.get(index, ""))
                pooled = holder if holder is not None and any(p is holder for p in self._pool) else None
                if pooled is not None:
                    self._pool.remove(pooled)
                claimed = holder is None and self.indexes.claim(index)
            if pooled is not None:
                rec = self._adopt_pooled(pooled, slot_id, compiled, source)
            elif claimed:
                if not self._index_is_free(index):  # a link of an earlier slot is still going away
                    self.indexes.free(index)
                    raise NetworkError(f"network slot index {index} is still in use", slot_id=slot_id)
                rec = self._build(None, compiled, source, at=(index, slot_id))
            elif holder is not None or time.monotonic() > deadline:
                raise NetworkError(f"network slot index {index} is taken by another slot", slot_id=slot_id)
            else:  # a pool slot is being built there: it joins the pool in a moment
                time.sleep(0.05)
        self._persist(rec)
        self._remember(rec)
        log.info("network slot re-created", slot_id=slot_id, index=index)
        return rec.nic()

    async def update_policy(self, nic: NicHandle, policy: NetworkPolicy,
                            extra_rules: Sequence[EgressRule] = ()) -> None:
        await self._run(self._update_sync, nic.slot_id, policy, tuple(extra_rules))

    def _update_sync(self, slot_id: str, policy: NetworkPolicy,
                     extra_rules: tuple[EgressRule, ...]) -> None:
        """Rewrite the slot's rules in place (map writes, no reload); established flows the new
        rules deny are revoked by the filter (their next packet is rejected)."""
        self._check_http_rules(policy)
        compiled = compile_policy(policy, extra_rules, resolver=self.resolver, denied=self.denied)
        with self._lock:
            rec = self._slots.get(slot_id)
            if rec is None:
                raise NetworkError(f"unknown network slot {slot_id}", slot_id=slot_id)
            if self.filter is not None:
                with map_network_errors("policy update", slot_id=slot_id):
                    self.filter.apply(rec.ifindex, compiled)
            rec.policy = compiled
            rec.rules = policy.rules
            self._sync_http(rec)
            rec.source = {"policy": policy.model_dump(mode="json"),
                          "extra_rules": [r.model_dump(mode="json") for r in extra_rules]}
        self._persist(rec)
        self.audit_log.add(slot_id, {"kind": "policy", "ts": _now_iso(),
                                     "policy": rec.source["policy"],
                                     "extra_rules": rec.source["extra_rules"]})

    async def audit(self, nic: NicHandle, *, limit: int = 1000) -> list[dict[str, Any]]:
        if self._reader is not None:
            await self._run(self._reader.drain)
        return self.audit_log.recent(nic.slot_id, limit)

    async def release(self, nic: NicHandle) -> None:
        await self._run(self._release_sync, nic.slot_id)

    def _release_sync(self, slot_id: str) -> None:
        """Unregister the filter entries and unmount the namespace; the kernel then deletes
        tap0 and both veth ends by itself (an explicit veth delete waits for an RCU grace period,
        about 25 ms). Idempotent."""
        index = index_of_slot(slot_id)
        rec = self._forget(slot_id)
        with map_network_errors("slot release", slot_id=slot_id):
            if rec is not None and rec.rules:
                rec.rules = ()
                self._sync_http(rec)
            if rec is not None and self.filter is not None:
                self.filter.unregister(rec.ifindex)
            netns.remove(netns_name(slot_id, self.names))
            self._state_file(slot_id).unlink(missing_ok=True)
        if index is not None:
            self._draining.add(index)
            self.indexes.free(index)  # reused only once vh<index> is gone (see _index_is_free)

    async def sweep(self, live: Iterable[str]) -> int:
        return await self._run(self._sweep_sync, frozenset(live))

    def _sweep_sync(self, live: frozenset[str]) -> int:
        with self._lock:
            keep = set(live) | {p.slot_id for p in self._pool}
        keep_indexes = {i for i in map(index_of_slot, keep) if i is not None}
        removed: set[int] = set()
        with map_network_errors("sweep"):
            inv = host.inventory(self.names)
            for slot_id in inv.namespaces:
                if slot_id in keep:
                    continue
                self._release_sync(slot_id)
                index = index_of_slot(slot_id)
                if index is not None:
                    removed.add(index)
            for slot_id in [s for s in list(self._slots) if s not in keep]:
                self._release_sync(slot_id)
            stale_links = {i: n for i, n in inv.host_links.items() if i not in keep_indexes}
            if stale_links:
                with IPRoute() as ipr:
                    for index, ifname in stale_links.items():
                        if slot.delete_link(ipr, ifname) and index not in self._draining:
                            removed.add(index)
            if self.filter is not None:
                alive = set(self._by_ifindex)
                for ifindex in self.filter.registered():
                    if ifindex not in alive:
                        self.filter.unregister(ifindex)
            for path in self.config.state_dir.glob("*.json"):
                if path.stem not in keep:
                    path.unlink(missing_ok=True)
        self._draining.clear()
        for index in removed:
            self.indexes.free(index)
        for index in keep_indexes:
            self.indexes.mark_used(index)
        if removed:
            log.info("swept orphan network slots", count=len(removed))
        return len(removed)

    # -- introspection --------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Filter packet counters (allowed, denied, rejects sent, events lost)."""
        return self.filter.stats() if self.filter is not None else {}


def _unpin_other_objects(pin_root: Path, keep: Path) -> None:
    """Unpin the maps of other builds of the filter. Filters still attached to older slots keep
    their maps alive (and keep enforcing); only the names go, so the memory is freed once those
    slots are gone."""
    if pin_root.is_dir():
        for entry in pin_root.iterdir():
            if entry != keep and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


def _ifindex_exists(ifindex: int) -> bool:
    try:
        socket.if_indextoname(ifindex)
    except OSError:
        return False
    return True


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _log_failure(future: Future[None]) -> None:
    with contextlib.suppress(Exception):
        exc = future.exception()
        if exc is not None:
            log.warning("building a pool slot failed", error=str(exc))
