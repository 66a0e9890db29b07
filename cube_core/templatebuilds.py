"""Template builds on the control plane: the SDK's ``Template.build`` as records, files and a node.

The SDK calls, in order: ``POST /v3/templates`` (:meth:`TemplateBuilds.request`: the template
record, new or the team's existing one of that name, and a build record), ``GET
/templates/{id}/files/{hash}`` per COPY (:meth:`file_link`: ``present`` when the team uploaded
that hash before, else a signed upload URL the SDK PUTs the tar archive to), ``POST
/v2/templates/{id}/builds/{buildID}`` (:meth:`start`: the plan goes to a node that has the
parent template ready) and ``GET .../status`` until ``ready`` or ``error`` (:meth:`get`).

Templates built here belong to the team that built them (``Template.team_id``): another team
does not see them, cannot use them and cannot take their name, unless the owner published the
template (:meth:`TemplateBuilds.update`): then every team lists it and starts sandboxes from it,
and still only the owner rebuilds, updates or deletes it. Uploaded files are kept per team under
``<state_dir>/build-files/<team>/<hash>.tar``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import structlog

from cube_core import ids
from cube_core.buildspec import BuildJob, BuildLogLine, BuildPlan, BuildStatus, RegistryAuth, TemplateBuild
from cube_core.config import CoreSettings
from cube_core.errors import InvalidStateError, NodeUnavailableError, TemplateError, TemplateNotFoundError
from cube_core.events import LOST, EventBus, Subscription
from cube_core.models import Template, TemplateStatus, utcnow
from cube_core.nodes import LIVE_STATES, NodeDirectory
from cube_core.pool import POOL_TEAM
from cube_core.state import SandboxState
from cube_core.store import StateStore

log = structlog.get_logger(__name__)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
HASH_RE = re.compile(r"[0-9a-f]{64}")
TEAM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
IMAGE_TEMPLATES = {"e2bdev/base": "base", "e2bdev/base:latest": "base",
                   "e2bdev/code-interpreter": "code-interpreter-v1",
                   "e2bdev/code-interpreter:latest": "code-interpreter-v1"}
"""``from_image`` names Cube maps to its own templates (``from_base_image()`` is ``e2bdev/base``)."""
UPLOAD_MAX_BYTES = 1 << 30
RELEASE_EVENTS = ("sandbox.killed", "sandbox.expired", "sandbox.created", "template.build_finished")
"""Events after which an older build of the event's template may be free (:meth:`TemplateBuilds.free_on_events`)."""


class TemplateNameTakenError(TemplateError):
    """The name belongs to another team's template, or to a built-in one (HTTP 409)."""

    msg_fmt = "template name {name!r} is taken"


class BuildRequestError(TemplateError):
    """A malformed build request: a bad name or files hash (HTTP 400)."""

    msg_fmt = "{reason}"


class TemplateInUseError(TemplateError):
    """Sandboxes, snapshots or a build still use the template (HTTP 409)."""

    msg_fmt = "template {template!r} is in use: {detail}"


class TemplateProtectedError(TemplateError):
    """A built-in template: made by ``cube serve`` from plugins.toml, not deleted through the API (HTTP 403)."""

    msg_fmt = "template {template!r} is built in; remove it from plugins.toml (or with the cube CLI) instead"


class TemplateNotOwnedError(TemplateError):
    """A template the team sees (built in, or another team published it) but does not own: its
    builds and its settings are its owner's (HTTP 403)."""

    msg_fmt = "template {template!r} {owner}: only its own team reads its builds or changes it"


class TagNotServedError(TemplateError):
    """``name:tag`` names an older build whose snapshot was not kept: one built before Cube kept
    the snapshots of tagged builds (HTTP 400)."""

    msg_fmt = ("{ref!r} names build {build_id}, whose snapshot was not kept (built before Cube kept older "
               "builds): build it again, or assign the tag to the newest build")


class UploadRefusedError(TemplateError):
    """A file upload with a bad or missing signature, or too large (HTTP 403)."""

    msg_fmt = "upload refused: {reason}"


def build_file_path(state_dir: Path, team_id: str, files_hash: str) -> Path:
    """Where the tar archive the team uploaded for a COPY of ``files_hash`` is kept (on the master
    that took the upload, and on a node that was sent it for a build)."""
    if not HASH_RE.fullmatch(files_hash):
        raise BuildRequestError(reason=f"invalid files hash {files_hash[:80]!r}: 64 lower-case hex digits")
    if not TEAM_RE.fullmatch(team_id):
        raise BuildRequestError(reason=f"invalid team id {team_id[:80]!r}")
    return state_dir / "build-files" / team_id / f"{files_hash}.tar"


