"""Options of the ``cow`` storage plugin (``[storage.options]`` in plugins.toml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Reflink = Literal["auto", "always", "never"]

FALLBACK_GUEST_SRC = Path("/opt/cube/guest-src")


class CowConfig(BaseModel):
    """Where the plugin keeps images, disks and snapshots, and how it builds template images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: Path = Path("/var/lib/cube/storage")
    """Images (``images/``), per-sandbox disks (``disks/``), snapshots (``snapshots/``), build trees."""
    cache: Path = Path("/var/cache/cube")
    """Machine-wide cache of expensive intermediate artifacts (``debootstrap/<suite>-<hash>.tar``)."""
    guest_src: Path | None = None
    """The guest folder (``cube_guest/`` + ``init/cube-init``); default: the repo's ``guest/`` found
    relative to this package, else ``/opt/cube/guest-src``."""
    mirror: str | None = None
    """Debian mirror for debootstrap; default: the one configured in this host's /etc/apt."""
    reflink: Reflink = "auto"
    """Per-sandbox disks as reflink copies (``always``), qcow2 overlays (``never``), or reflink where
    the filesystem of ``root`` supports it (``auto``)."""
    image_size_mb: int = Field(default=2048, ge=64)
    """ext4 image size (sparse) when a recipe does not set ``size_mb`` itself."""


def default_guest_src() -> Path:
    """The repo's ``guest/`` (editable install) or the system-wide copy."""
    repo_guest = Path(__file__).resolve().parents[3] / "guest"
    if (repo_guest / "cube_guest").is_dir():
        return repo_guest
    return FALLBACK_GUEST_SRC
