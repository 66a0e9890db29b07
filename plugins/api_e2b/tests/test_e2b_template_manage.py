"""Template management through the real ``e2b==2.63.0`` SDK's generated client (``e2b.api.client``)
on the fakes: a template with its builds, the paged v2 list, publish/unpublish (what the e2b CLI's
``template publish``/``unpublish`` send), who may do what with a published template, the deprecated
Docker registry build flow (410)."""

from __future__ import annotations

import httpx
import pytest
from cube_core.templatebuilds import TemplateNotOwnedError
from e2b import AsyncTemplate, ConnectionConfig
from e2b.api.client.api.templates import (
    get_templates,
    get_templates_template_id,
    get_v2_templates,
    patch_templates_template_id,
    patch_v_2_templates_template_id,
)
from e2b.api.client.models import TemplateUpdateRequest, TemplateWithBuilds
from e2b.api.client_async import get_api_client
from test_e2b_routes import assert_error
from test_e2b_template_build import name

OTHER_TEAMS = "of other teams"


def api(url: str, key: str):
    return get_api_client(ConnectionConfig(api_key=key, api_url=url))


def answer(detailed) -> httpx.Response:
    """The generated client's answer as it came, for the spec check."""
    return httpx.Response(int(detailed.status_code), content=detailed.content, headers=dict(detailed.headers))


async def build(alias: str, line: str = "echo one") -> tuple[str, str]:
    info = await AsyncTemplate.build(AsyncTemplate().from_template("base").run_cmd(line), alias)
    return info.template_id, info.build_id


async def test_a_template_with_its_builds_newest_first_a_page_at_a_time(cube, build_env, openapi):
    url, key = build_env
    alias = name()
    tid, first = await build(alias)
    _, second = await build(alias, "echo two")
    client = api(url, key)
    got = await get_templates_template_id.asyncio_detailed(tid, client=client)
    assert got.status_code == 200, got.content
    openapi.check("GET", "/templates/{templateID}", answer(got))
    body = got.parsed
    assert isinstance(body, TemplateWithBuilds)
    assert (body.template_id, body.public, body.names) == (tid, False, [alias])
    assert [str(b.build_id) for b in body.builds] == [second, first]
    assert [b.status.value for b in body.builds] == ["ready", "ready"]
    serving = body.builds[0]
    assert serving.envd_version and serving.disk_size_mb is not None  # the build the template serves
    assert body.updated_at >= body.created_at
    # by name too; one build a page, the token naming the last one served
    page = await get_templates_template_id.asyncio_detailed(alias, client=client, limit=1)
    assert [str(b.build_id) for b in page.parsed.builds] == [second]
    token = page.headers["x-next-token"]
    rest = await get_templates_template_id.asyncio_detailed(alias, client=client, limit=1, next_token=token)
    assert [str(b.build_id) for b in rest.parsed.builds] == [first] and "x-next-token" not in rest.headers
    bad = await cube.client.get(f"/templates/{tid}", params={"nextToken": "nope"}, headers=cube.headers(key))
    assert_error(bad, 400, "nextToken")


async def test_the_v2_list_pages_by_template_id(cube, build_env, openapi):
    url, key = build_env
    ids = sorted([(await build(name()))[0] for _ in range(3)] + ["base"])
    client = api(url, key)
    seen: list[str] = []
    token = None
    for _ in range(10):
        more = {"next_token": token} if token else {}
        page = await get_v2_templates.asyncio_detailed(client=client, limit=2, **more)
        assert page.status_code == 200
        openapi.check("GET", "/v2/templates", answer(page))
        seen += [t.template_id for t in page.parsed]
        token = page.headers.get("x-next-token")
        if not token:
            break
    assert seen == ids
    team = cube.service.authenticate(key).team_id
    assert (await get_v2_templates.asyncio_detailed(client=client, team_id=team)).status_code == 200
    other = await cube.client.get("/v2/templates", params={"teamID": "team-b"}, headers=cube.headers(key))
    assert_error(other, 403, "team-b")
    assert_error(await cube.client.get("/templates", params={"teamID": "team-b"}, headers=cube.headers(key)),
                 403, "team-b")


