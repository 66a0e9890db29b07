"""The node's build engine: a template from the SDK's ``Template`` builder, built in a microVM.

A build boots a **build VM** from its parent template's image (or from the newest cached layer
its steps allow), runs each step through the guest agent (``exec``, as root or as the step's
user), and after each step freezes the VM's disk (``storage.freeze_disk``, after a guest
``sync``) as a **layer** keyed by the parent layer's key + the step and its inputs
(:func:`cube_core.buildspec.layer_key`; a COPY's key holds the uploaded files' hash). A rebuild
whose first k steps are unchanged boots from layer k and runs only the rest; ``skip_cache``
(``force``) runs everything. Then the start command is started and the ready command polled, and
the VM is snapshotted like a built-in template's (:meth:`cube_core.templates.TemplateBuilder._snapshot`):
memory + devices, then its disk frozen. The template's ``rootfs`` is the last step's layer (its
clean disk), its ``snapshot`` the booted one; :meth:`NodeAgent.template_ready` makes it serve.

Layers live in the storage driver as snapshot directories without memory files
(``blayer-<key>``); ``<storage root>/build-layers.json`` maps keys to them. Layers that back a
template's snapshot outlive a storage ``gc``; others are cache only and may be collected.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import glob
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from cube_core import ids
from cube_core.buildspec import (
    BASE_STEP,
    DEFAULT_USER,
    DEFAULT_WORKDIR,
    FINALIZE_STEP,
    BuildJob,
    BuildLogLine,
    BuildStatus,
    BuildStep,
    base_key,
    layer_key,
)
from cube_core.errors import CubeError
from cube_core.guest import guest_call
from cube_core.models import (
    DiskHandle,
    ExecReply,
    NetworkPolicy,
    SnapshotRef,
    Template,
    TemplateStatus,
    VmHandle,
    VmSpec,
    utcnow,
)
from cube_core.storage import RootfsRecipe

if TYPE_CHECKING:
    from cube_core.node import NodeAgent

log = structlog.get_logger(__name__)

STEP_TIMEOUT_S = 1800.0
BOOT_TIMEOUT_S = 600.0
READY_TIMEOUT_S = 600.0
CHUNK = 96_000
"""Base64 characters per ``exec`` argument (Linux caps one argument at 128 KiB)."""
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INDEX_NAME = "build-layers.json"
LAYOUT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class StepFailed(CubeError):
    msg_fmt = "step {step} failed: {reason}"


class Context:
    """How the next step runs: ENV, WORKDIR and USER steps change it."""

    def __init__(self) -> None:
        self.env: dict[str, str] = {}
        self.workdir = DEFAULT_WORKDIR
        self.user = DEFAULT_USER

    def apply(self, step: BuildStep) -> None:
        if step.type == "ENV":
            self.env.update(dict(zip(step.args[::2], step.args[1::2], strict=False)))
        elif step.type == "WORKDIR" and step.args:
            self.workdir = step.args[0]
        elif step.type == "USER" and step.args:
            self.user = step.args[0]

    def script(self, command: str) -> str:
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env.items() if k.isidentifier())
        return f"export PATH={PATH}\n{exports}cd {shlex.quote(self.workdir)} || exit 1\n{command}"


def as_user(user: str, script: str) -> list[str]:
    if user in ("root", "0"):
        return ["/bin/bash", "-c", script]
    return ["/sbin/runuser", "-u", user, "--", "/bin/bash", "-c", script]


class LayerIndex:
    """``key -> layer file`` for cached step results on this node (a JSON file by the storage),
    with the template whose build froze each layer (what :meth:`BuildEngine.forget` frees) and the
    builds whose chain uses it (what :meth:`BuildEngine.free_build` frees: a layer no build uses
    any more). A layer a forced rebuild froze again under the same key takes the key; the one it
    replaced stays listed (under ``<key>~<its snapshot id>``, never looked up) while builds use it.
    Entries written before builds were listed carry none and stay until their template goes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        out: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            if isinstance(value, str):
                out[str(key)] = {"path": value}
            elif isinstance(value, dict):
                entry: dict[str, Any] = {str(a): str(b) for a, b in value.items() if a != "builds"}
                if isinstance(value.get("builds"), list):
                    entry["builds"] = [str(b) for b in value["builds"]]
                out[str(key)] = entry
        return out

    def _write(self, data: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, self.path)

    def get(self, key: str) -> Path | None:
        value = self._read().get(key, {}).get("path")
        return Path(value) if value and Path(value).is_file() else None

    def use(self, key: str, build_id: str) -> Path | None:
        """The layer of ``key`` for a build that starts from it (a cache hit): listed as used by
        ``build_id`` too, in the same step as the look-up (so freeing another build cannot take
        it in between)."""
        data = self._read()
        entry = data.get(key, {})
        value = entry.get("path")
        if not value or not Path(value).is_file():
            return None
        if "builds" in entry and build_id not in entry["builds"]:
            entry["builds"].append(build_id)
            self._write(data)
        return Path(value)

    def put(self, key: str, layer: Path, template_id: str, depth: int, build_id: str) -> None:
        """``depth``: the step's place in its chain (a layer backs only deeper ones)."""
        data = self._read()
        old = data.get(key, {})
        if old.get("path") == str(layer):  # a cache hit (same layer) keeps the template that froze it
            if "builds" in old and build_id not in old["builds"]:
                old["builds"].append(build_id)
        else:
            if old.get("builds"):  # frozen again (a forced step): the old layer stays for its builds
                data[f"{key}~{Path(old['path']).parent.name}"] = old
            data[key] = {"path": str(layer), "template": template_id, "depth": str(depth), "builds": [build_id]}
        self._write(data)

    def pop_template(self, template_id: str) -> list[Path]:
        """Forget the layers ``template_id``'s builds froze; their files, deepest first (so that
        each one is deleted after the layers built over it)."""
        data = self._read()
        return self._pop(data, [k for k, v in data.items() if v.get("template") == template_id])

    def pop_build(self, build_id: str) -> list[Path]:
        """``build_id`` was freed: it uses its layers no more. Forget the layers no build uses now
        (those only it used); their files, deepest first. A file several keys name (an ``ENV``
        step shares its parent's layer) goes only when none of them has a build left."""
        data = self._read()
        touched = False
        for entry in data.values():
            if build_id in entry.get("builds", ()):
                entry["builds"].remove(build_id)
                touched = True
        if not touched:
            return []
        by_path: dict[str, list[str]] = {}
        for key, entry in data.items():
            by_path.setdefault(entry.get("path", ""), []).append(key)
        unused = [key for keys in by_path.values()
                  if all("builds" in data[k] and not data[k]["builds"] for k in keys) for key in keys]
        paths = self._pop(data, unused)
        if not unused:
            self._write(data)
        return paths

    def _pop(self, data: dict[str, dict[str, Any]], gone: list[str]) -> list[Path]:
        gone = sorted(gone, key=lambda k: -int(data[k].get("depth", "0")))
        paths = list(dict.fromkeys(Path(data.pop(k)["path"]) for k in gone))
        if gone:
            self._write(data)
        return paths


