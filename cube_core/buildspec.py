"""Template builds from the E2B SDK's ``Template`` builder: what a build is asked to do, its record,
and the layer-cache keys of its steps.

The control plane (:mod:`cube_core.templatebuilds`) records a :class:`TemplateBuild` per
``POST /v3/templates``, receives the :class:`BuildPlan` (the SDK's ``TemplateBuildStartV2``) and
hands the node a :class:`BuildJob`; the node's :class:`cube_core.builds.BuildEngine` runs it and
writes the record's status and log lines as it goes.
"""

from __future__ import annotations

import enum
import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import Field

from cube_core.models import Frozen, SnapshotRef, Template, utcnow

STEP_TYPES = ("RUN", "COPY", "ENV", "WORKDIR", "USER")
"""The SDK's instruction types (``e2b.template.types.InstructionType``)."""
CONTEXT_STEPS = ("ENV", "WORKDIR", "USER")
"""Steps that change how later steps run, not the disk: they are never a layer of their own."""
BASE_STEP = "base"
FINALIZE_STEP = "finalize"
"""The SDK's names for the from_* phase and the start/ready phase (``e2b.template.consts``)."""
DEFAULT_USER = "user"
DEFAULT_WORKDIR = "/home/user"
LOG_LINES_MAX = 20_000
"""A build record keeps at most this many log lines (the first ones go)."""
CACHE_VERSION = "cube-build-1"


class BuildStatus(enum.StrEnum):
    WAITING = "waiting"
    """Requested (``POST /v3/templates``); the SDK has not started it yet."""
    BUILDING = "building"
    READY = "ready"
    ERROR = "error"


class BuildStep(Frozen):
    """One instruction: ``RUN [cmd, user?]``, ``COPY [src, dest, user, mode]`` (+ ``files_hash``),
    ``ENV [k1, v1, k2, v2...]``, ``WORKDIR [dir]``, ``USER [name]``."""

    type: Literal["RUN", "COPY", "ENV", "WORKDIR", "USER"]
    args: tuple[str, ...] = ()
    files_hash: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    force: bool = False

    def describe(self) -> str:
        if self.type == "COPY":
            return f"COPY {' '.join(a for a in self.args[:2])}"
        return f"{self.type} {' '.join(self.args)}"[:500]


class BuildPlan(Frozen):
    """What to build (the SDK's ``TemplateBuildStartV2``)."""

    from_template: str | None = None
    from_image: str | None = None
    force: bool = False
    steps: tuple[BuildStep, ...] = ()
    start_cmd: str | None = None
    ready_cmd: str | None = None


class BuildLogLine(Frozen):
    timestamp: datetime = Field(default_factory=utcnow)
    level: Literal["debug", "info", "warn", "error"] = "info"
    message: str
    step: str | None = None


class TemplateBuild(Frozen):
    """One build of a team's template, as the SDK polls it."""

    build_id: str
    template_id: str
    team_id: str
    name: str
    tags: tuple[str, ...] = ()
    status: BuildStatus = BuildStatus.WAITING
    cpu_count: int = Field(default=1, ge=1, le=64)
    memory_mb: int = Field(default=512, ge=128, le=65536)
    plan: BuildPlan | None = None
    node_id: str | None = None
    logs: tuple[BuildLogLine, ...] = ()
    reason: str | None = None
    reason_step: str | None = None
    steps_run: int = 0
    steps_cached: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    snapshot: SnapshotRef | None = None
    """The snapshot sandboxes of this build restore (set when it is ready, on the node that built
    it): kept while a tag names the build or a sandbox or sandbox snapshot uses it, then freed
    (None again, ``freed_at`` set; :meth:`cube_core.templatebuilds.TemplateBuilds.release`)."""
    freed_at: datetime | None = None

    def with_log(self, *lines: BuildLogLine) -> TemplateBuild:
        return self.model_copy(update={"logs": (self.logs + lines)[-LOG_LINES_MAX:]})


class RegistryAuth(Frozen):
    """Credentials for pulling ``plan.from_image`` from a private registry (the SDK's
    ``fromImageRegistry``). Only ever in a :class:`BuildJob` on its way to the node: never in the
    build record, never logged (``repr`` hides the password)."""

    username: str = Field(min_length=1, max_length=1000)
    password: str = Field(min_length=1, max_length=100_000, repr=False)


class BuildJob(Frozen):
    """What the node gets: the build, its parent template (READY on that node) or the OCI image to
    start from (``plan.from_image``, with ``registry`` credentials if it is private), and where the
    uploaded files of its COPY steps are (hash -> tar archive the SDK uploaded)."""

    build: TemplateBuild
    plan: BuildPlan
    parent: Template | None = None
    files: dict[str, Path] = Field(default_factory=dict)
    registry: RegistryAuth | None = None


def layer_key(parent_key: str, step: BuildStep, context: dict[str, object]) -> str:
    """The cache key of ``step``'s result: its parent layer's key, the step with its inputs (the
    files' hash for COPY) and the context it runs in (user, workdir, env)."""
    body = json.dumps({"v": CACHE_VERSION, "parent": parent_key, "type": step.type, "args": list(step.args),
                       "files": step.files_hash, "context": context}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def base_key(parent: Template) -> str:
    """The key the first step's layer hangs on: the parent template's image (content-addressed for
    the built-in templates, a layer path for built ones)."""
    return hashlib.sha256(f"{CACHE_VERSION}\0{parent.template_id}\0{parent.rootfs}".encode()).hexdigest()
