"""The templates Cube ships: ``base`` and ``code-interpreter-v1`` (both Debian bookworm minbase).

The package sets themselves live in :mod:`cube_storage_cow.debootstrap` (``BASE_PACKAGES`` for
every debootstrap recipe, plus ``INTERPRETER_PACKAGES`` when ``interpreter=True``).
"""

from __future__ import annotations

from cube_core import RootfsRecipe, TemplateNotFoundError

BASE = RootfsRecipe(name="base", source="debootstrap", suite="bookworm")
CODE_INTERPRETER = RootfsRecipe(name="code-interpreter-v1", source="debootstrap", suite="bookworm",
                                interpreter=True)

RECIPES: dict[str, RootfsRecipe] = {r.name: r for r in (BASE, CODE_INTERPRETER)}


def recipe_for(name: str) -> RootfsRecipe:
    """The built-in recipe called ``name`` (``TemplateNotFoundError`` if there is none)."""
    try:
        return RECIPES[name]
    except KeyError:
        raise TemplateNotFoundError(template=name) from None
