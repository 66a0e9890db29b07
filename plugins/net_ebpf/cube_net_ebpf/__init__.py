"""Cube's first-party network plugin: namespaces, taps, veths, NAT and the eBPF egress filter."""

from __future__ import annotations

from cube_net_ebpf.config import EbpfNetConfig
from cube_net_ebpf.driver import EbpfNetwork
from cube_net_ebpf.plugin import EbpfNetPlugin

__all__ = ["EbpfNetConfig", "EbpfNetPlugin", "EbpfNetwork"]
