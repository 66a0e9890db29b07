"""Options of the ``cow`` storage plugin (``[storage.options]`` in plugins.toml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cube_storage_cow.layertar import LayerPolicy

Reflink = Literal["auto", "always", "never"]

FALLBACK_GUEST_SRC = Path("/opt/cube/guest-src")
LOCAL_NODE = "local"


class CowConfig(BaseModel):
    """Where the plugin keeps images, disks and snapshots, and how it builds template images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: Path = Path("/var/lib/cube/storage")
    """Images (``images/``), per-sandbox disks (``disks/``), snapshots (``snapshots/``), build trees.
    One node's own (its ``gc`` removes disks and snapshots it does not know): default
    ``/var/lib/cube/storage`` for node ``local``, else ``<[core] state_dir>/storage``."""
    cache: Path = Path("/var/cache/cube")
    """Machine-wide cache of expensive intermediate artifacts (``debootstrap/<suite>-<hash>.tar``).
    Shared by every node on the host on purpose: builds and clean-up take flocks in it."""
    guest_src: Path | None = None
    """The guest folder (``cube_guest/`` + ``init/cube-init``); default: the repo's ``guest/`` found
    relative to this package, else ``/opt/cube/guest-src``."""
    mirror: str | None = None
    agent_runtime: bool = True
    """Put the agent runtime bundle (:mod:`cube_storage_cow.runtime`) into ``oci`` and ``dir`` trees
    without Debian's python3 + aiohttp, and refuse trees without /bin/sh. Off only for tests that
    build tiny trees that never boot."""
    """Debian mirror for debootstrap; default: the one configured in this host's /etc/apt."""
    reflink: Reflink = "auto"
    """Per-sandbox disks as reflink copies (``always``), qcow2 overlays (``never``), or reflink where
    the filesystem of ``root`` supports it (``auto``)."""
    image_size_mb: int = Field(default=2048, ge=64)
    """ext4 image size (sparse) when a recipe does not set ``size_mb`` itself."""
    volume_tool_uid: int | None = Field(default=410000, ge=1, le=(1 << 32) - 2)
    """The uid (and gid) e2fsprogs run as on a volume image a guest wrote (the content API, the
    journal replay): no other groups, no capabilities, only that image reachable. A uid nothing
    else runs as, outside ``[vmm.options] uid_range`` (default 400000-409999). None: as Cube."""

    # OCI images are untrusted input (docs/templates.md, "Untrusted images")
    oci_allow_devices: bool = False
    """Keep device nodes of OCI layers (default: dropped; the guest's /dev is a devtmpfs anyway)."""
    oci_allow_setuid: bool = False
    """Keep setuid/setgid bits of files in OCI layers (default: cleared, so ``sudo``/``su``/``ping``
    from the image will not gain privileges in the guest)."""
    oci_allow_capabilities: bool = False
    """Keep ``security.capability`` xattrs (file capabilities) of OCI layers (default: dropped)."""
    oci_max_file_mb: int = Field(default=4096, ge=1)
    """Largest single file an OCI layer may unpack."""
    oci_max_total_mb: int | None = Field(default=None, ge=1)
    """File data all layers of one image may unpack together (files later deleted or replaced
    count too); default: twice the image size."""
    oci_max_entries: int = Field(default=500_000, ge=1)
    """Entries (files, directories, links) all layers of one image may hold together."""

    def for_node(self, node_id: str, state_dir: Path) -> CowConfig:
        """This config for node ``node_id`` whose ``[core] state_dir`` is ``state_dir``: ``root``
        becomes ``<state_dir>/storage`` unless set (node ``local`` keeps its historical root)."""
        if node_id == LOCAL_NODE or "root" in self.model_fields_set:
            return self
        return self.model_copy(update={"root": state_dir / "storage"})

    def layer_policy(self) -> LayerPolicy:
        return LayerPolicy(
            allow_devices=self.oci_allow_devices, allow_setuid=self.oci_allow_setuid,
            allow_capabilities=self.oci_allow_capabilities, max_file_bytes=self.oci_max_file_mb << 20,
            max_total_bytes=None if self.oci_max_total_mb is None else self.oci_max_total_mb << 20,
            max_entries=self.oci_max_entries)


def default_guest_src() -> Path:
    """The repo's ``guest/`` (editable install) or the system-wide copy."""
    repo_guest = Path(__file__).resolve().parents[3] / "guest"
    if (repo_guest / "cube_guest").is_dir():
        return repo_guest
    return FALLBACK_GUEST_SRC
