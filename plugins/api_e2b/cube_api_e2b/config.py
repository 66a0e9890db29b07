"""Options of ``[[api]] plugin = "e2b"`` (validated from ``plugins.toml``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class E2bConfig(BaseModel):
    """How the E2B control plane and the edge proxy behave."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    domain: str | None = Field(
        default=None,
        description="Sandbox domain for domain mode, optionally with the TLS port (`cube.localhost:8443`). "
                    "Sandbox hosts are `<port>-<sandboxID>.<domain>`, the API is `api.<domain>`. "
                    "Default: `[core] domain`; unset means single-URL mode only.")
    envd_version: str | None = Field(
        default=None, description="envdVersion reported to the SDK; default: the template's own value")
    envd_port: int = Field(default=49983, ge=1, le=65535, description="guest port of envd")
    default_timeout_s: int | None = Field(
        default=None, ge=0,
        description="sandbox timeout when the request has none; default: `[core] default_timeout_s`")
    max_timeout_s: int = Field(default=86_400, ge=1, le=30 * 86_400, description="largest timeout a client may ask for")
    retry_after_s: int = Field(default=1, ge=0, le=3600,
                               description="`Retry-After` sent with retryable errors (429/503)")
    admin_host: str | None = Field(default=None, description="metrics listen address; default: `[core] host`")
    admin_port: int | None = Field(default=None, ge=0, le=65535,
                                   description="Prometheus metrics port; default: `[core] admin_port`")
    metrics_on_startup: bool = Field(
        default=True, description="start the metrics server when the app starts (its lifespan); "
                                  "a port already in use is logged, not fatal")
    tls_dir: Path | None = Field(default=None, description="CA and certificates for domain mode; "
                                                           "default: `<state_dir>/tls`")
    traffic_token_secret: str | None = Field(
        default=None, description="secret for traffic access tokens (use `{ env = ... }`); "
                                  "default: a random key kept in `<state_dir>/api_e2b/traffic.key`")
    proxy_connect_timeout_s: float = Field(default=5.0, gt=0, description="edge: connect to a sandbox port")
    proxy_idle_timeout_s: float = Field(default=620.0, gt=0,
                                        description="edge: longest silence on a proxied stream (upstream E2B: 620 s)")
    proxy_max_connections: int = Field(default=200, ge=1, description="edge: connections per sandbox")
    blocked_envd_paths: tuple[str, ...] = Field(
        default=("/init",), description="envd routes only the control plane may call; the edge answers 403")
