"""Template builds with the unmodified E2B SDK's ``Template`` builder on real microVMs: every step
runs in a build VM booted from ``base``, the result is a template whose snapshot has the start
command running; a rebuild that changes only the last step reruns only it; a failing step fails
the build with its exit code."""

from __future__ import annotations

import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cube_e2e import CubeServer, free_port, oci_layout
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


@pytest.fixture(scope="module")
def debian_layout(cube_server: CubeServer) -> Path:
    """The Debian tree the server's base image was made from (its debootstrap cache), as a one-layer
    OCI image layout in ``<state_dir>/oci/debian-base`` (where ``from_image("oci:debian-base")`` looks)."""
    layout = cube_server.state_dir / "oci" / "debian-base"
    if not layout.exists():
        tars = sorted(Path("/var/cache/cube/debootstrap").glob("bookworm-*.tar"), key=lambda p: p.stat().st_size)
        assert tars, "the e2e server builds base from a debootstrap tarball in /var/cache/cube/debootstrap"
        oci_layout(layout, tars[0])
    return layout


def check_built_from_image(name: str) -> None:
    sbx = Sandbox.create(template=name, timeout=120)
    try:
        assert sbx.files.read("/home/user/img.txt").strip() == "from-image"
        assert "bookworm" in sbx.files.read("/etc/os-release")
    finally:
        sbx.kill()


def test_build_from_a_local_oci_layout(e2b_env: CubeServer, debian_layout: Path) -> None:
    logs: list[str] = []
    name = f"e2e-img-{uuid.uuid4().hex[:8]}"
    Template.build(Template().from_image("oci:debian-base").run_cmd("echo from-image > /home/user/img.txt"),
                   name, on_build_logs=lambda e: logs.append(e.message))
    assert any("Using the OCI layout" in m for m in logs), logs
    check_built_from_image(name)


REGISTRY_USER, REGISTRY_PASSWORD = "alice", "s3cret-" + uuid.uuid4().hex[:8]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """Debian's docker-registry on loopback (no TLS) with htpasswd (bcrypt) auth, stopped after the test."""
    with warnings.catch_warnings():  # crypt is deprecated (gone in 3.13); it is the stdlib's bcrypt here
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # noqa: PLC0415

        hashed = crypt.crypt(REGISTRY_PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH))
    port = free_port()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"{REGISTRY_USER}:{hashed}\n")
    config = tmp_path / "registry.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'data'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n"
                      f"auth:\n  htpasswd:\n    realm: cube-e2e\n    path: {htpasswd}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=2).status_code == 401:  # up, wants auth
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "docker-registry did not start"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_build_from_a_private_registry_image(e2b_env: CubeServer, debian_layout: Path, registry: str) -> None:
    """``from_image(ref, username=, password=)`` against a registry with basic auth: without the
    credentials the pull is refused, with them it works; the password is in no record or log."""
    ref = f"{registry}/cube-test/debian:1"
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"--dest-creds={REGISTRY_USER}:{REGISTRY_PASSWORD}",
                    f"oci:{debian_layout}", f"docker://{ref}"], check=True, capture_output=True, timeout=600)
    with pytest.raises(BuildException, match="(?i)unauthorized|authentication required"):
        Template.build(Template().from_image(ref).run_cmd("true"), f"e2e-noauth-{uuid.uuid4().hex[:8]}")
    logs: list[str] = []
    name = f"e2e-reg-{uuid.uuid4().hex[:8]}"
    Template.build(Template().from_image(ref, username=REGISTRY_USER, password=REGISTRY_PASSWORD)
                   .run_cmd("echo from-image > /home/user/img.txt"), name,
                   on_build_logs=lambda e: logs.append(e.message))
    assert f"Pulling {ref}" in logs and f"Using the registry credentials of {REGISTRY_USER!r}" in logs, logs
    check_built_from_image(name)
    assert REGISTRY_PASSWORD not in e2b_env.log.read_text()
    for db in e2b_env.state_dir.glob("cube.db*"):  # the store and its WAL
        assert REGISTRY_PASSWORD.encode() not in db.read_bytes(), db
