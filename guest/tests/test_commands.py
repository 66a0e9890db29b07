"""Commands and PTYs through the real ``e2b`` SDK (sync and async)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from e2b import AsyncSandbox, CommandExitException, NotFoundException, TimeoutException
from e2b.sandbox.commands.command_handle import PtySize


def test_run_basic(sbx: Any, agent: Any) -> None:
    r = sbx.commands.run("echo hello; echo oops >&2; whoami; pwd")
    assert r.exit_code == 0
    assert r.stdout == f"hello\nuser\n{agent.home}\n"
    assert r.stderr == "oops\n"


def test_run_nonzero_exit(sbx: Any) -> None:
    with pytest.raises(CommandExitException) as ei:
        sbx.commands.run("echo out; exit 3")
    assert ei.value.exit_code == 3
    assert ei.value.stdout == "out\n"
    assert ei.value.error == "exit status 3"


def test_run_as_root_and_cwd(sbx: Any) -> None:
    r = sbx.commands.run("whoami; pwd; echo $HOME", user="root", cwd="/tmp")
    assert r.stdout.split() == ["root", "/tmp", "/root"]


def test_bad_cwd(sbx: Any) -> None:
    with pytest.raises(Exception, match="does not exist"):
        sbx.commands.run("true", cwd="/definitely/not/here")


def test_envs_do_not_leak(sbx: Any) -> None:
    r = sbx.commands.run("echo $CUBE_A", envs={"CUBE_A": "one"})
    assert r.stdout == "one\n"
    r = sbx.commands.run('echo "[$CUBE_A]"')
    assert r.stdout == "[]\n"


def test_sandbox_env_vars(gateway: Any) -> None:
    from e2b import Sandbox

    s = Sandbox.create(envs={"CUBE_SBX_VAR": "fromcreate"})
    try:
        assert s.commands.run("echo $CUBE_SBX_VAR").stdout == "fromcreate\n"
        # per-call envs override sandbox env vars
        r = s.commands.run("echo $CUBE_SBX_VAR", envs={"CUBE_SBX_VAR": "override"})
        assert r.stdout == "override\n"
    finally:
        s.kill()


def test_streaming_callbacks(sbx: Any) -> None:
    seen: list[tuple[str, float]] = []
    t0 = time.monotonic()
    sbx.commands.run(
        "echo first; sleep 1; echo second",
        on_stdout=lambda s: seen.append((s, time.monotonic() - t0)),
    )
    assert [s for s, _ in seen] == ["first\n", "second\n"]
    assert seen[1][1] - seen[0][1] > 0.5  # delivered as produced, not at the end


def test_background_wait_and_list(sbx: Any) -> None:
    h = sbx.commands.run("sleep 1; echo done", background=True)
    pids = [p.pid for p in sbx.commands.list()]
    assert h.pid in pids
    info = next(p for p in sbx.commands.list() if p.pid == h.pid)
    assert info.cmd == "/bin/bash" and info.args[-1] == "sleep 1; echo done"
    r = h.wait()
    assert r.stdout == "done\n"
    assert h.pid not in [p.pid for p in sbx.commands.list()]


def test_stdin_send_and_close(sbx: Any) -> None:
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "line one\n")
    sbx.commands.send_stdin(h.pid, b"line two\n")
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "line one\nline two\n"


def test_stream_input(sbx: Any) -> None:
    h = sbx.commands.run("wc -c", background=True, stdin=True)
    sbx.commands.stream_input(h.pid, (b"x" * 1000 for _ in range(100)))
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout.strip() == "100000"


def test_stdin_disabled_reads_eof(sbx: Any) -> None:
    r = sbx.commands.run("cat; echo end", stdin=False)
    assert r.stdout == "end\n"


def test_kill(sbx: Any) -> None:
    h = sbx.commands.run("sleep 30", background=True)
    assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    assert ei.value.exit_code == -1
    assert ei.value.error == "signal: killed"
    assert sbx.commands.kill(h.pid) is False  # gone: not found


def test_connect_running_and_finished(sbx: Any) -> None:
    h = sbx.commands.run("sleep 1; echo later", background=True)
    h.disconnect()
    h2 = sbx.commands.connect(h.pid)
    assert h2.wait().stdout == "later\n"
    # Already finished: Connect replays start and end.
    h3 = sbx.commands.connect(h.pid)
    r = h3.wait()
    assert r.exit_code == 0 and r.stdout == ""


def test_connect_unknown(sbx: Any) -> None:
    with pytest.raises(NotFoundException):
        sbx.commands.connect(999999).wait()


def test_timeout_kills_command(sbx: Any) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 20", timeout=1)
    assert time.monotonic() - t0 < 10
    # The agent kills the command at its timeout, as upstream envd does.
    time.sleep(0.5)
    assert not any("sleep 20" in " ".join(p.args) for p in sbx.commands.list())


def test_large_output(sbx: Any) -> None:
    r = sbx.commands.run("head -c 20000000 /dev/zero | tr '\\0' a")
    assert len(r.stdout) == 20_000_000
    assert set(r.stdout) == {"a"}


def test_binary_and_utf8_output(sbx: Any) -> None:
    r = sbx.commands.run("printf 'h\\xc3\\xa9llo'")
    assert r.stdout == "héllo"


def test_pty(sbx: Any) -> None:
    out = bytearray()
    h = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.send_stdin(h.pid, b"stty size; tty; echo $TERM\n")
    resized = False
    for _, _, pty in h:
        out.extend(pty or b"")
        if not resized and b"xterm-256color\r\n" in out:
            resized = True
            sbx.pty.resize(h.pid, PtySize(rows=40, cols=100))
            sbx.pty.send_stdin(h.pid, b"stty size; exit\n")
    text = out.decode(errors="replace")
    assert h.wait().exit_code == 0
    assert "24 80" in text
    assert "40 100" in text
    assert "/dev/pts/" in text
    assert "xterm-256color" in text


def _pty_until(handle: Any, marker: bytes) -> bytes:
    out = bytearray()
    for _, _, pty in handle:
        out.extend(pty or b"")
        if marker in out:
            break
    return bytes(out)


@pytest.mark.parametrize("first_stays", [False, True], ids=["after-disconnect", "second-viewer"])
def test_pty_connect_gets_what_follows(sbx: Any, first_stays: bool) -> None:
    h = sbx.pty.create(PtySize(rows=24, cols=80), timeout=60)
    sbx.pty.send_stdin(h.pid, b"echo first-$((6*7))\n")
    assert b"first-42" in _pty_until(h, b"first-42")
    if not first_stays:
        h.disconnect()
    again = sbx.pty.connect(h.pid, timeout=30)
    sbx.pty.send_stdin(h.pid, b"echo second-$((6*8))\n")
    assert b"second-48" in _pty_until(again, b"second-48")
    if first_stays:  # the first viewer still sees everything too
        assert b"second-48" in _pty_until(h, b"second-48")
    sbx.pty.send_stdin(h.pid, b"exit\n")
    assert again.wait().exit_code == 0


def test_pty_connect_right_after_create(sbx: Any) -> None:
    """E2B's own pattern: the first handle is never read while the second one waits."""
    out: list[bytes] = []
    terminal = sbx.pty.create(PtySize(80, 24), envs={"ABC": "123"}, cwd="/")
    connected = sbx.pty.connect(terminal.pid)
    assert connected.pid == terminal.pid
    sbx.pty.send_stdin(terminal.pid, b"echo $ABC\nexit\n")
    assert connected.wait(on_pty=out.append).exit_code == 0
    assert b"123" in b"".join(out)


