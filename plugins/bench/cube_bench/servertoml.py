"""The ``plugins.toml`` of the servers the benches (and the cluster e2e tests) start on this box:
one builder for ``cube serve``, ``cube master`` and ``cube node``, so the plugin sections are
written once.

Every server gets the real plugins (``kvm``, ``ebpf``, ``cow``, the ``e2b`` API); what differs is
passed in: the ``[core]`` keys, the vmm and network options, the scheduler, and for a cluster
the ``[node]`` and ``[cluster]`` sections.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

UNLIMITED_PLACEMENT: dict[str, Any] = {"cpu_overcommit": 10000.0, "memory_overcommit": 10000.0}
"""Scheduler options under which only ``max_sandboxes`` and the pool's free-memory guard limit how
many sandboxes a bench gets (not the scheduler's reservation model)."""


def toml_value(value: Any) -> str:
    """``value`` as a TOML value: strings, paths, booleans, numbers, lists and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}: {value!r}")


def _table(name: str, items: Mapping[str, Any]) -> str:
    return "\n".join([f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in items.items() if v is not None)])


def plugins_toml(*, core: Mapping[str, Any], state: Path, vmm: Mapping[str, Any] | None = None,
                 network: Mapping[str, Any] | None = None, scheduler: str = "binpack",
                 scheduler_options: Mapping[str, Any] | None = None, node: Mapping[str, Any] | None = None,
                 cluster: Mapping[str, Any] | None = None) -> str:
    """A whole config. ``vmm`` options come on top of ``run_dir = <state>/vms``; storage lives
    in ``<state>/storage``; ``None`` leaves a section's options (or the section) out."""
    sections = [_table("core", core)]
    if node is not None:
        sections.append(_table("node", node))
    sections += [
        _table("vmm", {"plugin": "kvm", "options": {"run_dir": state / "vms", **(vmm or {})}}),
        _table("network", {"plugin": "ebpf", "options": network or None}),
        _table("storage", {"plugin": "cow", "options": {"root": state / "storage"}}),
        _table("scheduler", {"plugin": scheduler, "options": scheduler_options or None}),
        _table("[api]", {"plugin": "e2b"}),
    ]
    if cluster is not None:
        sections.append(_table("cluster", cluster))
    return "\n\n".join(sections) + "\n"
