"""What the routes, the edge proxy and the metrics of one app share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cube_core import CoreSettings

from cube_api_e2b.auth import TrafficTokens
from cube_api_e2b.config import E2bConfig
from cube_api_e2b.metrics import ApiMetrics
from cube_api_e2b.service import ControlPlane

FALLBACK_ENVD_VERSION = "0.4.0"


@dataclass
class E2bContext:
    service: ControlPlane
    config: E2bConfig
    settings: CoreSettings
    metrics: ApiMetrics
    tokens: TrafficTokens

    @property
    def domain(self) -> str | None:
        """The sandbox domain as sent to clients (may carry a port), or None in single-URL mode."""
        return self.config.domain or self.settings.domain or None

    @property
    def domain_host(self) -> str | None:
        """The domain without its port, lower-case: what Host headers are matched against."""
        domain = self.domain
        return split_host_port(domain)[0] if domain else None

    @property
    def default_timeout_s(self) -> int:
        if self.config.default_timeout_s is not None:
            return self.config.default_timeout_s
        return self.settings.default_timeout_s

    @property
    def tls_dir(self) -> Path:
        return self.config.tls_dir or self.settings.state_dir / "tls"

    def envd_version(self, template_envd_version: str | None) -> str:
        return self.config.envd_version or template_envd_version or FALLBACK_ENVD_VERSION


def split_host_port(value: str) -> tuple[str, int | None]:
    """``"a.b:8443"`` -> ``("a.b", 8443)``; ``"a.b"`` -> ``("a.b", None)`` (lower-cased, no trailing dot)."""
    host, sep, port = value.strip().rpartition(":")
    if sep and port.isascii() and port.isdigit() and len(port) <= 5 and "]" not in port:
        return host.lower().rstrip("."), int(port)
    return value.strip().lower().rstrip("."), None
