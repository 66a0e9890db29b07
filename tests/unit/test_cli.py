from __future__ import annotations

import json
from pathlib import Path

import pytest

from cube_core.testing.fakes import FAKE_CONFIG


@pytest.fixture
def good_config(tmp_path: Path) -> Path:
    path = tmp_path / "plugins.toml"
    path.write_text(FAKE_CONFIG.format(state_dir=tmp_path / "state"))
    return path


def test_config_check_ok(run_cube, good_config: Path) -> None:
    result = run_cube("config", "check", "--config", str(good_config))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


BROKEN = {
    "missing file": (None, "does not exist"),
    "malformed toml": ("[vmm\nplugin = 'fake'", "malformed TOML"),
    "unknown plugin": ('[vmm]\nplugin = "fake"', "no plugin 'kvmm' in cube.vmm — installed:"),
    "bad option": ('[storage]\nplugin = "fake"\noptions = {{ root = "{state_dir}/storage" }}',
                   "option 'colour'"),
    "missing slot": ("[scheduler]\nplugin = \"fake\"\n", "[scheduler]"),
    "secret not set": ('[[api]]\nplugin = "fake"', "CUBE_TEST_UNSET_SECRET"),
}


def _broken_text(kind: str, state: Path) -> str | None:
    good = FAKE_CONFIG.format(state_dir=state)
    if kind == "missing file":
        return None
    if kind == "malformed toml":
        return good.replace('[vmm]\nplugin = "fake"', "[vmm\nplugin = 'fake'")
    if kind == "unknown plugin":
        return good.replace('[vmm]\nplugin = "fake"', '[vmm]\nplugin = "kvmm"')
    if kind == "bad option":
        return good.replace(f'options = {{ root = "{state}/storage" }}',
                            f'options = {{ root = "{state}/storage", colour = "blue" }}')
    if kind == "missing slot":
        return good.replace('[scheduler]\nplugin = "fake"\n', "")
    if kind == "secret not set":
        return good.replace('[[api]]\nplugin = "fake"',
                            '[[api]]\nplugin = "fake"\noptions = { root = { env = "CUBE_TEST_UNSET_SECRET" } }')
    raise AssertionError(kind)


def test_five_broken_configs_give_distinct_helpful_errors(run_cube, tmp_path: Path) -> None:
    messages = []
    for kind, (_, expected) in BROKEN.items():
        path = tmp_path / f"{kind.replace(' ', '-')}.toml"
        text = _broken_text(kind, tmp_path / "state")
        if text is not None:
            path.write_text(text)
        result = run_cube("config", "check", "--config", str(path))
        assert result.returncode == 2, (kind, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, kind
        assert expected in result.stderr, (kind, result.stderr)
        messages.append(result.stderr)
    assert len(set(messages)) == len(BROKEN)


def test_bad_option_names_key_plugin_and_line(run_cube, tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(_broken_text("bad option", tmp_path / "state"))
    err = run_cube("config", "check", "--config", str(path)).stderr
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "colour" in text)
    assert f"{path}:{line}" in err and "plugin 'fake'" in err and "colour" in err


def test_debug_shows_traceback(run_cube, tmp_path: Path) -> None:
    result = run_cube("--debug", "config", "check", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_doctor_reports_isolation_honestly(run_cube) -> None:
    """The default plugins' checks run next to the core's; on a nested PVM host the VMM plugin
    says so, TCG is used, and that is a warning (exit 0), not a failure."""
    result = run_cube("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    text = " ".join(result.stdout.split())
    for source in ("core", "vmm:kvm", "network:ebpf", "storage:cow"):
        assert f" {source} " in text, source
    for check in ("python", "state-dir", "qemu", "kvm", "tcg", "tun", "bpf", "nftables", "image-tools"):
        assert f" {check} " in text, check
    vendor = any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))
    if Path("/sys/module/kvm_pvm").exists() or not vendor or not Path("/dev/kvm").exists():
        assert "isolation: tcg" in text
        if Path("/sys/module/kvm_pvm").exists():
            assert "nested PVM" in text and "isolation 'tcg'" in text


def test_doctor_with_fake_plugins(run_cube, good_config: Path) -> None:
    """Only the configured plugins are asked: the fake VMM warns that it isolates nothing."""
    result = run_cube("doctor", "--config", str(good_config))
    assert result.returncode == 0, result.stdout + result.stderr
    text = " ".join(result.stdout.split())
    assert "vmm:fake" in text and "isolation: none" in text
    assert "vmm:kvm" not in text and " bpf " not in text


def test_keys_lifecycle(run_cube, good_config: Path) -> None:
    created = run_cube("keys", "create", "--team", "acme", "--config", str(good_config))
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("e2b_") and len(secret) == 44
    listed = run_cube("keys", "ls", "--config", str(good_config))
    assert secret[:10] in listed.stdout and "acme" in listed.stdout and secret not in listed.stdout
    key_id = next(word for word in listed.stdout.split() if word.startswith("key_"))
    for not_an_id in (secret[:10], secret, key_id[:-1], "e2b_nope"):  # prefixes never revoke a key
        refused = run_cube("keys", "revoke", not_an_id, "--config", str(good_config))
        assert refused.returncode == 2 and "full key id" in refused.stderr, refused.stderr
    assert "yes" not in run_cube("keys", "ls", "--config", str(good_config)).stdout
    assert run_cube("keys", "revoke", key_id, "--config", str(good_config)).returncode == 0
    assert "yes" in run_cube("keys", "ls", "--config", str(good_config)).stdout


def test_plugins_and_schema(run_cube, good_config: Path) -> None:
    listed = run_cube("plugins", "--config", str(good_config))
    assert listed.returncode == 0
    rows = [line for line in listed.stdout.splitlines() if " fake " in line]
    assert len(rows) >= 5 and all("yes" in r for r in rows if "cube-core" in r)
    schema = json.loads(run_cube("config", "schema").stdout)
    assert "vmm" in schema["properties"]
    assert "cube.vmm:fake" in schema["x-plugin-options"]
