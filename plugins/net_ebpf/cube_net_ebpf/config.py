"""Options of the ``ebpf`` network plugin (``[network.options]`` in plugins.toml)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cube_net_ebpf.nodenames import (
    TAG_RE,
    HostNames,
    default_bpf_pin_dir,
    default_state_dir,
    node_tag,
)
from cube_net_ebpf.ranges import ALWAYS_DENIED, ALWAYS_DENIED6

_PRIVATE = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))


class EbpfNetConfig(BaseModel):
    """Per-sandbox namespaces, tap, veth, NAT and the eBPF egress filter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subnet: str = "100.64.0.0/10"
    """IPv4 range the per-slot /30 host links are cut from (never 10/8, 172.16/12, 192.168/16).
    Its first /30 is Cube's: the resolver listens on its ``.1``. Several nodes on one host need
    subnets that do not overlap."""
    node_tag: str = ""
    """4 characters ``[a-z][a-z0-9]{3}`` in this node's host link, namespace and nft table
    names; ``""`` for the historical names. Default: ``""`` for ``[core] node_id = "local"``,
    else derived from the node id (see the plugin README, "Several nodes on one host")."""
    workers: int = Field(default=2, ge=1, le=16)
    """Threads doing netlink work (each enters sandbox namespaces on its own)."""
    pool_size: int = Field(default=2, ge=0, le=256)
    """Slots built ahead (filtered, deny-all) so ``allocate`` only renames one and writes its
    policy."""
    manage_forwarding: bool = True
    """Turn IPv4 forwarding on for sandbox traffic; if Cube turns it on, only sandbox traffic is
    forwarded (the host's ``inet cube`` table drops the rest)."""
    state_dir: Path = Path("/run/cube/net")
    """Per-slot policy files, so a restarted Cube can keep enforcing domain rules. Default
    ``/run/cube/net`` for node ``local``, else ``/run/cube/<node_id>/net``."""

    ebpf: bool = True
    """Attach the egress filter. Without it sandboxes have plain NAT (no policy, no audit)."""
    bpf_object: Path | None = None
    """A prebuilt ``egress.bpf.o``; default: the content-hashed build in ``bpf_cache_dir``
    (built by ``plugins/net_ebpf/bpf/build.sh``; built on first start when clang is present)."""
    bpf_cache_dir: Path = Path("/var/cache/cube/bpf")
    bpf_pin_dir: Path = Path("/sys/fs/bpf/cube")
    """Maps are pinned under ``<bpf_pin_dir>/<object hash>/`` and shared across restarts (not
    between nodes). Default ``/sys/fs/bpf/cube`` for node ``local``, else
    ``/sys/fs/bpf/cube-<node_id>``."""
    always_denied: tuple[str, ...] = ALWAYS_DENIED
    """IPv4 destinations no sandbox rule (``allow_out``, plugin egress rules, DNS-learned
    addresses) can open: an allow rule wholly inside one is refused. The host's own addresses
    and ``subnet`` are always added."""
    always_denied6: tuple[str, ...] = ALWAYS_DENIED6
    """The same for IPv6."""
    openable_ranges: tuple[str, ...] = ()
    """Parts of the always-denied ranges the operator opens to sandbox rules (IPv4 or IPv6
    CIDRs, e.g. ``["10.20.0.5/32"]`` for an internal mirror). Still denied by default: only a
    sandbox whose allow rule names the destination reaches it. Never ``subnet`` (other
    sandboxes) nor the host's own addresses."""

    dns: bool = True
    """Run Cube's resolver (needed for domain rules)."""
    dns_upstreams: tuple[str, ...] = ()
    """Upstream DNS servers; default: the nameservers of the host's /etc/resolv.conf."""
    dns_min_ttl: int = Field(default=5, ge=1)
    dns_max_ttl: int = Field(default=300, ge=1)
    dns_grace_s: float = Field(default=2.0, ge=0)
    dns_rate: float = Field(default=50.0, gt=0)
    """Queries per second one sandbox may send to the resolver (token bucket)."""
    dns_burst: int = Field(default=100, ge=1)
    dns_in_flight: int = Field(default=4, ge=1)
    """Queries of one sandbox being answered at once."""
    dns_queue: int = Field(default=256, ge=1)
    """Queries of all sandboxes waiting or being answered; beyond it they are dropped."""
    dns_tcp_per_sandbox: int = Field(default=4, ge=1)
    """Open TCP connections to the resolver per sandbox (each must send its query within 2 s)."""

    http_rules: bool = True
    """Apply E2B ``network.rules`` (header transforms on outbound plain HTTP, with
    ``${e2b.secrets.<name>}`` resolved per request) through the node's egress proxy."""
    http_proxy_port: int = Field(default=3129, ge=1, le=65535)
    """The egress proxy's port on the resolver address (``.1`` of ``subnet``, on ``lo``)."""
    http_ports: tuple[int, ...] = (80,)
    """Destination ports of plain HTTP that the rules apply to."""
    https_ports: tuple[int, ...] = (443,)
    """Destination ports of HTTPS that the rules apply to: a connection there whose TLS server
    name is a domain of the sandbox's rules is inspected (terminated with a certificate of the
    node's egress CA, which the node's guests trust); every other one is spliced untouched.
    ``[]`` turns HTTPS rules off (and no CA is made or sent to guests)."""
    https_proxy_port: int = Field(default=3130, ge=1, le=65535)
    """The egress proxy's HTTPS listener on the resolver address."""
    upstream_ca_file: Path | None = None
    """Extra CA certificates (a PEM bundle) the proxy trusts, besides the host's store, when it
    verifies a rule host's real certificate (an internal API with a private CA; the tests)."""
    ca_dir: Path | None = None
    """Where the node's egress CA lives (``ca.key`` 0600, ``ca.pem``). Default:
    ``<[core] state_dir>/egress-ca`` (kept across reboots: paused sandboxes trust it)."""

    audit_max_events: int = Field(default=10_000, ge=0)
    """Events kept in memory per sandbox for ``audit()``."""
    audit_dir: Path | None = None
    """If set, every event is also appended to ``<audit_dir>/<slot_id>.jsonl``."""

    @property
    def names(self) -> HostNames:
        """This node's host-global network names (from ``node_tag``)."""
        return HostNames(self.node_tag)

    def for_node(self, node_id: str) -> EbpfNetConfig:
        """This config with the node-derived defaults of ``node_id`` for every option the
        operator did not set (``node_tag``, ``state_dir``, ``bpf_pin_dir``)."""
        derived = {"node_tag": node_tag(node_id), "state_dir": default_state_dir(node_id),
                   "bpf_pin_dir": default_bpf_pin_dir(node_id)}
        update = {k: v for k, v in derived.items() if k not in self.model_fields_set}
        return self.model_copy(update=update) if update else self

    @field_validator("node_tag")
    @classmethod
    def _check_tag(cls, value: str) -> str:
        if value and not TAG_RE.match(value):
            raise ValueError("node_tag: 4 characters, a letter then letters or digits ([a-z][a-z0-9]{3})")
        return value

    @field_validator("always_denied", "always_denied6", "openable_ranges")
    @classmethod
    def _check_cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_network(v, strict=False)) for v in value)

    @model_validator(mode="after")
    def _check_openable(self) -> EbpfNetConfig:
        subnet = ipaddress.IPv4Network(self.subnet)
        for cidr in self.openable_ranges:
            net = ipaddress.ip_network(cidr)
            if net.version == 4 and net.overlaps(subnet):
                raise ValueError(f"openable_ranges: {cidr} overlaps the slot subnet {subnet} "
                                 "(other sandboxes are never openable)")
        return self

    @field_validator("subnet")
    @classmethod
    def _check_subnet(cls, value: str) -> str:
        net = ipaddress.IPv4Network(value)
        if net.prefixlen > 28:
            raise ValueError("subnet must hold at least a few /30 links (prefix length <= 28)")
        if any(net.overlaps(p) for p in _PRIVATE):
            raise ValueError("subnet must not overlap 10/8, 172.16/12 or 192.168/16")
        return str(net)
