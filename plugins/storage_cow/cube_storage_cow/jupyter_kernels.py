"""Jupyter kernels Debian does not package, fetched from npm and PyPI at build time (interpreter
trees only).

Debian bookworm packages the Python kernel (``python3-ipykernel``), R's IRkernel
(``r-cran-irkernel``), Node.js (``nodejs``) and the JDK (``openjdk-17-jdk-headless``, whose JShell
the Java kernel drives); those come in through the apt stage of :mod:`.debootstrap`.

JavaScript and TypeScript come from npm's ``tslab`` (one package, two kernels: ``jslab`` and
``tslab``). Its native dependency ``zeromq`` ships prebuilt N-API binaries in its npm tarball, so
nothing is compiled and no install script runs. The host's ``npm`` installs :data:`NPM_PACKAGES`
(``--ignore-scripts --omit=dev``) once into ``<cache>/npm/<hash>.tar``, keyed by
:data:`NPM_FORMAT`, the package specs and the architecture, like the debootstrap tarballs. The
tarball's sha256 is written to the build log.

Java comes from PyPI's ``jjava`` wheel (:data:`JJAVA`): pure data (the kernel's jar), fetched once
by the host's ``pip download --require-hashes`` into ``<cache>/pypi`` and checked against its
pinned sha256 on every use. Only ``jjava.jar`` goes into the image; Cube's own kernelspec starts it
directly on Debian's ``java`` (the wheel's launcher jar would start a second JVM, twice the start
cost under TCG) with start-up-friendly JVM options (:data:`JAVA_OPTIONS`).

Each interpreter image gets the npm tree unpacked at :data:`PREFIX`, the Java kernel at
:data:`JAVA_DIR`, and a kernelspec per kernel under :data:`KERNELS_DIR`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from cube_core import StorageError

from cube_storage_cow import buildcache, commands, inroot

NPM_PACKAGES = ("tslab@1.0.22",)
"""Pinned npm packages of the interpreter image."""
NPM_FORMAT = "npm-tar-2"
"""Bump when the cached tarball's content would change for the same specs."""
PREFIX = "/opt/cube/node"
"""Where the npm tree lands in the guest (``<PREFIX>/node_modules``)."""
KERNELS_DIR = "/usr/local/share/jupyter/kernels"
JJAVA = ("jjava", "1.0a8", "b86ddf2eee6037a33a0adc2ac2f318a94638f42eefaeeeb13db381587e5f2a69")
"""The Java kernel's wheel on PyPI: name, pinned version, sha256 of
``jjava-1.0a8-py3-none-any.whl``."""
JAVA_DIR = f"{KERNELS_DIR}/java"
JAVA_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-XX:-UsePerfData")
"""C1 only, one GC thread, no perf-data file: the JVM starts and warms with less work (TCG)."""
TAR_FLAGS = ("--numeric-owner", "--owner=0", "--group=0")
_PRUNE = ("node_modules/zeromq/build/darwin", "node_modules/zeromq/build/win32")


def kernelspecs() -> dict[str, dict[str, object]]:
    """Kernel name -> kernel.json of the kernels this module adds (``jslab``, ``tslab``, ``java``;
    IRkernel's ``ir`` comes with ``r-cran-irkernel``)."""
    tslab = f"{PREFIX}/node_modules/tslab/bin/tslab"
    return {
        "jslab": {"argv": ["/usr/bin/node", tslab, "kernel", "--config-path", "{connection_file}", "--js"],
                  "display_name": "JavaScript", "language": "javascript"},
        "tslab": {"argv": ["/usr/bin/node", tslab, "kernel", "--config-path", "{connection_file}"],
                  "display_name": "TypeScript", "language": "typescript"},
        # what the wheel's launcher would run, less its second JVM
        "java": {"argv": ["/usr/bin/java", *JAVA_OPTIONS, "--add-opens", "jdk.jshell/jdk.jshell=ALL-UNNAMED",
                          "-jar", f"{JAVA_DIR}/jjava.jar", "{connection_file}"],
                 "display_name": "Java", "language": "java", "interrupt_mode": "message"},
    }


def fingerprint() -> dict[str, object]:
    """What the image hash covers for these kernels."""
    return {"npm": list(NPM_PACKAGES), "format": NPM_FORMAT, "pypi": [list(JJAVA)], "kernelspecs": kernelspecs()}


def tarball(cache_dir: Path, arch: str) -> Path:
    blob = json.dumps({"format": NPM_FORMAT, "packages": list(NPM_PACKAGES), "arch": arch}, sort_keys=True)
    return cache_dir / "npm" / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.tar"


