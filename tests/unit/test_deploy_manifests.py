"""The deployment files under deploy/ (systemd units, example configs, Kubernetes manifests) are
checked offline: no cluster, no network, no running systemd.

- Kubernetes: every document validates against the API schemas of ``K8S_VERSION`` bundled in
  ``kubernetes-validate`` (strict: unknown fields are errors too), and kustomization.yaml lists
  every manifest. The node DaemonSet mounts every host path the plugins' defaults write to.
- systemd: ``systemd-analyze verify`` (Debian's ``systemd`` package) accepts the units with no
  warning at all (it only warns about unknown keys and bad values, so a warning is a failure).
- Configs: deploy/config/*.toml and the ConfigMap's copies pass ``cube config check``, with and
  without their ``[cluster]`` / ``[node]`` sections. Those arrive with ``cube master`` / ``cube
  node``: while ``cube_core.config`` lacks them, the whole-file check is an expected, strict
  failure (it fails if it passes); once the loader has them it is a plain test.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from cube_core.config import PluginsFile

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBE = DEPLOY / "kubernetes"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
CONFIGS = {p.name: p for p in sorted((DEPLOY / "config").glob("*.toml"))}
CUBE = str(Path(sys.executable).with_name("cube"))
K8S_VERSION = "1.30.0"
"""The oldest Kubernetes release the manifests are written for (still in wide use in 2026)."""
CLUSTER_SECTIONS = ("cluster", "node")
ENV = {"CUBE_CLUSTER_TOKEN": "t" * 64, "CUBE_STATE_URL": "postgresql://cube@db.invalid:5432/cube"}
NOT_YET = pytest.mark.xfail(not set(CLUSTER_SECTIONS) <= set(PluginsFile.model_fields), strict=True,
                            reason="[cluster]/[node] land with cube master/node")
"""Expected to fail only while the loader lacks the sections; once it has them the test must pass."""


def manifests() -> list[Path]:
    return sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_docs() -> list[dict[str, Any]]:
    return [d for p in manifests() for d in docs(p)]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in all_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} documents"
    return found[0]


def schema_problem(doc: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"
    except SchemaNotFoundError as exc:  # a misspelt kind or apiVersion must not pass unchecked
        return exc.message
    return None


# -- Kubernetes ---------------------------------------------------------------------------------


def test_there_are_manifests() -> None:
    kinds = {d["kind"] for d in all_docs()}
    assert {"Namespace", "Secret", "ConfigMap", "Deployment", "Service", "DaemonSet"} <= kinds


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path: Path) -> None:
    found = docs(path)
    assert found, f"{path.name} holds no document"
    problems = {f"{d['kind']}/{d['metadata']['name']}": schema_problem(d) for d in found}
    assert not {k: v for k, v in problems.items() if v}, problems


def test_the_validator_rejects_what_kubernetes_would() -> None:
    daemonset = one("DaemonSet", "cube-node")
    broken = yaml.safe_load(yaml.safe_dump(daemonset))
    broken["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    assert schema_problem(broken)
    unknown = yaml.safe_load(yaml.safe_dump(daemonset))
    unknown["spec"]["template"]["spec"]["containers"][0]["privilegd"] = True
    assert schema_problem(unknown)
    assert schema_problem({**daemonset, "kind": "DeamonSet"})


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == [p.name for p in manifests()]
    images = {d["image"] for doc in all_docs() if doc["kind"] in ("Deployment", "DaemonSet")
              for d in doc["spec"]["template"]["spec"].get("initContainers", []) +
              doc["spec"]["template"]["spec"]["containers"]}
    assert {i.split(":")[0] for i in images} == {i["name"] for i in kustomization["images"]}


def test_every_object_is_in_the_cube_namespace() -> None:
    for doc in all_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "cube", doc["metadata"]["name"]


def test_secret_holds_every_env_name_the_configs_reference() -> None:
    secret = one("Secret", "cube-cluster")
    referenced = {m for p in CONFIGS.values() for m in re.findall(r'\{\s*env\s*=\s*"([A-Z_]+)"', p.read_text())}
    assert referenced == set(ENV)
    assert set(secret["stringData"]) == referenced


def test_master_deployment_shape() -> None:
    master = one("Deployment", "cube-master")
    assert master["spec"]["replicas"] == 2
    pod = master["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][1:3] == ["master", "--config"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"secretRef": {"name": "cube-cluster"}} in container["envFrom"]
    port = tomllib.loads(CONFIGS["master.toml"].read_text())["core"]["port"]
    assert container["ports"][0]["containerPort"] == port
    service = one("Service", "cube-master")
    assert service["spec"]["selector"] == master["spec"]["selector"]["matchLabels"]


def _host_mounts(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mount, for hostPath volumes mounted at the same path as on the host."""
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {}
    for mount in pod["containers"][0]["volumeMounts"]:
        if mount["name"] in host_paths:
            assert host_paths[mount["name"]] == mount["mountPath"], mount
            mounts[mount["mountPath"]] = mount
    return mounts