def copy_archive(upload: Path, src: str, dest: str, owner: str, mode: str) -> bytes:
    """The gzip tar to unpack at ``/`` in the guest for ``COPY src dest``: Docker's rules (a file
    into ``dest/`` keeps its name, else becomes ``dest``; a directory's content goes into ``dest``),
    owned by ``owner`` (``user[:group]``), with ``mode`` (octal) on files if given. Blocking."""
    user, _, group = owner.partition(":")
    group = group or user
    out = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="cube-copy-") as tmp:
        with tarfile.open(upload, "r:*") as archive:
            archive.extractall(tmp, filter="data")
        root = os.path.realpath(tmp)
        matches = sorted(m for m in glob.glob(os.path.join(tmp, src)) if os.path.realpath(m).startswith(root))
        if not matches:
            raise StepFailed(step="COPY", reason=f"{src!r} is not in the uploaded files")
        entries: list[tuple[str, str]] = []
        for match in matches:
            if os.path.isdir(match):
                entries.append((match, dest))
                for base, dirs, files in os.walk(match):
                    for name in sorted(dirs + files):
                        full = os.path.join(base, name)
                        entries.append((full, os.path.join(dest, os.path.relpath(full, match))))
            elif dest.endswith("/") or len(matches) > 1:
                entries.append((match, os.path.join(dest, os.path.basename(match))))
            else:
                entries.append((match, dest))
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            for path, target in entries:
                name = os.path.normpath(target).lstrip("/")
                if not name or name == ".":
                    continue
                info = tar.gettarinfo(path, arcname=name)
                info.uname, info.gname, info.uid, info.gid = user, group, 0, 0
                if mode and info.isfile():
                    info.mode = int(mode, 8)
                if info.isfile():
                    with open(path, "rb") as fh:
                        tar.addfile(info, fh)
                else:
                    tar.addfile(info)
    return out.getvalue()