async def save_upload(path: Path, chunks: AsyncIterator[bytes]) -> int:
    """Write an upload to ``path`` (atomically, at most :data:`UPLOAD_MAX_BYTES`); its size."""
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


def visible(template: Template, team_id: str) -> bool:
    """Public templates (the built-in ones and the published ones) and the team's own."""
    return template.public or template.team_id == team_id


class TemplateBuilds:
    def __init__(self, store: StateStore, settings: CoreSettings, nodes: NodeDirectory,
                 events: EventBus | None = None) -> None:
        self.store = store
        self.nodes = nodes
        self.events = events
        self.state_dir = settings.state_dir
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

    def owned(self, team_id: str | None, template_ref: str) -> Template:
        """The team's own template (by id or name; ``team_id`` None: the operator, any one):
        :class:`TemplateNotFoundError` when the team cannot see it, :class:`TemplateNotOwnedError`
        when it sees it (built in, or published) without owning it."""
        return self._owned(team_id, template_ref, self.store.get_template(template_ref.partition(":")[0]))

    @staticmethod
    def _owned(team_id: str | None, template_ref: str, template: Template | None) -> Template:
        if template is None or (team_id is not None and not visible(template, team_id)):
            raise TemplateNotFoundError(template=template_ref)
        if team_id is not None and template.team_id != team_id:
            owner = "is built in" if template.team_id is None else "belongs to another team"
            raise TemplateNotOwnedError(template=template_ref, owner=owner)
        return template

    def update(self, team_id: str | None, template_ref: str, *, public: bool | None = None) -> Template:
        """``PATCH /templates/{id}``: publish or unpublish the team's template (``public`` None:
        nothing changes). A built-in template is public by plugins.toml: 403. Unpublishing stops
        other teams' new sandboxes from it; the ones they started keep running (and pause, resume
        and snapshot), and their own snapshots still start sandboxes, as with E2B."""
        template = self._team_owned(team_id, template_ref)
        if public is None or public == template.published:
            return template
        template = template.model_copy(update={"published": public, "updated_at": utcnow()})
        self.store.put_template(template)
        log.info("template published" if public else "template unpublished", template_id=template.template_id,
                 team_id=template.team_id)
        return template

    def get(self, team_id: str, template_id: str, build_id: str) -> TemplateBuild:
        build = self.store.get_build(build_id)
        template = self.store.get_template(template_id)
        if build is None or build.team_id != team_id or template is None or template.template_id != build.template_id:
            raise TemplateNotFoundError(template=f"{template_id}/{build_id}")
        return build

    # -- files -----------------------------------------------------------------------------------

    def file_path(self, team_id: str, files_hash: str) -> Path:
        return build_file_path(self.state_dir, team_id, files_hash)

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
        return await save_upload(self.file_path(template.team_id, files_hash), chunks)

    # -- POST /v2/templates/{id}/builds/{buildID} ------------------------------------------------

    async def start(self, team_id: str, template_id: str, build_id: str, plan: BuildPlan, *,
                    registry: RegistryAuth | None = None) -> TemplateBuild:
        """Send the build to a node; ``registry``: credentials for ``plan.from_image`` (passed to the
        node with the job, never recorded)."""
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
            await client.build_template(BuildJob(build=build, plan=plan, parent=parent, files=files,
                                                 registry=registry if parent is None else None))
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

    # -- DELETE /templates/{id} ------------------------------------------------------------------

    async def delete(self, template_ref: str, *, team_id: str | None) -> Template:
        """Delete a built template (by id or name): refused while live sandboxes (paused ones
        too), snapshots or a build use it; then its record, aliases and builds go, and every node
        that serves it drops its warm members and frees its snapshot and the build layers only it
        used. ``team_id`` None: the operator (any team's template)."""
        template = self._team_owned(team_id, template_ref)
        tid = template.template_id
        names = {tid, *template.aliases}
        snapshot_id = template.snapshot.snapshot_id if template.snapshot else None
        older = [b for b in self.store.list_builds(tid)  # kept for their tags: freed too
                 if b.snapshot is not None and b.snapshot.snapshot_id != snapshot_id]

        def named(team: str | None) -> bool:  # other teams' users of a published template: counted, not named
            return team_id is None or team == team_id

        users = [(s.sandbox_id, named(s.team_id)) for s in self.store.list_sandboxes(states=LIVE_STATES)
                 if s.template_id == tid and s.team_id != POOL_TEAM]
        snaps = [(s.snapshot_id, named(s.team_id)) for s in self.store.list_snapshots()
                 if s.template_id == tid or (snapshot_id and snapshot_id in (s.base_state_id, s.parent_id))]
        building = [(b.build_id, True) for b in self.store.list_builds(tid) if b.status == BuildStatus.BUILDING]
        building += [(b.build_id, named(b.team_id)) for t in self.store.list_templates() if t.template_id != tid
                     for b in self.store.list_builds(t.template_id)
                     if b.status == BuildStatus.BUILDING and b.plan is not None and b.plan.from_template in names]
        for what, found in (("sandboxes", users), ("snapshots", snaps), ("builds", building)):
            if found:
                raise TemplateInUseError(template=template_ref, detail=in_use(what, found))
        self.store.delete_template(tid)
        for build in older:  # first: then the build layers under them are not kept for them
            await self._free_files(build)
        for node in self.nodes.records():
            try:
                deleted = await self.nodes.client(node.node_id).remove_template(template)
            except NodeUnavailableError as exc:  # it frees the files when it starts again (storage gc)
                log.info("template files left on a node that is away", template_id=tid, node_id=node.node_id,
                         error=exc.message)
                continue
            log.info("template deleted on node", template_id=tid, node_id=node.node_id, deleted=deleted)
        if self.events is not None:
            self.events.emit("template.deleted", team_id=template.team_id, template_id=tid,
                             name=template.aliases[0] if template.aliases else tid)
        return template

    def _team_owned(self, team_id: str | None, template_ref: str) -> Template:
        """:meth:`owned`, but a built-in template (every team sees it) is :class:`TemplateProtectedError`."""
        found = self.store.get_template(template_ref.partition(":")[0])
        if found is not None and found.team_id is None:
            raise TemplateProtectedError(template=template_ref)
        return self._owned(team_id, template_ref, found)

    # -- older builds: kept while a tag names them ------------------------------------------------

    async def release(self, template_id: str | None = None) -> list[str]:
        """Free older builds (not the one the template serves) that no tag names any more and
        that no sandbox or sandbox snapshot uses: their snapshots and the build layers only they
        used, on every node. Called when something that can free a build happened
        (:meth:`free_on_events`, the tag routes, a deleted snapshot, a failed create); one still
        used is freed by the call after its last user went. ``template_id`` None: every team
        template (the sweep when a control plane starts reaping). The build ids freed."""
        if template_id is not None:
            found = self.store.get_template(template_id)
            templates = [found] if found is not None else []
        else:
            templates = [t for t in self.store.list_templates() if t.team_id is not None]
        freed: list[str] = []
        for template in templates:
            builds = [b for b in self.store.list_builds(template.template_id) if b.status == BuildStatus.READY]
            older = [b for b in builds if b.snapshot is not None and b.build_id != template.build_id]
            if not older:
                continue
            named = {b.build_id for _, b in named_builds(builds)}
            for build in older:
                assert build.snapshot is not None
                if build.build_id in named:
                    continue
                users = self._users(build.snapshot.snapshot_id, template.template_id)
                if users:
                    log.debug("older build kept for its users", build_id=build.build_id, users=users[:10])
                    continue
                current = self.store.get_build(build.build_id)
                if current is None or current.snapshot is None:
                    continue
                self.store.put_build(current.model_copy(update={"snapshot": None, "freed_at": utcnow(), "tags": ()}))
                await self._free_files(build)
                log.info("older template build freed", template_id=template.template_id, build_id=build.build_id,
                         snapshot_id=build.snapshot.snapshot_id)
                freed.append(build.build_id)
        return freed

    async def free_on_events(self, events: Subscription, leader: Callable[[], bool]) -> None:
        """Run :meth:`release` for the template of each event after which one of its older builds
        may be free: a sandbox of it ended (``sandbox.killed``/``expired``: it may have used an
        older build) or finished being created (one being created counts as a user of every
        build), a build of it is ready (a rebuild takes ``default`` and other tags it was given);
        a lost stream (``stream.lost``) releases every template. Only while ``leader()`` (this
        control plane holds the reaper lease: one master frees, not all). Runs until cancelled."""
        async for event in events:
            if event.type == LOST:
                template_id: str | None = None
            elif event.type in RELEASE_EVENTS and isinstance(event.data.get("template_id"), str):
                if event.type == "template.build_finished" and event.data.get("status") != BuildStatus.READY.value:
                    continue
                template_id = event.data["template_id"]
            else:
                continue
            if not leader():
                continue
            try:
                await self.release(template_id)
            except Exception:  # noqa: BLE001 - the next event (or the next start's sweep) tries again
                log.exception("freeing older template builds failed", template_id=template_id)

    def _users(self, snapshot_id: str, template_id: str) -> list[str]:
        """What still needs a build's snapshot: sandbox snapshots saved as differences from it, and
        the template's live sandboxes restored from it or from those (and the ones being created)."""
        snaps = [s.snapshot_id for s in self.store.list_snapshots() if snapshot_id in (s.base_state_id, s.parent_id)]
        known = {snapshot_id, *snaps}
        sandboxes = [s.sandbox_id for s in self.store.list_sandboxes(states=LIVE_STATES)
                     if s.template_id == template_id and s.team_id != POOL_TEAM
                     and (s.state == SandboxState.CREATING or s.runtime.parent_snapshot in known
                          or (s.runtime.saved is not None and s.runtime.saved.base_state_id == snapshot_id))]
        return sandboxes + snaps

    async def _free_files(self, build: TemplateBuild) -> None:
        """Free a build's files on every node (``NodeClient.free_build``): its snapshot where it
        was made and where a copy is, and the build layers only it used where it was built. A node
        that is away frees them at its next start (storage ``gc``: no record keeps them)."""
        for node in self.nodes.records():
            try:
                deleted = await self.nodes.client(node.node_id).free_build(build.build_id, build.snapshot)
            except NodeUnavailableError as exc:
                log.info("build files left on a node that is away", build_id=build.build_id,
                         node_id=node.node_id, error=exc.message)
                continue
            if deleted:
                log.info("build files freed on node", build_id=build.build_id, node_id=node.node_id, deleted=deleted)

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


