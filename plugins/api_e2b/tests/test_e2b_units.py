"""Pure pieces: the error table, edge routing, pagination, tokens, network options."""

from __future__ import annotations

import inspect
import stat
from datetime import UTC, datetime, timedelta

import cube_core
import pytest
from cube_core import AdmissionRejectedError, CubeError, NoCapacityError, Sandbox, SandboxState

from cube_api_e2b.auth import TrafficTokens, api_key_from, load_traffic_secret
from cube_api_e2b.context import split_host_port
from cube_api_e2b.errors import ERROR_TABLE, InvalidRequestError, error_headers, http_error
from cube_api_e2b.pagination import decode_token, encode_token, paginate
from cube_api_e2b.policy import network_policy
from cube_api_e2b.proxy import EdgeRequestError, Target, target_of
from cube_api_e2b.schemas import SandboxNetworkConfig


def test_every_public_cube_error_has_an_answer() -> None:
    errors = [obj for _, obj in inspect.getmembers(cube_core, inspect.isclass) if issubclass(obj, CubeError)]
    assert len(errors) > 15
    for cls in errors:  # each maps through itself or a parent more specific than CubeError
        assert cls is CubeError or any(c in ERROR_TABLE for c in cls.__mro__[:-4]), cls
    assert http_error(NoCapacityError(cpu=1, memory_mb=512)).status == 503
    assert http_error(AdmissionRejectedError(reason="x", retryable=True)).status == 429
    assert http_error(AdmissionRejectedError(reason="x", retryable=False)).status == 403
    assert http_error(InvalidRequestError(field="a", reason="b")).status == 400
    # a policy field the network plugin refuses (allow_out[0] in an always-denied range)
    assert http_error(cube_core.NetworkError("allow_out[0]: x", field="allow_out[0]", reason="x")).status == 400
    assert http_error(cube_core.NetworkError("slot setup failed")).status == 500

    class Custom(cube_core.SandboxNotFoundError):
        pass

    assert http_error(Custom(sandbox_id="s")).status == 404  # subclasses follow their parent
    retry = http_error(NoCapacityError(cpu=1, memory_mb=1))
    assert error_headers(retry, 3) == {"Should-Retry": "true", "Retry-After": "3"}
    assert error_headers(http_error(CubeError("x")), 3) == {"Should-Retry": "false"}


def hdrs(**kv: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in kv.items()]


def test_target_of() -> None:
    assert target_of(hdrs(e2b_sandbox_id="abc1", e2b_sandbox_port="49983"), None) == Target("abc1", 49983)
    assert target_of(hdrs(host="api.cube.test"), "cube.test") is None
    assert target_of(hdrs(host="8080-abc1.cube.test:8443"), "cube.test") == Target("abc1", 8080)
    assert target_of(hdrs(host="8080-ABC.Cube.Test"), "cube.test") == Target("abc", 8080)  # DNS ignores case
    assert target_of(hdrs(host="8080-a_b.cube.test"), "cube.test") is None  # ids are [a-z0-9]
    assert target_of(hdrs(host="8080-abc1.x.cube.test"), "cube.test") is None  # one label only
    assert target_of(hdrs(host="8080-abc1.cube.test"), None) is None  # no domain configured
    assert target_of(hdrs(host="127.0.0.1:3000"), "cube.test") is None
    # headers win over the host label
    assert target_of(hdrs(host="1-zzz.cube.test", e2b_sandbox_id="abc1", e2b_sandbox_port="2"),
                     "cube.test") == Target("abc1", 2)
    with pytest.raises(EdgeRequestError):
        target_of(hdrs(e2b_sandbox_id="abc1"), None)
    with pytest.raises(EdgeRequestError):
        target_of(hdrs(e2b_sandbox_id="abc1", e2b_sandbox_port="0"), None)
    with pytest.raises(EdgeRequestError):
        target_of(hdrs(host="70000-abc1.cube.test"), "cube.test")


def test_split_host_port() -> None:
    assert split_host_port("Cube.Localhost:8443") == ("cube.localhost", 8443)
    assert split_host_port("cube.localhost.") == ("cube.localhost", None)


def sandbox(i: int, started: datetime) -> Sandbox:
    return Sandbox(sandbox_id=f"s{i:02d}", template_id="base", team_id="t", state=SandboxState.RUNNING,
                   started_at=started, end_at=started + timedelta(minutes=5))


