"""A template's size for the templates page: its image (``Template.rootfs_bytes``, what the node
reported when it made the image) and its snapshot's files (memory, device state, frozen disk
layer), read with a ``stat`` of the bytes allocated on disk when the node holding them runs in
this process; ``None`` (shown as "unknown") where neither is available, e.g. a remote node's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cube_core.models import Node, Template


@dataclass(frozen=True)
class TemplateSize:
    image: int | None
    snapshot: int | None


def _allocated(paths: list[Path]) -> int | None:
    total = 0
    for path in set(paths):
        try:
            total += path.stat().st_blocks * 512
        except OSError:
            return None
    return total


def template_size(template: Template, nodes: list[Node]) -> TemplateSize:
    image = template.rootfs_bytes or None
    snap = template.snapshot
    snapshot = None
    if snap is not None and snap.vm_state is not None:
        local = {n.node_id for n in nodes if n.url is None}
        if snap.node_id in local or (snap.node_id is None and local):
            files = [snap.vm_state.memory_file, snap.vm_state.device_state]
            if snap.disk is not None:
                files.append(snap.disk.path)
            snapshot = _allocated(files)
    return TemplateSize(image=image, snapshot=snapshot)


def human(size: int | None) -> str:
    if size is None:
        return "unknown"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
