"""The real ``base`` template image: debootstrap from the host's Debian mirror (network), cached
per package set under /var/cache/cube so that later runs only unpack it."""

from __future__ import annotations

import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from cow_helpers import REPO, copy_guest, ext4_cat, ext4_ls, ext4_stat, fsck_clean
from cube_core import RootfsRecipe, StorageError

from cube_storage_cow import BASE, CODE_INTERPRETER, CowConfig, CowStorage, jupyter_kernels
from cube_storage_cow.debootstrap import BASE_PACKAGES, host_mirror, packages_for
from cube_storage_cow.rootfs import BuildSettings, plan

SHARED_CACHE = Path("/var/cache/cube")


@pytest.mark.slow
@pytest.mark.root
async def test_base_recipe_end_to_end(tmp_path: Path):
    guest = _guest(tmp_path)
    driver = CowStorage(CowConfig(root=tmp_path / "root", cache=SHARED_CACHE, guest_src=guest))
    await driver.start()
    steps: list[tuple[str, float | None]] = []
    image = await driver.build_rootfs(BASE, lambda s, f: steps.append((s, f)))
    img = image.path
    fsck_clean(img)
    assert img.stat().st_size == 2048 << 20 and image.bytes_allocated < 600 << 20
    assert ext4_stat(img, "/usr/bin/python3.11")["type"] == "regular"
    assert ext4_stat(img, "/usr/bin/python3")["type"] == "symlink"
    assert "aiohttp" in ext4_ls(img, "/usr/lib/python3/dist-packages")
    for tool in ("bash", "curl", "git", "sudo", "ps", "ip"):
        assert ext4_stat(img, f"/usr/bin/{tool}" if tool != "ip" else "/usr/sbin/ip")["uid"] == 0
    assert ext4_cat(img, "/opt/cube/guest/cube_guest/__init__.py") == (guest / "cube_guest/__init__.py").read_bytes()
    assert ext4_stat(img, "/usr/sbin/cube-init")["mode"] & 0o7777 == 0o755
    assert ext4_stat(img, "/home/user")["uid"] == 1000
    assert ext4_ls(img, "/usr/share/doc") == set() and ext4_ls(img, "/var/lib/apt/lists") == set()
    # the login profile spawns nothing (cube_storage_cow.login; behaviour in test_cow_login.py)
    assert b'"$(id -u)"' not in ext4_cat(img, "/etc/profile") and b"${EUID:-$(id -u)}" in ext4_cat(img, "/etc/profile")
    assert b"if [ -t 0 ]; then mesg n" in ext4_cat(img, "/root/.profile")
    assert steps[-1] == ("rootfs image up to date", 1.0) or steps[-1] == ("rootfs image ready", 1.0)
    assert any(s.startswith(("debootstrap", "unpacking Debian tree")) for s, _ in steps)

    # run the image's own python on the agent, and sudo as user (read-only loop mount + a tmpfs /tmp;
    # not a VM, only its userspace)
    out = in_image(img, ["/usr/bin/python3", "-c", "import sys; sys.path.insert(0, '/opt/cube/guest'); "
                         "import aiohttp, cube_guest; print(cube_guest.AGENT_VERSION, aiohttp.__version__)"])
    assert len(out.split()) == 2
    assert in_image(img, ["/usr/bin/sudo", "-n", "/usr/bin/id", "-u"], user=True).strip() == "0"


@pytest.mark.slow
@pytest.mark.root
async def test_code_interpreter_recipe_end_to_end(tmp_path: Path):
    """apt (not debootstrap's resolver) installs the interpreter set: virtual packages resolve,
    the Jupyter/data stack imports, and matplotlib's font cache is prebuilt for user."""
    driver = CowStorage(CowConfig(root=tmp_path / "root", cache=SHARED_CACHE, guest_src=_guest(tmp_path)))
    await driver.start()
    image = await driver.build_rootfs(CODE_INTERPRETER)
    img = image.path
    fsck_clean(img)
    assert image.bytes_allocated < 1500 << 20
    assert "scipy" not in ext4_ls(img, "/usr/lib/python3/dist-packages")  # python3-munkres kept it out
    assert any(n.startswith("fontlist") for n in ext4_ls(img, "/home/user/.cache/matplotlib"))
    out = in_image(img, ["/usr/bin/python3", "-c",
                         "import ipykernel, jupyter_client, zmq, numpy, pandas, matplotlib; "
                         "matplotlib.use('Agg'); import matplotlib.pyplot as plt; plt.plot([1, 2]); "
                         "plt.savefig('/tmp/x.png'); print(numpy.arange(3).sum(), pandas.Series([1, 2]).sum())"],
                   user=True)
    assert out.split() == ["3", "3"]
    # the other languages' kernels: IRkernel from Debian, tslab (JS + TS) from npm on Debian's node,
    # jjava (PyPI) on Debian's JDK
    specs = in_image(img, ["/usr/bin/python3", "-c", "from jupyter_client.kernelspec import find_kernel_specs; "
                           "print(' '.join(sorted(find_kernel_specs())))"], user=True)
    assert specs.split() == ["ir", "java", "jslab", "python3", "tslab"]
    assert "jshell" in in_image(img, ["/usr/bin/java", "--list-modules"], user=True)
    assert ext4_stat(img, f"{jupyter_kernels.JAVA_DIR}/jjava.jar")["type"] == "regular"
    assert "jmods" not in ext4_ls(img, "/usr/lib/jvm/java-17-openjdk-amd64")
    assert in_image(img, ["/usr/bin/node", "/opt/cube/node/node_modules/tslab/bin/tslab", "--version"],
                    user=True).strip()
    assert in_image(img, ["/usr/bin/Rscript", "-e", "library(IRkernel); cat('ok')"], user=True) == "ok"
    # tslab finds @types/node (console, process) from any cwd through its own node_modules
    assert ext4_ls(img, "/opt/cube/node/node_modules/tslab/node_modules/@types/node")


