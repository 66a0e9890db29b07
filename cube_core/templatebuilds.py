"""Template builds on the control plane: the SDK's ``Template.build`` as records, files and a node.

The SDK calls, in order: ``POST /v3/templates`` (:meth:`TemplateBuilds.request`: the template
record, new or the team's existing one of that name, and a build record), ``GET
/templates/{id}/files/{hash}`` per COPY (:meth:`file_link`: ``present`` when the team uploaded
that hash before, else a signed upload URL the SDK PUTs the tar archive to), ``POST
/v2/templates/{id}/builds/{buildID}`` (:meth:`start`: the plan goes to a node that has the
parent template ready) and ``GET .../status`` until ``ready`` or ``error`` (:meth:`get`).

Templates built here belong to the team that built them (``Template.team_id``): another team
does not see them, cannot use them and cannot take their name. Uploaded files are kept per team
under ``<state_dir>/build-files/<team>/<hash>.tar``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from cube_core import ids
from cube_core.buildspec import BuildJob, BuildLogLine, BuildPlan, BuildStatus, TemplateBuild
from cube_core.config import CoreSettings
from cube_core.errors import InvalidStateError, TemplateError, TemplateNotFoundError
from cube_core.events import EventBus
from cube_core.models import Template, TemplateStatus, utcnow
from cube_core.nodes import NodeDirectory
from cube_core.store import StateStore

log = structlog.get_logger(__name__)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
HASH_RE = re.compile(r"[0-9a-f]{64}")
IMAGE_TEMPLATES = {"e2bdev/base": "base", "e2bdev/base:latest": "base",
                   "e2bdev/code-interpreter": "code-interpreter-v1",
                   "e2bdev/code-interpreter:latest": "code-interpreter-v1"}
"""``from_image`` names Cube maps to its own templates (``from_base_image()`` is ``e2bdev/base``)."""
UPLOAD_MAX_BYTES = 1 << 30


class TemplateNameTakenError(TemplateError):
    """The name belongs to another team's template, or to a built-in one (HTTP 409)."""

    msg_fmt = "template name {name!r} is taken"


class BuildRequestError(TemplateError):
    """A malformed build request: a bad name or files hash (HTTP 400)."""

    msg_fmt = "{reason}"


class UploadRefusedError(TemplateError):
    """A file upload with a bad or missing signature, or too large (HTTP 403)."""

    msg_fmt = "upload refused: {reason}"


def visible(template: Template, team_id: str) -> bool:
    """Public templates (the built-in ones) and the team's own."""
    return template.team_id is None or template.team_id == team_id


