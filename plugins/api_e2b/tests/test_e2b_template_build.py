"""Template builds with the real ``e2b==2.63.0`` SDK's ``Template`` builder against a served Cube on
the fake drivers: the routes, the upload, the records, team scoping, the layer cache (the fake
guest runs every command with exit code 0 unless it ends in ``exit N``)."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from e2b import AsyncTemplate, BuildException


def template(context, last: str = "echo two") -> AsyncTemplate:
    return (AsyncTemplate(file_context_path=str(context))
            .from_template("base")
            .set_envs({"GREETING": "hi"})
            .run_cmd("echo one", user="root")
            .copy("app.txt", "/home/user/")
            .set_workdir("/home/user")
            .run_cmd(last)
            .set_start_cmd("sleep infinity", "true"))


async def freed(store, build_id: str, *files) -> None:
    """Wait (2 s at most) until the control plane freed the build by itself (an event or a route
    triggered it: nothing frees builds periodically) and ``files`` are gone."""
    for _ in range(100):
        record = store.get_build(build_id)
        if record.freed_at is not None and not any(f.exists() for f in files):
            assert record.snapshot is None
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"build {build_id} was not freed")


def name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def test_build_rebuild_and_create(cube, build_env, tmp_path):
    url, key = build_env
    logs: list[str] = []
    alias = name()
    team = cube.service.authenticate(key).team_id
    events, others = cube.service.events.subscribe(team), cube.service.events.subscribe("another-team")
    info = await AsyncTemplate.build(template(tmp_path), alias, on_build_logs=lambda e: logs.append(e.message))
    finished = [e for e in [await asyncio.wait_for(anext(events), 5)] if e.type == "template.build_finished"]
    assert [(e.data["status"], e.data["build_id"], e.data["template_id"]) for e in finished] == [
        ("ready", info.build_id, info.template_id)]
    others.close()
    assert not others._queue  # another team's subscription saw nothing of it
    assert any("Uploaded 'app.txt'" == m for m in logs)
    assert any("[builder 3/5] COPY app.txt /home/user/" in m for m in logs)
    assert not any("CACHED" in m for m in logs)
    record = cube.service.store.get_build(info.build_id)
    assert record.status.value == "ready" and record.steps_run == 5 and record.steps_cached == 0
    assert await AsyncTemplate.exists(alias)
    tpl = cube.service.store.get_template(alias)
    assert tpl.status.value == "ready" and tpl.snapshot is not None and tpl.build_id == info.build_id
    assert tpl.template_id in cube.agent.report().templates

    # only the last step changed: the four before come from the cache, one runs; app.txt is not re-sent
    logs.clear()
    info2 = await AsyncTemplate.build(template(tmp_path, "echo three"), alias,
                                      on_build_logs=lambda e: logs.append(e.message))
    assert info2.template_id == info.template_id and info2.build_id != info.build_id
    assert "Skipping upload of 'app.txt', already cached" in logs
    assert sum("CACHED [builder" in m for m in logs) == 4
    assert any("[builder 5/5] RUN echo three" in m and "CACHED" not in m for m in logs)
    record = cube.service.store.get_build(info2.build_id)
    assert (record.steps_run, record.steps_cached) == (1, 4)
    # skip_cache runs every step again
    logs.clear()
    await AsyncTemplate.build(template(tmp_path, "echo three"), alias, skip_cache=True,
                              on_build_logs=lambda e: logs.append(e.message))
    assert not any("CACHED" in m for m in logs)

    # a sandbox from it (the fake VMM restores the template's snapshot)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}) as client:
        resp = await client.post("/sandboxes", json={"templateID": alias, "timeout": 60})
        assert resp.status_code == 201, resp.text
        assert resp.json()["templateID"] == info.template_id
        listed = await client.get("/templates")
        mine = [t for t in listed.json() if t["templateID"] == info.template_id]
        assert mine and mine[0]["public"] is False and mine[0]["buildID"] == cube.service.store.get_template(
            alias).build_id


async def test_failing_step_reports_step_exit_code_and_output(cube, build_env, tmp_path):
    tpl = (AsyncTemplate(file_context_path=str(tmp_path)).from_template("base")
           .run_cmd("echo fine").run_cmd("false; exit 7").run_cmd("echo never"))
    events = cube.service.events.subscribe()
    logs: list[str] = []
    with pytest.raises(BuildException) as err:
        await AsyncTemplate.build(tpl, name(), on_build_logs=lambda e: logs.append(e.message))
    assert "exit code 7" in str(err.value) and "[builder 2]" in str(err.value)
    assert any("failed with 7" in m for m in logs)
    assert not any("echo never" in m for m in logs)
    finished = await asyncio.wait_for(anext(events), 5)
    assert (finished.type, finished.data["status"]) == ("template.build_finished", "error")
    assert "exit code 7" in finished.data["reason"]


async def test_background_build_and_status(cube, build_env, tmp_path):
    alias = name()
    tpl = AsyncTemplate().from_base_image().run_cmd("echo bg")
    info = await AsyncTemplate.build_in_background(tpl, alias)
    for _ in range(200):
        status = await AsyncTemplate.get_build_status(info)
        if status.status.value in ("ready", "error"):
            break
        await asyncio.sleep(0.05)
    assert status.status.value == "ready", status
    assert any("RUN echo bg" in e.message for e in status.log_entries)


async def test_another_team_cannot_see_use_or_take_it(cube, build_env, tmp_path, monkeypatch):
    url, key = build_env
    alias = name()
    info = await AsyncTemplate.build(AsyncTemplate().from_template("base").run_cmd("echo mine"), alias)
    other = cube.key("team-b")
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": other}) as client:
        assert all(t["templateID"] != info.template_id for t in (await client.get("/templates")).json())
        resp = await client.post("/sandboxes", json={"templateID": alias, "timeout": 60})
        assert resp.status_code == 404, resp.text
        resp = await client.post("/sandboxes", json={"templateID": info.template_id, "timeout": 60})
        assert resp.status_code == 404, resp.text
        status = await client.get(f"/templates/{info.template_id}/builds/{info.build_id}/status")
        assert status.status_code == 404
        assert (await client.get(f"/templates/aliases/{alias}")).status_code == 403
        taken = await client.post("/v3/templates", json={"name": alias})
        assert taken.status_code == 409, taken.text
        # from_template of another team's template: the build fails at its base step
        monkeypatch.setenv("E2B_API_KEY", other)
        with pytest.raises(BuildException, match="not found"):
            await AsyncTemplate.build(AsyncTemplate().from_template(alias).run_cmd("echo x"), name())
    assert await AsyncTemplate.exists(alias)  # as team b: taken by someone (403)
    monkeypatch.setenv("E2B_API_KEY", key)
    assert not await AsyncTemplate.exists(name())


async def test_upload_needs_its_signature(cube, build_env, tmp_path):
    url, key = build_env
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}) as client:
        created = (await client.post("/v3/templates", json={"name": name()})).json()
        link = await client.get(f"/templates/{created['templateID']}/files/{'a' * 64}")
        assert link.status_code == 201 and link.json()["present"] is False
        upload = link.json()["url"]
        bad = await client.put(upload.replace("signature=", "signature=0"), content=b"x")
        assert bad.status_code == 403
        assert (await client.put(upload, content=b"not a tar")).status_code == 201
        again = await client.get(f"/templates/{created['templateID']}/files/{'a' * 64}")
        assert again.json() == {"present": True}
        assert (await client.get(f"/templates/{created['templateID']}/files/nothex")).status_code == 400


async def test_tags_with_the_sdk(cube, build_env, tmp_path):
    alias = name()
    first = await AsyncTemplate.build(AsyncTemplate().from_template("base").run_cmd("echo 1"), f"{alias}:v1")
    second = await AsyncTemplate.build(AsyncTemplate().from_template("base").run_cmd("echo 2"), alias,
                                       tags=["v2", "stable"])
    assert first.tags == ["v1"] and sorted(second.tags) == ["stable", "v2"]
    tags = {t.tag: t.build_id for t in await AsyncTemplate.get_tags(alias)}
    assert tags == {"v1": first.build_id, "v2": second.build_id, "stable": second.build_id}
    moved = await AsyncTemplate.assign_tags(f"{alias}:v1", ["stable"])
    assert moved.build_id == first.build_id
    tags = {t.tag: t.build_id for t in await AsyncTemplate.get_tags(alias)}
    assert tags["stable"] == first.build_id and tags["v2"] == second.build_id
    await AsyncTemplate.remove_tags(alias, ["v2"])
    assert "v2" not in {t.tag for t in await AsyncTemplate.get_tags(alias)}
    with pytest.raises(Exception, match="not found"):
        await AsyncTemplate.assign_tags(f"{alias}:nope", ["x"])

    # name:tag in create and exists: the newest build, or an older one a tag still names
    url, key = build_env
    store, snapshots = cube.service.store, cube.agent.storage.root / "snapshots"
    second_snapshot = store.get_build(second.build_id).snapshot
    third = await AsyncTemplate.build(AsyncTemplate().from_template("base").run_cmd("echo 3"), f"{alias}:v3")
    assert third.tags == ["v3"]
    assert await AsyncTemplate.exists(f"{alias}:v3") and await AsyncTemplate.exists(f"{alias}:v1")
    assert not await AsyncTemplate.exists(f"{alias}:nope")
    # the second build lost its tags and is not served any more: the rebuild (its build_finished) frees it
    await freed(store, second.build_id, snapshots / second_snapshot.snapshot_id)
    kept = store.get_build(first.build_id).snapshot
    assert kept is not None and (snapshots / kept.snapshot_id).exists()
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}) as client:
        made = await client.post("/sandboxes", json={"templateID": f"{alias}:v3", "timeout": 60})
        assert made.status_code == 201, made.text
        assert made.json()["templateID"] == third.template_id
        current = store.get_template(alias).snapshot
        assert store.get_sandbox(made.json()["sandboxID"]).runtime.parent_snapshot == current.snapshot_id
        older = await client.post("/sandboxes", json={"templateID": f"{alias}:v1", "timeout": 60})
        assert older.status_code == 201, older.text
        old_sandbox = older.json()["sandboxID"]
        assert older.json()["templateID"] == third.template_id
        assert store.get_sandbox(old_sandbox).runtime.parent_snapshot == kept.snapshot_id  # a pool miss
        unknown = await client.post("/sandboxes", json={"templateID": f"{alias}:nope", "timeout": 60})
        assert unknown.status_code == 404, unknown.text
        other = cube.key("team-b")  # another team's tag: not found
        theirs = await client.post("/sandboxes", json={"templateID": f"{alias}:v1", "timeout": 60},
                                   headers={"X-API-Key": other})
        assert theirs.status_code == 404, theirs.text
        # no tag names the first build any more, but a sandbox runs from it: kept until it goes
        await AsyncTemplate.remove_tags(alias, ["v1", "stable"])
        assert (snapshots / kept.snapshot_id).exists() and store.get_build(first.build_id).snapshot is not None
        assert not await AsyncTemplate.exists(f"{alias}:v1")
        assert (await client.delete(f"/sandboxes/{old_sandbox}")).status_code == 204
    await freed(store, first.build_id, snapshots / kept.snapshot_id)  # its last sandbox's kill frees it
    assert (snapshots / current.snapshot_id).exists()  # the template's own build stays


async def test_an_older_build_stays_for_its_sandbox_snapshots_and_goes_with_the_template(cube, build_env):
    url, key = build_env
    alias = name()
    store, snapshots = cube.service.store, cube.agent.storage.root / "snapshots"
    first = await AsyncTemplate.build(AsyncTemplate().from_template("base").run_cmd("echo 1"), f"{alias}:v1")
    second = await AsyncTemplate.build(AsyncTemplate().from_template("base").run_cmd("echo 2"), f"{alias}:v2")
    v1 = store.get_build(first.build_id).snapshot
    v2 = store.get_build(second.build_id).snapshot
    assert v1 is not None and v2 is not None and v1.snapshot_id != v2.snapshot_id
    assert v2.snapshot_id == store.get_template(alias).snapshot.snapshot_id
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}) as client:
        made = await client.post("/sandboxes", json={"templateID": f"{alias}:v1", "timeout": 60})
        assert made.status_code == 201, made.text
        sandbox_id = made.json()["sandboxID"]
        snap = await client.post(f"/sandboxes/{sandbox_id}/snapshots", json={})
        assert snap.status_code in (200, 201), snap.text
        snapshot_id = snap.json()["snapshotID"]
        assert (await client.delete(f"/sandboxes/{sandbox_id}")).status_code == 204
        # the tag moves to the newest build; the sandbox snapshot still needs v1's files
        await AsyncTemplate.assign_tags(f"{alias}:v2", ["v1"])
        assert await cube.service.template_builds.release(first.template_id) == []
        assert (snapshots / v1.snapshot_id).exists()
        again = await client.post("/sandboxes", json={"templateID": snapshot_id, "timeout": 60})
        assert again.status_code == 201, again.text
        assert (await client.delete(f"/sandboxes/{again.json()['sandboxID']}")).status_code == 204
        assert (await client.delete(f"/templates/{snapshot_id}")).status_code == 204  # its last user
        await freed(store, first.build_id, snapshots / v1.snapshot_id)
        # a tagged older build goes with the template
        third = await AsyncTemplate.build(AsyncTemplate().from_template("base").run_cmd("echo 3"), f"{alias}:v3")
        v2 = store.get_build(second.build_id).snapshot
        assert v2 is not None and (snapshots / v2.snapshot_id).exists()  # v2 and v1 still name it
        assert (await client.delete(f"/templates/{alias}")).status_code == 204, third
    assert not list(snapshots.glob(f"tmpl-{first.template_id}-*"))


async def test_from_image_of_a_local_oci_layout_and_of_a_registry(cube, build_env, tmp_path):
    layouts = cube.service.settings.state_dir / "oci"
    (layouts / "mine").mkdir(parents=True)
    info = await AsyncTemplate.build(AsyncTemplate().from_image("oci:mine").run_cmd("echo on the image"), name())
    tpl = cube.service.store.get_template(info.template_id)
    assert tpl.status.value == "ready" and tpl.snapshot is not None
    record = cube.service.store.get_build(info.build_id)
    assert any("Using the OCI layout" in line.message for line in record.logs)
    with pytest.raises(BuildException, match="no OCI layout"):
        await AsyncTemplate.build(AsyncTemplate().from_image("oci:absent").run_cmd("true"), name())
    with pytest.raises(BuildException, match="oci:<name>"):
        await AsyncTemplate.build(AsyncTemplate().from_image("oci:../etc").run_cmd("true"), name())
    # a registry the host cannot reach (or no skopeo on it): the build fails at its base step
    with pytest.raises(BuildException, match="skopeo|pulling"):
        await AsyncTemplate.build(AsyncTemplate().from_image("registry.invalid/x:1").run_cmd("true"), name())


async def test_delete_a_built_template(cube, build_env, tmp_path):
    url, key = build_env
    alias = name()
    info = await AsyncTemplate.build(template(tmp_path), alias)
    tpl = cube.service.store.get_template(alias)
    engine_index = cube.agent.storage.root / "build-layers.json"
    assert info.template_id in engine_index.read_text()
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}) as client:
        made = await client.post("/sandboxes", json={"templateID": alias, "timeout": 60})
        assert made.status_code == 201, made.text
        sandbox_id = made.json()["sandboxID"]
        # in use by a sandbox (a paused one counts too): refused, nothing changes
        busy = await client.delete(f"/templates/{alias}")
        assert busy.status_code == 409 and sandbox_id in busy.json()["message"], busy.text
        assert cube.service.store.get_template(alias) is not None
        # another team: not found; a built-in template: refused
        other = cube.key("team-b")
        assert (await client.delete(f"/templates/{alias}", headers={"X-API-Key": other})).status_code == 404
        builtin = await client.delete("/templates/base")
        assert builtin.status_code == 403 and "built in" in builtin.json()["message"], builtin.text
        assert (await client.delete(f"/sandboxes/{sandbox_id}")).status_code == 204
        events = cube.service.events.subscribe(tpl.team_id)
        gone = await client.delete(f"/templates/{info.template_id}")
        assert gone.status_code == 204, gone.text
        event = await asyncio.wait_for(anext(events), 5)
        assert (event.type, event.data) == ("template.deleted", {"template_id": info.template_id, "name": alias})
        events.close()
        assert (await client.delete(f"/templates/{alias}")).status_code == 404
        assert (await client.post("/sandboxes", json={"templateID": alias, "timeout": 60})).status_code == 404
    assert not await AsyncTemplate.exists(alias)
    assert cube.service.store.list_builds(info.template_id) == []
    assert info.template_id not in cube.agent.report().templates
    assert info.template_id not in cube.agent.pool.sizes()
    assert info.template_id not in engine_index.read_text()  # its layers are freed
    assert not (cube.agent.storage.root / "snapshots" / tpl.snapshot.snapshot_id).exists()
    # the name is free again
    again = await AsyncTemplate.build(AsyncTemplate().from_template("base").run_cmd("echo again"), alias)
    assert again.template_id != info.template_id


FAKE_SKOPEO = """#!{python}
import json, os, sys
args = sys.argv[1:]
auth = args[args.index("--src-authfile") + 1] if "--src-authfile" in args else None
with open({out!r}, "w") as fh:
    json.dump({{"args": args, "auth": json.load(open(auth)) if auth else None,
               "mode": oct(os.stat(auth).st_mode & 0o777) if auth else None}}, fh)