def test_node_daemonset_reaches_every_host_path_the_plugins_use() -> None:
    kvm = pytest.importorskip("cube_vmm_kvm.config").KvmConfig()
    net = pytest.importorskip("cube_net_ebpf.config").EbpfNetConfig()
    cow = pytest.importorskip("cube_storage_cow.config").CowConfig()
    from cube_core.config import CoreSettings

    pod = one("DaemonSet", "cube-node")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert pod["containers"][0]["securityContext"]["privileged"] is True
    mounts = _host_mounts(pod)
    used = [CoreSettings().state_dir, kvm.run_dir, kvm.mem_dir, kvm.jail_root, kvm.uid_lease_dir, net.state_dir,
            net.bpf_cache_dir, net.bpf_pin_dir, cow.root, cow.cache, Path("/run/netns"), Path("/dev/kvm"),
            Path("/sys/fs/cgroup")]
    uncovered = [str(p) for p in used if not any(p == Path(m) or Path(m) in p.parents for m in mounts)]
    assert not uncovered, f"host paths the node writes but the pod does not mount from the host: {uncovered}"
    for shared in ("/run/netns", "/sys/fs/bpf"):
        assert mounts[shared].get("mountPropagation") == "Bidirectional", shared


def test_node_daemonset_gets_the_cluster_secret() -> None:
    container = one("DaemonSet", "cube-node")["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "cube-cluster"}}]
    assert container["command"][1:3] == ["node", "--config"]
    port = tomllib.loads(CONFIGS["node.toml"].read_text())["node"]["port"]
    assert container["ports"][0]["containerPort"] == container["ports"][0]["hostPort"] == port


def test_configmap_holds_the_example_configs() -> None:
    data = one("ConfigMap", "cube-config")["data"]
    assert data["master.toml"] == CONFIGS["master.toml"].read_text()
    example = tomllib.loads(CONFIGS["node.toml"].read_text())
    rendered = tomllib.loads(render_node_template(data["node.toml"], example["core"]["node_id"],
                                                  example["node"]["url"].split("//")[1].split(":")[0]))
    assert rendered == example


def render_node_template(text: str, node_name: str, host_ip: str) -> str:
    """What the DaemonSet's render-config init container does (its sed, checked below)."""
    return text.replace("__NODE_NAME__", node_name).replace("__HOST_IP__", host_ip)


def test_render_config_init_container_substitutes_both_placeholders() -> None:
    pod = one("DaemonSet", "cube-node")["spec"]["template"]["spec"]
    script = pod["initContainers"][0]["command"][-1]
    assert 's/__NODE_NAME__/${NODE_NAME}/' in script and 's/__HOST_IP__/${HOST_IP}/' in script
    out = subprocess.run(["sh", "-c", script.replace("/etc/cube-template/node.toml", "-").replace(
        "> /etc/cube/node.toml", "")], input=one("ConfigMap", "cube-config")["data"]["node.toml"],
        capture_output=True, text=True, env={"NODE_NAME": "kube-7", "HOST_IP": "10.1.2.3"}, check=True)
    node = tomllib.loads(out.stdout)
    assert node["core"]["node_id"] == "kube-7" and node["node"]["url"] == "http://10.1.2.3:7070"


# -- systemd ------------------------------------------------------------------------------------


def systemd_problems(units: list[Path], tmp_path: Path) -> str:
    """``systemd-analyze verify`` on copies whose ExecStart points at this venv's cube and this
    checkout's scripts (verify checks that the binary exists; /opt/cube/... are only the
    documented install paths)."""
    copies = []
    for unit in units:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/cube/bin/cube", CUBE)
                        .replace("/opt/cube/libexec/", f"{REPO}/scripts/"))
        copies.append(str(copy))
    out = subprocess.run(["systemd-analyze", "verify", *copies], capture_output=True, text=True, timeout=60)
    return (out.stdout + out.stderr).strip() or ("" if out.returncode == 0 else f"exit {out.returncode}")


def test_there_are_units() -> None:
    assert {u.name for u in UNITS} == {"cube.service", "cube-master.service", "cube-node.service",
                                       "cube-zram-swap.service"}


def test_zram_unit_runs_the_script_it_names_before_cube() -> None:
    unit = unit_settings("cube-zram-swap.service")
    assert unit["Type"] == ["oneshot"] and unit["RemainAfterExit"] == ["yes"]
    assert set(unit["Before"][0].split()) == {"cube.service", "cube-node.service"}
    for key, verb in (("ExecStart", "setup"), ("ExecStop", "teardown")):
        script, arg = unit[key][0].split()[:2]
        assert arg == verb and (REPO / "scripts" / Path(script).name).is_file(), unit[key]


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    assert systemd_problems(UNITS, tmp_path) == ""


