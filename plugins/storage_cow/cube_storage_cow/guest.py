"""The guest side that every template gets: the agent package and the PID-1 init script."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cube_core import StorageError

from cube_storage_cow import inroot

AGENT_DIR = "/opt/cube/guest/cube_guest"
INIT_PATH = "/sbin/cube-init"
SKIP_NAMES = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"})
SKIP_SUFFIXES = (".pyc", ".pyo")


@dataclass(frozen=True)
class GuestFiles:
    """The files copied into every image; ``digest`` goes into the image's content hash."""

    agent: Path
    init: Path
    files: tuple[Path, ...]
    """The agent's files, relative to ``agent``, sorted."""
    digest: str

    @classmethod
    def load(cls, guest_src: Path) -> GuestFiles:
        """Collect ``<guest_src>/cube_guest/**`` and ``<guest_src>/init/cube-init``."""
        agent = guest_src / "cube_guest"
        init = guest_src / "init" / "cube-init"
        if not (agent / "__init__.py").is_file():
            raise StorageError(f"guest agent not found: {agent}/__init__.py (set storage option guest_src)")
        if not init.is_file():
            raise StorageError(f"guest init not found: {init} (set storage option guest_src)")
        files = tuple(sorted(_walk(agent)))
        h = hashlib.sha256()
        for rel, path in [*((f"cube_guest/{f}", agent / f) for f in files), ("init/cube-init", init)]:
            data = path.read_bytes()
            h.update(f"{rel}\0{len(data)}\0".encode())
            h.update(data)
        return cls(agent=agent, init=init, files=files, digest=h.hexdigest())

    def install(self, tree: Path) -> None:
        """Copy the agent to /opt/cube/guest/cube_guest (root, 0644/0755) and init to /sbin/cube-init."""
        inroot.remove(tree, AGENT_DIR)
        inroot.ensure_dir(tree, AGENT_DIR)
        for rel in self.files:
            data = (self.agent / rel).read_bytes()
            inroot.write_file(tree, f"{AGENT_DIR}/{rel.as_posix()}", data, mode=0o644)
        inroot.write_file(tree, INIT_PATH, self.init.read_bytes(), mode=0o755)
        if not inroot.lexists(inroot.resolve_in_root(tree, "/sbin/init", follow_final=False)):
            os.symlink("cube-init", inroot.resolve_in_root(tree, "/sbin/init", follow_final=False))


def _walk(top: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_NAMES and not d.startswith("."))
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(SKIP_SUFFIXES) or name.startswith(".") or not stat.S_ISREG(path.lstat().st_mode):
                continue
            found.append(path.relative_to(top))
    return found
