"""Filesystem RPCs and /files through the real ``e2b`` SDK (sync and async)."""

from __future__ import annotations

import asyncio
import io
import os
import time
from typing import Any

import pytest
from e2b import AsyncSandbox, FileType, InvalidArgumentException, NotFoundException
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType


def test_write_read_roundtrip(sbx: Any, agent: Any) -> None:
    info = sbx.files.write("dir1/sub/hello.txt", "hi there")
    assert info.path == f"{agent.home}/dir1/sub/hello.txt"
    assert info.name == "hello.txt"
    assert sbx.files.read("dir1/sub/hello.txt") == "hi there"
    assert sbx.files.read(f"{agent.home}/dir1/sub/hello.txt", format="bytes") == b"hi there"
    st = os.stat(agent.home / "dir1/sub/hello.txt")
    assert st.st_uid != 0  # owned by the acting user
    assert oct(st.st_mode & 0o777) == "0o644"


def test_write_binary_and_stream_read(sbx: Any) -> None:
    data = os.urandom(3_000_000)
    sbx.files.write("bin.dat", data)
    assert bytes(sbx.files.read("bin.dat", format="bytes")) == data
    with sbx.files.read("bin.dat", format="stream") as stream:
        assert b"".join(stream) == data


def test_write_as_root_owner(sbx: Any) -> None:
    sbx.files.write("/tmp/cube-root-owned.txt", "x", user="root")
    info = sbx.files.get_info("/tmp/cube-root-owned.txt")
    assert info.owner == "root"
    sbx.files.remove("/tmp/cube-root-owned.txt")


def test_write_files_multipart(sbx: Any, agent: Any) -> None:
    res = sbx.files.write_files([
        {"path": "multi/a.txt", "data": "A"},
        {"path": "multi/b.txt", "data": b"B"},
        {"path": f"{agent.home}/multi/c.txt", "data": io.BytesIO(b"C")},
    ], use_octet_stream=False)
    assert sorted(r.path for r in res) == [f"{agent.home}/multi/{n}.txt" for n in "abc"]
    assert [sbx.files.read(f"multi/{n}.txt") for n in "abc"] == ["A", "B", "C"]


def test_gzip_both_ways(sbx: Any) -> None:
    payload = "compress me " * 10000
    sbx.files.write("gz.txt", payload, gzip=True)
    assert sbx.files.read("gz.txt", gzip=True) == payload
    assert sbx.files.read("gz.txt") == payload


def test_streamed_upload_iterable(sbx: Any) -> None:
    chunks = (bytes([i]) * 65536 for i in range(64))
    sbx.files.write("streamed.bin", chunks)
    data = bytes(sbx.files.read("streamed.bin", format="bytes"))
    assert len(data) == 64 * 65536 and data[-1] == 63


def test_read_missing_and_dir(sbx: Any) -> None:
    with pytest.raises(NotFoundException):
        sbx.files.read("nope/none.txt")
    sbx.files.make_dir("adir")
    with pytest.raises(InvalidArgumentException):
        sbx.files.read("adir")


def test_list_stat_exists(sbx: Any, agent: Any) -> None:
    sbx.files.write("ls/b.txt", "bb")
    sbx.files.write("ls/a/inner.txt", "i")
    entries = sbx.files.list("ls")
    assert [e.name for e in entries] == ["a", "b.txt"]
    assert entries[0].type == FileType.DIR and entries[1].type == FileType.FILE
    deep = sbx.files.list("ls", depth=2)
    assert [e.path for e in deep] == [
        f"{agent.home}/ls/a", f"{agent.home}/ls/a/inner.txt", f"{agent.home}/ls/b.txt"
    ]
    info = sbx.files.get_info("ls/b.txt")
    assert info.size == 2 and info.mode == 0o644 and info.permissions == "-rw-r--r--"
    assert info.owner == "user" and info.group == "user"
    assert abs(info.modified_time.timestamp() - time.time()) < 60
    assert sbx.files.exists("ls/b.txt") and not sbx.files.exists("ls/zzz")
    with pytest.raises(NotFoundException):
        sbx.files.list("no-such-dir")


def test_symlink(sbx: Any, agent: Any) -> None:
    sbx.files.write("target.txt", "t")
    sbx.commands.run("ln -sf target.txt link.txt")
    info = sbx.files.get_info("link.txt")
    assert info.type == FileType.FILE
    assert info.symlink_target == f"{agent.home}/target.txt"


