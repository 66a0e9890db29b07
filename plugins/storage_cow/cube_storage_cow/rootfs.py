"""Template root filesystems: source tree -> Cube customisation -> immutable, content-addressed ext4.

``build(recipe, settings, progress, cancel)`` runs in a worker thread (the driver calls it through
``asyncio.to_thread``). Its steps:

1. the source tree: ``debootstrap`` (cached per package set, see :mod:`.debootstrap`), a ``dir``
   copied with ``cp -a``, or an ``oci`` image layout (see :mod:`.oci`);
2. the ``user`` account, the guest agent + init, /etc/hostname, hosts, machine-id, resolv.conf;
3. slimming (apt caches and lists, docs, man, info, locales); for Debian trees, a login profile that
   spawns nothing (:mod:`.login`: every ``commands.run`` is a login shell) and a byte-compiled agent;
4. ``mkfs.ext4 -d`` into ``<root>/images/<sha256-prefix>.ext4`` (temp name, fsync, rename, 0440).

The hash covers the recipe (not its name), the effective size, a fingerprint of the source, the
guest agent + init contents and :data:`BUILDER_VERSION`; an existing image is reused as is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cube_core import RootfsImage, RootfsRecipe, StorageError, TemplateBuildError

from cube_storage_cow import accounts, commands, debootstrap, hostfiles, inroot, jupyter_kernels, login, oci, runtime
from cube_storage_cow.guest import GuestFiles
from cube_storage_cow.layertar import LayerPolicy
from cube_storage_cow.locks import exclusive, is_held

log = structlog.get_logger(__name__)

BUILDER_VERSION = "cube-storage-cow/rootfs/4"
"""Part of every image hash: bump it when the builder's output changes for the same inputs."""
HASH_PREFIX = 32
RESOLVER = "169.254.0.22"
HOSTNAME = "cube"
HOSTS = (f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n"
         "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n")
SLIM_DIRS = ("/var/cache/apt", "/var/lib/apt/lists", "/usr/share/doc", "/usr/share/man", "/usr/share/info",
             "/usr/share/locale", "/var/log/apt")
SLIM_FILES = ("/var/log/bootstrap.log", "/var/log/dpkg.log", "/var/log/alternatives.log",
              "/var/cache/debconf/templates.dat-old", "/var/cache/ldconfig/aux-cache")
BASE_DIRS: tuple[tuple[str, int], ...] = (("/proc", 0o555), ("/sys", 0o555), ("/dev", 0o755),
                                          ("/run", 0o755), ("/tmp", 0o1777), ("/var/tmp", 0o1777),
                                          ("/root", 0o700), ("/home", 0o755), ("/etc", 0o755))

ProgressFn = Callable[[str, float | None], None]


@dataclass(frozen=True)
class BuildSettings:
    images: Path
    """``<root>/images``: the finished, immutable images."""
    work: Path
    """``<root>/build``: scratch trees, removed after each build."""
    cache: Path
    """Machine-wide cache (``/var/cache/cube``)."""
    guest_src: Path
    mirror: str | None = None
    default_size_mb: int = 2048
    oci_policy: LayerPolicy = LayerPolicy()
    """What OCI layers may contain (devices, setuid, capabilities) and size caps."""
    agent_runtime: bool = True
    """``oci``/``dir`` trees: require /bin/sh and add :mod:`.runtime` when python3 + aiohttp are missing."""


@dataclass(frozen=True)
class Plan:
    """What a recipe builds to, known before any expensive work."""

    recipe: RootfsRecipe
    size_mb: int
    content_hash: str
    image: Path
    guest: GuestFiles
    packages: tuple[str, ...]

    @property
    def prefix(self) -> str:
        return self.content_hash[:HASH_PREFIX]


