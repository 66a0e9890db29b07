"""Debian root trees from ``debootstrap --variant=minbase``, cached per package set as a tarball."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog
from cube_core import RootfsRecipe, StorageError

from cube_storage_cow import buildcache, commands, hostfiles
from cube_storage_cow.locks import is_held

log = structlog.get_logger(__name__)

BASE_PACKAGES = ("bash", "python3", "python3-aiohttp", "curl", "git", "sudo", "coreutils",
                 "ca-certificates", "procps", "iproute2")
INTERPRETER_PACKAGES = ("python3-ipykernel", "python3-jupyter-client", "python3-matplotlib",
                        "python3-numpy", "python3-pandas", "python3-zmq",
                        # satisfies python3-fonttools' "python3-scipy | python3-munkres" without
                        # scipy, whose python3-pythran drags in g++, python3-dev and boost (~600 MB)
                        "python3-munkres",
                        # R, JavaScript/TypeScript and Java contexts: IRkernel, the node that runs the
                        # npm kernels of cube_storage_cow.jupyter_kernels and the JDK (JShell) that
                        # runs its PyPI Java kernel
                        "r-cran-irkernel", "nodejs", "openjdk-17-jdk-headless")
CACHE_FORMAT = "debootstrap-tar-1"
"""Bump when the cached tarball's content would change for the same package set."""
APT_DIR = Path("/etc/apt")
TAR_FLAGS = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--sparse")
MIRROR_SCHEMES = ("http://", "https://", "ftp://", "file:/")

StepProgress = Callable[[str, float | None], None]


