"""The code interpreter (port 49999) through the real ``e2b-code-interpreter`` SDK."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest
from e2b import NotFoundException, TimeoutException
from e2b_code_interpreter import AsyncSandbox


def test_state_and_result(ci: Any) -> None:
    ex = ci.run_code("x = 40\nx + 2")
    assert ex.error is None
    assert ex.text == "42"
    assert ex.execution_count is not None
    ex2 = ci.run_code("x * 2")
    assert ex2.text == "80"
    assert ex2.execution_count == ex.execution_count + 1


def test_stdout_stderr_and_callbacks(ci: Any) -> None:
    out: list[str] = []
    err: list[str] = []
    ex = ci.run_code(
        "import sys\nprint('to out')\nprint('to err', file=sys.stderr)",
        on_stdout=lambda m: out.append(m.line),
        on_stderr=lambda m: err.append(m.line),
    )
    assert ex.logs.stdout == ["to out\n"]
    assert ex.logs.stderr == ["to err\n"]
    assert out == ["to out\n"] and err == ["to err\n"]


def test_error(ci: Any) -> None:
    errors: list[Any] = []
    ex = ci.run_code("1 / 0", on_error=errors.append)
    assert ex.error is not None
    assert ex.error.name == "ZeroDivisionError"
    assert ex.error.value == "division by zero"
    assert "ZeroDivisionError" in ex.error.traceback
    assert errors and errors[0].name == "ZeroDivisionError"


def test_rich_outputs(ci: Any) -> None:
    code = """
from IPython.display import display, HTML, Markdown, Latex, JSON, Javascript, SVG
display(HTML("<b>bold</b>"))
display(Markdown("# title"))
display(Latex(r"$x^2$"))
display(JSON({"a": 1}))
display(Javascript("console.log(1)"))
display(SVG('<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"></svg>'))
"text result"
"""
    ex = ci.run_code(code)
    assert ex.error is None, ex.error
    results = ex.results
    assert results[0].html == "<b>bold</b>" and not results[0].is_main_result
    assert results[1].markdown == "# title"
    assert results[2].latex == "$x^2$"
    assert results[3].json == {"a": 1}
    assert results[4].javascript == "console.log(1)"
    assert results[5].svg is not None and results[5].svg.startswith("<svg")
    assert results[-1].is_main_result and results[-1].text == "text result"


def test_matplotlib_png_and_chart(ci: Any) -> None:
    code = """
import matplotlib.pyplot as plt
fig, ax = plt.subplots()
ax.plot([1, 2, 3], [4, 5, 6], label="series")
ax.set_title("My chart")
ax.set_xlabel("x axis")
plt.show()
"""
    ex = ci.run_code(code)
    assert ex.error is None, ex.error
    figs = [r for r in ex.results if r.png]
    assert len(figs) == 1
    png = base64.b64decode(figs[0].png)
    assert png.startswith(b"\x89PNG")
    chart = figs[0].chart
    assert chart is not None
    assert chart.type.value == "line"
    assert chart.title == "My chart"
    assert chart.x_label == "x axis"
    assert chart.elements[0].label == "series"
    assert [tuple(p) for p in chart.elements[0].points] == [(1.0, 4.0), (2.0, 5.0), (3.0, 6.0)]


def test_bar_chart(ci: Any) -> None:
    ex = ci.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.bar(['a', 'b'], [3, 5], label='g')\nplt.title('bars')\nplt.show()"
    )
    chart = next(r for r in ex.results if r.png).chart
    assert chart is not None and chart.type.value == "bar"
    assert [(e.label, e.value) for e in chart.elements] == [("a", 3.0), ("b", 5.0)]


def test_dataframe_html_and_data(ci: Any) -> None:
    ex = ci.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    assert ex.error is None
    assert ex.results[0].html is not None and "<table" in ex.results[0].html
    assert ex.results[0].text is not None
    assert ex.results[0].data == {"a": [1, 2], "b": ["x", "y"]}  # upstream's e2b/data


def test_default_contexts_listed(ci: Any) -> None:
    languages = [c.language for c in ci.list_code_contexts()]
    assert "python" in languages


def test_env_vars_per_call(ci: Any) -> None:
    ex = ci.run_code("import os; os.environ.get('CUBE_CI_VAR')", envs={"CUBE_CI_VAR": "v1"})
    assert ex.text == "v1"
    ex = ci.run_code("import os; os.environ.get('CUBE_CI_VAR', 'unset')")
    assert ex.text == "unset"


def test_contexts(ci: Any, agent: Any) -> None:
    ctx = ci.create_code_context(cwd="/tmp")
    assert ctx.language == "python" and ctx.cwd == "/tmp"
    ci.run_code("y = 'in ctx'", context=ctx)
    assert ci.run_code("import os; os.getcwd()", context=ctx).text == "/tmp"
    assert ci.run_code("y", context=ctx).text == "in ctx"
    default = ci.run_code("'y' in dir()")
    assert default.text == "False"
    assert ctx.id in [c.id for c in ci.list_code_contexts()]
    ci.restart_code_context(ctx)
    assert ci.run_code("'y' in dir()", context=ctx).text == "False"
    ci.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in ci.list_code_contexts()]
    with pytest.raises(NotFoundException):
        ci.run_code("1", context=ctx)


def test_bash_context(ci: Any) -> None:
    ex = ci.run_code("cd /tmp && export FOO=bar && echo hi", language="bash")
    assert ex.error is None
    assert ex.logs.stdout == ["hi\n"]
    ex = ci.run_code("pwd; echo $FOO; echo err >&2", language="bash")
    assert "".join(ex.logs.stdout) == "/tmp\nbar\n"
    assert "".join(ex.logs.stderr) == "err\n"
    ex = ci.run_code("false", language="bash")
    assert ex.error is not None and ex.error.value == "1"
    ctx = ci.create_code_context(language="bash")
    assert ci.run_code("echo $FOO", context=ctx).logs.stdout == ["\n"]
    ci.remove_code_context(ctx)


def test_unsupported_language(ci: Any) -> None:
    with pytest.raises(Exception, match="400"):
        ci.run_code("1", language="cobol")


def test_timeout_then_interrupted(ci: Any) -> None:
    ctx = ci.create_code_context()
    t0 = time.monotonic()
    with pytest.raises(TimeoutException):
        ci.run_code("import time\nwhile True: time.sleep(0.1)", context=ctx, timeout=2)
    assert time.monotonic() - t0 < 15
    # The disconnect interrupted the kernel, so the context is usable again.
    ex = ci.run_code("'alive'", context=ctx, timeout=30)
    assert ex.text == "alive"
    ci.remove_code_context(ctx)


def test_streaming_is_incremental(ci: Any) -> None:
    stamps: list[float] = []
    t0 = time.monotonic()
    ci.run_code(
        "import time\nprint('a', flush=True)\ntime.sleep(1.5)\nprint('b', flush=True)",
        on_stdout=lambda m: stamps.append(time.monotonic() - t0),
    )
    assert len(stamps) == 2 and stamps[1] - stamps[0] > 1.0


def test_async_interpreter(gateway: Any) -> None:
    async def main() -> None:
        s = await AsyncSandbox.create()
        try:
            ex = await s.run_code("z = 5\nz * 3")
            assert ex.text == "15"
            lines: list[str] = []
            await s.run_code("print('cb')", on_stdout=lambda m: lines.append(m.line))
            assert lines == ["cb\n"]
            ctx = await s.create_code_context()
            assert (await s.run_code("'z' in dir()", context=ctx)).text == "False"
            await s.remove_code_context(ctx)
        finally:
            await s.kill()

    asyncio.run(main())
