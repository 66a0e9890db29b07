"""The agent runtime bundle for images without a usable ``python3`` + ``aiohttp``.

The guest agent is Python. An OCI image or a directory tree without Debian's ``/usr/bin/python3``
and ``python3-aiohttp`` (ubuntu, debian-slim, alpine, busybox) gets a self-contained copy of the
``base`` image's interpreter under :data:`RUNTIME_DIR`:

- ``bin/python3``: the base tree's python3.11 binary;
- ``lib/python3.11``: its standard library and ``lib-dynload`` (tests, tkinter, idle, ensurepip
  left out); ``lib/python3/dist-packages``: aiohttp and its dependencies (base's whole
  dist-packages);
- ``lib64``: every shared library the binary and the extension modules need (DT_NEEDED closure,
  read with ``readelf``), **including base's own dynamic loader**.

``cube-init`` runs ``lib64/<loader> --library-path lib64 bin/python3 -m cube_guest`` with
``PYTHONHOME`` set, so neither the image's libc (another glibc, musl, none) nor its ``PATH`` or
``LD_*`` matter, and nothing is installed where the image's programs look: the image's ``python3``
stays what it was (absent). The agent drops the bundle's variables from its own environment at
start (``cube_guest.__main__``), so the processes it spawns never see them.

The bundle is built once per base tarball from the cached ``debootstrap`` tree and kept in
``<cache>/runtime/<name>``; each image build copies it (``cp -a``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
from pathlib import Path

from cube_core import RootfsRecipe, StorageError

from cube_storage_cow import commands, debootstrap, hostfiles, inroot
from cube_storage_cow.locks import exclusive

RUNTIME_DIR = "/opt/cube/runtime"
FORMAT = "runtime-1"
"""Part of the cached bundle's name: bump when the bundle's layout changes."""
PYTHON = "python3.11"
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
            "/lib/aarch64-linux-gnu", "/usr/lib", "/lib", "/usr/lib64", "/lib64")
STDLIB_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "__pycache__",
               "config-")
"""Standard library entries (names or name prefixes) the agent never imports."""
AGENT_MODULES = ("aiohttp",)


def usable_python(tree: Path) -> bool:
    """True when ``tree`` has Debian's python3 layout with aiohttp (what cube-init runs otherwise)."""
    python = inroot.resolve_in_root(tree, "/usr/bin/python3")
    if not python.is_file():
        return False
    return all(inroot.resolve_in_root(tree, f"/usr/lib/python3/dist-packages/{m}/__init__.py").is_file()
               for m in AGENT_MODULES)


def check_tree(tree: Path) -> None:
    """Refuse what cannot boot: the guest init is a ``/bin/sh`` script."""
    if not inroot.resolve_in_root(tree, "/bin/sh").is_file():
        raise StorageError("the image has no /bin/sh: Cube's guest init (/sbin/cube-init) is a shell script; "
                           "add a shell (busybox, dash or bash) to the image")


def install(tree: Path, *, cache_dir: Path, mirror: str | None, cancel: threading.Event,
            log_lines: list[str], progress: debootstrap.StepProgress) -> None:
    """Copy the runtime bundle into ``tree`` at :data:`RUNTIME_DIR`, building it first if needed."""
    bundle = _ensure_bundle(cache_dir=cache_dir, mirror=mirror, cancel=cancel, log_lines=log_lines,
                            progress=progress)
    inroot.remove(tree, RUNTIME_DIR)
    target = inroot.ensure_dir(tree, RUNTIME_DIR)
    commands.run(["cp", "-a", "--reflink=auto", f"{bundle}/.", f"{target}/"], cancel=cancel)
    log_lines.append(f"no usable python3 + aiohttp in the image: agent runtime {bundle.name} "
                     f"installed at {RUNTIME_DIR}")