async def test_publish_then_unpublish(cube, build_env, openapi):
    url, key = build_env
    alias = name()
    tid, _ = await build(alias)
    a, b_key = api(url, key), cube.key("team-b")
    b, hb = api(url, b_key), cube.headers(b_key)

    # private: team b sees nothing of it
    assert tid not in {t.template_id for t in (await get_templates.asyncio_detailed(client=b)).parsed}
    for r in (await cube.client.get(f"/templates/{tid}", headers=hb),
              await cube.client.patch(f"/v2/templates/{tid}", json={"public": True}, headers=hb),
              await cube.client.patch(f"/templates/{alias}", json={"public": True}, headers=hb)):
        assert_error(r, 404, openapi=openapi)
    assert cube.service.store.get_template(tid).published is False

    # publish (what `e2b template publish` sends): the names come back
    done = await patch_v_2_templates_template_id.asyncio_detailed(tid, client=a,
                                                                  body=TemplateUpdateRequest(public=True))
    assert done.status_code == 200 and done.parsed.names == [alias]
    openapi.check("PATCH", "/v2/templates/{templateID}", answer(done))
    listed = {t.template_id: t for t in (await get_templates.asyncio_detailed(client=b)).parsed}
    assert listed[tid].public is True
    alias_seen = await cube.client.get(f"/templates/aliases/{alias}", headers=hb)
    assert alias_seen.status_code == 200 and alias_seen.json() == {"templateID": tid, "public": True}
    created = await cube.client.post("/sandboxes", json={"templateID": alias, "timeout": 60}, headers=hb)
    assert created.status_code == 201, created.text
    b_sandbox = created.json()["sandboxID"]
    snap = await cube.client.post(f"/sandboxes/{b_sandbox}/snapshots", json={"name": "b-snap"}, headers=hb)
    assert snap.status_code == 201, snap.text

    # ... but only its own team reads its builds, changes, rebuilds or deletes it
    for r in (await cube.client.get(f"/templates/{tid}", headers=hb),
              await cube.client.patch(f"/v2/templates/{tid}", json={"public": False}, headers=hb),
              await cube.client.patch(f"/templates/{tid}", json={"public": False}, headers=hb),
              await cube.client.delete(f"/templates/{tid}", headers=hb)):
        assert_error(r, 403, "another team")
    assert_error(await cube.client.post("/v3/templates", json={"name": alias}, headers=hb), 409)
    with pytest.raises(TemplateNotOwnedError):  # the dashboard's builds column reads through this
        cube.service.list_builds(tid, cube.service.authenticate(b_key).team_id)
    build_id = cube.service.store.get_template(tid).build_id
    for path in (f"/templates/{tid}/builds/{build_id}/status", f"/templates/{tid}/builds/{build_id}/logs",
                 f"/templates/{tid}/tags"):
        assert_error(await cube.client.get(path, headers=hb), 404)
    # the owner cannot delete it under team b's sandbox, and is not told its id
    refused = await cube.client.delete(f"/templates/{tid}", headers=cube.headers(key))
    assert_error(refused, 409, OTHER_TEAMS)
    assert b_sandbox not in refused.text

    # unpublish (the deprecated v1 route: 200, no body): team b's sandbox stays, new ones are refused
    undone = await patch_templates_template_id.asyncio_detailed(alias, client=a,
                                                                body=TemplateUpdateRequest(public=False))
    assert undone.status_code == 200 and undone.content == b""
    assert tid not in {t.template_id for t in (await get_templates.asyncio_detailed(client=b)).parsed}
    assert_error(await cube.client.post("/sandboxes", json={"templateID": alias}, headers=hb), 404)
    assert_error(await cube.client.get(f"/templates/{tid}", headers=hb), 404)
    still = await cube.client.get(f"/sandboxes/{b_sandbox}", headers=hb)
    assert still.status_code == 200 and still.json()["state"] == "running"
    # its own snapshot (taken while the template was public) still starts sandboxes, as E2B's do
    again = await cube.client.post("/sandboxes", json={"templateID": snap.json()["snapshotID"]}, headers=hb)
    assert again.status_code == 201, again.text
    assert (await cube.client.post(f"/sandboxes/{b_sandbox}/pause", headers=hb)).status_code == 204
    assert (await cube.client.post(f"/sandboxes/{b_sandbox}/resume", json={"timeout": 60},
                                   headers=hb)).status_code == 201

    # an empty update changes nothing; a rebuild keeps what was set
    assert (await patch_v_2_templates_template_id.asyncio_detailed(
        tid, client=a, body=TemplateUpdateRequest(public=True))).status_code == 200
    same = await cube.client.patch(f"/v2/templates/{tid}", json={}, headers=cube.headers(key))
    assert same.status_code == 200 and same.json() == {"names": [alias]}
    await build(alias, "echo rebuilt")
    rebuilt = cube.service.store.get_template(tid)
    assert rebuilt.published is True and rebuilt.updated_at is not None and rebuilt.updated_at > rebuilt.created_at


async def test_built_in_templates_are_public_and_not_a_teams(cube, openapi):
    h = cube.headers(cube.key())
    assert_error(await cube.client.patch("/v2/templates/base", json={"public": False}, headers=h), 403, "built in")
    assert_error(await cube.client.get("/templates/base", headers=h), 403, "built in")
    assert_error(await cube.client.get("/templates/nope", headers=h), 404, "nope")
    assert_error(await cube.client.patch("/templates/nope", json={"public": True}, headers=h), 404, "nope")
    r = await cube.client.get("/templates/aliases/base", headers=h)
    assert r.json() == {"templateID": "base", "public": True}


@pytest.mark.parametrize("path", ["/templates", "/v2/templates", "/templates/base", "/templates/base/builds/b1"])
async def test_the_docker_registry_build_flow_is_gone(cube, openapi, path):
    h = cube.headers(cube.key())
    r = await cube.client.post(path, json={"alias": "x", "dockerfile": "FROM ubuntu"}, headers=h)
    assert_error(r, 410, "Template.build", "e2b template create", openapi=openapi)
    assert r.headers["should-retry"] == "false"
    assert_error(await cube.client.post(path, json={}), 401)  # the key is checked first
