"""Host-global names of this node's VMs, derived from ``[core] node_id``.

Several Cube nodes may run on one host (tests, labs). Each needs its own VM work directories,
RAM files and cgroup parent: work directories and RAM files are named after VM ids, which two
nodes may share (template and pool VMs), and a node reattaches to or removes whatever sits under
its own directories. Node ``local`` keeps the historical defaults; another node's are:

- ``run_dir``: ``/run/cube/<node>/vms``
- ``mem_dir``: ``/dev/shm/cube/<node>`` (``local``'s RAM files are ``*.ram`` files, never a dir)
- ``cgroup_parent``: ``cube-<node>``

``<node>`` is the node id when it is a safe file name (``[A-Za-z0-9][A-Za-z0-9_.-]*``, at most
64 characters), else a cleaned form plus 6 hex characters of its hash. Shared on purpose:
``uid_lease_dir`` (O_EXCL lease files, so two nodes never hand out the same jail uid) and
``jail_root`` (only ever mounted over inside each jailer's own mount namespace).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

LOCAL_NODE = "local"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


def node_path_name(node_id: str) -> str:
    """``node_id`` as one path component (safe ids unchanged; others cleaned plus a hash)."""
    if _SAFE_NAME.match(node_id) and node_id not in (".", ".."):
        return node_id
    cleaned = _UNSAFE_CHARS.sub("_", node_id).strip("._-")[:48] or "node"
    return f"{cleaned}-{hashlib.sha256(node_id.encode()).hexdigest()[:6]}"


def node_defaults(node_id: str) -> dict[str, object]:
    """The per-node defaults of ``node_id`` (empty for ``local``: the historical ones)."""
    if node_id == LOCAL_NODE:
        return {}
    name = node_path_name(node_id)
    return {"run_dir": Path("/run/cube") / name / "vms", "mem_dir": Path("/dev/shm/cube") / name,
            "cgroup_parent": f"cube-{name}"}