def in_use(what: str, found: list[tuple[str, bool]]) -> str:
    """``sandboxes a, b and 3 more`` from (id, the owner's) pairs: ids of other teams' are only counted."""
    mine = [i for i, own in found if own]
    others = len(found) - len(mine)
    text = f"{what} {', '.join(mine[:10])}" if mine else what
    more = [f"{len(mine) - 10} more"] if len(mine) > 10 else []
    more += [f"{others} of other teams"] if others else []
    return text + (" and " if mine else " ") + ", ".join(more) if more else text


def named_builds(builds: list[TemplateBuild]) -> list[tuple[str, TemplateBuild]]:
    """Every tag of a template's ready ``builds`` (newest first) and the build it names (the newest
    holding it), by tag."""
    named: dict[str, TemplateBuild] = {}
    for build in builds:
        for tag in build.tags:
            named.setdefault(tag, build)
    return sorted(named.items())


class TemplateTags:
    """``name:tag`` -> build: each build carries the tags it was built or tagged with; a tag names
    the newest ready build holding it (``default``: every build has it unless it was given tags).
    The template serves its newest build (its warm pool too); a tag of an older build restores that
    build's snapshot, kept while a tag names it (:meth:`TemplateBuilds.release`)."""

    def __init__(self, builds: TemplateBuilds) -> None:
        self.builds = builds
        self.store = builds.store

    def _ready(self, team_id: str, name: str) -> tuple[Template, list[TemplateBuild]]:
        template = self.builds.template(team_id, name.partition(":")[0])
        if template.team_id != team_id:
            raise TemplateNotFoundError(template=name)
        return template, [b for b in self.store.list_builds(template.template_id) if b.status == BuildStatus.READY]

    def resolve(self, ref: str) -> tuple[Template, TemplateBuild | None] | None:
        """The template ``name:tag`` names, and the older build to restore when the tag names
        one (None: the build the template serves); None if there is no such template or tag. A
        tag on an older build whose snapshot was not kept: :class:`TagNotServedError`. Any team's
        (the caller checks visibility)."""
        name, _, tag = ref.partition(":")
        template = self.store.get_template(name)
        if template is None:
            return None
        builds = [b for b in self.store.list_builds(template.template_id) if b.status == BuildStatus.READY]
        holder = next((b for b in builds if tag in b.tags), None)
        if holder is None:
            return (template, None) if tag == "default" and not builds else None
        if holder.build_id == template.build_id:
            return template, None
        if holder.snapshot is None:
            raise TagNotServedError(ref=ref, build_id=holder.build_id)
        return template, holder

    def list(self, team_id: str, name: str) -> list[tuple[str, TemplateBuild]]:
        """Every tag of the template and the build it names, by tag."""
        _, builds = self._ready(team_id, name)
        return named_builds(builds)

    def assign(self, team_id: str, target: str, tags: tuple[str, ...]) -> TemplateBuild:
        """Give ``tags`` to the build ``target`` (``name:tag``, the tag ``default`` if none) names;
        a build the tags moved away from is freed by :meth:`TemplateBuilds.release`."""
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

    def remove(self, team_id: str, name: str, tags: tuple[str, ...]) -> Template:
        """Take ``tags`` off the template's builds (:meth:`TemplateBuilds.release` then frees a
        build no tag names any more); the template."""
        template, builds = self._ready(team_id, name)
        for build in builds:
            if set(build.tags) & set(tags):
                self.store.put_build(build.model_copy(update={"tags": tuple(t for t in build.tags if t not in tags)}))
        return template