def test_pagination_with_equal_start_times() -> None:
    now = datetime.now(UTC)
    items = [sandbox(i, now if i % 2 else now - timedelta(seconds=i)) for i in range(7)]
    for order in ("asc", "desc"):
        seen, token = [], None
        while True:
            page, token = paginate(items, order=order, limit=3, next_token=token)
            seen += page
            if token is None:
                break
        assert [s.sandbox_id for s in seen] == [s.sandbox_id for s in sorted(
            items, key=lambda s: (s.started_at, s.sandbox_id), reverse=order == "desc")]
    assert decode_token(encode_token((now, "s01"))) == (now, "s01")
    for bad in ("", "@@", encode_token((now, "x"))[:-3]):
        with pytest.raises(InvalidRequestError):
            decode_token(bad or "e30")
    page, token = paginate([], limit=5)
    assert page == [] and token is None


def test_api_key_headers() -> None:
    assert api_key_from({"x-api-key": " e2b_1 "}) == "e2b_1"
    assert api_key_from({"authorization": "Bearer e2b_2"}) == "e2b_2"
    assert api_key_from({"authorization": "Basic e2b_2"}) is None
    assert api_key_from({}) is None


def test_traffic_tokens(tmp_path) -> None:
    secret = load_traffic_secret(None, tmp_path)
    assert load_traffic_secret(None, tmp_path) == secret  # kept across restarts
    assert stat.S_IMODE((tmp_path / "api_e2b" / "traffic.key").stat().st_mode) == 0o600
    tokens = TrafficTokens(secret)
    assert tokens.check("a", tokens.token_for("a")) and not tokens.check("b", tokens.token_for("a"))
    assert not tokens.check("a", None)
    assert TrafficTokens(b"another secret!!").token_for("a") != tokens.token_for("a")
    assert load_traffic_secret("configured-secret-value", tmp_path) == b"configured-secret-value"
    with pytest.raises(cube_core.ConfigError):
        TrafficTokens(b"short")


def test_network_policy() -> None:
    policy = network_policy(False, SandboxNetworkConfig(allow_out=["Example.COM", "*.a.b", "10.0.0.1"],
                                                        deny_out=["0.0.0.0/0", "::/0"], allow_public_traffic=False))
    assert policy.allow_internet_access is False and policy.allow_public_traffic is False
    assert policy.allow_out == ("example.com", "*.a.b", "10.0.0.1") and policy.deny_out == ("0.0.0.0/0", "::/0")
    assert network_policy(None, None).allow_internet_access is True
    for bad in ({"allow_out": ["a..b"]}, {"allow_out": ["-a.com"]}, {"deny_out": ["a.com"]}, {"https_ports": [443]}):
        with pytest.raises(InvalidRequestError):
            network_policy(None, SandboxNetworkConfig(**bad))


def test_api_prefix_is_a_config_error(tmp_path) -> None:
    """The API lives at the root of its host (E2B clients derive https://api.<domain>/); a
    ``prefix`` used to be accepted and silently ignored, now it says so."""
    from cube_core.config import parse_config
    from e2b_helpers import e2b_config_text

    text = e2b_config_text(tmp_path)
    assert parse_config(text).data.api[0].plugin == "e2b"
    bad = text.replace('[[api]]\nplugin = "e2b"', '[[api]]\nplugin = "e2b"\nprefix = "/e2b"')
    assert bad != text
    with pytest.raises(cube_core.ConfigError, match=r"\[api\.0\].*'prefix' is not a setting.*root of its host"):
        parse_config(bad)


async def test_pool_member_warm_up_reaches_envd_over_the_network() -> None:
    """The API plugin, which alone knows envd's port and protocol, warms a pool member by
    reaching envd at the member's address; an unreachable envd is logged, not raised."""
    import asyncio

    from cube_api_e2b.config import E2bConfig
    from cube_api_e2b.plugin import E2bApiPlugin

    requests: list[bytes] = []

    async def envd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(envd, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    now = datetime.now(UTC)
    member = Sandbox(sandbox_id="pool123", template_id="base", team_id="__pool__", state=SandboxState.CREATING,
                     started_at=now, end_at=now)
    async with server:
        await E2bApiPlugin(E2bConfig(envd_port=port)).cube_pool_member_warm_up(member, "127.0.0.1")
    assert len(requests) == 1 and requests[0].startswith(b"GET /health HTTP/1.1\r\n")
    await E2bApiPlugin(E2bConfig(envd_port=port)).cube_pool_member_warm_up(member, "127.0.0.1")  # closed: no raise
