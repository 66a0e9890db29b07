"""Run code in a Cube microVM through the unmodified E2B SDK.

    export E2B_API_URL=http://127.0.0.1:3000 E2B_SANDBOX_URL=http://127.0.0.1:3000 E2B_API_KEY=e2b_...
    python examples/hello.py
"""

from e2b_code_interpreter import Sandbox

with Sandbox.create() as sandbox:
    execution = sandbox.run_code("import platform; f'{sum(range(101))} computed on kernel {platform.release()}'")
    print(execution.text)
    print("isolation is reported per sandbox by `cube sandbox ls` and `cube doctor`")
