"""Build and tear down one network slot (namespace + tap + veth + NAT), synchronously.

Everything here runs on one of the driver's worker threads: the thread enters the new namespace
to configure it and comes back. The host side of the veth is brought up last, after
``before_up`` (the egress filter attach) has run, so a slot never has unfiltered connectivity.
``in_namespace`` runs inside the new namespace once tap0 and vg0 exist (the filter's IPv6 relay).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cube_net_ebpf import nat, netns
from cube_net_ebpf.addressing import (
    GATEWAY_ADDR,
    GUEST_PREFIXLEN,
    LINK_PREFIXLEN,
    NS_VETH,
    TAP_MAC,
    TAP_NAME,
    SlotAddress,
)
from cube_net_ebpf.tap import create_persistent_tap

log = structlog.get_logger(__name__)

BeforeUp = Callable[[IPRoute, int], None]
"""Called with the host's IPRoute and the host-side ifindex before the link goes up."""
InNamespace = Callable[[IPRoute, int, int], None]
"""Called inside the slot's namespace with its IPRoute and the ifindexes of tap0 and vg0."""


@dataclass(frozen=True, slots=True)
class SlotSpec:
    netns: str
    addr: SlotAddress
    resolver: str | None = None
    guest_veth_netns: str | None = None
    """Test only: make ``tap0`` a veth whose peer ``eth0`` lives in this (existing) namespace."""


def _link_index(ifname: str) -> int:
    """ifindex of ``ifname`` in the calling thread's namespace (an ioctl, no netlink dump)."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError as exc:
        raise NetlinkError(errno.ENODEV, f"no link {ifname}") from exc


def _configure_namespace(spec: SlotSpec, origin_fd: int,
                         in_namespace: InNamespace | None = None) -> None:
    for key in ("net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/default/disable_ipv6",
                "net/ipv4/ip_forward"):
        netns.write_sysctl(key, "1")
    with IPRoute() as ipr:
        ipr.link("set", index=_link_index("lo"), state="up")
        if spec.guest_veth_netns is None:
            create_persistent_tap(TAP_NAME)
            tap = _link_index(TAP_NAME)
            ipr.link("set", index=tap, address=TAP_MAC, state="up")
        else:
            peer_fd = netns.open_fd(spec.guest_veth_netns)
            try:
                ipr.link("add", ifname=TAP_NAME, kind="veth", address=TAP_MAC, state="up",
                         peer={"ifname": "eth0", "net_ns_fd": peer_fd})
            finally:
                netns.close_fd(peer_fd)
            tap = _link_index(TAP_NAME)
        ipr.addr("add", index=tap, address=GATEWAY_ADDR, prefixlen=GUEST_PREFIXLEN)
        ipr.link("add", ifname=NS_VETH, kind="veth", state="up",
                 peer={"ifname": spec.addr.host_if, "net_ns_fd": origin_fd})
        veth = _link_index(NS_VETH)
        ipr.addr("add", index=veth, address=spec.addr.ns_addr, prefixlen=LINK_PREFIXLEN)
        ipr.route("add", dst="0.0.0.0/0", gateway=spec.addr.host_addr)
        if in_namespace is not None:
            in_namespace(ipr, tap, veth)
    nat.apply_slot(spec.addr.ns_addr, spec.resolver)


class HostNetlink:
    """Root-namespace ``IPRoute`` sockets, one per thread and reused (opening one costs about
    0.7 ms). A socket stays bound to the namespace it was opened in, so it is safe to use while
    the thread visits a sandbox namespace. ``close()`` closes them all."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[tuple[IPRoute, asyncio.AbstractEventLoop, asyncio.DatagramTransport]] = []
        self._lock = threading.Lock()

    def get(self) -> IPRoute:
        ipr: IPRoute | None = getattr(self._local, "ipr", None)
        if ipr is None:
            ipr = IPRoute()
            self._local.ipr = ipr
            # pyroute2 keeps the event loop and transport of a sync socket in the opening
            # thread's locals, out of reach of a close() from another thread: keep them at hand
            loop: asyncio.AbstractEventLoop = ipr.asyncore.event_loop
            transport: asyncio.DatagramTransport = ipr.asyncore.transport
            with self._lock:
                self._all.append((ipr, loop, transport))
        return ipr

    def close_current(self) -> None:
        """Close the calling thread's socket (pyroute2 closes cleanly only on the thread that
        opened the socket, whose event loop it uses)."""
        ipr: IPRoute | None = getattr(self._local, "ipr", None)
        if ipr is not None:
            self._local.ipr = None
            with self._lock:
                self._all = [entry for entry in self._all if entry[0] is not ipr]
            ipr.close()

    def close(self) -> None:
        """Close whatever sockets are left, from this thread. pyroute2 cannot reach another
        thread's event loop and transport when it closes a socket, so they are closed here. Call
        it when the threads that opened them are done (their loops run only during a call)."""
        with self._lock:
            sockets, self._all = self._all, []
        for ipr, loop, transport in sockets:
            ipr.close()
            if loop.is_closed():
                continue
            transport.abort()
            loop.run_until_complete(asyncio.sleep(0))  # runs the abort's connection_lost: closes the socket
            loop.close()


@contextlib.contextmanager
def _host_ipr(host: HostNetlink | None) -> Iterator[IPRoute]:
    if host is not None:
        yield host.get()
    else:
        with IPRoute() as ipr:
            yield ipr


def build(spec: SlotSpec, before_up: BeforeUp | None = None, host: HostNetlink | None = None,
          in_namespace: InNamespace | None = None) -> int:
    """Create the slot; return the host-side ifindex. On failure nothing is left behind."""
    with netns.created(spec.netns) as origin_fd:  # removes the namespace if the block fails
        _configure_namespace(spec, origin_fd, in_namespace)
    try:
        with _host_ipr(host) as ipr:
            ifindex = _link_index(spec.addr.host_if)
            netns.write_sysctl(f"net/ipv6/conf/{spec.addr.host_if}/disable_ipv6", "1")
            if before_up is not None:
                before_up(ipr, ifindex)
            ipr.addr("add", index=ifindex, address=spec.addr.host_addr, prefixlen=LINK_PREFIXLEN)
            ipr.link("set", index=ifindex, state="up")
    except BaseException:
        destroy(spec.netns, spec.addr.host_if)
        raise
    return ifindex


def delete_link(ipr: IPRoute, ifname: str) -> bool:
    """Delete link ``ifname`` (a veth takes its peer along); False if it was not there."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        return False
    try:
        ipr.link("del", index=found[0])
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise
        return False
    return True


def destroy(netns_name: str, host_if: str) -> None:
    """Remove a slot's host link and namespace; idempotent."""
    with IPRoute() as ipr:
        delete_link(ipr, host_if)
    netns.remove(netns_name)