class TemplateBuilds:
    def __init__(self, store: StateStore, settings: CoreSettings, nodes: NodeDirectory,
                 events: EventBus | None = None) -> None:
        self.store = store
        self.nodes = nodes
        self.events = events
        self.files = settings.state_dir / "build-files"
        self._key = secrets.token_bytes(32)
        """Signs upload URLs; per process (an upload goes to the master that gave the link)."""
        self.tags = TemplateTags(self)

    # -- POST /v3/templates ----------------------------------------------------------------------

    def request(self, team_id: str, name: str, *, tags: tuple[str, ...] = (), cpu_count: int | None = None,
                memory_mb: int | None = None) -> tuple[Template, TemplateBuild]:
        name, _, tag = name.strip().partition(":")
        name = name.lower()
        if not NAME_RE.fullmatch(name):
            raise BuildRequestError(reason=f"invalid template name {name[:130]!r}: use 1-128 of [a-z0-9._-]")
        tags = tuple(dict.fromkeys([*tags, *([tag] if tag else [])]))
        existing = self.store.get_template(name)
        if existing is not None and existing.team_id != team_id:
            raise TemplateNameTakenError(name=name)
        template = existing or Template(template_id=ids.sandbox_id(), aliases=(name,), team_id=team_id,
                                        status=TemplateStatus.BUILDING, cpu_count=cpu_count or 1,
                                        memory_mb=memory_mb or 512)
        if existing is None:
            self.store.put_template(template)
        build = TemplateBuild(build_id=str(uuid.uuid4()), template_id=template.template_id, team_id=team_id,
                              name=name, tags=tags or ("default",), cpu_count=cpu_count or template.cpu_count,
                              memory_mb=memory_mb or template.memory_mb)
        self.store.put_build(build)
        log.info("template build requested", template_id=template.template_id, build_id=build.build_id,
                 team_id=team_id)
        return template, build

    def template(self, team_id: str, template_id: str) -> Template:
        template = self.store.get_template(template_id)
        if template is None or not visible(template, team_id):
            raise TemplateNotFoundError(template=template_id)
        return template

    def get(self, team_id: str, template_id: str, build_id: str) -> TemplateBuild:
        build = self.store.get_build(build_id)
        template = self.store.get_template(template_id)
        if build is None or build.team_id != team_id or template is None or template.template_id != build.template_id:
            raise TemplateNotFoundError(template=f"{template_id}/{build_id}")
        return build

    # -- files -----------------------------------------------------------------------------------

    def file_path(self, team_id: str, files_hash: str) -> Path:
        if not HASH_RE.fullmatch(files_hash):
            raise BuildRequestError(reason=f"invalid files hash {files_hash[:80]!r}: 64 lower-case hex digits")
        return self.files / team_id / f"{files_hash}.tar"

    def file_link(self, team_id: str, template_id: str, files_hash: str) -> tuple[bool, str]:
        """Whether the team uploaded these files before, and the signature of an upload URL."""
        template = self.template(team_id, template_id)
        if template.team_id != team_id:
            raise TemplateNotFoundError(template=template_id)
        return self.file_path(team_id, files_hash).is_file(), self._sign(template_id, files_hash)

    def _sign(self, template_id: str, files_hash: str) -> str:
        return hmac.new(self._key, f"{template_id}\0{files_hash}".encode(), hashlib.sha256).hexdigest()

    async def upload(self, template_id: str, files_hash: str, signature: str, chunks: AsyncIterator[bytes]) -> int:
        """Store an upload whose URL :meth:`file_link` signed; return its size."""
        if not hmac.compare_digest(self._sign(template_id, files_hash).encode(), signature.encode()):
            raise UploadRefusedError(reason="bad signature")
        template = self.store.get_template(template_id)
        if template is None or template.team_id is None:
            raise UploadRefusedError(reason="no such template")
        path = self.file_path(template.team_id, files_hash)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        size = 0
        try:
            with open(tmp, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > UPLOAD_MAX_BYTES:
                        raise UploadRefusedError(reason=f"more than {UPLOAD_MAX_BYTES} bytes")
                    fh.write(chunk)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return size

    # -- POST /v2/templates/{id}/builds/{buildID} ------------------------------------------------

    async def start(self, team_id: str, template_id: str, build_id: str, plan: BuildPlan) -> TemplateBuild:
        build = self.get(team_id, template_id, build_id)
        if build.status != BuildStatus.WAITING:
            raise InvalidStateError(f"build {build_id} is {build.status.value}, it was started before")
        build = build.model_copy(update={"plan": plan})
        self.store.put_build(build)
        try:
            parent = self._parent(team_id, plan)  # None: from an OCI image (any node pulls it)
            files: dict[str, Path] = {}
            for step in plan.steps:
                if step.type == "COPY":
                    path = self.file_path(team_id, step.files_hash or "")
                    if not path.is_file():
                        raise TemplateError(f"the files of COPY {step.args[0] if step.args else ''} were not uploaded")
                    files[step.files_hash or ""] = path
            nodes = [n for n in self.nodes.placeable() if parent is None or parent.template_id in n.templates]
            if not nodes:
                raise TemplateError(f"template {parent.template_id if parent else plan.from_image!r} cannot be built "
                                    "on any node that takes sandboxes")
            node = min(nodes, key=lambda n: (n.sandboxes, n.node_id))
            client = self.nodes.client(node.node_id)
            await client.build_template(BuildJob(build=build, plan=plan, parent=parent, files=files))
        except TemplateError as exc:
            build = build.with_log(BuildLogLine(level="error", message=exc.message, step="base"))
            build = build.model_copy(update={"status": BuildStatus.ERROR, "reason": exc.message,
                                             "reason_step": "base", "finished_at": utcnow()})
            self.store.put_build(build)
            self._failed(build)
            if self.events is not None:
                self.events.emit("template.build_finished", team_id=team_id, status=build.status.value,
                                 template_id=template_id, build_id=build_id, name=build.name, reason=build.reason)
        return build

    def _failed(self, build: TemplateBuild) -> None:
        template = self.store.get_template(build.template_id)
        if template is not None and template.status == TemplateStatus.BUILDING and template.snapshot is None:
            self.store.put_template(template.model_copy(update={"status": TemplateStatus.FAILED}))

    def _parent(self, team_id: str, plan: BuildPlan) -> Template | None:
        if plan.from_template:
            name = plan.from_template
        elif plan.from_image in IMAGE_TEMPLATES:
            name = IMAGE_TEMPLATES[plan.from_image]
        elif plan.from_image:
            return None
        else:
            raise TemplateError("the build names no template or image to start from")
        template = self.store.get_template(name)
        if template is None or not visible(template, team_id):
            raise TemplateError(f"parent template {name!r} not found")
        if template.status != TemplateStatus.READY:
            raise TemplateError(f"parent template {name!r} is {template.status.value}, not ready")
        return template


class TemplateTags:
    """``name:tag`` -> build: each build carries the tags it was built or tagged with; a tag names
    the newest ready build holding it (``default``: every build has it unless it was given tags)."""

    def __init__(self, builds: TemplateBuilds) -> None:
        self.builds = builds
        self.store = builds.store

    def _ready(self, team_id: str, name: str) -> tuple[Template, list[TemplateBuild]]:
        template = self.builds.template(team_id, name.partition(":")[0])
        if template.team_id != team_id:
            raise TemplateNotFoundError(template=name)
        return template, [b for b in self.store.list_builds(template.template_id) if b.status == BuildStatus.READY]

    def list(self, team_id: str, name: str) -> list[tuple[str, TemplateBuild]]:
        """Every tag of the template and the build it names, by tag."""
        _, builds = self._ready(team_id, name)
        named: dict[str, TemplateBuild] = {}
        for build in builds:  # newest first: the first holder of a tag wins
            for tag in build.tags:
                named.setdefault(tag, build)
        return sorted(named.items())

    def assign(self, team_id: str, target: str, tags: tuple[str, ...]) -> TemplateBuild:
        """Give ``tags`` to the build ``target`` (``name:tag``, the tag ``default`` if none) names."""
        name, _, tag = target.partition(":")
        holder = dict(self.list(team_id, name)).get(tag or "default")
        if holder is None:
            raise TemplateNotFoundError(template=target)
        for tag_name in tags:
            if not NAME_RE.fullmatch(tag_name):
                raise BuildRequestError(reason=f"invalid tag {tag_name[:130]!r}: use 1-128 of [a-z0-9._-]")
        _, builds = self._ready(team_id, name)
        for other in builds:  # a tag names one build: it moves
            if other.build_id != holder.build_id and set(other.tags) & set(tags):
                self.store.put_build(other.model_copy(update={"tags": tuple(t for t in other.tags if t not in tags)}))
        current = self.store.get_build(holder.build_id) or holder
        updated = current.model_copy(update={"tags": tuple(dict.fromkeys([*current.tags, *tags]))})
        self.store.put_build(updated)
        return updated

    def remove(self, team_id: str, name: str, tags: tuple[str, ...]) -> None:
        _, builds = self._ready(team_id, name)
        for build in builds:
            if set(build.tags) & set(tags):
                self.store.put_build(build.model_copy(update={"tags": tuple(t for t in build.tags if t not in tags)}))