def test_systemd_analyze_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    broken = tmp_path / "src" / "cube-node.service"
    broken.parent.mkdir()
    broken.write_text((DEPLOY / "systemd" / "cube-node.service").read_text().replace(
        "KillMode=process", "KillMode=proces\nDelegates=yes"))
    problems = systemd_problems([broken], tmp_path)
    assert "kill mode" in problems and "Delegates" in problems


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.parametrize("name", ["cube-node.service", "cube.service"])
def test_vm_running_units_leave_qemu_alive_and_share_the_host_mounts(name: str) -> None:
    unit = unit_settings(name)
    assert unit["KillMode"] == ["process"] and unit["Delegate"] == ["yes"]
    assert unit["Restart"] == ["on-failure"]
    private_mounts = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ReadWritePaths",
                      "ReadOnlyPaths", "InaccessiblePaths", "RuntimeDirectory", "TemporaryFileSystem",
                      "BindPaths", "PrivateMounts", "DynamicUser", "User"}
    assert not private_mounts & set(unit)


def test_master_unit_is_confined() -> None:
    unit = unit_settings("cube-master.service")
    assert unit["ExecStart"][0].split()[:2] == ["/opt/cube/bin/cube", "master"]
    assert unit["EnvironmentFile"] == ["/etc/cube/cluster.env"]
    for key, value in {"DynamicUser": "yes", "ProtectSystem": "strict", "NoNewPrivileges": "yes",
                       "CapabilityBoundingSet": "", "Restart": "on-failure"}.items():
        assert unit[key] == [value], key
    state_dir = tomllib.loads(CONFIGS["master.toml"].read_text())["core"]["state_dir"]
    assert f"/var/lib/{unit['StateDirectory'][0]}" == state_dir  # its only writable directory


def test_master_pod_can_write_its_state_dir() -> None:
    state_dir = tomllib.loads(CONFIGS["master.toml"].read_text())["core"]["state_dir"]
    pod = one("Deployment", "cube-master")["spec"]["template"]["spec"]
    writable = {m["name"] for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == state_dir}
    assert writable and all("emptyDir" in v for v in pod["volumes"] if v["name"] in writable)


# -- example configs ----------------------------------------------------------------------------


def config_texts() -> dict[str, str]:
    data = one("ConfigMap", "cube-config")["data"]
    return {**{name: p.read_text() for name, p in CONFIGS.items()},
            "configmap:master.toml": data["master.toml"],
            "configmap:node.toml": render_node_template(data["node.toml"], "kube-7", "10.1.2.3")}


def without_sections(text: str, names: tuple[str, ...]) -> str:
    """``text`` without the top-level tables ``[name]`` / ``[name.sub]`` of ``names``."""
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        header = re.match(r"^\s*\[\[?\s*([A-Za-z0-9_-]+)", line)
        if header:
            skipping = header.group(1) in names
        if not skipping:
            kept.append(line)
    return "".join(kept)


def config_check(run_cube: Any, text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "plugins.toml"
    path.write_text(text)
    return run_cube("config", "check", "--config", str(path), env=ENV)


def test_example_configs_have_the_cluster_sections() -> None:
    for name, text in config_texts().items():
        parsed = tomllib.loads(text)
        assert parsed["cluster"]["token"] == {"env": "CUBE_CLUSTER_TOKEN"}, name
        assert parsed["cluster"]["down_after_s"] > parsed["cluster"]["heartbeat_s"], name
        assert without_sections(text, CLUSTER_SECTIONS) != text
        assert "cluster" not in tomllib.loads(without_sections(text, CLUSTER_SECTIONS))
    node = tomllib.loads(CONFIGS["node.toml"].read_text())
    assert set(node["node"]) == {"host", "port", "url"} and node["core"]["node_id"] != "local"
    for name in CONFIGS:
        assert tomllib.loads(CONFIGS[name].read_text())["core"]["state"] == {"env": "CUBE_STATE_URL"}, name


@pytest.mark.parametrize("name", sorted(config_texts()))
def test_example_config_passes_cube_config_check_without_cluster_sections(name: str, run_cube: Any,
                                                                          tmp_path: Path) -> None:
    out = config_check(run_cube, without_sections(config_texts()[name], CLUSTER_SECTIONS), tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_config_check_fails_on_a_bad_example(run_cube: Any, tmp_path: Path) -> None:
    text = without_sections(CONFIGS["node.toml"].read_text(), CLUSTER_SECTIONS).replace('"binpack"', '"binpak"')
    assert config_check(run_cube, text, tmp_path).returncode != 0


@NOT_YET
@pytest.mark.parametrize("name", sorted(config_texts()))
def test_example_config_passes_cube_config_check(name: str, run_cube: Any, tmp_path: Path) -> None:
    out = config_check(run_cube, config_texts()[name], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