def install(tree: Path, *, cache_dir: Path, arch: str, cancel: threading.Event, log_lines: list[str]) -> None:
    """Unpack the npm tree and the Java kernel (fetching them first if they are not cached) and
    write the kernelspecs."""
    tar = tarball(cache_dir, arch)
    _ensure(tar, cancel, log_lines)
    log_lines.append(f"npm kernels: {tar.name} sha256 {_sha256(tar)}")
    target = inroot.ensure_dir(tree, PREFIX)
    commands.run(["tar", "-xpf", tar, "-C", target, "--numeric-owner"], cancel=cancel)
    inroot.write_file(tree, f"{JAVA_DIR}/jjava.jar", java_kernel_jar(cache_dir, cancel, log_lines))
    jvms = inroot.resolve_in_root(tree, "/usr/lib/jvm")
    for jmods in sorted(jvms.glob("*/jmods")) if jvms.is_dir() else ():
        if jmods.parent.is_symlink():  # java-1.17.0-openjdk-amd64 -> java-17-openjdk-amd64
            continue
        # jlink's input (75 MB for JDK 17): no kernel uses it
        inroot.remove(tree, f"/usr/lib/jvm/{jmods.parent.name}/jmods")
        log_lines.append(f"removed /usr/lib/jvm/{jmods.parent.name}/jmods")
    for name, spec in kernelspecs().items():
        inroot.write_file(tree, f"{KERNELS_DIR}/{name}/kernel.json", json.dumps(spec, indent=1).encode())


def _ensure(tar: Path, cancel: threading.Event, log_lines: list[str]) -> None:
    if tar.is_file():
        log_lines.append(f"npm cache: reused {tar}")
        return
    commands.require_tool("npm", "npm")

    def make(work: Path, out: Path) -> None:
        home = work / ".home"
        home.mkdir()
        env = {**os.environ, "HOME": str(home), "npm_config_update_notifier": "false"}
        commands.run(["npm", "install", "--ignore-scripts", "--omit=dev", "--no-audit", "--no-fund",
                      "--no-save", "--prefix", work, *NPM_PACKAGES], cancel=cancel, env=env)
        for rel in _PRUNE:
            inroot.remove_host_path(work / rel)
        # tslab finds @types/node (console, process, ...) from the cell's cwd upwards, else in
        # its own node_modules/@types; npm hoisted it to the top
        types = work / "node_modules/tslab/node_modules/@types"
        if not inroot.lexists(types):
            types.parent.mkdir(exist_ok=True)
            types.symlink_to("../../@types")
        commands.run(["tar", "-cpf", out, "-C", work, *TAR_FLAGS, "node_modules"], cancel=cancel)

    _made(f"npm install {' '.join(NPM_PACKAGES)}", tar, make, cancel, log_lines)


def wheel(cache_dir: Path) -> Path:
    name, version, _digest = JJAVA
    return cache_dir / "pypi" / f"{name}-{version}-py3-none-any.whl"


def java_kernel_jar(cache_dir: Path, cancel: threading.Event, log_lines: list[str]) -> bytes:
    """``jjava.jar`` out of the pinned wheel (downloaded first if it is not cached; a wheel whose
    sha256 is not the pinned one is refused, and a cached one is checked again)."""
    name, version, digest = JJAVA
    whl = wheel(cache_dir)
    if whl.is_file():
        log_lines.append(f"pypi cache: reused {whl}")
    else:
        _download_wheel(whl, cancel, log_lines)
    actual = _sha256(whl)
    if actual != digest:
        raise StorageError(f"{whl}: sha256 {actual}, expected {digest} ({name}=={version}); remove it to fetch "
                           "it again")
    log_lines.append(f"java kernel: {whl.name} sha256 {actual}")
    member = f"{name}-{version}.data/data/share/jupyter/kernels/java/jjava.jar"
    try:
        with zipfile.ZipFile(whl) as zf:
            return zf.read(member)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise StorageError(f"{whl}: no {member}: {exc}") from exc


def _download_wheel(whl: Path, cancel: threading.Event, log_lines: list[str]) -> None:
    name, version, digest = JJAVA

    def make(work: Path, out: Path) -> None:
        requirements = work / "requirements.txt"
        requirements.write_text(f"{name}=={version} --hash=sha256:{digest}\n")
        # the interpreter running Cube has pip (python3 -m venv); the index is the host's pip config
        commands.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                      "--require-hashes", "--disable-pip-version-check", "--no-input", "-r", requirements,
                      "-d", work / "dist"], cancel=cancel, env={**os.environ, "HOME": str(work)})
        os.replace(work / "dist" / whl.name, out)

    _made(f"pip download {name}=={version}", whl, make, cancel, log_lines)


def _made(what: str, target: Path, make: Callable[[Path, Path], None], cancel: threading.Event,
          log_lines: list[str]) -> None:
    """:func:`.buildcache.ensure_file`, with how long ``what`` took in the build log."""
    started = time.monotonic()
    if buildcache.ensure_file(target, make, cancel):
        log_lines.append(f"{what} took {time.monotonic() - started:.1f}s")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
