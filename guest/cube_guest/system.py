"""Guest OS changes made when a snapshot clone becomes a sandbox.

Kernel CRNG reseed, wall clock, hostname, machine-id, ASLR, the node's egress CA. Every function
here changes the machine it runs on; the agent skips the syscalls under ``--no-system-calls``
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


RANDOMIZE_VA_SPACE = "/proc/sys/kernel/randomize_va_space"


def set_aslr(enabled: bool, *, path: str = RANDOMIZE_VA_SPACE) -> bool:
    """Turn address-space layout randomization for new processes on (``2``, the kernel's
    default, unless the image chose ``1``) or off (``0``), as the node asks; writes only on a
    change. Returns whether it wrote."""
    with open(path) as fh:
        current = fh.read().strip()
    if enabled == (current != "0"):
        return False
    with open(path, "w") as fh:
        fh.write("2\n" if enabled else "0\n")
    return True


def new_machine_id(*, system_root: str) -> str:
    machine_id = uuid.uuid4().hex
    etc = os.path.join(system_root, "etc")
    os.makedirs(etc, exist_ok=True)
    _atomic_write(os.path.join(etc, "machine-id"), machine_id + "\n")
    return machine_id


CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
"""The system bundle (Debian's): OpenSSL's default, so curl, Python's ssl and most tools use it."""
CA_FILE = "/usr/local/share/ca-certificates/cube-egress.crt"
"""Where Debian keeps a local CA (``update-ca-certificates`` would keep it in the bundle too)."""
TRUST_ENV = {"SSL_CERT_FILE": CA_BUNDLE, "REQUESTS_CA_BUNDLE": CA_BUNDLE,
             "NODE_EXTRA_CA_CERTS": CA_BUNDLE}
"""For the tools that bring their own CA list (requests and httpx use certifi's, Node its own):
set for envd's processes while the node sends a CA, unless the sandbox's env vars set them."""
_BEGIN = ("# cube: the node's egress CA (HTTPS inspection of network.rules hosts); "
          "replaced on each personalize\n")
_END = "# cube: end of the node's egress CA\n"


def install_trust(pem: str | None, *, system_root: str) -> bool:
    """Make the guest trust exactly ``pem`` (the CA of the node that made it a sandbox) besides
    the system's CAs: its block in the system bundle replaces any earlier node's, ``None``
    removes it. Idempotent and spawns nothing (no ``update-ca-certificates``); writes only
    what changes. Returns whether a file changed."""
    bundle = _under(system_root, CA_BUNDLE)
    try:
        with open(bundle) as fh:
            text = fh.read()
    except FileNotFoundError:
        text = ""
    kept = text
    start = kept.find(_BEGIN)
    if start >= 0:
        end = kept.find(_END, start)
        kept = kept[:start] + (kept[end + len(_END):] if end >= 0 else "")
    block = f"{_BEGIN}{pem.strip()}\n{_END}" if pem else ""
    if kept and not kept.endswith("\n"):
        kept += "\n"
    changed = False
    if kept + block != text:
        os.makedirs(os.path.dirname(bundle), exist_ok=True)
        _atomic_write(bundle, kept + block)
        changed = True
    local = _under(system_root, CA_FILE)
    if pem:
        try:
            with open(local) as fh:
                same = fh.read() == pem.strip() + "\n"
        except FileNotFoundError:
            same = False
        if not same:
            os.makedirs(os.path.dirname(local), exist_ok=True)
            _atomic_write(local, pem.strip() + "\n")
            changed = True
    elif os.path.exists(local):
        os.unlink(local)
        changed = True
    return changed


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.cube-tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