def registry_host(ref: str) -> str:
    """The registry an image reference names (Docker's rule: the first component, if it has a
    ``.`` or ``:`` or is ``localhost``; otherwise Docker Hub)."""
    first, sep, _ = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def auth_json(host: str, username: str, password: str) -> str:
    """A containers-auth.json granting ``username:password`` for ``host`` (skopeo ``--authfile``)."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return json.dumps({"auths": {host: {"auth": token}}})


class BuildEngine:
    """Runs :class:`BuildJob` s on one node (one task per build)."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.tasks: dict[str, asyncio.Task[Template | None]] = {}
        self.index = LayerIndex(agent.storage.root / INDEX_NAME)

    def start(self, job: BuildJob) -> None:
        """Run ``job`` in the background; its record tells how it goes."""
        task = asyncio.ensure_future(Build(self, job).run())
        self.tasks[job.build.build_id] = task
        task.add_done_callback(lambda _t: self.tasks.pop(job.build.build_id, None))

    async def forget(self, template_id: str) -> list[str]:
        """Free the layers the builds of ``template_id`` froze (it was deleted): the storage keeps
        a layer that still backs another disk or layer (another template built over it) until
        nothing does. The snapshot ids deleted."""
        return await self._delete(self.index.pop_template(template_id))

    async def free_build(self, build_id: str) -> list[str]:
        """Free the layers only ``build_id`` used (it was freed: no tag names it, nothing uses its
        snapshot); a layer another build's chain uses (a cache hit, the template's newest build)
        stays, and the storage keeps one that still backs a disk or layer (a snapshot's, a
        template's built over it) until nothing does. The snapshot ids deleted."""
        return await self._delete(self.index.pop_build(build_id))

    async def _delete(self, paths: list[Path]) -> list[str]:
        deleted = []
        for path in paths:
            snapshot_id = path.parent.name
            if snapshot_id.startswith("blayer-"):  # not a template image (a first ENV step names it)
                await self.agent.storage.delete_snapshot(snapshot_id)
                deleted.append(snapshot_id)
        return deleted


