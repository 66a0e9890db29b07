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
    what changes. Returns whether a file changed.

    Every clone of a template runs this once (a template never gets a node's CA), so it touches
    as little of the ~220 KB bundle as it can: each page it reads or writes becomes guest RAM the
    clone owns (a private copy of its template's page, base64 that compresses poorly). Our block
    is always the bundle's end, and ``CA_FILE`` exists exactly while a block is in: without it
    the block is appended in place; with it the bundle's tail is compared; only a bundle whose
    block is elsewhere (rewritten by something else since) is read whole."""
    bundle = _under(system_root, CA_BUNDLE)
    local = _under(system_root, CA_FILE)
    block = f"{_BEGIN}{pem.strip()}\n{_END}" if pem else ""
    if os.path.exists(local):
        changed = _replace_block(bundle, block)
    else:
        changed = bool(block) and _append_block(bundle, block)
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


_TAIL = 16 << 10
"""Bytes of the bundle's end read to find our block (a CA's PEM is 1-3 KB)."""


def _append_block(bundle: str, block: str) -> bool:
    """Add ``block`` at the end of a bundle that has none (only its last page is read)."""
    try:
        with open(bundle, "rb+") as fh:
            end = fh.seek(0, os.SEEK_END)
            newline = b""
            if end:
                fh.seek(end - 1)
                newline = b"" if fh.read(1) == b"\n" else b"\n"
            fh.write(newline + block.encode())
    except FileNotFoundError:
        os.makedirs(os.path.dirname(bundle), exist_ok=True)
        _atomic_write(bundle, block)
    return True


def _replace_block(bundle: str, block: str) -> bool:
    """Put ``block`` in place of the bundle's block (none: remove it)."""
    try:
        with open(bundle, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, end - _TAIL))
            tail = fh.read().decode(errors="replace")
    except FileNotFoundError:
        tail = ""
    at = tail.find(_BEGIN)
    if at >= 0 and tail.endswith(_END) and tail[at:] == block:
        return False  # ours already, at the end: the common case after a snapshot of a sandbox
    try:
        with open(bundle) as fh:
            text = fh.read()
    except FileNotFoundError:
        text = ""
    kept = text
    start = kept.find(_BEGIN)
    if start >= 0:
        stop = kept.find(_END, start)
        kept = kept[:start] + (kept[stop + len(_END):] if stop >= 0 else "")
    if kept and not kept.endswith("\n"):
        kept += "\n"
    if kept + block == text:
        return False
    os.makedirs(os.path.dirname(bundle), exist_ok=True)
    _atomic_write(bundle, kept + block)
    return True


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.cube-tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
