"""Language/kernel logic of the code interpreter that needs no VM: language names, which
languages a system offers, the glue code sent to node kernels (run by the host's real node),
errors of kernels that only print them (tslab), and the ``e2b/data`` of a DataFrame."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cube_guest import kernel_charts, kernels
from cube_guest.kernels import (
    ContextManager,
    Execution,
    Turn,
    UnsupportedLanguage,
    normalize_language,
)
from cube_guest.state import AgentState


@pytest.mark.parametrize(("given", "expected"), [
    (None, "python"), ("Python3", "python"), ("js", "javascript"), (" JavaScript ", "javascript"),
    ("ts", "typescript"), ("typescript", "typescript"), ("R", "r"), ("sh", "bash"),
    ("java", "java"),
])
def test_language_names(given: str | None, expected: str) -> None:
    assert normalize_language(given) == expected


def test_unknown_language() -> None:
    with pytest.raises(UnsupportedLanguage, match="cobol"):
        normalize_language("cobol")


def _spec(root: Path, name: str, language: str) -> None:
    (root / "kernels" / name).mkdir(parents=True)
    (root / "kernels" / name / "kernel.json").write_text(json.dumps(
        {"argv": ["/bin/false", "{connection_file}"], "display_name": name, "language": language}))


def test_available_follows_installed_kernelspecs(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _spec(tmp_path, "tslab", "typescript")
    _spec(tmp_path, "ir", "R")
    _spec(tmp_path, "java", "java")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    available = ContextManager(AgentState(), str(tmp_path)).available()
    assert {"bash", "python", "typescript", "r", "java"} <= available
    if "jslab" not in kernels.installed_kernels():
        assert "javascript" not in available


def test_missing_kernel_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    manager = ContextManager(AgentState(), str(tmp_path))
    missing = [lang for lang in ("javascript", "typescript", "r", "java")
               if lang not in manager.available()]
    assert missing, "this host has every kernel: nothing to refuse"
    with pytest.raises(UnsupportedLanguage, match="not installed"):
        asyncio.run(manager.default(missing[0]))
    assert manager.contexts == {}


def test_default_languages_are_upstreams() -> None:
    assert kernels.DEFAULT_LANGUAGES == ("python", "javascript")


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="needs node (Debian package nodejs)")
def test_node_env_glue_runs_in_node() -> None:
    """Push, read, pop, as the agent sends it around a cell with per-call env vars."""
    values = {"CUBE_A": "it's \"quoted\" \\ and ünïcode\nnewline", "CUBE_B": "b"}
    script = "\n".join([
        'process.env.CUBE_B = "before";',
        kernels.node_env_push_code(values),
        'const during = {a: process.env.CUBE_A, b: process.env.CUBE_B};',
        kernels.NODE_ENV_POP_CODE,
        kernels.node_env_code({"CUBE_C": "c"}),
        'console.log(JSON.stringify({during, after: {a: process.env.CUBE_A ?? null,',
        '  b: process.env.CUBE_B, c: process.env.CUBE_C,',
        '  saved: process.env.__CUBE_SAVED_ENV ?? null}}));',
    ])
    assert NODE is not None
    env = {k: v for k, v in os.environ.items() if k != "CUBE_A"}
    out = subprocess.run([NODE, "-e", script], capture_output=True, text=True, check=True, env=env)
    got = json.loads(out.stdout)
    assert got["during"] == {"a": values["CUBE_A"], "b": "b"}
    assert got["after"] == {"a": None, "b": "before", "c": "c", "saved": None}


def test_r_env_glue_quotes_like_r() -> None:
    code = kernels.r_env_push_code({"K": 'a"b\\c'})
    assert code.startswith('.cube_saved_env <- Sys.getenv(c("K"), unset = NA, names = TRUE)')
    assert 'Sys.setenv("K" = "a\\"b\\\\c")' in code
    assert "rm(.cube_saved_env)" in kernels.R_ENV_POP_CODE


def _finish(turn: Turn) -> tuple[bool, list[dict[str, Any]]]:
    job = Execution("x", None)
    failed = turn.finish(job)
    lines = []
    while not job.lines.empty():
        line = job.lines.get_nowait()
        assert line is not None
        lines.append(line)
    return failed, lines


def test_error_only_printed_becomes_an_error_line() -> None:
    turn = Turn()
    turn.reply = {"status": "error", "execution_count": 7}
    turn.stderr = ["evalmachine.<anonymous>:2\nthrow new TypeError('boom');\n^\n\n",
                   "TypeError: boom\n    at evalmachine.<anonymous>:2:7\n"]
    failed, lines = _finish(turn)
    assert failed
    assert lines[0] == {"type": "number_of_executions", "execution_count": 7}
    assert lines[1]["type"] == "error"
    assert (lines[1]["name"], lines[1]["value"]) == ("TypeError", "boom")
    assert "at evalmachine" in lines[1]["traceback"]


def test_type_error_of_tslab() -> None:
    turn = Turn()
    turn.reply = {"status": "error", "execution_count": 2}
    turn.stderr = ["1:7 - Type 'number' is not assignable to type 'string'.\n"]
    _, lines = _finish(turn)
    assert lines[-1]["name"] == "Error"
    assert lines[-1]["value"] == "1:7 - Type 'number' is not assignable to type 'string'."


def test_published_error_and_count_are_not_repeated() -> None:
    turn = Turn()
    turn.counted = turn.errored = True
    turn.reply = {"status": "error", "execution_count": 3, "ename": "ZeroDivisionError"}
    failed, lines = _finish(turn)
    assert failed and lines == []
    ok = Turn()
    ok.reply = {"status": "ok", "execution_count": 4}
    assert _finish(ok) == (False, [{"type": "number_of_executions", "execution_count": 4}])


def test_dataframe_data_is_upstreams_shape() -> None:
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"A": [1, 3], "B": [2.5, float("nan")],
                       "when": pd.to_datetime(["2020-01-01", "2021-06-01"]), 3: ["x", "y"]})
    data = kernel_charts.dataframe_to_data(df)
    assert data is not None
    assert data["A"] == [1, 3]
    assert data["B"][0] == 2.5 and data["B"][1] is None
    assert data["when"][0].startswith("2020-01-01")
    assert data["3"] == ["x", "y"]
    json.dumps(data, allow_nan=False)
    assert kernel_charts.dataframe_to_data(object()) is None


def _slow_python_kernel(root: Path, delay_s: float) -> None:
    """A real ipykernel that takes ``delay_s`` longer to come up (a cold kernel under TCG)."""
    (root / "kernels" / "python3").mkdir(parents=True)
    argv = ["/bin/sh", "-c", f'sleep {delay_s}; exec "$0" -m ipykernel_launcher -f "$1"',
            sys.executable, "{connection_file}"]
    (root / "kernels" / "python3" / "kernel.json").write_text(json.dumps(
        {"argv": argv, "display_name": "slow", "language": "python"}))


async def _lines(ctx: Any, code: str) -> list[dict[str, Any]]:
    job = ctx.submit(code, None)
    out = []
    while (line := await job.lines.get()) is not None:
        out.append(line)
    return out


def test_slow_start_returns_early_and_executions_wait(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _slow_python_kernel(tmp_path, 3)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))

    async def scenario() -> None:
        manager = ContextManager(AgentState(), str(tmp_path))
        ctx = await manager.create("python", str(tmp_path), wait_s=0.2)
        try:
            assert ctx.starting is not None and not ctx.starting.done()
            assert ctx.id in manager.contexts
            results = [ln for ln in await _lines(ctx, "x = 20\nx + 1") if ln["type"] == "result"]
            assert results[0]["text"] == "21"
            ctx.begin(restart=True)
            await ctx.settle(0.2)
            assert not ctx.starting.done()
            after = await _lines(ctx, "'x' in dir()")
            assert [ln["text"] for ln in after if ln["type"] == "result"] == ["False"]
        finally:
            await manager.shutdown()

    asyncio.run(scenario())


def test_start_failure_within_the_wait_raises(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kernels" / "python3").mkdir(parents=True)
    (tmp_path / "kernels" / "python3" / "kernel.json").write_text(json.dumps(
        {"argv": ["/nonexistent/kernel", "{connection_file}"], "display_name": "x",
         "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    manager = ContextManager(AgentState(), str(tmp_path))
    with pytest.raises(OSError):
        asyncio.run(manager.create("python", str(tmp_path), wait_s=30))
    assert manager.contexts == {}


def test_turn_aborted() -> None:
    turn = Turn()
    turn.reply = {"status": "aborted"}
    assert turn.aborted()
    turn.counted = True
    assert not turn.aborted()
    tslab = Turn()
    tslab.reply = {"status": "abort"}
    assert tslab.aborted()


def test_cell_right_after_an_error_is_not_lost(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """ipykernel drops execute requests that arrive within ``stop_on_error_timeout`` of a failed
    cell (0 by default: a race under load); the agent sends an aborted cell again."""
    (tmp_path / "kernels" / "python3").mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
            "--Kernel.stop_on_error_timeout=0.2"]
    (tmp_path / "kernels" / "python3" / "kernel.json").write_text(json.dumps(
        {"argv": argv, "display_name": "abort window", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))

    async def scenario() -> None:
        manager = ContextManager(AgentState(), str(tmp_path))
        ctx = await manager.create("python", str(tmp_path))
        try:
            for _ in range(3):
                failed = await _lines(ctx, "1 / 0")
                errors = [ln["name"] for ln in failed if ln["type"] == "error"]
                assert errors == ["ZeroDivisionError"]
                after = await _lines(ctx, "40 + 2")
                assert [ln["text"] for ln in after if ln["type"] == "result"] == ["42"]
        finally:
            await manager.shutdown()

    asyncio.run(scenario())


def test_java_errors_take_upstreams_shape() -> None:
    """jjava's wrapped exception becomes IJava's EvalException + message (E2B's kernel); a
    compilation error and a RuntimeException of the kernel itself pass through."""
    ctx = kernels.JavaContext(AgentState(), "/")
    assert ctx.error_name_value("RuntimeException", "java.lang.IllegalStateException, boom") == (
        "EvalException", "boom")
    assert ctx.error_name_value("RuntimeException", "a.B$C, two\nlines, x") == (
        "EvalException", "two\nlines, x")
    assert ctx.error_name_value("RuntimeException", "java.lang.NullPointerException, null") == (
        "EvalException", "")
    assert ctx.error_name_value("CompilationException", "x, y") == ("CompilationException", "x, y")
    assert ctx.error_name_value("RuntimeException", "no class here") == (
        "RuntimeException", "no class here")


def test_java_env_glue() -> None:
    """Env vars become system properties (upstream's choice: Java cannot set its environment);
    the values are JSON string literals, which Java reads the same (checked in a real JShell by
    the e2e test)."""
    push = kernels.java_env_push_code({"A": 'q"\\\n', "B": "ü"})
    assert 'for (String k : new String[] {"A", "B"})\n' in push
    assert 'System.setProperty("A", "q\\"\\\\\\n");' in push
    assert 'System.setProperty("B", "\\u00fc");' in push
    assert "System.clearProperty(e.getKey())" in kernels.JAVA_ENV_POP_CODE


def test_a_slow_start_is_asked_for_kernel_info_rarely_without_heartbeat(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """jupyter_client's ``wait_for_ready`` asks a starting kernel for ``kernel_info`` every
    second (a start of minutes under TCG then answers hundreds at its end); the agent asks once
    per READY_RETRY_S, and opens no heartbeat channel (its pings woke every idle kernel)."""
    from jupyter_client.asynchronous.client import AsyncKernelClient

    _slow_python_kernel(tmp_path, 4)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    asked: list[str] = []
    real = AsyncKernelClient.kernel_info

    def counting(self: AsyncKernelClient) -> str:
        asked.append("kernel_info")
        return real(self)

    monkeypatch.setattr(AsyncKernelClient, "kernel_info", counting)

    async def scenario() -> None:
        manager = ContextManager(AgentState(), str(tmp_path))
        ctx = await manager.create("python", str(tmp_path))
        try:
            assert 1 <= len(asked) <= 2  # 2: iopub had not joined when the first reply came
            assert ctx.kc._hb_channel is None  # type: ignore[attr-defined]
            results = await _lines(ctx, "6 * 7")
            assert [ln["text"] for ln in results if ln["type"] == "result"] == ["42"]
        finally:
            await manager.shutdown()

    asyncio.run(scenario())