class Build:
    def __init__(self, engine: BuildEngine, job: BuildJob) -> None:
        self.engine = engine
        self.agent = engine.agent
        self.job = job
        self.record = job.build
        self.vm: VmHandle | None = None

    # -- the record ------------------------------------------------------------------------------

    def put(self, **changes: object) -> None:
        self.record = self.record.model_copy(update=changes)
        self.agent.store.put_build(self.record)

    def say(self, message: str, *, level: str = "info", step: str | None = None) -> None:
        line = BuildLogLine.model_validate({"message": message[:4000], "level": level, "step": step})
        self.record = self.record.with_log(line)
        self.agent.store.put_build(self.record)

    # -- the build -------------------------------------------------------------------------------

    async def run(self) -> Template | None:
        self.put(status=BuildStatus.BUILDING, node_id=self.agent.node_id)
        try:
            template = await self._build()
        except StepFailed as exc:
            self._fail(str(exc.fields.get("reason", exc)), str(exc.fields.get("step", FINALIZE_STEP)))
            return None
        except Exception as exc:  # noqa: BLE001 - every failure ends in the record
            log.exception("template build failed", build_id=self.record.build_id)
            self._fail(f"{type(exc).__name__}: {exc}", FINALIZE_STEP)
            return None
        self.say(f"Template {self.record.name} ({template.template_id}) is ready", step=FINALIZE_STEP)
        self.put(status=BuildStatus.READY, finished_at=utcnow())
        self._finished()
        return template

    def _finished(self) -> None:
        build = self.record
        self.agent.events.emit("template.build_finished", team_id=build.team_id, node_id=self.agent.node_id,
                               status=build.status.value, template_id=build.template_id, build_id=build.build_id,
                               name=build.name, reason=build.reason)

    def _fail(self, reason: str, step: str) -> None:
        self.say(f"Build failed: {reason}", level="error", step=step)
        self.put(status=BuildStatus.ERROR, reason=reason[:4000], reason_step=step, finished_at=utcnow())
        self._finished()
        template = self.agent.store.get_template(self.record.template_id)
        if template is not None and template.status == TemplateStatus.BUILDING and template.snapshot is None:
            self.agent.store.put_template(template.model_copy(update={"status": TemplateStatus.FAILED}))

    async def _build(self) -> Template:
        plan = self.job.plan
        parent = self.job.parent or await self._image_parent(plan.from_image or "")
        steps = plan.steps
        n = len(steps)
        self.say(f"Building from template {parent.aliases[0] if parent.aliases else parent.template_id}",
                 step=BASE_STEP)
        # the chain of keys, and the newest cached layer the steps allow
        keys, key = [], base_key(parent)
        for step in steps:
            key = layer_key(key, step, {})
            keys.append(key)
        first_forced = next((i for i, s in enumerate(steps) if s.force), n)
        start, base = 0, Path(parent.rootfs or "")
        if not plan.force:
            for i in range(min(first_forced, n), 0, -1):
                layer = self.engine.index.use(keys[i - 1], self.record.build_id)  # kept for this build now
                if layer is not None:
                    start, base = i, layer
                    break
        for cached in keys[:max(start - 1, 0)]:  # the cached steps under it: this build's chain too
            self.engine.index.use(cached, self.record.build_id)
        context = Context()
        for i, step in enumerate(steps[:start]):
            context.apply(step)
            self.say(f"CACHED [builder {i + 1}/{n}] {step.describe()}", step=str(i + 1))
        if not base.is_file():
            raise StepFailed(step=BASE_STEP, reason=f"the image of template {parent.template_id} is not on this node")
        kernel = Path(parent.kernel or "/dev/null")
        initrd = Path(parent.initrd) if parent.initrd else None
        owner = f"bld-{self.record.build_id}"
        disk = await self.agent.storage.create_disk(owner, base)
        nic = await self.agent.network.allocate(owner, NetworkPolicy())
        last_layer = base
        try:
            self.say("Starting the build VM", step=BASE_STEP)
            self.vm = await self.agent.vmm.boot(VmSpec(
                vm_id=owner, kernel=kernel, initrd=initrd, rootfs_disk=disk, memory_mb=self.record.memory_mb,
                cpu_count=self.record.cpu_count, interpreter=parent.interpreter), nic)
            await self.agent.vmm.wait_ready(self.vm, timeout=BOOT_TIMEOUT_S)
            pong = await self.agent.vmm.guest_call(self.vm, "ping", {}, timeout=60.0)
            envd_version = str(pong.get("envd_version") or parent.envd_version)
            ran = 0
            for i in range(start, n):
                step = steps[i]
                name = str(i + 1)
                self.say(f"[builder {i + 1}/{n}] {step.describe()}", step=name)
                if step.type in ("ENV", "USER"):
                    context.apply(step)
                else:
                    await self._step(step, name, context)
                    await self._exec(["/bin/sync"], "sync")
                    frozen = await self.agent.storage.freeze_disk(
                        disk, f"blayer-{keys[i][:24]}-{ids.short_id('')[:8]}")
                    last_layer = frozen.path
                ran += 1
                self.engine.index.put(keys[i], last_layer, self.record.template_id, i, self.record.build_id)
            self.put(steps_run=ran, steps_cached=start)
            await self._finalize(context)
            template_id = self.record.template_id
            snapshot_id = f"tmpl-{template_id}-{self.record.build_id[:8]}-{ids.short_id('')[:8]}"
            self.say("Saving the template snapshot", step=FINALIZE_STEP)
            state = await self.agent.vmm.snapshot(self.vm, self.agent.storage.snapshot_dir(snapshot_id))
            vm, self.vm = self.vm, None
            await self.agent.vmm.shutdown(vm)
            frozen_disk: DiskHandle = await self.agent.storage.freeze_disk(disk, snapshot_id)
        finally:
            if self.vm is not None:
                with contextlib.suppress(Exception):
                    await self.agent.vmm.shutdown(self.vm)
            await self.agent.network.release(nic)
            await self.agent.storage.delete_disk(disk)
        snapshot = SnapshotRef(snapshot_id=snapshot_id, template_id=template_id, vm_state=state,
                               disk=frozen_disk, node_id=self.agent.node_id)
        self.put(snapshot=snapshot)  # kept while a tag names this build (after a rebuild too)
        old = self.agent.store.get_template(template_id)
        template = Template(
            template_id=template_id, aliases=old.aliases if old else (self.record.name,),
            status=TemplateStatus.READY, kernel=parent.kernel, initrd=parent.initrd, rootfs=str(last_layer),
            interpreter=parent.interpreter, cpu_count=self.record.cpu_count, memory_mb=self.record.memory_mb,
            envd_version=envd_version, team_id=self.record.team_id, build_id=self.record.build_id,
            build_log="\n".join(line.message for line in self.record.logs)[-20_000:], snapshot=snapshot,
            created_at=old.created_at if old else utcnow(), updated_at=utcnow(),
            published=old.published if old else False)  # a rebuild keeps what PATCH set
        self.agent.store.put_template(template)
        self.agent.template_ready(template)  # first: a member being restored from the old snapshot is dropped
        if old is not None and old.snapshot is not None:  # warm members of the previous build go
            await self.agent.pool.drain(template_id)
        return template

    async def _image_parent(self, ref: str) -> Template:
        """The parent of a ``from_image`` build: the OCI image as a template image (storage's
        ``oci`` source: layers checked and unpacked without running anything, the guest agent
        added), with this node's guest kernel. ``oci:<name>`` is the layout
        ``<state_dir>/oci/<name>`` (a directory or tarball); anything else is pulled from its
        registry with ``skopeo`` into a layout first."""
        digest = hashlib.sha256(ref.encode()).hexdigest()
        if ref.startswith("oci:"):
            name = ref[4:]
            if not LAYOUT_NAME.fullmatch(name):
                raise StepFailed(step=BASE_STEP, reason=f"from_image({ref!r}): oci:<name> names a layout in "
                                                        "<state_dir>/oci/ ([A-Za-z0-9._-], no slashes)")
            layout = self.agent.settings.state_dir / "oci" / name
            if not layout.exists():
                raise StepFailed(step=BASE_STEP, reason=f"from_image({ref!r}): no OCI layout {layout}")
            self.say(f"Using the OCI layout {layout}", step=BASE_STEP)
        else:
            layout = self.agent.storage.root / "pulled" / digest[:32]
            await self._pull(ref, layout)
        self.say("Unpacking the image", step=BASE_STEP)
        image = await self.agent.storage.build_rootfs(RootfsRecipe(name=f"image-{digest[:16]}", source="oci",
                                                                   path=layout))
        kernel, initrd = await asyncio.shield(self.agent.templates.kernel())
        return Template(template_id=f"image-{digest[:16]}", aliases=(ref,), status=TemplateStatus.READY,
                        kernel=str(kernel), initrd=str(initrd) if initrd else None, rootfs=str(image.path),
                        rootfs_bytes=image.bytes_allocated)

    async def _pull(self, ref: str, layout: Path) -> None:
        skopeo = shutil.which("skopeo")
        if skopeo is None:
            raise StepFailed(step=BASE_STEP, reason=f"from_image({ref!r}) needs skopeo on the node "
                                                    "(scripts/apt-packages.txt)")
        host = ref.split("/", 1)[0] if "/" in ref else ""
        insecure = host.split(":")[0] in ("localhost", "127.0.0.1", "[::1]")
        self.say(f"Pulling {ref}", step=BASE_STEP)
        if layout.exists():
            shutil.rmtree(layout)
        layout.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="cube-pull-") as private:  # 0700
            args = ["--src-tls-verify=false"] if insecure else []
            if self.job.registry is not None:
                # an auth file (0600, deleted after), never --src-creds: that would be in /proc/<pid>/cmdline
                authfile = Path(private) / "auth.json"
                authfile.touch(mode=0o600)
                authfile.write_text(auth_json(registry_host(ref), self.job.registry.username,
                                              self.job.registry.password))
                args += ["--src-authfile", str(authfile)]
                self.say(f"Using the registry credentials of {self.job.registry.username!r}", step=BASE_STEP)
            proc = await asyncio.create_subprocess_exec(
                skopeo, "copy", *args, f"docker://{ref}", f"oci:{layout}:latest", stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise StepFailed(step=BASE_STEP, reason=f"pulling {ref} failed: {out.decode(errors='replace')[-2000:]}")

    async def _exec(self, cmd: list[str], what: str, timeout: float = STEP_TIMEOUT_S) -> ExecReply:
        assert self.vm is not None
        return await guest_call(self.agent.vmm, self.vm, "exec", {"cmd": cmd, "timeout": timeout}, ExecReply,
                                timeout=timeout + 30)

    async def _step(self, step: BuildStep, name: str, context: Context) -> None:
        if step.type == "RUN":
            user = step.args[1] if len(step.args) > 1 and step.args[1] else context.user
            reply = await self._exec(as_user(user, context.script(step.args[0] if step.args else "true")), name)
            self._output(reply, name)
            if reply.exit_code != 0:
                tail = (reply.stderr or reply.stdout).strip()[-2000:]
                raise StepFailed(step=name, reason=f"[builder {name}] {step.describe()}: exit code "
                                                   f"{reply.exit_code}" + (f": {tail}" if tail else ""))
        elif step.type == "WORKDIR":
            context.apply(step)
            wd = shlex.quote(context.workdir)
            await self._checked(as_user("root", f"mkdir -p {wd} && chown {shlex.quote(context.user)} {wd}"), name)
        elif step.type == "COPY":
            await self._copy(step, name, context)

    def _output(self, reply: ExecReply, name: str) -> None:
        for stream, level in ((reply.stdout, "info"), (reply.stderr, "warn" if reply.exit_code == 0 else "error")):
            for line in stream.splitlines()[-200:]:
                self.say(line, level=level, step=name)

    async def _checked(self, cmd: list[str], name: str) -> None:
        reply = await self._exec(cmd, name)
        if reply.exit_code != 0:
            raise StepFailed(step=name, reason=f"exit code {reply.exit_code}: {(reply.stderr or reply.stdout)[-2000:]}")

    async def _copy(self, step: BuildStep, name: str, context: Context) -> None:
        args = list(step.args) + ["", "", "", ""]
        src, dest, owner, mode = args[0], args[1], args[2] or context.user, args[3]
        upload = self.job.files.get(step.files_hash or "")
        if upload is None or not upload.is_file():
            raise StepFailed(step=name, reason=f"the files of COPY {src} were not uploaded")
        if not dest.startswith("/"):
            dest = os.path.join(context.workdir, dest) + ("/" if dest.endswith("/") else "")
        data = await asyncio.to_thread(copy_archive, upload, src, dest, owner, mode)
        encoded = base64.b64encode(data).decode()
        target = f"/tmp/.cube-copy-{name}.b64"
        await self._checked(["/bin/sh", "-c", f": > {target}"], name)
        for offset in range(0, len(encoded), CHUNK):
            await self._checked(["/bin/sh", "-c", f'printf %s "$1" >> {target}', "sh",
                                 encoded[offset:offset + CHUNK]], name)
        await self._checked(["/bin/sh", "-c", f"base64 -d {target} | tar -xzf - -C / && rm -f {target}"], name)

    async def _finalize(self, context: Context) -> None:
        plan = self.job.plan
        if plan.start_cmd:
            self.say(f"Starting: {plan.start_cmd}", step=FINALIZE_STEP)
            start = (f"nohup setsid /bin/bash -c {shlex.quote(plan.start_cmd)} "
                     f">/tmp/cube-start.log 2>&1 </dev/null &")
            await self._checked(as_user(context.user, context.script(start)), FINALIZE_STEP)
        if plan.ready_cmd:
            self.say(f"Waiting for: {plan.ready_cmd}", step=FINALIZE_STEP)
            deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
            while True:
                reply = await self._exec(as_user(context.user, context.script(plan.ready_cmd)), FINALIZE_STEP,
                                         timeout=60.0)
                if reply.exit_code == 0:
                    break
                if asyncio.get_running_loop().time() > deadline:
                    self._output(reply, FINALIZE_STEP)
                    raise StepFailed(step=FINALIZE_STEP, reason=f"the ready command did not succeed within "
                                                                f"{READY_TIMEOUT_S:.0f}s (exit code {reply.exit_code})")
                await asyncio.sleep(1.0)
        await self._exec(["/bin/sync"], "sync")


_ENGINES: dict[int, tuple[NodeAgent, BuildEngine]] = {}


def engine_of(agent: NodeAgent) -> BuildEngine:
    """The build engine of ``agent`` (one per node agent, made on first use)."""
    found = _ENGINES.get(id(agent))
    if found is None or found[0] is not agent:
        found = (agent, BuildEngine(agent))
        _ENGINES[id(agent)] = found
    return found[1]
