from __future__ import annotations

from pathlib import Path

import pytest

from cube_core.config import find_line, load_config, parse_config, resolve_secrets
from cube_core.errors import ConfigError
from cube_core.testing.fakes import FAKE_CONFIG

GOOD = FAKE_CONFIG.format(state_dir="/tmp/cube-test-state")


def test_default_config_names_real_plugins_never_fakes() -> None:
    cfg = load_config(None)
    data = cfg.data
    assert (data.vmm.plugin, data.network.plugin, data.storage.plugin, data.scheduler.plugin) == (
        "kvm", "ebpf", "cow", "binpack")
    assert [a.plugin for a in data.api] == ["e2b", "dashboard"]


def test_secret_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "s"
    secret.write_text("from-file\n")
    monkeypatch.setenv("CUBE_TEST_SECRET", "from-env")
    resolved = resolve_secrets({"a": {"env": "CUBE_TEST_SECRET"}, "b": {"file": str(secret)},
                                "c": {"env": "X", "other": 1}, "d": [1, {"env": "CUBE_TEST_SECRET"}]})
    assert resolved == {"a": "from-env", "b": "from-file", "c": {"env": "X", "other": 1}, "d": [1, "from-env"]}
    with pytest.raises(ConfigError, match="CUBE_TEST_MISSING"):
        resolve_secrets({"k": {"env": "CUBE_TEST_MISSING"}})


def test_find_line_points_at_the_key() -> None:
    text = '[core]\nport = 1\n\n[vmm]\nplugin = "kvm"\n[vmm.options]\naccel = "x"\n'
    assert find_line(text, "vmm", "accel") == 7
    assert find_line(text, "vmm") == 4
    assert find_line(text, "core", "port") == 2


def test_unknown_core_key_is_rejected_with_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(GOOD.replace("templates = []", "templates = []\nbogus = 1"), Path("/x/plugins.toml"))
    assert "bogus" in str(info.value) and "/x/plugins.toml:" in str(info.value)