def _ensure_bundle(*, cache_dir: Path, mirror: str | None, cancel: threading.Event, log_lines: list[str],
                   progress: debootstrap.StepProgress) -> Path:
    suite = RootfsRecipe.model_fields["suite"].default
    packages = tuple(sorted(debootstrap.BASE_PACKAGES))
    arch = debootstrap.host_arch()
    name = f"{suite}-{arch}-{debootstrap.cache_key(suite, packages, arch)[:24]}-{FORMAT}"
    store = cache_dir / "runtime"
    hostfiles.make_dir(store)
    bundle = store / name
    if bundle.is_dir():
        return bundle
    with exclusive(store / f".{name}.lock", cancel):
        if bundle.is_dir():
            return bundle
        work = store / f".{name}.work"
        inroot.remove_host_path(work)
        work.mkdir(mode=0o700)
        try:
            base = work / "base"
            base.mkdir()
            progress("building the agent runtime from the base Debian tree", None)
            debootstrap.populate(base, suite=suite, packages=packages,
                                 mirror=mirror or debootstrap.host_mirror(suite), cache_dir=cache_dir,
                                 progress=progress, cancel=cancel, log_lines=log_lines)
            out = work / "bundle"
            extract(base, out)
            os.chmod(out, 0o755)
            os.rename(out, bundle)
            log_lines.append(f"agent runtime: built {bundle}")
        finally:
            inroot.remove_host_path(work)
    return bundle


def extract(base: Path, out: Path) -> None:
    """Copy the interpreter, its stdlib, dist-packages and library closure of the Debian tree ``base``."""
    python = inroot.resolve_in_root(base, f"/usr/bin/{PYTHON}")
    if not python.is_file():
        raise StorageError(f"the base Debian tree has no /usr/bin/{PYTHON}")
    (out / "bin").mkdir(parents=True)
    (out / "lib64").mkdir()
    shutil.copy2(python, out / "bin" / "python3")
    shutil.copytree(inroot.resolve_in_root(base, f"/usr/lib/{PYTHON}"), out / "lib" / PYTHON, symlinks=True,
                    ignore=lambda _d, names: [n for n in names if n.startswith(STDLIB_SKIP)])
    shutil.copytree(inroot.resolve_in_root(base, "/usr/lib/python3/dist-packages"),
                    out / "lib" / "python3" / "dist-packages", symlinks=True,
                    ignore=lambda _d, names: [n for n in names if n == "__pycache__"])
    todo = [out / "bin" / "python3", *(p for p in (out / "lib").rglob("*.so") if p.is_file())]
    copied: set[str] = set()
    loader = ""
    while todo:
        elf = todo.pop()
        needed, interp = _dynamic(elf)
        if interp and not loader:
            loader = interp
            needed.append(interp)
        for lib in needed:
            libname = os.path.basename(lib)
            if libname in copied:
                continue
            src = _find_lib(base, lib)
            dst = out / "lib64" / libname
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o755)
            copied.add(libname)
            todo.append(dst)
    if not loader:
        raise StorageError(f"{python} has no ELF interpreter")
    os.symlink(os.path.basename(loader), out / "lib64" / "ld.so")


def _dynamic(elf: Path) -> tuple[list[str], str]:
    """The DT_NEEDED names and the PT_INTERP path of ``elf`` (``readelf``, binutils)."""
    commands.require_tool("readelf", "binutils")
    text = commands.run(["readelf", "-W", "-d", "-l", elf])
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", text)
    interp = re.search(r"\[Requesting program interpreter: ([^\]]+)\]", text)
    return needed, interp.group(1) if interp else ""


def _find_lib(base: Path, lib: str) -> Path:
    candidates = [lib] if lib.startswith("/") else [f"{d}/{lib}" for d in LIB_DIRS]
    for guest_path in candidates:
        with contextlib.suppress(StorageError, OSError):
            path = inroot.resolve_in_root(base, guest_path)
            if path.is_file():
                return path
    raise StorageError(f"the base Debian tree has no {lib} (needed by the agent runtime)")
