"""Meta-tests: every hookspec is documented (docstring contract + docs/plugins/hooks.md) and has a
``test_hook_<name>`` test."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gen_hooks", REPO / "docs" / "gen_hooks.py")
assert spec and spec.loader
gen_hooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_hooks)
HOOKS = gen_hooks.hookspec_functions()


def test_there_are_hooks() -> None:
    assert len(HOOKS) >= 10


@pytest.mark.parametrize(("name", "fn"), HOOKS, ids=[n for n, _ in HOOKS])
def test_hookspec_docstring_contract(name: str, fn: object) -> None:
    doc = inspect.getdoc(fn) or ""
    assert doc, f"{name} has no docstring"
    assert "versionadded" in doc, f"{name}: missing .. versionadded::"
    assert re.search(r"implementer", doc), f"{name}: must say who implements it (one or many)"
    for param in inspect.signature(fn).parameters:  # type: ignore[arg-type]
        assert f":param {param}:" in doc, f"{name}: parameter {param!r} is not documented"


def test_reference_doc_is_generated_from_hookspecs() -> None:
    committed = (REPO / "docs" / "plugins" / "hooks.md").read_text()
    assert committed == gen_hooks.render(), "run: python docs/gen_hooks.py > docs/plugins/hooks.md"


def test_every_hook_has_a_test() -> None:
    sources = "\n".join(p.read_text() for p in (REPO / "tests").rglob("test_*.py"))
    missing = [name for name, _ in HOOKS if f"def test_hook_{name}(" not in sources]
    assert not missing, f"hooks without a test_hook_<name>: {missing}"
