"""Guest OS changes made when a snapshot clone becomes a sandbox.

Kernel CRNG reseed, wall clock, hostname, machine-id. Every function here changes
the machine it runs on; the agent skips the syscalls under ``--no-system-calls``
(host test harness) and writes the /etc files below ``--system-root``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import time
import uuid

log = logging.getLogger(__name__)

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def reseed_kernel_rng(entropy: bytes) -> None:
    """Mix ``entropy`` into the kernel CRNG (credited) and force a reseed."""
    with open("/dev/urandom", "wb", buffering=0) as fh:
        info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
        fcntl.ioctl(fh.fileno(), RNDADDENTROPY, info)
        fcntl.ioctl(fh.fileno(), RNDRESEEDCRNG)


def set_clock(unix_ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, unix_ns)


def set_hostname(name: str, *, system_root: str, syscall: bool) -> None:
    if syscall:
        socket.sethostname(name)
    etc = os.path.join(system_root, "etc")
    os.makedirs(etc, exist_ok=True)
    _atomic_write(os.path.join(etc, "hostname"), name + "\n")
    hosts_path = os.path.join(etc, "hosts")
    try:
        with open(hosts_path) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines = [ln for ln in lines if not ln.startswith("127.0.1.1")]
    lines.append(f"127.0.1.1\t{name}")
    _atomic_write(hosts_path, "\n".join(lines) + "\n")


def new_machine_id(*, system_root: str) -> str:
    machine_id = uuid.uuid4().hex
    etc = os.path.join(system_root, "etc")
    os.makedirs(etc, exist_ok=True)
    _atomic_write(os.path.join(etc, "machine-id"), machine_id + "\n")
    return machine_id


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.cube-tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