def packages_for(recipe: RootfsRecipe) -> tuple[str, ...]:
    """The sorted package set debootstrap installs on top of minbase for ``recipe``."""
    pkgs = set(BASE_PACKAGES) | set(recipe.packages)
    if recipe.interpreter:
        pkgs |= set(INTERPRETER_PACKAGES)
    bad = [p for p in pkgs if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", p)]
    if bad:
        raise StorageError(f"invalid Debian package names: {', '.join(sorted(bad))}")
    return tuple(sorted(pkgs))


def host_mirror(suite: str, apt_dir: Path = APT_DIR) -> str:
    """The Debian mirror this host's apt uses for ``suite`` (component ``main``).

    Reads ``sources.list``, ``sources.list.d/*.list`` (one-line format) and
    ``sources.list.d/*.sources`` (deb822). The first ``deb`` entry that carries ``suite`` exactly
    and the ``main`` component wins.
    """
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list")),
             *sorted((apt_dir / "sources.list.d").glob("*.sources"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        entries = _deb822_entries(text) if path.suffix == ".sources" else _one_line_entries(text)
        for uris, suites, components in entries:
            if suite in suites and "main" in components:
                for uri in uris:
                    if uri.startswith(MIRROR_SCHEMES):
                        return uri.rstrip("/")
    raise StorageError(f"no Debian mirror for {suite!r} (main) in {apt_dir}/sources.list(.d); "
                       "set the storage option 'mirror'")


def _one_line_entries(text: str) -> Iterator[tuple[list[str], list[str], list[str]]]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        line = re.sub(r"\[[^\]]*\]", " ", line)  # options such as [signed-by=... arch=amd64]
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            yield [words[1]], [words[2]], words[3:]


def _deb822_entries(text: str) -> Iterator[tuple[list[str], list[str], list[str]]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1] in (" ", "\t") and key is not None:
                fields[key] += " " + raw.strip()
                continue
            if ":" in raw:
                key, value = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        yield fields.get("uris", "").split(), fields.get("suites", "").split(), \
            fields.get("components", "").split()


def cache_key(suite: str, packages: tuple[str, ...], arch: str) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "suite": suite, "variant": "minbase", "arch": arch,
                       "packages": list(packages)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def host_arch() -> str:
    try:
        return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.uname().machine


def populate(tree: Path, *, suite: str, packages: tuple[str, ...], mirror: str, cache_dir: Path,
             progress: StepProgress, cancel: threading.Event, log_lines: list[str]) -> str:
    """Fill the empty directory ``tree`` with a minbase Debian plus ``packages``.

    Two cached stages, each a tarball ``<cache_dir>/debootstrap/<suite>-<arch>-<hash>.tar``:

    1. ``debootstrap --variant=minbase --include=<BASE_PACKAGES>`` (the ``base`` template);
    2. for any other package, that tree plus ``apt-get install --no-install-recommends`` in a
       chroot. apt, unlike debootstrap's own resolver, understands virtual packages (Provides),
       which python3-zmq, gdb (via python3-debugpy) and friends need.

    Later builds of the same package set only unpack the tarball. Returns its path.
    """
    arch = host_arch()
    store = cache_dir / "debootstrap"
    hostfiles.private_dir(store)  # Debian trees: device nodes, setuid files
    base = tuple(sorted(BASE_PACKAGES))
    extras = tuple(sorted(set(packages) - set(base)))
    base_tar = _tarball(store, suite, arch, base)
    final = _tarball(store, suite, arch, tuple(sorted(set(packages) | set(base))))

    def bootstrap(work: Path) -> None:
        _debootstrap(work, suite=suite, packages=base, mirror=mirror, progress=progress, cancel=cancel,
                     log_lines=log_lines, top=0.3 if extras else 0.5)

    def add_extras(work: Path) -> None:
        _ensure(base_tar, bootstrap, cancel, log_lines, progress)
        progress("unpacking the base Debian tree", 0.3)
        commands.run(["tar", "-xpf", base_tar, "-C", work, *TAR_FLAGS], cancel=cancel)
        _apt_install(work, extras, progress=progress, cancel=cancel, log_lines=log_lines)

    _ensure(final, add_extras if extras else bootstrap, cancel, log_lines, progress)
    progress("unpacking Debian tree", 0.6)
    started = time.monotonic()
    commands.run(["tar", "-xpf", final, "-C", tree, *TAR_FLAGS], cancel=cancel)
    log_lines.append(f"unpacked {final.name} in {time.monotonic() - started:.1f}s")
    return str(final)


def _tarball(store: Path, suite: str, arch: str, packages: tuple[str, ...]) -> Path:
    return store / f"{suite}-{arch}-{cache_key(suite, packages, arch)[:24]}.tar"


def _ensure(tarball: Path, build: Callable[[Path], None], cancel: threading.Event, log_lines: list[str],
            progress: StepProgress) -> None:
    """Make ``tarball`` by running ``build(work_dir)`` unless it exists (one builder at a time)."""
    if tarball.is_file():
        log_lines.append(f"debootstrap cache: reused {tarball}")
        return

    def make(work: Path, out: Path) -> None:
        build(work)
        progress("saving the Debian tree to the cache", None)
        for deb in (work / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        commands.run(["tar", "-cpf", out, "-C", work, *TAR_FLAGS, "."], cancel=cancel)

    if buildcache.ensure_file(tarball, make, cancel, remove_work=_remove_tree):
        log_lines.append(f"debootstrap cache: wrote {tarball}")


def _debootstrap(work: Path, *, suite: str, packages: tuple[str, ...], mirror: str, progress: StepProgress,
                 cancel: threading.Event, log_lines: list[str], top: float) -> None:
    commands.require_tool("debootstrap", "debootstrap")
    meter = _DebootstrapMeter(progress, len(packages), top)
    argv: list[str | Path] = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
                              "--components=main", suite, work, mirror]
    log.info("debootstrap", suite=suite, mirror=mirror, packages=len(packages))
    log_lines.append("$ " + " ".join(str(a) for a in argv))
    started = time.monotonic()
    try:
        out = commands.run(argv, on_line=meter.line, cancel=cancel, env=_apt_env())
    except StorageError as exc:
        raise StorageError(f"{exc}\n--- debootstrap.log (tail) ---\n{_log_tail(work)}") from exc
    log_lines.extend(out.splitlines()[-20:])
    log_lines.append(f"debootstrap took {time.monotonic() - started:.1f}s")


def _apt_install(work: Path, packages: tuple[str, ...], *, progress: StepProgress, cancel: threading.Event,
                 log_lines: list[str]) -> None:
    """``apt-get install --no-install-recommends`` into the Debian tree ``work`` (chroot, /proc mounted,
    services never started, the host's resolv.conf for the download)."""
    policy = work / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    resolv = work / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        shutil.copyfile("/etc/resolv.conf", resolv)
    meter = _AptMeter(progress)
    started = time.monotonic()
    (work / "proc").mkdir(exist_ok=True)
    commands.run(["mount", "-t", "proc", "proc", work / "proc"])
    try:
        chroot: list[str | Path] = ["chroot", work]
        commands.run([*chroot, "apt-get", "-q", "update"], cancel=cancel, env=_apt_env())
        log.info("apt-get install", packages=len(packages))
        log_lines.append("$ apt-get install --no-install-recommends " + " ".join(packages))
        out = commands.run([*chroot, "apt-get", "-q", "-y", "--no-install-recommends",
                            "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
                            "install", *packages], on_line=meter.line, cancel=cancel, env=_apt_env())
        log_lines.extend(line for line in out.splitlines() if "newly installed" in line)
        commands.run([*chroot, "apt-get", "clean"], cancel=cancel, env=_apt_env())
    finally:
        subprocess.run(["umount", "-l", str(work / "proc")], check=False, capture_output=True)
        policy.unlink(missing_ok=True)
    log_lines.append(f"apt-get install took {time.monotonic() - started:.1f}s")


def _apt_env() -> dict[str, str]:
    """The caller's environment (proxies, say) with a sane PATH and a non-interactive, C-locale apt."""
    return {**os.environ, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
            "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}


def _log_tail(work: Path, lines: int = 40) -> str:
    try:
        text = (work / "debootstrap" / "debootstrap.log").read_text(errors="replace")
    except OSError:
        return "(no debootstrap.log)"
    return "\n".join(text.splitlines()[-lines:])


def _remove_tree(path: Path) -> None:
    """rmtree a work tree, after unmounting what debootstrap or our apt stage mounted inside it."""
    if not path.exists():
        return
    for mnt in _mounts_under(path):
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
    if _mounts_under(path):
        raise StorageError(f"cannot remove {path}: filesystems still mounted inside")
    try:
        shutil.rmtree(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as fh:
        mounts = [line.split()[1] for line in fh]
    return sorted((m for m in mounts if m.startswith(f"{path}/")), reverse=True)


class _DebootstrapMeter:
    """Turns debootstrap's ``I: Retrieving/Extracting/Unpacking/Configuring <pkg>`` lines into a
    monotonic fraction in 0..``top`` (the rest of the build takes the rest)."""

    def __init__(self, progress: StepProgress, included: int, top: float = 0.5) -> None:
        self.progress = progress
        self.scale = top / 0.5
        self.expected = max(90, 80 + 4 * included)  # minbase is ~80 packages; exact once retrieved
        self.retrieved: set[str] = set()
        self.extracted: set[str] = set()
        self.installed: set[tuple[str, str]] = set()
        self.done = 0.0

    def line(self, text: str) -> None:
        m = re.match(r"I: (Retrieving|Validating|Extracting|Unpacking|Configuring) ([^ .]\S*?)(?:\.\.\.)?$",
                     text) or re.match(r"I: (Retrieving|Validating) (\S+) \S+$", text)
        if not m:
            if text.startswith(("E: ", "W: ")):
                log.warning("debootstrap", line=text)
            return
        phase, pkg = m.group(1), m.group(2).split(":")[0]
        if pkg in ("required", "the", "InRelease", "Packages", "Release"):
            return
        if phase in ("Retrieving", "Validating"):
            self.retrieved.add(pkg)
            fraction = 0.25 * len(self.retrieved) / max(self.expected, len(self.retrieved))
        elif phase == "Extracting":
            self.expected = max(len(self.retrieved), 1)
            self.extracted.add(pkg)
            fraction = 0.25 + 0.05 * len(self.extracted) / max(self.expected, len(self.extracted))
        else:
            self.expected = max(len(self.retrieved), 1)
            self.installed.add((phase, pkg))
            fraction = 0.3 + 0.2 * len(self.installed) / max(2 * self.expected, len(self.installed))
        self.done = max(self.done, min(fraction, 0.5) * self.scale)
        self.progress(f"debootstrap: {phase.lower()} {pkg}", self.done)


def gc_leftovers(cache_dir: Path) -> int:
    """Remove work trees and temp tarballs of debootstrap runs that no process is running."""
    store = cache_dir / "debootstrap"
    freed = 0
    if not store.is_dir():
        return 0
    for entry in [*store.glob(".*.work"), *store.glob(".*.tar.tmp")]:
        stem = entry.name[1:].removesuffix(".work").removesuffix(".tar.tmp")
        if not is_held(store / f".{stem}.tar.lock"):
            if entry.is_dir():
                _remove_tree(entry)
            else:
                entry.unlink(missing_ok=True)
            freed += 1
    return freed


class _AptMeter:
    """``Get:``/``Unpacking``/``Setting up`` lines of apt-get install -> a fraction in 0.3..0.5."""

    def __init__(self, progress: StepProgress) -> None:
        self.progress = progress
        self.total = 0
        self.seen = 0
        self.done = 0.3

    def line(self, text: str) -> None:
        m = re.search(r"(\d+) newly installed", text)
        if m:
            self.total = int(m.group(1))
            return
        m = re.match(r"(?:Get:\d+ \S+ \S+ \S+ (\S+)|(Unpacking|Setting up) (\S+))", text)
        if not m:
            return
        self.seen += 1
        pkg = (m.group(1) or m.group(3) or "").split(":")[0]
        phase = "downloading" if m.group(1) else m.group(2).lower()
        if self.total:
            self.done = max(self.done, min(0.5, 0.3 + 0.2 * self.seen / (3 * self.total)))
        self.progress(f"apt: {phase} {pkg}", self.done)
