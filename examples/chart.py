"""Code interpreter with a matplotlib chart: the PNG comes back base64-encoded."""

import base64

from e2b_code_interpreter import Sandbox

code = """
import matplotlib.pyplot as plt
xs = list(range(10))
plt.plot(xs, [x * x for x in xs])
plt.title("squares")
plt.show()
"""

with Sandbox.create() as sandbox:
    execution = sandbox.run_code(code)
    png = next(r.png for r in execution.results if r.png)
    with open("chart.png", "wb") as f:
        f.write(base64.b64decode(png))
    chart = next((r.chart for r in execution.results if r.chart), None)
    print("wrote chart.png;", "chart type:", chart.type.value if chart else None)
