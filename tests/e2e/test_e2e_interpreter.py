"""e2b-code-interpreter against a real Cube server on the code-interpreter-v1 template."""

from __future__ import annotations

import base64

import pytest
from cube_e2e import CubeServer
from e2b_code_interpreter import AsyncSandbox, Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


@pytest.fixture(scope="module")
def ci(cube_server: CubeServer):
    sbx = Sandbox.create(timeout=600, api_key=cube_server.key_a, api_url=cube_server.url,
                         sandbox_url=cube_server.url)
    yield sbx
    sbx.kill()


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
