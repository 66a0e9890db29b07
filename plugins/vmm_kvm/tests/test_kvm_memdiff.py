"""RAM diffs (:mod:`cube_vmm_kvm.memdiff`) between real processes that map a file copy-on-write,
the way a clone's QEMU maps its template's RAM file (no guests here; the VM tests are in
test_kvm_diff_snapshot.py)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cube_core import VmmError

from cube_vmm_kvm import memdiff
from cube_vmm_kvm.memdiff import PAGE, ExtraBlock

pytestmark = pytest.mark.root  # reading another process's pagemap flags and memory

CHILD = r"""
import ctypes, hashlib, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
ram = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
extra = mmap.mmap(-1, 65536)
anchor = ctypes.c_char.from_buffer(extra)
print(ctypes.addressof(anchor), flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "write":
        page, count, value = map(int, args)
        ram[page * 4096:(page + count) * 4096] = bytes([value]) * (count * 4096)
    elif cmd == "extra":
        extra[:] = bytes([int(args[0])]) * len(extra)
    elif cmd == "hash":
        print(hashlib.sha256(ram).hexdigest(), hashlib.sha256(extra).hexdigest(), flush=True)
        continue
    print("ok", flush=True)
"""


class Child:
    """A process that maps ``base`` MAP_PRIVATE (like a clone's QEMU) plus one anonymous block."""

    def __init__(self, base: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(base)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.extra_address = int(self.ask(None))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, line: str | None) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if line is not None:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "memory.ram"
    path.write_bytes(os.urandom(8 << 20))  # no zero pages: a zeroed page must travel in the diff
    return path


@pytest.fixture
def children(base: Path) -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for child in made:
        child.close()


def entry(present: bool = False, swapped: bool = False, file: bool = False) -> bytes:
    return struct.pack("<Q", (present << 63) | (swapped << 62) | (file << 61) | 0x1234)


def test_runs_from_pagemap_picks_private_pages() -> None:
    entries = b"".join([
        entry(present=True, file=True),     # 0: the base file's page, untouched
        entry(present=True),                # 1: copy-on-write broken
        entry(present=True),                # 2
        entry(),                            # 3: never touched
        entry(swapped=True),                # 4: a private page on swap
        entry(swapped=True, file=True),     # 5: a file page under migration: not private
        entry(present=True),                # 6
    ])
    assert memdiff.runs_from_pagemap(entries, 100) == [(101, 2), (104, 1), (106, 1)]


def test_diff_roundtrip_between_processes(base: Path, children: list[Child], tmp_path: Path) -> None:
    src = Child(base)
    children.append(src)
    for page, count, value in ((0, 1, 0), (10, 5, 7), (100, 3, 255), (2047, 1, 1)):
        assert src.ask(f"write {page} {count} {value}") == "ok"
    assert src.ask("extra 90") == "ok"
    vmas = memdiff.base_mappings(src.pid, base)
    assert [(vma.end - vma.start, vma.offset) for vma in vmas] == [(8 << 20, 0)]
    runs = [(0, 1), (10, 5), (100, 3), (2047, 1)]
    assert memdiff.private_runs(src.pid, vmas) == runs

    diff = tmp_path / "memory.diff"
    block = ExtraBlock(name="blk", gpa=0xF0000, size=65536)
    stats = memdiff.save(src.pid, base, diff, [(block, src.extra_address)])
    assert stats.pages == 10 and stats.runs == 4 and stats.data_bytes == 10 * PAGE + 65536
    index = memdiff.read_index(diff)
    assert index.runs == runs and index.extras == [block] and index.base_bytes == 8 << 20
    assert diff.stat().st_size == index.data_offset + index.data_bytes

    dst = Child(base)
    children.append(dst)
    assert dst.ask("hash") != src.ask("hash")
    memdiff.apply(dst.pid, base, diff, index, [dst.extra_address])
    assert dst.ask("hash") == src.ask("hash")  # the zeroed page too
    # The writes broke copy-on-write for exactly the diff's pages, as guest writes would.
    assert memdiff.private_runs(dst.pid, memdiff.base_mappings(dst.pid, base)) == runs


def test_a_replaced_base_file_is_not_found(base: Path, children: list[Child], tmp_path: Path) -> None:
    child = Child(base)
    children.append(child)
    assert memdiff.base_mappings(child.pid, base)
    fresh = tmp_path / "fresh"
    fresh.write_bytes(base.read_bytes())
    os.replace(fresh, base)  # same path and content, another file: a diff against it would be wrong
    assert memdiff.base_mappings(child.pid, base) == []
    with pytest.raises(VmmError, match="does not map"):
        memdiff.save(child.pid, base, tmp_path / "memory.diff", [])


def test_read_index_rejects_damaged_files(base: Path, children: list[Child], tmp_path: Path) -> None:
    child = Child(base)
    children.append(child)
    assert child.ask("write 3 2 9") == "ok"
    diff = tmp_path / "memory.diff"
    memdiff.save(child.pid, base, diff, [])
    with open(diff, "r+b") as f:
        f.truncate(diff.stat().st_size - PAGE)
    with pytest.raises(VmmError, match="truncated"):
        memdiff.read_index(diff)
    (tmp_path / "junk").write_bytes(b"not a diff at all, but long enough to hold a header")
    with pytest.raises(VmmError, match="not a RAM diff"):
        memdiff.read_index(tmp_path / "junk")
