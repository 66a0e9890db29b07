"""Cube's ``cow`` storage plugin: content-addressed ext4 template images built from debootstrap,
a directory or an OCI image layout; qcow2-overlay or reflink per-sandbox disks; frozen snapshot
layers; crash-safe garbage collection.

Public API: :class:`CowStorage` (the driver), :class:`CowConfig`, :class:`CowPlugin`, and the
built-in recipes :data:`BASE`, :data:`CODE_INTERPRETER`, :func:`recipe_for`.
"""

from __future__ import annotations

from cube_storage_cow.config import CowConfig
from cube_storage_cow.driver import CowStorage
from cube_storage_cow.plugin import CowPlugin
from cube_storage_cow.recipes import BASE, CODE_INTERPRETER, RECIPES, recipe_for
from cube_storage_cow.rootfs import BUILDER_VERSION

__all__ = ["BASE", "BUILDER_VERSION", "CODE_INTERPRETER", "RECIPES", "CowConfig", "CowPlugin", "CowStorage",
           "recipe_for"]
