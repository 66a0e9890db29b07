"""Template management on real microVMs, through the unmodified e2b SDK's generated client
(``e2b.api.client``) and the e2b CLI (npm ``@e2b/cli``, pinned by sha512 and cached by content hash
as the dashboard's chart library is): team A builds a template, reads it with its builds, publishes
it with ``e2b template publish``; team B lists it and runs a sandbox from it, but cannot read its
builds or change it; ``e2b template unpublish`` takes it away again: B's running sandbox keeps
running, B's new sandboxes are refused; ``e2b template delete`` is refused while B's sandbox lives
(without naming it), then deletes it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from cube_dashboard.assets import fetch
from cube_e2e import CubeServer
from e2b import ConnectionConfig, Sandbox, Template
from e2b.api.client.api.templates import get_templates_template_id, get_v2_templates, patch_v_2_templates_template_id
from e2b.api.client.models import TemplateUpdateRequest, TemplateWithBuilds
from e2b.api.client_sync import get_api_client
from e2b.exceptions import SandboxException

pytestmark = pytest.mark.e2e

CLI = "@e2b/cli@2.19.0"
CLI_INTEGRITY = "sha512-/v9xE+0NSVBM/xghJX7MoEK3hrAQgcnllw8tv5pDhvZ8rT9x6b+SD66yBLAh/9u+xBikhpJnsPt89HjFAhzroA=="
"""The registry's ``dist.integrity`` of the tarball (its dist/index.js bundles its dependencies)."""
CACHE = Path(os.environ.get("CUBE_CACHE", "/var/cache/cube"))


@pytest.fixture(scope="module")
def e2b_cli() -> Path:
    node = shutil.which("node")
    assert node is not None, "node is not installed (scripts/apt-packages.txt names npm)"
    return fetch(CACHE, CLI, CLI_INTEGRITY, {"e2b.js": "package/dist/index.js"}, why="the e2e tests' e2b CLI")


def cli(e2b_cli: Path, server: CubeServer, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(e2b_cli), "E2B_API_KEY": key, "E2B_API_URL": server.url,
           "NO_COLOR": "1", "NO_UPDATE_NOTIFIER": "1"}
    return subprocess.run(["node", str(e2b_cli / "e2b.js"), *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=e2b_cli)


def listed(e2b_cli: Path, server: CubeServer, key: str) -> dict[str, dict[str, object]]:
    out = cli(e2b_cli, server, key, "template", "list", "-f", "json")
    assert out.returncode == 0, out.stderr
    return {t["templateID"]: t for t in json.loads(out.stdout)}


def test_publish_unpublish_and_delete_with_the_cli(e2b_env: CubeServer, e2b_cli: Path) -> None:
    name = f"e2e-pub-{uuid.uuid4().hex[:8]}"
    info = Template.build(Template().from_template("base").run_cmd("echo published > /home/user/who"), name)
    tid = info.template_id
    a = get_api_client(ConnectionConfig(api_key=e2b_env.key_a, api_url=e2b_env.url))
    b = get_api_client(ConnectionConfig(api_key=e2b_env.key_b, api_url=e2b_env.url))

    got = get_templates_template_id.sync_detailed(tid, client=a)
    assert isinstance(got.parsed, TemplateWithBuilds), got.content
    assert [str(x.build_id) for x in got.parsed.builds] == [info.build_id] and got.parsed.public is False
    assert get_templates_template_id.sync_detailed(tid, client=b).status_code == 404
    assert tid not in listed(e2b_cli, e2b_env, e2b_env.key_b)
    assert listed(e2b_cli, e2b_env, e2b_env.key_a)[tid]["public"] is False

    out = cli(e2b_cli, e2b_env, e2b_env.key_a, "template", "publish", tid, "-y")
    assert out.returncode == 0, out.stdout + out.stderr
    assert listed(e2b_cli, e2b_env, e2b_env.key_b)[tid]["public"] is True
    assert tid in {t.template_id for t in get_v2_templates.sync_detailed(client=b).parsed}
    sbx = Sandbox.create(template=name, api_key=e2b_env.key_b, timeout=300)
    try:
        assert sbx.files.read("/home/user/who").strip() == "published"
        assert get_templates_template_id.sync_detailed(tid, client=b).status_code == 403
        refused = patch_v_2_templates_template_id.sync_detailed(tid, client=b, body=TemplateUpdateRequest(public=False))
        assert refused.status_code == 403
        out = cli(e2b_cli, e2b_env, e2b_env.key_b, "template", "unpublish", tid, "-y")
        assert out.returncode != 0 and "another team" in out.stdout + out.stderr

        out = cli(e2b_cli, e2b_env, e2b_env.key_a, "template", "unpublish", tid, "-y")
        assert out.returncode == 0, out.stdout + out.stderr
        assert tid not in listed(e2b_cli, e2b_env, e2b_env.key_b)
        with pytest.raises(SandboxException, match="404: template .* not found"):
            Sandbox.create(template=name, api_key=e2b_env.key_b, timeout=60)
        assert sbx.commands.run("cat /home/user/who").stdout.strip() == "published"  # B's own keeps running

        out = cli(e2b_cli, e2b_env, e2b_env.key_a, "template", "delete", tid, "-y")
        assert out.returncode != 0 and "1 of other teams" in out.stdout + out.stderr
        assert sbx.sandbox_id not in out.stdout + out.stderr
    finally:
        sbx.kill()
    out = cli(e2b_cli, e2b_env, e2b_env.key_a, "template", "delete", tid, "-y")
    assert out.returncode == 0, out.stdout + out.stderr
    assert get_templates_template_id.sync_detailed(tid, client=a).status_code == 404
