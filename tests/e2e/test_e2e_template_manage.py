"""A template from a Dockerfile (parsed by the unmodified E2B SDK) built on real microVMs: every
step kind the SDK emits runs in the build VM and the CMD is running in the snapshot; then the
template is deleted through the E2B API: refused while a sandbox uses it, then its warm-pool
member, snapshot and build layers are gone from the disk."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cube_e2e import CubeServer
from e2b import Sandbox, Template

pytestmark = pytest.mark.e2e

DOCKERFILE = """FROM e2bdev/base
ARG FLAVOUR=plain
ENV APP_HOME=/opt/app
RUN mkdir -p $APP_HOME && echo $FLAVOUR > $APP_HOME/flavour && id -un > $APP_HOME/built-by
WORKDIR /opt/app
COPY site/ ./site/
COPY --chown=user:user --chmod=0640 app.txt /opt/app/app.txt
USER user
RUN echo "$APP_HOME as $(id -un) in $(pwd)" > /home/user/env.txt
EXPOSE 8000
CMD ["python3", "-m", "http.server", "8000"]
"""


@pytest.fixture
def api(e2b_env: CubeServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=e2b_env.url, headers={"X-API-Key": e2b_env.key_a}, timeout=120) as client:
        yield client


def test_dockerfile_build_then_delete(e2b_env: CubeServer, api: httpx.Client, tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<p>from a Dockerfile</p>\n")
    (tmp_path / "app.txt").write_text("app\n")
    name = f"e2e-df-{uuid.uuid4().hex[:8]}"
    logs: list[str] = []
    info = Template.build(Template(file_context_path=str(tmp_path)).from_dockerfile(DOCKERFILE), name,
                          on_build_logs=lambda e: logs.append(e.message))
    sbx = Sandbox.create(template=name, timeout=300)
    try:
        assert sbx.files.read("/opt/app/flavour").strip() == "plain"
        assert sbx.files.read("/opt/app/built-by").strip() == "root"  # the Dockerfile's RUNs start as root
        assert sbx.files.read("/home/user/env.txt").strip() == "/opt/app as user in /opt/app"
        out = sbx.commands.run("stat -c '%U %a' /opt/app/app.txt; stat -c %U /opt/app/site/index.html")
        assert out.stdout.split("\n")[:2] == ["user 640", "root"], out.stdout
        # CMD was running when the snapshot was taken, in the WORKDIR
        # bounded, and on failure the server's own view (it hung once in CI, cause unknown)
        page = sbx.commands.run("curl -sS --max-time 20 http://127.0.0.1:8000/site/index.html || true",
                                timeout=60)
        if page.stdout != "<p>from a Dockerfile</p>\n":
            seen = sbx.commands.run("cat /tmp/cube-start.log; ss -tanp; ps -eo pid,stat,wchan:24,args; date",
                                    timeout=60)
            pytest.fail(f"curl: {page.stdout!r} {page.stderr!r}\n{seen.stdout}\nbuild logs: {logs}")

        storage = e2b_env.state_dir / "storage"
        index = json.loads((storage / "build-layers.json").read_text())
        layers = [Path(v["path"]) for v in index.values()  # frozen layers (a first USER step keys the image)
                  if isinstance(v, dict) and v.get("template") == info.template_id
                  and Path(v["path"]).parent.name.startswith("blayer-")]
        assert layers and all(p.is_file() for p in layers), index
        snapshots = sorted(p.name for p in (storage / "snapshots").glob(f"tmpl-{info.template_id}-*"))
        assert snapshots, "the template's snapshot is on the disk"

        busy = api.delete(f"/templates/{name}")
        assert busy.status_code == 409 and sbx.sandbox_id in busy.json()["message"], busy.text
        assert api.delete(f"/templates/{name}", headers={"X-API-Key": e2b_env.key_b}).status_code == 404
    finally:
        sbx.kill()
    gone = api.delete(f"/templates/{info.template_id}")
    assert gone.status_code == 204, gone.text
    assert not Template.exists(name)
    assert all(not p.exists() for p in layers), [p for p in layers if p.exists()]
    assert (storage / "images").is_dir() and any((storage / "images").glob("*.ext4"))  # images stay
    assert not list((storage / "snapshots").glob(f"tmpl-{info.template_id}-*"))
    assert info.template_id not in (storage / "build-layers.json").read_text()
    pooled = [s for s in Sandbox.list().next_items() if s.template_id == info.template_id]
    assert not pooled
    health = api.get("/health").json()
    assert info.template_id not in json.dumps(health)
