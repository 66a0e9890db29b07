"""Generate docs/plugins/hooks.md from cube_core/hookspecs.py (the docstrings are the reference).

    python docs/gen_hooks.py > docs/plugins/hooks.md

tests/docs/test_hooks_documented.py fails when the committed file differs from this output.
"""

from __future__ import annotations

import inspect

from cube_core import hookspecs


def hookspec_functions() -> list[tuple[str, object]]:
    return [(name, fn) for name, fn in vars(hookspecs).items()
            if name.startswith("cube_") and inspect.isfunction(fn)]


def render() -> str:
    lines = ["# Hook reference", "",
             "Generated from `cube_core/hookspecs.py` by `docs/gen_hooks.py`; do not edit by hand.", ""]
    for name, fn in hookspec_functions():
        opts = getattr(fn, "cube_spec", {}) or {}
        flags = [k for k in ("firstresult", "historic") if opts.get(k)]
        signature = str(inspect.signature(fn)).replace("'", "")  # type: ignore[arg-type]
        lines += [f"## `{name}{signature}`", ""]
        if flags:
            lines += ["*" + ", ".join(flags) + "*", ""]
        lines += [inspect.cleandoc(fn.__doc__ or ""), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
