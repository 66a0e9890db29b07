"""Names of this node's host-global network resources, derived from ``[core] node_id``.

Several Cube nodes may run on one host (tests, labs). Everything the network driver creates
outside a sandbox namespace then needs a name of its own node, and sweeping must only ever see
that node's resources. The rules:

- node ``local`` (the default of ``[core] node_id``) keeps the historical names: namespaces
  ``cube-<slot>``, host links ``vh<index>``, nft table ``inet cube``, ``/run/cube/net``,
  ``/sys/fs/bpf/cube``;
- any other node gets a **tag**: 4 characters ``[a-z][a-z0-9]{3}`` taken from the SHA-256 of its
  node id (``[network.options] node_tag`` overrides it). Interface names are limited to 15
  characters (IFNAMSIZ - 1), so they carry the tag, not the node id: host links
  ``vh<tag><index>`` (at most 2 + 4 + 7 = 13 characters), namespaces ``cube-<tag>-<slot>``, nft
  table ``inet cube_<tag>``;
- paths carry the node id itself when it is a safe file name (``[A-Za-z0-9][A-Za-z0-9_.-]*``,
  at most 64 characters), else a cleaned form plus 6 hex characters of its hash:
  ``/run/cube/<node>/net``, ``/sys/fs/bpf/cube-<node>``.

A tag starts with a letter, so ``vh<tag><n>`` never parses as a ``local`` link ``vh<n>``, and a
tag has a fixed length, so no node's link prefix is a prefix of another's. Every node's links
start with ``vh`` (the family): a node's host table isolates sandboxes of all nodes from each
other by the family pattern, and the forwarding guard (when Cube turned IPv4 forwarding on)
lets every node's sandbox traffic through.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

LOCAL_NODE = "local"
FAMILY_PREFIX = "vh"
"""Every node's host links start with it (``local``'s are exactly ``vh<index>``)."""
IFNAMSIZ = 15
"""Longest interface name Linux accepts (IFNAMSIZ is 16 with the NUL)."""

TAG_RE = re.compile(r"^[a-z][a-z0-9]{3}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ALNUM = _LETTERS + "0123456789"


def node_tag(node_id: str) -> str:
    """The 4-character tag of ``node_id`` (``""`` for ``local``: the historical names)."""
    if node_id == LOCAL_NODE:
        return ""
    value = int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:8], "big")
    chars = [_LETTERS[value % 26]]
    value //= 26
    for _ in range(3):
        chars.append(_ALNUM[value % 36])
        value //= 36
    return "".join(chars)


def node_path_name(node_id: str) -> str:
    """``node_id`` as one path component (safe ids unchanged; others cleaned plus a hash)."""
    if _SAFE_NAME.match(node_id) and node_id not in (".", ".."):
        return node_id
    cleaned = _UNSAFE_CHARS.sub("_", node_id).strip("._-")[:48] or "node"
    return f"{cleaned}-{hashlib.sha256(node_id.encode()).hexdigest()[:6]}"


def default_state_dir(node_id: str) -> Path:
    if node_id == LOCAL_NODE:
        return Path("/run/cube/net")
    return Path("/run/cube") / node_path_name(node_id) / "net"


def default_bpf_pin_dir(node_id: str) -> Path:
    if node_id == LOCAL_NODE:
        return Path("/sys/fs/bpf/cube")
    return Path(f"/sys/fs/bpf/cube-{node_path_name(node_id)}")


@dataclass(frozen=True, slots=True)
class HostNames:
    """Prefixes and names of one node's host-global network resources (from its tag)."""

    tag: str = ""

    def __post_init__(self) -> None:
        if self.tag and not TAG_RE.match(self.tag):
            raise ValueError(f"node tag {self.tag!r}: 4 characters [a-z][a-z0-9]{{3}}")

    @property
    def netns_prefix(self) -> str:
        return f"cube-{self.tag}-" if self.tag else "cube-"

    @property
    def host_if_prefix(self) -> str:
        return f"{FAMILY_PREFIX}{self.tag}"

    @property
    def nft_table(self) -> str:
        return f"cube_{self.tag}" if self.tag else "cube"

    def check_index_fits(self, max_index: int) -> None:
        """Refuse a plan whose longest host link name would not fit in IFNAMSIZ."""
        longest = len(self.host_if_prefix) + len(str(max_index))
        if longest > IFNAMSIZ:
            raise ValueError(f"host link names {self.host_if_prefix}<index> up to index {max_index} "
                             f"need {longest} characters (at most {IFNAMSIZ})")


LOCAL = HostNames()