def _guest(tmp_path: Path) -> Path:
    real = REPO / "guest"
    return real if (real / "init" / "cube-init").is_file() else copy_guest(tmp_path / "guest")


def in_image(image: Path, argv: list[str], *, user: bool = False) -> str:
    """Run ``argv`` chrooted into a read-only loop mount of ``image`` (tmpfs on /tmp)."""
    with tempfile.TemporaryDirectory(prefix="cube-mnt-") as mnt:
        subprocess.run(["mount", "-o", "ro,loop", str(image), mnt], check=True)
        try:
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", f"{mnt}/tmp"], check=True)
            # /proc: ld.so resolves $ORIGIN (java's RPATH to libjli.so) through /proc/self/exe
            subprocess.run(["mount", "-t", "proc", "proc", f"{mnt}/proc"], check=True)
            try:
                prefix = ["chroot", *(["--userspec=1000:1000"] if user else []), mnt, "/usr/bin/env", "-i",
                          f"HOME={'/home/user' if user else '/root'}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
                proc = subprocess.run([*prefix, *argv], capture_output=True, text=True)
                assert proc.returncode == 0, proc.stdout + proc.stderr
                return proc.stdout
            finally:
                subprocess.run(["umount", f"{mnt}/proc"], check=True)
                subprocess.run(["umount", f"{mnt}/tmp"], check=True)
        finally:
            subprocess.run(["umount", mnt], check=True)


def test_package_sets():
    assert set(BASE_PACKAGES) <= set(packages_for(BASE))
    interp = packages_for(RootfsRecipe(name="ci", interpreter=True, packages=("vim",)))
    assert {"python3-ipykernel", "python3-numpy", "python3-zmq", "vim", "bash", "r-cran-irkernel",
            "nodejs"} <= set(interp)
    assert list(interp) == sorted(interp)
    with pytest.raises(Exception, match="invalid Debian package"):
        packages_for(RootfsRecipe(name="bad", packages=("foo;rm -rf /",)))


def test_mirror_comes_from_the_apt_sources(tmp_path: Path):
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list").write_text(
        "# comment\ndeb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm-updates main\n")
    (apt / "sources.list.d" / "a.sources").write_text(
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n\n"
        "Types: deb deb-src\n# http://snapshot.example/\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main contrib\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n")
    (apt / "sources.list.d" / "ignored.list.disabled").write_text("deb http://nope.example/debian bookworm main\n")
    assert host_mirror("bookworm", apt) == "http://mirror.example/debian"
    (apt / "sources.list").write_text("deb http://first.example/debian bookworm main non-free\n")
    assert host_mirror("bookworm", apt) == "http://first.example/debian"
    with pytest.raises(Exception, match="no Debian mirror for 'trixie'"):
        host_mirror("trixie", apt)
    # and this host has one (the slow test uses it)
    assert host_mirror("bookworm").startswith(("http://", "https://", "file:/"))


def test_npm_kernels_are_part_of_the_image_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    settings = BuildSettings(images=tmp_path / "images", work=tmp_path / "build", cache=tmp_path / "cache",
                             guest_src=_guest(tmp_path))
    before = plan(CODE_INTERPRETER, settings).content_hash
    base_before = plan(BASE, settings).content_hash
    monkeypatch.setattr(jupyter_kernels, "NPM_PACKAGES", ("tslab@1.0.21",))
    assert plan(CODE_INTERPRETER, settings).content_hash != before
    assert plan(BASE, settings).content_hash == base_before
    assert jupyter_kernels.tarball(tmp_path, "amd64") != jupyter_kernels.tarball(tmp_path, "arm64")
    java = plan(CODE_INTERPRETER, settings).content_hash
    monkeypatch.setattr(jupyter_kernels, "JJAVA", ("jjava", "1.0a7", "0" * 64))
    assert plan(CODE_INTERPRETER, settings).content_hash != java


def test_java_kernel_wheel_is_checked_against_its_pin(tmp_path: Path):
    """A cached wheel whose sha256 is not the pinned one is refused (nothing is fetched: it exists)."""
    whl = jupyter_kernels.wheel(tmp_path)
    whl.parent.mkdir(parents=True)
    whl.write_bytes(b"not the wheel")
    with pytest.raises(StorageError, match="expected " + jupyter_kernels.JJAVA[2]):
        jupyter_kernels.java_kernel_jar(tmp_path, threading.Event(), [])