def plan(recipe: RootfsRecipe, settings: BuildSettings) -> Plan:
    """Validate ``recipe`` and compute its content hash and image path (cheap: no build)."""
    size_mb = recipe.size_mb if "size_mb" in recipe.model_fields_set else settings.default_size_mb
    packages: tuple[str, ...] = ()
    if recipe.source == "debootstrap":
        packages = debootstrap.packages_for(recipe)
        source: Any = {"suite": recipe.suite, "packages": list(packages)}
        if recipe.interpreter:
            source["kernels"] = jupyter_kernels.fingerprint()
    else:
        if recipe.path is None:
            raise StorageError(f"source {recipe.source!r} needs a path")
        if recipe.packages:
            raise StorageError(f"packages only apply to source 'debootstrap', not {recipe.source!r}")
        path = recipe.path.resolve()
        if recipe.source == "dir":
            if not path.is_dir():
                raise StorageError(f"rootfs directory {path} does not exist")
            source = {"dir": tree_fingerprint(path)}
        else:
            if not path.exists():
                raise StorageError(f"OCI image layout {path} does not exist")
            source = {"oci": oci_fingerprint(path),
                      "policy": dataclasses.asdict(settings.oci_policy.for_image(size_mb))}
    guest = GuestFiles.load(settings.guest_src)
    recipe_part = recipe.model_dump(mode="json", exclude={"name", "path", "size_mb"})
    blob = json.dumps({"builder": BUILDER_VERSION, "recipe": recipe_part, "size_mb": size_mb,
                       "source": source, "guest": guest.digest}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()
    return Plan(recipe=recipe, size_mb=size_mb, content_hash=digest,
                image=settings.images / f"{digest[:HASH_PREFIX]}.ext4", guest=guest, packages=packages)


def build(recipe: RootfsRecipe, settings: BuildSettings, progress: ProgressFn,
          cancel: threading.Event) -> RootfsImage:
    """Build (or reuse) the image of ``recipe``. Raises :class:`TemplateBuildError`."""
    try:
        p = plan(recipe, settings)
        cached = _existing(p)
        if cached is not None:
            progress("rootfs image up to date", 1.0)
            return cached
        hostfiles.make_dir(settings.images)
        with exclusive(settings.images / f".{p.prefix}.lock", cancel):
            cached = _existing(p)  # another process may have built it while we waited
            if cached is not None:
                progress("rootfs image up to date", 1.0)
                return cached
            return _build_locked(p, settings, progress, cancel)
    except (StorageError, OSError) as exc:
        raise TemplateBuildError(template=recipe.name, reason=str(exc)) from exc


def _existing(p: Plan) -> RootfsImage | None:
    if not p.image.is_file():
        return None
    meta = _read_meta(p.image)
    return RootfsImage(path=p.image, content_hash=p.content_hash, bytes_allocated=allocated(p.image),
                       build_log=str(meta.get("build_log", "")) + f"\nreused {p.image}")


def _build_locked(p: Plan, settings: BuildSettings, progress: ProgressFn,
                  cancel: threading.Event) -> RootfsImage:
    started = time.monotonic()
    lines: list[str] = [f"recipe {p.recipe.model_dump_json()}", f"content hash {p.content_hash}"]
    work = settings.work / p.prefix
    inroot.remove_host_path(work)  # leftovers of a crashed build (we hold the lock)
    hostfiles.private_dir(settings.work)
    hostfiles.private_dir(work)  # nobody else may reach an untrusted tree
    tree = work / "tree"
    tree.mkdir(mode=0o755)
    tmp_image = p.image.with_name(f".{p.image.name}.tmp")
    log.info("building rootfs", recipe=p.recipe.name, source=p.recipe.source, hash=p.prefix)
    try:
        progress(f"preparing {p.recipe.source} tree", 0.0)
        _populate(p, tree, settings, progress, cancel, lines)
        if p.recipe.source != "debootstrap" and settings.agent_runtime:
            runtime.check_tree(tree)
            if not runtime.usable_python(tree):
                progress("adding the agent runtime (the image has no python3 with aiohttp)", 0.6)
                runtime.install(tree, cache_dir=settings.cache, mirror=settings.mirror, cancel=cancel,
                                log_lines=lines, progress=progress)
        progress("installing the guest agent and user", 0.65)
        customize(tree, p.guest)
        slim(tree)
        if p.recipe.source == "debootstrap":
            lines += [f"login profile: {path} spawns nothing" for path in login.quiet_profiles(tree)]
            _prime(tree, p.recipe.interpreter, lines)
        os.chown(tree, 0, 0)
        os.chmod(tree, 0o755)
        progress("writing ext4 image", 0.8)
        mkfs_started = time.monotonic()
        make_ext4(tree, tmp_image, p.size_mb, cancel)
        lines.append(f"mkfs.ext4 {p.size_mb} MiB in {time.monotonic() - mkfs_started:.1f}s")
        lines.append(f"built in {time.monotonic() - started:.1f}s")
        _write_meta(p, lines)
        _seal(tmp_image, p.image)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_image.unlink()
        raise
    finally:
        inroot.remove_host_path(work)
    log.info("rootfs built", recipe=p.recipe.name, image=str(p.image), seconds=round(time.monotonic() - started, 1))
    progress("rootfs image ready", 1.0)
    return RootfsImage(path=p.image, content_hash=p.content_hash, bytes_allocated=allocated(p.image),
                       build_log="\n".join(lines))


def _populate(p: Plan, tree: Path, settings: BuildSettings, progress: ProgressFn, cancel: threading.Event,
              lines: list[str]) -> None:
    recipe = p.recipe
    if recipe.source == "debootstrap":
        mirror = settings.mirror or debootstrap.host_mirror(recipe.suite)
        lines.append(f"mirror {mirror}")
        debootstrap.populate(tree, suite=recipe.suite, packages=p.packages, mirror=mirror,
                             cache_dir=settings.cache, progress=progress, cancel=cancel, log_lines=lines)
        if recipe.interpreter:
            progress("installing the npm and PyPI Jupyter kernels (JavaScript, TypeScript, Java)", 0.62)
            jupyter_kernels.install(tree, cache_dir=settings.cache, arch=debootstrap.host_arch(), cancel=cancel,
                                    log_lines=lines)
    elif recipe.source == "dir":
        assert recipe.path is not None
        commands.run(["cp", "-a", "--reflink=auto", f"{recipe.path.resolve()}/.", f"{tree}/"], cancel=cancel)
        lines.append(f"copied {recipe.path}")
    else:
        assert recipe.path is not None
        progress("applying OCI layers", 0.1)
        oci.populate(tree, recipe.path.resolve(), policy=settings.oci_policy.for_image(p.size_mb), cancel=cancel,
                     log_lines=lines)


def customize(tree: Path, guest: GuestFiles) -> None:
    """Everything Cube needs in every template, whatever the source."""
    for directory, mode in BASE_DIRS:
        path = inroot.ensure_dir(tree, directory, mode=mode)
        if directory in ("/tmp", "/var/tmp"):
            os.chmod(path, mode)
    accounts.ensure_user(tree)
    guest.install(tree)
    inroot.write_file(tree, "/etc/hostname", f"{HOSTNAME}\n".encode())
    inroot.write_file(tree, "/etc/hosts", HOSTS.encode())
    inroot.write_file(tree, "/etc/machine-id", b"", mode=0o444)
    inroot.write_file(tree, "/etc/resolv.conf", f"nameserver {RESOLVER}\n".encode())


def slim(tree: Path) -> None:
    """Drop what a sandbox never needs: apt caches and lists, docs, man pages, locales, build logs."""
    for directory in SLIM_DIRS:
        inroot.clear_dir(tree, directory)
    for file in SLIM_FILES:
        inroot.remove(tree, file)


def _prime(tree: Path, interpreter: bool, lines: list[str]) -> None:
    """Work the guest would otherwise do under TCG (15x slower), done natively at build time with
    the guest's own python (Debian trees only: trusted code): byte-compile the agent and, for the
    interpreter, build matplotlib's font cache for ``user``. Failures only warn: the VM would
    redo the same work."""
    if not inroot.resolve_in_root(tree, "/usr/bin/python3").is_file():
        return
    steps: list[tuple[str, list[str | Path]]] = [
        ("byte-compiling the agent", ["chroot", tree, "/usr/bin/python3", "-m", "compileall", "-q", "/opt/cube/guest"])]
    if interpreter:
        steps.append(("building the matplotlib font cache", [
            "chroot", f"--userspec={accounts.UID}:{accounts.GID}", tree, "/usr/bin/env", "-i", "HOME=/home/user",
            "MPLBACKEND=Agg", "/usr/bin/python3", "-c", "import matplotlib.pyplot"]))
    for what, argv in steps:
        try:
            commands.run(argv)
        except StorageError as exc:
            lines.append(f"warning: {what} failed: {exc}")
            log.warning("build step failed", step=what, error=str(exc))


def make_ext4(tree: Path, image: Path, size_mb: int, cancel: threading.Event | None = None) -> None:
    """``mkfs.ext4 -d``: a sparse ext4 image of ``tree`` with ownership kept, no mount, no journal."""
    commands.require_tool("mkfs.ext4", "e2fsprogs")
    with contextlib.suppress(FileNotFoundError):
        image.unlink()
    try:
        commands.run(["mkfs.ext4", "-q", "-F", "-d", tree, "-O", "^has_journal",
                      "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0", "-L", "cube-root",
                      image, f"{size_mb}M"], cancel=cancel)
    except StorageError as exc:
        used = _tree_mib(tree)
        raise StorageError(f"mkfs.ext4 failed (tree is about {used} MiB, image {size_mb} MiB): {exc}") from exc


def _seal(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, hostfiles.SHARED_FILE_MODE)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def meta_path(image: Path) -> Path:
    return image.with_suffix(".json")


def _write_meta(p: Plan, lines: list[str]) -> None:
    meta = {"content_hash": p.content_hash, "builder": BUILDER_VERSION, "recipe": p.recipe.model_dump(mode="json"),
            "size_mb": p.size_mb, "built_at": time.time(), "build_log": "\n".join(lines)[-20_000:]}
    path = meta_path(p.image)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.chmod(tmp, hostfiles.SHARED_FILE_MODE)
    os.replace(tmp, path)


def _read_meta(image: Path) -> dict[str, Any]:
    try:
        data = json.loads(meta_path(image).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _tree_mib(tree: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total >> 20


def tree_fingerprint(top: Path) -> str:
    """A hash of a directory's names, types, modes, owners, sizes, mtimes and link targets."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
            rel = os.path.relpath(path, top)
            h.update(f"{rel}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0{st.st_mtime_ns}\0"
                     f"{link}\n".encode(errors="surrogateescape"))
    return h.hexdigest()


def oci_fingerprint(path: Path) -> str:
    """sha256 of a layout tarball; for a layout directory, its index.json + blob names (content-addressed)."""
    h = hashlib.sha256()
    if path.is_dir():
        h.update((path / "index.json").read_bytes())
        for blob in sorted((path / "blobs").rglob("*")):
            h.update(str(blob.relative_to(path)).encode())
        return h.hexdigest()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def remove_image(image: Path) -> None:
    """Delete an image and its metadata (the caller knows no template uses it)."""
    for path in (image, meta_path(image)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    with contextlib.suppress(FileNotFoundError):
        image.with_name(f".{image.name}.tmp").unlink()


def gc_leftovers(settings: BuildSettings) -> int:
    """Remove scratch trees and half-written images of builds that no process is running."""
    freed = 0
    if settings.work.is_dir():
        for work in settings.work.iterdir():
            if not is_held(settings.images / f".{work.name}.lock"):
                inroot.remove_host_path(work)
                freed += 1
    if settings.images.is_dir():
        for tmp in [*settings.images.glob(".*.ext4.tmp"), *settings.images.glob(".*.json.tmp")]:
            prefix = tmp.name[1:].split(".", 1)[0]
            if not is_held(settings.images / f".{prefix}.lock"):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                freed += 1
    return freed + debootstrap.gc_leftovers(settings.cache)