def test_make_dir_rename_remove(sbx: Any, agent: Any) -> None:
    assert sbx.files.make_dir("mk/a/b") is True
    assert sbx.files.make_dir("mk/a/b") is False
    assert sbx.files.get_info("mk/a").owner == "user"
    sbx.files.write("mk/a/b/f.txt", "f")
    moved = sbx.files.rename("mk/a/b/f.txt", "mk/other/g.txt")
    assert moved.path == f"{agent.home}/mk/other/g.txt"
    assert sbx.files.read("mk/other/g.txt") == "f"
    with pytest.raises(NotFoundException):
        sbx.files.rename("mk/nothing", "mk/x")
    sbx.files.remove("mk")
    assert not sbx.files.exists("mk")
    sbx.files.remove("mk")  # removing a missing path succeeds


def test_metadata(sbx: Any) -> None:
    info = sbx.files.write("meta.txt", "m", metadata={"Owner": "alice", "k2": "v 2"})
    assert info.metadata == {"owner": "alice", "k2": "v 2"}
    assert sbx.files.get_info("meta.txt").metadata == {"owner": "alice", "k2": "v 2"}
    sbx.files.write("meta.txt", "m2", metadata={"only": "this"})
    assert sbx.files.get_info("meta.txt").metadata == {"only": "this"}
    listed = {e.name: e for e in sbx.files.list(".")}
    assert listed["meta.txt"].metadata == {"only": "this"}


def test_write_without_metadata_clears_it(sbx: Any) -> None:
    sbx.files.write("meta-clear.txt", "1", metadata={"owner": "alice"})
    info = sbx.files.write("meta-clear.txt", "2")
    assert not info.metadata
    assert not sbx.files.get_info("meta-clear.txt").metadata
    assert sbx.files.read("meta-clear.txt") == "2"
    sbx.files.write_files([{"path": "meta-clear.txt", "data": "3"}], metadata={"k": "v"})
    assert sbx.files.get_info("meta-clear.txt").metadata == {"k": "v"}
    sbx.files.write_files([{"path": "meta-clear.txt", "data": "4"}])
    assert not sbx.files.get_info("meta-clear.txt").metadata


def test_watch_dir_sync(sbx: Any) -> None:
    sbx.files.make_dir("w1")
    handle = sbx.files.watch_dir("w1", recursive=True, include_entry=True)
    try:
        sbx.files.write("w1/f.txt", "hello")
        sbx.files.make_dir("w1/sub")
        time.sleep(0.1)
        sbx.files.write("w1/sub/deep.txt", "deep")
        sbx.files.remove("w1/f.txt")
        time.sleep(0.2)
        events = handle.get_new_events()
        pairs = [(e.name, e.type) for e in events]
        assert ("f.txt", FilesystemEventType.CREATE) in pairs
        assert ("f.txt", FilesystemEventType.WRITE) in pairs
        assert ("sub", FilesystemEventType.CREATE) in pairs
        assert ("sub/deep.txt", FilesystemEventType.CREATE) in pairs
        assert ("f.txt", FilesystemEventType.REMOVE) in pairs
        created = next(e for e in events if e.name == "sub/deep.txt")
        assert created.entry is not None and created.entry.name == "deep.txt"
        assert handle.get_new_events() == []  # drained
    finally:
        handle.stop()


def test_watch_missing_dir(sbx: Any) -> None:
    with pytest.raises(NotFoundException):
        sbx.files.watch_dir("nowhere")


def test_async_files_and_watch(gateway: Any) -> None:
    async def main() -> None:
        s = await AsyncSandbox.create()
        try:
            await s.files.make_dir("aw")
            events: list[Any] = []
            got = asyncio.Event()

            def on_event(e: Any) -> None:
                events.append(e)
                if e.name == "x.txt" and e.type == FilesystemEventType.WRITE:
                    got.set()

            handle = await s.files.watch_dir("aw", on_event=on_event)
            await s.files.write("aw/x.txt", "data")
            await asyncio.wait_for(got.wait(), 10)
            await handle.stop()
            assert any(e.type == FilesystemEventType.CREATE for e in events)
            assert await s.files.read("aw/x.txt") == "data"
            entries = await s.files.list("aw")
            assert [e.name for e in entries] == ["x.txt"]
        finally:
            await s.kill()

    asyncio.run(main())
