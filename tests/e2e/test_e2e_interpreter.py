"""e2b-code-interpreter against a real Cube server on the code-interpreter-v1 template."""

from __future__ import annotations

import base64
import time

import pytest
from cube_e2e import CubeServer
from e2b_code_interpreter import AsyncSandbox, Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


@pytest.fixture(scope="module")
def ci(cube_server: CubeServer):
    # the module's tests share this sandbox for ~10-15 min under TCG (the java tests start a JVM:
    # ~70 s); 600 s expired it before the last tests in the CI run, so it lives for 30 min
    sbx = Sandbox.create(timeout=1800, api_key=cube_server.key_a, api_url=cube_server.url,
                         sandbox_url=cube_server.url)
    yield sbx
    sbx.kill()


def test_default_contexts_are_upstreams(ci: Sandbox) -> None:
    """A new sandbox lists what E2B's server starts: python and javascript, in /home/user
    (runs first: later tests add contexts to this sandbox)."""
    contexts = ci.list_code_contexts()
    assert sorted(c.language for c in contexts) == ["javascript", "python"]
    assert {c.cwd for c in contexts} == {"/home/user"}


def test_state_survives_between_calls(ci: Sandbox) -> None:
    ci.run_code("x = 20 + 1")
    execution = ci.run_code("x * 2")
    assert execution.text == "42"


def test_errors(ci: Sandbox) -> None:
    execution = ci.run_code("1 / 0")
    assert execution.error is not None and execution.error.name == "ZeroDivisionError"


def test_stdout_and_streaming(ci: Sandbox) -> None:
    seen: list[str] = []
    execution = ci.run_code("print('out-1'); print('out-2')", on_stdout=lambda m: seen.append(m.line))
    assert "".join(execution.logs.stdout).split() == ["out-1", "out-2"]
    assert "".join(seen).split() == ["out-1", "out-2"]


def test_png_chart(ci: Sandbox) -> None:
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()"
    execution = ci.run_code(code)
    pngs = [r.png for r in execution.results if r.png]
    assert pngs and base64.b64decode(pngs[0]).startswith(b"\x89PNG")


def test_contexts(ci: Sandbox) -> None:
    ctx = ci.create_code_context()
    ci.run_code("y = 'in-context'", context=ctx)
    assert ci.run_code("y", context=ctx).text == "in-context"  # E2B strips a str repr's quotes
    assert ci.run_code("'y' in globals()").text == "False"


async def test_async_interpreter(cube_server: CubeServer) -> None:
    sbx = await AsyncSandbox.create(timeout=300, api_key=cube_server.key_a, api_url=cube_server.url,
                                    sandbox_url=cube_server.url)
    try:
        execution = await sbx.run_code("sum(range(10))")
        assert execution.text == "45"
    finally:
        await sbx.kill()


def test_dataframe_gives_data_text_and_html(ci: Sandbox) -> None:
    execution = ci.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    result = execution.results[0]
    assert result.is_main_result and result.text and "<table" in (result.html or "")
    assert result.data == {"a": [1, 2], "b": ["x", "y"]}


def test_javascript(ci: Sandbox) -> None:
    """tslab prints a cell's last value (no execute_result) and reports errors on stderr."""
    execution = ci.run_code("const a = 40;\nconsole.log('hi');\na + 2", language="javascript")
    assert execution.error is None, execution.error
    assert "".join(execution.logs.stdout).split() == ["hi", "42"]
    assert ci.run_code("a * 2", language="js").logs.stdout == ["80\n"]
    failed = ci.run_code("throw new TypeError('boom')", language="javascript")
    assert failed.error is not None and (failed.error.name, failed.error.value) == ("TypeError", "boom")
    shown = ci.run_code("import * as tslab from 'tslab';\ntslab.display.html('<b>js</b>')",
                        language="javascript")
    assert [r.html for r in shown.results] == ["<b>js</b>"]


def test_typescript(ci: Sandbox) -> None:
    execution = ci.run_code("const n: number = 41;\nn + 1", language="typescript")
    assert execution.error is None and execution.logs.stdout == ["42\n"]
    typed = ci.run_code("const s: string = 1", language="ts")
    assert typed.error is not None and "not assignable" in typed.error.value


def test_r(ci: Sandbox) -> None:
    execution = ci.run_code("x <- c(1, 2, 3)\nmean(x)", language="r")
    assert execution.error is None, execution.error
    assert [r.text for r in execution.results] == ["[1] 2"]
    frame = ci.run_code("data.frame(a = 1:2)", language="r")
    assert "<table" in (frame.results[0].html or "")
    failed = ci.run_code("stop('boom')", language="r")
    assert failed.error is not None and "boom" in failed.error.value


def test_bash(ci: Sandbox) -> None:
    execution = ci.run_code("echo $((6 * 7))", language="bash")
    assert execution.logs.stdout == ["42\n"]


def test_java(ci: Sandbox) -> None:
    """jjava on Debian's JDK. Not a default context (upstream's neither): this first java cell
    starts the JVM, within the SDK's default run_code timeout under TCG too."""
    started = time.monotonic()
    execution = ci.run_code("System.out.println(1+1);", language="java")
    first = time.monotonic() - started
    rss = ci.commands.run("ps -o rss= -C java").stdout.split()
    print(f"first java run_code: {first:.1f}s; JVM RSS {rss} KiB")
    assert execution.error is None, execution.error
    assert execution.logs.stdout == ["2\n"]
    assert ci.run_code("int n = 40;\nn + 2", language="java").text == "42"
    failed = ci.run_code('throw new IllegalStateException("boom");', language="java")
    assert failed.error is not None and (failed.error.name, failed.error.value) == ("EvalException", "boom")
    assert "java.lang.IllegalStateException: boom" in failed.error.traceback
    value = 'ü "q"'
    env = ci.run_code('System.getProperty("CUBE_J")', language="java", envs={"CUBE_J": value})
    assert env.text == value  # env vars are system properties in Java, as upstream
    assert ci.run_code('String.valueOf(System.getProperty("CUBE_J"))', language="java").text == "null"


@pytest.mark.parametrize("language", ["javascript", "r", "java"])
def test_restart_context(ci: Sandbox, language: str) -> None:
    """Restarting a language's context (here its default one, which the tests above started: a
    context of its own would be one more cold kernel start, minutes for tslab or a JVM under
    TCG) clears its state and keeps the sandbox; every call within the SDK's default timeouts."""
    assign = {"javascript": "Reflect.set(globalThis, 'kept', 1)", "r": "kept <- 1",
              "java": 'System.setProperty("kept", "1");'}[language]
    probe = {"javascript": "Reflect.has(globalThis, 'kept')", "r": "exists('kept')",
             "java": 'String.valueOf(System.getProperty("kept"))'}[language]
    ci.run_code(assign, language=language)
    ctx = next(c for c in ci.list_code_contexts() if c.language == language)
    before = ci.run_code(probe, context=ctx)
    started = time.monotonic()
    ci.restart_code_context(ctx)
    after = ci.run_code(probe, context=ctx)
    print(f"{language}: restart_code_context and the next run_code took {time.monotonic() - started:.1f}s")
    if language == "javascript":
        assert (before.logs.stdout, after.logs.stdout) == (["true\n"], ["false\n"])
    elif language == "java":
        assert (before.text, after.text) == ("1", "null")
    else:
        assert ([r.text for r in before.results], [r.text for r in after.results]) == (
            ["[1] TRUE"], ["[1] FALSE"])
    assert ci.is_running()