os.makedirs(args[-1].split(":")[1])
"""


async def test_from_image_with_registry_credentials(cube, build_env, tmp_path, monkeypatch):
    """``from_image(..., username=, password=)``: the node's skopeo gets them in an auth file of
    its own (0600, deleted after), never on its command line; the build record never holds them."""
    import base64
    import json
    import sys

    out = tmp_path / "skopeo.json"
    fake = tmp_path / "bin" / "skopeo"
    fake.parent.mkdir()
    fake.write_text(FAKE_SKOPEO.format(python=sys.executable, out=str(out)))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    ref = "registry.example.com:5000/team/app:1"
    info = await AsyncTemplate.build(
        AsyncTemplate().from_image(ref, username="alice", password="s3cret-pw").run_cmd("true"), name())
    seen = json.loads(out.read_text())
    assert "s3cret-pw" not in " ".join(seen["args"]) and "--src-creds" not in seen["args"]
    assert seen["mode"] == "0o600"
    token = seen["auth"]["auths"]["registry.example.com:5000"]["auth"]
    assert base64.b64decode(token).decode() == "alice:s3cret-pw"
    assert not __import__("os").path.exists(seen["args"][seen["args"].index("--src-authfile") + 1])
    record = cube.service.store.get_build(info.build_id)
    assert "s3cret-pw" not in record.model_dump_json()
    assert any("credentials of 'alice'" in line.message for line in record.logs)
    # GCP: Google's basic-auth form; AWS: refused with what to do instead
    await AsyncTemplate.build(AsyncTemplate().from_gcp_registry(
        "gcr.io/p/app:1", service_account_json={"type": "service_account"}).run_cmd("true"), name())
    auth = json.loads(out.read_text())["auth"]["auths"]["gcr.io"]["auth"]
    assert base64.b64decode(auth).decode().startswith("_json_key:{")
    with pytest.raises(BuildException, match="get-login-password"):
        await AsyncTemplate.build(AsyncTemplate().from_aws_registry(
            "1.dkr.ecr.us-west-2.amazonaws.com/app:1", access_key_id="AKIA", secret_access_key="x",
            region="us-west-2").run_cmd("true"), name())


DOCKERFILE = """FROM e2bdev/base:latest
ARG FLAVOUR=plain
ENV APP_HOME=/opt/app LEVEL=3
RUN mkdir -p $APP_HOME && echo $FLAVOUR > $APP_HOME/flavour
WORKDIR /opt/app
COPY app.txt ./
COPY --chown=user:user --chmod=0640 dir/ /opt/app/dir/
ADD app.txt /opt/app/added.txt
USER user
EXPOSE 8000
CMD ["python3", "-m", "http.server", "8000"]
"""


async def test_from_dockerfile(cube, build_env, tmp_path):
    """Every step kind the SDK's Dockerfile parser emits runs: FROM e2bdev/base is ``base``,
    ARG/ENV -> ENV, RUN, WORKDIR, COPY/ADD (with --chown/--chmod), USER, CMD -> start command."""
    logs: list[str] = []
    tpl = AsyncTemplate(file_context_path=str(tmp_path)).from_dockerfile(DOCKERFILE)
    info = await AsyncTemplate.build(tpl, name(), on_build_logs=lambda e: logs.append(e.message))
    record = cube.service.store.get_build(info.build_id)
    assert record.status.value == "ready", logs
    plan = record.plan
    assert plan.from_image == "e2bdev/base:latest" and plan.start_cmd == "python3 -m http.server 8000"
    kinds = [s.type for s in plan.steps]
    assert set(kinds) == {"ENV", "RUN", "WORKDIR", "COPY", "USER"}, kinds
    copies = [s.args for s in plan.steps if s.type == "COPY"]
    assert ("dir/", "/opt/app/dir/", "user:user", "0640") in [tuple(a[:4]) for a in copies], copies
    assert any("[builder" in m and "RUN mkdir -p $APP_HOME" in m for m in logs), logs

    # a step kind Cube does not run: 400 naming it
    url, key = build_env
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}) as client:
        created = (await client.post("/v3/templates", json={"name": name()})).json()
        resp = await client.post(f"/v2/templates/{created['templateID']}/builds/{created['buildID']}",
                                 json={"fromTemplate": "base", "steps": [{"type": "HEALTHCHECK", "args": []}]})
        assert resp.status_code == 400 and "'HEALTHCHECK' is not supported" in resp.json()["message"], resp.text
