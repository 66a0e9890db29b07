"""Jupyter kernels Debian does not package, fetched from npm at build time (interpreter trees only).

Debian bookworm packages the Python kernel (``python3-ipykernel``), R's IRkernel
(``r-cran-irkernel``) and Node.js (``nodejs``); those come in through the apt stage of
:mod:`.debootstrap`. JavaScript and TypeScript come from npm's ``tslab`` (one package, two
kernels: ``jslab`` and ``tslab``). Its native dependency ``zeromq`` ships prebuilt N-API
binaries in its npm tarball, so nothing is compiled and no install script runs.

The host's ``npm`` installs :data:`NPM_PACKAGES` (``--ignore-scripts --omit=dev``) once into
``<cache>/npm/<hash>.tar``, keyed by :data:`NPM_FORMAT`, the package specs and the architecture,
like the debootstrap tarballs. The tarball's sha256 is written to the build log. Each interpreter
image gets it unpacked at :data:`PREFIX` and a kernelspec per kernel under
``/usr/local/share/jupyter/kernels``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from pathlib import Path

from cube_storage_cow import commands, hostfiles, inroot
from cube_storage_cow.locks import exclusive

NPM_PACKAGES = ("tslab@1.0.22",)
"""Pinned npm packages of the interpreter image."""
NPM_FORMAT = "npm-tar-2"
"""Bump when the cached tarball's content would change for the same specs."""
PREFIX = "/opt/cube/node"
"""Where the npm tree lands in the guest (``<PREFIX>/node_modules``)."""
KERNELS_DIR = "/usr/local/share/jupyter/kernels"
TAR_FLAGS = ("--numeric-owner", "--owner=0", "--group=0")
_PRUNE = ("node_modules/zeromq/build/darwin", "node_modules/zeromq/build/win32")


def kernelspecs() -> dict[str, dict[str, object]]:
    """Kernel name -> kernel.json of the kernels this module adds (``jslab``, ``tslab``; IRkernel's
    ``ir`` comes with ``r-cran-irkernel``)."""
    tslab = f"{PREFIX}/node_modules/tslab/bin/tslab"
    return {
        "jslab": {"argv": ["/usr/bin/node", tslab, "kernel", "--config-path", "{connection_file}", "--js"],
                  "display_name": "JavaScript", "language": "javascript"},
        "tslab": {"argv": ["/usr/bin/node", tslab, "kernel", "--config-path", "{connection_file}"],
                  "display_name": "TypeScript", "language": "typescript"},
    }


def fingerprint() -> dict[str, object]:
    """What the image hash covers for these kernels."""
    return {"npm": list(NPM_PACKAGES), "format": NPM_FORMAT, "kernelspecs": kernelspecs()}


def tarball(cache_dir: Path, arch: str) -> Path:
    blob = json.dumps({"format": NPM_FORMAT, "packages": list(NPM_PACKAGES), "arch": arch}, sort_keys=True)
    return cache_dir / "npm" / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.tar"


def install(tree: Path, *, cache_dir: Path, arch: str, cancel: threading.Event, log_lines: list[str]) -> None:
    """Unpack the npm tree (fetching it first if it is not cached) and write the kernelspecs."""
    tar = tarball(cache_dir, arch)
    _ensure(tar, cancel, log_lines)
    log_lines.append(f"npm kernels: {tar.name} sha256 {_sha256(tar)}")
    target = inroot.ensure_dir(tree, PREFIX)
    commands.run(["tar", "-xpf", tar, "-C", target, "--numeric-owner"], cancel=cancel)
    for name, spec in kernelspecs().items():
        inroot.write_file(tree, f"{KERNELS_DIR}/{name}/kernel.json", json.dumps(spec, indent=1).encode())


def _ensure(tar: Path, cancel: threading.Event, log_lines: list[str]) -> None:
    if tar.is_file():
        log_lines.append(f"npm cache: reused {tar}")
        return
    hostfiles.private_dir(tar.parent)
    with exclusive(tar.with_name(f".{tar.name}.lock"), cancel):
        if tar.is_file():
            return
        commands.require_tool("npm", "npm")
        work = tar.with_name(f".{tar.stem}.work")
        tmp = tar.with_name(f".{tar.name}.tmp")
        inroot.remove_host_path(work)
        work.mkdir(mode=0o755)
        started = time.monotonic()
        try:
            home = work / ".home"
            home.mkdir()
            env = {**os.environ, "HOME": str(home), "npm_config_update_notifier": "false"}
            commands.run(["npm", "install", "--ignore-scripts", "--omit=dev", "--no-audit", "--no-fund",
                          "--no-save", "--prefix", work, *NPM_PACKAGES], cancel=cancel, env=env)
            inroot.remove_host_path(home)
            for rel in _PRUNE:
                inroot.remove_host_path(work / rel)
            # tslab finds @types/node (console, process, ...) from the cell's cwd upwards, else in
            # its own node_modules/@types; npm hoisted it to the top
            types = work / "node_modules/tslab/node_modules/@types"
            if not inroot.lexists(types):
                types.parent.mkdir(exist_ok=True)
                types.symlink_to("../../@types")
            commands.run(["tar", "-cpf", tmp, "-C", work, *TAR_FLAGS, "node_modules"], cancel=cancel)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, tar)
            log_lines.append(f"npm install {' '.join(NPM_PACKAGES)} took {time.monotonic() - started:.1f}s")
        finally:
            inroot.remove_host_path(work)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