def test_pty_reconnect_async(gateway: Any) -> None:
    async def main() -> tuple[int, bytes, bytes]:
        s = await AsyncSandbox.create()
        first: list[bytes] = []
        again: list[bytes] = []
        try:
            t = await s.pty.create(PtySize(80, 24), on_data=first.append, envs={"FOO": "bar"})
            await s.pty.send_stdin(t.pid, b"echo $FOO-1\n")
            for _ in range(100):
                if b"bar-1" in b"".join(first):
                    break
                await asyncio.sleep(0.05)
            await t.disconnect()
            r = await s.pty.connect(t.pid, on_data=again.append)
            await s.pty.send_stdin(t.pid, b"echo $FOO-2\nexit\n")
            code = (await r.wait()).exit_code
        finally:
            await s.kill()
        return code, b"".join(first), b"".join(again)

    code, first, again = asyncio.run(main())
    assert code == 0
    assert b"bar-1" in first and b"bar-2" in again
    assert b"bar-2" not in first  # the first viewer was gone


def test_pty_kill(sbx: Any) -> None:
    h = sbx.pty.create(PtySize(rows=10, cols=40))
    assert sbx.pty.kill(h.pid)
    with pytest.raises(CommandExitException):
        h.wait()


def test_async_commands(gateway: Any) -> None:
    async def main() -> None:
        s = await AsyncSandbox.create()
        try:
            r = await s.commands.run("echo async-hi")
            assert r.stdout == "async-hi\n"
            chunks: list[str] = []
            h = await s.commands.run(
                "for i in 1 2 3; do echo $i; done", background=True, on_stdout=chunks.append
            )
            res = await h.wait()
            assert res.stdout == "1\n2\n3\n"
            assert "".join(chunks) == "1\n2\n3\n"
            hs = await asyncio.gather(*(s.commands.run(f"echo {i}") for i in range(20)))
            assert [x.stdout for x in hs] == [f"{i}\n" for i in range(20)]
        finally:
            await s.kill()

    asyncio.run(main())
