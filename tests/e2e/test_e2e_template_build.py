"""Template builds with the unmodified E2B SDK's ``Template`` builder on real microVMs: every step
runs in a build VM booted from ``base``, the result is a template whose snapshot has the start
command running; a rebuild that changes only the last step reruns only it; a failing step fails
the build with its exit code."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from cube_e2e import CubeServer
from e2b import BuildException, Sandbox, Template, wait_for_port

pytestmark = pytest.mark.e2e


def recipe(context: Path, last: str) -> Template:
    return (Template(file_context_path=str(context))
            .from_template("base")
            .set_envs({"GREETING": "hello from the build"})
            .run_cmd('echo "$GREETING" > /home/user/greeting.txt')
            .run_cmd("mkdir -p /opt/data && echo made-by-root > /opt/data/who && id -un > /opt/data/as", user="root")
            .copy("site/", "/home/user/site/")
            .make_symlink("/home/user/site/index.html", "/home/user/index-link.html")
            .set_workdir("/home/user/site")
            .run_cmd(last)
            .set_start_cmd("python3 -m http.server 8000", wait_for_port(8000)))


def test_build_create_rebuild_and_fail(e2b_env: CubeServer, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<h1>built by cube</h1>\n")
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    logs: list[str] = []
    info = Template.build(recipe(tmp_path, "echo first > last.txt && whoami > whoami.txt"), name,
                          on_build_logs=lambda e: logs.append(e.message))
    assert "Uploaded 'site/'" in logs, logs
    assert not any("CACHED" in m for m in logs)
    assert Template.exists(name)

    sbx = Sandbox.create(template=name, timeout=300)
    try:
        assert sbx.files.read("/home/user/greeting.txt").strip() == "hello from the build"
        assert sbx.files.read("/opt/data/who").strip() == "made-by-root"
        assert sbx.files.read("/opt/data/as").strip() == "root"
        assert sbx.files.read("/home/user/site/index.html") == "<h1>built by cube</h1>\n"
        assert sbx.files.read("/home/user/site/last.txt").strip() == "first"
        assert sbx.files.read("/home/user/site/whoami.txt").strip() == "user"  # the default build user
        out = sbx.commands.run("readlink /home/user/index-link.html; stat -c %U /home/user/site/index.html")
        assert out.stdout.split() == ["/home/user/site/index.html", "user"]
        # the start command was running when the snapshot was taken: it answers at once
        page = sbx.commands.run("curl -s http://127.0.0.1:8000/index.html", timeout=60)
        assert page.stdout == "<h1>built by cube</h1>\n"
    finally:
        sbx.kill()

    # only the last step changed: everything before it comes from the layer cache, site/ is not re-sent
    logs.clear()
    info2 = Template.build(recipe(tmp_path, "echo second > last.txt"), name,
                           on_build_logs=lambda e: logs.append(e.message))
    assert info2.template_id == info.template_id and info2.build_id != info.build_id
    assert "Skipping upload of 'site/', already cached" in logs, logs
    ran = [m for m in logs if m.startswith("[builder ")]
    cached = [m for m in logs if m.startswith("CACHED [builder ")]
    assert len(cached) == 6 and len(ran) == 1 and ran[0].startswith("[builder 7/7] RUN echo second"), logs
    sbx = Sandbox.create(template=name, timeout=120)
    try:
        assert sbx.files.read("/home/user/site/last.txt").strip() == "second"
    finally:
        sbx.kill()

    # a failing step fails the build with the step, its exit code and its output
    failing = (Template().from_template("base").run_cmd("echo before")
               .run_cmd("echo going-wrong >&2; exit 3"))
    logs.clear()
    with pytest.raises(BuildException) as err:
        Template.build(failing, f"{name}-bad", on_build_logs=lambda e: logs.append(e.message))
    assert "exit code 3" in str(err.value) and "going-wrong" in str(err.value), str(err.value)
    assert "going-wrong" in logs
