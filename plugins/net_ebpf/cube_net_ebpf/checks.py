"""What ``cube doctor`` checks for the ``ebpf`` network: the bpf() syscall, the eBPF egress
filter object (or clang to build it) and libnftables."""

from __future__ import annotations

import ctypes
import os
import shutil

from cube_core import Check, NetworkError

from . import bpfobject, nftables
from .config import EbpfNetConfig

SYS_BPF = 321  # x86_64
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_ARRAY = 2


def check_bpf() -> Check:
    libc = ctypes.CDLL(None, use_errno=True)
    # BPF_MAP_CREATE of a 1-entry array map: the cheapest proof that bpf() works here.
    attr = (ctypes.c_uint32 * 30)(BPF_MAP_TYPE_ARRAY, 4, 4, 1)
    fd = libc.syscall(SYS_BPF, BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return Check("bpf", "ok", "bpf() syscall works (map created)")
    err = ctypes.get_errno()
    return Check("bpf", "fail", f"bpf() failed: {os.strerror(err)}; the egress filter cannot be loaded",
                 "run as root on a kernel with CONFIG_BPF_SYSCALL; check kernel.unprivileged_bpf_disabled")


def check_bpf_object(config: EbpfNetConfig) -> Check:
    if config.bpf_object is not None:
        if config.bpf_object.is_file():
            return Check("bpf-object", "ok", str(config.bpf_object))
        return Check("bpf-object", "fail", f"bpf_object {config.bpf_object} does not exist",
                     "build it with plugins/net_ebpf/bpf/build.sh or unset [network.options] bpf_object")
    built = bpfobject.object_path(config.bpf_cache_dir)
    if built.is_file() and built.stat().st_size > 0:
        return Check("bpf-object", "ok", f"egress filter built at {built}")
    if shutil.which("clang") is not None:
        return Check("bpf-object", "ok", f"egress filter not built yet; clang will build it into {built}")
    return Check("bpf-object", "fail", f"{built} is missing and clang is not installed",
                 "apt-get install clang libbpf-dev (or run `make install`)")


def check_nftables() -> Check:
    try:
        nftables.ensure_loaded()
    except NetworkError as exc:
        return Check("nftables", "fail", str(exc), "apt-get install nftables")
    return Check("nftables", "ok", "libnftables.so.1 loads")


def doctor_checks(config: EbpfNetConfig) -> list[Check]:
    return [check_bpf(), check_bpf_object(config), check_nftables()]
