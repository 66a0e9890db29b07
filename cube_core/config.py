"""plugins.toml: parsing, validation and secret references.

The file names one plugin per slot (``[vmm]``, ``[network]``, ``[storage]``, ``[scheduler]``), one
or more API plugins (``[[api]]``) and hook-only extensions. Options are validated later by each
plugin's own ``Config`` model (see ``_host.py``); here we only check the shape and resolve
``{ env = "NAME" }`` / ``{ file = "path" }`` secret references.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cube_core.errors import ConfigError

SLOTS: tuple[str, ...] = ("vmm", "network", "storage", "scheduler")
NAMESPACES: dict[str, str] = {
    "vmm": "cube.vmm",
    "network": "cube.network",
    "storage": "cube.storage",
    "scheduler": "cube.scheduler",
    "api": "cube.api",
    "extensions": "cube.extension",
}


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PoolSettings(_Model):
    size: int = Field(default=2, ge=0, le=1000)
    """Restored, paused VMs kept ready per template (0: no pool)."""
    max_memory_mb: int = Field(default=4096, ge=0)
    """Memory the pool may hold (an eighth of each member's guest RAM counts: what a clone
    privately owns); the pool also stops refilling while host memory is short."""
    warm_up: bool = True
    """Before a member is paused, its guest runs once what a new sandbox's first requests run
    (a command through envd, a file stat), so those paths are loaded (under TCG: translated)
    when a user arrives."""
    identity_at_join: bool = True
    """A member is personalized, when it joins, as the sandbox it will become: its id (the
    sandbox's), envd access token, hostname, machine-id, fresh RNG state. A create that takes it
    only sets the egress policy and answers; the sandbox's start then resumes it and sends the
    guest the clock and env vars (the edge holds the sandbox's first request, and every other
    operation on it waits, until that start is over). ``false``: the old path, the whole
    personalization at create."""
    background_refill: bool = True
    """Refill at a lower priority than creates: a member is prepared (restored, personalized,
    warmed up) at the lowest CPU priority of the node's VMs until a create takes it (where the
    VMM supports it), and the refill does not start the next member while creates are being
    served (waiting at most a few seconds). ``false``: the old way, members prepared at the
    same priority as the sandboxes users wait for, whenever one is missing."""


class CoreSettings(_Model):
    """The ``[core]`` section."""

    state_dir: Path = Path("/var/lib/cube")
    state: str | dict[str, str] | None = None
    """Where the master keeps its records: unset for SQLite at ``<state_dir>/cube.db`` (nothing to
    install), or a PostgreSQL URL ``postgresql://user@host:5432/db`` (several masters share it). A
    URL with a password can be a secret reference: ``{ env = "NAME" }`` or ``{ file = "/path" }``."""
    host: str = "127.0.0.1"
    port: int = Field(default=3000, ge=0, le=65535)
    admin_port: int = Field(default=3001, ge=0, le=65535)
    domain: str | None = None
    node_id: str = "local"
    kernel: str = "auto"
    """Path of the guest vmlinux; ``auto`` to let the VMM driver build/reuse its kernel (kvm: its
    ``kernel/build.sh``, falling back to Debian's stock kernel + initramfs when the build is
    impossible); ``stock`` for that fallback only; ``none`` for VMM drivers that need no kernel (the fakes)."""
    templates: tuple[str, ...] = ("base", "code-interpreter-v1")
    """Templates ``cube serve`` builds on first start."""
    default_timeout_s: int = Field(default=300, ge=1)
    max_sandboxes: int = Field(default=200, ge=1)
    volume_size_mb: int = Field(default=1024, ge=1, le=256 << 10)
    """The quota (filesystem size) of a new volume when ``POST /volumes`` names none (the SDK's
    ``Volume.create`` cannot); at most 256 GiB."""
    max_parallel_starts: int = Field(default=4, ge=1)
    """Creates that miss the warm pool start their VM (restore or boot, then personalize) at most
    this many at a time; the others wait their turn in arrival order (first come, first served),
    so a burst of creates on a small host queues instead of starving every guest of CPU."""
    sample_interval_s: float = Field(default=5.0, gt=0, le=3600)
    """How often each node reads its running sandboxes' metrics and new log entries from their guest
    agents (``/sandboxes/{id}/metrics`` history, ``/sandboxes/{id}/logs``)."""
    sample_idle_interval_s: float = Field(default=600.0, ge=0, le=3600)
    """A running sandbox whose VM the VMM counts idle (``VmmDriver.activity``: for ``kvm``, its QEMU
    under ``idle_reclaim_cpu_pct`` of a core, read on the host without waking the guest) is asked
    again only once this long has passed since its last answer: each ask wakes the guest (under
    TCG a few ms of emulated CPU) and, with idle reclaim, faults ~10 MiB back in that the reclaimer
    then pages out again; at 60 s (the default until session 22) that cycle was ~90 % of what
    ``cube serve`` did with 300 idle sandboxes (docs/bench.md). In the rounds between, its last
    answer is stored again with the round's time and the CPU use the host counted, so its metrics
    keep one sample per ``sample_interval_s`` (memory and disk as last answered); its new log
    entries can arrive this much later. The VMM finding it busy brings it back to every round
    until an answer taken two rounds after that.
    ``0``: every running sandbox is asked every round. Only with a VMM that reports activity
    (``kvm`` does)."""
    observations_keep_s: int = Field(default=7 * 86400, ge=60)
    """How long those metric samples and log entries are kept, also after their sandbox ended."""
    pause_to_disk_after_s: float = Field(default=600.0, ge=0)
    """A sandbox paused this long is written out to disk (its memory and devices, incremental over
    its template's snapshot) and its VM process ends: it then costs disk, not RAM; a resume (by
    ``connect``, or by traffic with auto-resume) restores it. ``0``: never (paused sandboxes stay
    in RAM). See docs/lifecycle.md."""
    pause_to_disk_below_mb: int = Field(default=512, ge=0)
    """Memory pressure: while a node reports less available memory than this (MiB), its paused
    sandboxes are written out to disk at once, whatever ``pause_to_disk_after_s`` says. ``0``: off."""
    pool: PoolSettings = Field(default_factory=PoolSettings)
    boot_mode: Literal["snapshot", "cold"] = "snapshot"
    """How a sandbox's VM starts when it does not come from the warm pool: ``snapshot`` restores
    the template's snapshot; ``cold`` boots the template image from scratch (seconds under TCG:
    the baseline of ``cube bench create``; set ``pool = { size = 0 }`` too, or pool members, which
    are restored from the snapshot, still serve creates). Creates from a sandbox snapshot always
    restore it."""

    secrets_key: dict[str, str] | str | None = None
    """The key that encrypts the teams' secrets (``/secrets``) at rest: a secret reference,
    ``{ env = "CUBE_SECRETS_KEY" }`` or ``{ file = "/etc/cube/secrets.key" }``, to 32 random bytes
    in base64 (``openssl rand -base64 32``) or 64 hex digits. Unset: the ``/secrets`` routes answer
    403 saying so. Losing it loses every secret (they cannot be decrypted)."""

    operator_token: dict[str, str] | None = None
    """The operator's token, a secret reference (``{ env = "CUBE_OPERATOR_TOKEN" }`` or
    ``{ file = "/etc/cube/operator-token" }``) to 32+ random characters: it signs in to the
    dashboard's all-teams view and reads every team's ``GET /events``. Unset: neither exists."""

    def operator_secret(self) -> str | None:
        """The resolved operator token (None when unset); a ``ConfigError`` when too short."""
        if self.operator_token is None:
            return None
        value = resolve_secrets(self.operator_token, where="[core] operator_token")
        if not isinstance(value, str) or len(value) < 32:
            raise ConfigError("[core] operator_token must be a string of at least 32 characters "
                              "(e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("operator_token")
    @classmethod
    def _operator_token_shape(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and set(value) not in ({"env"}, {"file"}):
            raise ValueError('operator_token is a secret reference: { env = "NAME" } or { file = "/path" }')
        return value

    @field_validator("secrets_key")
    @classmethod
    def _secrets_key_shape(cls, value: dict[str, str] | str | None) -> dict[str, str] | str | None:
        if isinstance(value, str):  # never echoed: it is the key
            raise ValueError('secrets_key is a secret reference, never the key itself: '
                             '{ env = "NAME" } or { file = "/path" }')
        if value is not None and set(value) not in ({"env"}, {"file"}):
            raise ValueError('secrets_key is a secret reference: { env = "NAME" } or { file = "/path" }')
        return value

    @field_validator("state")
    @classmethod
    def _state_shape(cls, value: str | dict[str, str] | None) -> str | dict[str, str] | None:
        if isinstance(value, dict) and set(value) not in ({"env"}, {"file"}):
            raise ValueError('a secret reference is { env = "NAME" } or { file = "/path" }')
        problem = _state_problem(value) if isinstance(value, str) else None
        if problem:  # the value itself is never echoed: it may hold a password
            raise ValueError(problem)
        return value


STATE_SCHEMES = ("postgresql://", "postgres://")


def state_url(value: str | dict[str, str] | None) -> str | None:
    """``[core] state`` with its secret reference resolved and its scheme checked (``None``: SQLite)."""
    if value is None:
        return None
    url = resolve_secrets(value, where="[core] state")
    if not isinstance(url, str):
        raise ConfigError('[core] state: expected a postgresql:// URL or a secret reference '
                          '{ env = "NAME" } / { file = "/path" }')
    problem = _state_problem(url)
    if problem:
        raise ConfigError(f"[core] state: {problem}")
    return url


def _state_problem(url: str) -> str | None:
    if url.startswith(STATE_SCHEMES):
        return None
    shown = url.split("://", 1)[0] + "://..." if "://" in url else "a value without a scheme"
    return (f"{shown} is not a PostgreSQL URL (postgresql://user@host:5432/db); "
            "leave state unset for SQLite at <state_dir>/cube.db")


class TeamQuota(_Model):
    """Limits of one team; ``None`` means no limit of that kind (the host-wide ``[core]
    max_sandboxes`` still applies)."""

    max_sandboxes: int | None = Field(default=None, ge=0)
    """Sandboxes the team may hold at once: starting, running **and paused** (a paused sandbox
    keeps its memory image and disk, so it counts)."""
    max_running: int | None = Field(default=None, ge=0)
    """Of those, how many may be starting or running; resuming a paused sandbox needs a free slot."""
    max_snapshots: int | None = Field(default=None, ge=0)
    """Snapshots the team may keep (forks take one too); deleting one frees its slot."""
    max_network_rules: int | None = Field(default=None, ge=0)
    """Entries of one sandbox's egress policy (``allowOut`` + ``denyOut``)."""


class QuotaSettings(TeamQuota):
    """The ``[quotas]`` section: limits for every team, and ``[quotas.teams.<name>]`` overrides.

    A team's own table replaces only the limits it names; the others come from ``[quotas]``.
    """

    teams: dict[str, TeamQuota] = Field(default_factory=dict)

    def for_team(self, name: str) -> TeamQuota:
        base = TeamQuota(**{k: getattr(self, k) for k in TeamQuota.model_fields})
        own = self.teams.get(name)
        return base.model_copy(update=own.model_dump(exclude_unset=True)) if own is not None else base


class WebhookSettings(_Model):
    """The ``[webhooks]`` section: where teams' webhooks may point and how deliveries are retried.

    A webhook URL is an outbound request from the host chosen by a tenant (server-side request
    forgery): by default only global unicast addresses are called (every address the name resolves
    to, checked at each attempt, and the request goes to the checked address); loopback, private,
    link-local (cloud metadata), shared (Cube's guests) and reserved addresses are refused unless
    ``allow_networks`` names them. Redirects are never followed and no proxy from the environment
    is used. See docs/webhooks.md."""

    allow_networks: tuple[str, ...] = ()
    """CIDRs a webhook may call besides public addresses, e.g. ``["10.20.0.0/24"]`` for an internal
    receiver, ``["127.0.0.0/8"]`` for tests."""
    deny_networks: tuple[str, ...] = ()
    """CIDRs never called, even public ones or inside ``allow_networks``."""
    require_https: bool = False
    """Refuse ``http://`` URLs (the signature proves the sender, but the body travels in clear)."""
    max_per_team: int = Field(default=20, ge=0, le=1000)
    timeout_s: float = Field(default=15.0, gt=0, le=120)
    """One attempt: connect, send, and the receiver's status line (the body is not read)."""
    max_attempts: int = Field(default=8, ge=1, le=50)
    """Attempts of one delivery before it is recorded ``failed``."""
    backoff_s: float = Field(default=5.0, gt=0, le=86400)
    """Delay after the first failed attempt; it doubles after each one (with +-20 % jitter)."""
    backoff_max_s: float = Field(default=3600.0, gt=0, le=7 * 86400)
    """The longest delay between two attempts (also caps a receiver's ``Retry-After``)."""
    poll_s: float = Field(default=1.0, gt=0, le=60)
    """How often each master looks for due deliveries (new events wake it at once)."""

    @field_validator("allow_networks", "deny_networks")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a network (CIDR like 10.0.0.0/8 or an address)") from exc
        return value

    def networks(self, which: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(c, strict=False) for c in getattr(self, which))


class SlotSection(_Model):
    plugin: str
    options: dict[str, Any] = Field(default_factory=dict)


class ApiSection(SlotSection):
    """An ``[[api]]`` entry. Its routes are served at the root of the API host: E2B clients derive
    ``https://api.<domain>`` with no path (``E2B_API_URL``, the only way to give one, is deprecated
    in the SDK), so there is no ``prefix`` setting (it used to be accepted and ignored)."""

    @model_validator(mode="before")
    @classmethod
    def _no_prefix(cls, data: Any) -> Any:
        if isinstance(data, dict) and "prefix" in data:
            raise ValueError("'prefix' is not a setting: the API is served at the root of its host, where E2B "
                             "clients expect it (https://api.<domain>/); remove the line")
        return data


class ExtensionsSection(_Model):
    enabled: tuple[str, ...] = ()


class ClusterSettings(_Model):
    """The ``[cluster]`` section: what masters and nodes share (``cube master``, ``cube node``)."""

    token: str | dict[str, str] | None = None
    """Shared secret of masters and nodes: every request between them carries it (header
    ``x-cube-cluster-token``). Required by ``cube master`` and ``cube node``; give it as a secret
    reference (``{ env = "CUBE_CLUSTER_TOKEN" }`` or ``{ file = "/etc/cube/cluster-token" }``).
    At least 32 characters."""
    heartbeat_s: float = Field(default=2.0, gt=0, le=60)
    """How often a node writes its report (capacity, usage, templates) to the state store."""
    down_after_s: float = Field(default=10.0, gt=0, le=3600)
    """A node whose last report is older than this is marked down: its sandboxes answer 503 until
    it reports again, and new sandboxes go elsewhere."""
    masters: tuple[str, ...] = ()
    """Nodes only: base URLs of the masters' API (``http://10.0.0.2:3000``, or one load balancer
    in front of them), tried in order. A node asks a master for each ``${e2b.secrets.<name>}``
    its egress proxy resolves (docs/cluster.md "Secrets"); unset, such requests answer 502."""
    secret_lookups_per_s: float = Field(default=20.0, gt=0, le=10000)
    """Secret look-ups one sandbox may cause per second (the node's egress proxy resolving the
    placeholders of its ``network.rules``), counted by the node before it asks and by each master
    before it reads the store; beyond it the request answers 502 to the guest."""
    secret_lookup_burst: int = Field(default=40, ge=1, le=100000)
    """Look-ups one sandbox may make at once above that rate."""

    @field_validator("masters")
    @classmethod
    def _master_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            if not re.fullmatch(r"https?://[^/?#\s]+/?", url):
                raise ValueError(f"masters: {url!r} is not a base URL (http://host:port)")
        return tuple(url.rstrip("/") for url in value)

    @model_validator(mode="after")
    def _window(self) -> ClusterSettings:
        if self.down_after_s < 2 * self.heartbeat_s:
            raise ValueError("down_after_s must be at least twice heartbeat_s (one late heartbeat "
                             "must not mark a node down)")
        return self

    def secret(self) -> str:
        """The resolved token; a ``ConfigError`` when missing or too short."""
        if self.token is None:
            raise ConfigError('[cluster] token is required by cube master and cube node: '
                              'token = { env = "CUBE_CLUSTER_TOKEN" } (32+ random characters)')
        value = resolve_secrets(self.token, where="[cluster] token")
        if not isinstance(value, str) or len(value) < 32:
            raise ConfigError("[cluster] token must be a string of at least 32 characters "
                              "(e.g. `openssl rand -hex 32`)")
        return value


class NodeSettings(_Model):
    """The ``[node]`` section: where ``cube node`` serves masters."""

    host: str = "127.0.0.1"
    port: int = Field(default=7070, ge=1, le=65535)
    url: str | None = None
    """How masters reach this node (``http://10.0.0.5:7070``); default ``http://<host>:<port>``."""

    def advertised(self) -> str:
        return self.url or f"http://{self.host}:{self.port}"


class TelemetrySettings(_Model):
    """The ``[telemetry]`` section: logs and traces (docs/observability.md)."""

    log_format: Literal["auto", "json", "console"] = "auto"
    """``json``: one JSON object per line (production, log shippers); ``console``: coloured
    human lines; ``auto``: console on a terminal, JSON otherwise. ``$CUBE_LOG_FORMAT`` overrides."""
    log_level: str = "info"
    """``debug``, ``info``, ``warning``, ``error``; ``$CUBE_LOG_LEVEL`` overrides."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP collector base URL (``http://127.0.0.1:4318``; spans go to ``<url>/v1/traces``).
    Unset (and no ``$OTEL_EXPORTER_OTLP_ENDPOINT``): no tracing at all, nothing imported."""
    service_name: str = "cube"
    """The ``service.name`` resource attribute of the spans (each process adds its role)."""
    otlp_headers: dict[str, str] = Field(default_factory=dict)
    """Extra HTTP headers for the collector (e.g. an auth token)."""


class PluginsFile(_Model):
    """The whole ``plugins.toml``."""

    core: CoreSettings = Field(default_factory=CoreSettings)
    vmm: SlotSection
    network: SlotSection
    storage: SlotSection
    scheduler: SlotSection
    api: tuple[ApiSection, ...] = ()
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    node: NodeSettings = Field(default_factory=NodeSettings)
    extensions: ExtensionsSection = Field(default_factory=ExtensionsSection)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)


class LoadedConfig(_Model):
    data: PluginsFile
    path: Path | None = None
    text: str = ""

    def line_of(self, section: str, key: str | None = None) -> int | None:
        """Best-effort 1-based line of ``key`` inside ``[section]`` (or of the section header)."""
        return find_line(self.text, section, key)


def find_line(text: str, section: str, key: str | None = None) -> int | None:
    lines = text.splitlines()
    header = re.compile(rf"^\s*\[\[?\s*{re.escape(section)}(\.options)?\s*\]\]?\s*$")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        return None
    if key is None:
        return start + 1
    pattern = re.compile(rf"(^|[{{,\s]){re.escape(key)}\s*=")
    for i in range(start, len(lines)):
        if i > start and re.match(r"^\s*\[", lines[i]) and not lines[i].strip().startswith(
                f"[{section}."):
            break
        if pattern.search(lines[i]):
            return i + 1
    return start + 1


def default_config_text() -> str:
    """The embedded default ``plugins.toml`` (real plugins; never the fakes)."""
    return resources.files("cube_core").joinpath("default_plugins.toml").read_text()


def resolve_secrets(value: Any, *, where: str = "options") -> Any:
    """Replace ``{env = NAME}`` and ``{file = PATH}`` tables by the secret they point to."""
    if isinstance(value, dict):
        if set(value) == {"env"}:
            name = value["env"]
            if name not in os.environ:
                raise ConfigError(f"{where}: environment variable {name!r} is not set")
            return os.environ[name]
        if set(value) == {"file"}:
            path = Path(value["file"])
            try:
                return path.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{where}: cannot read secret file {path}: {exc.strerror}") from exc
        return {k: resolve_secrets(v, where=f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_secrets(v, where=where) for v in value]
    return value


def parse_config(text: str, path: Path | None = None) -> LoadedConfig:
    where = str(path) if path else "<default plugins.toml>"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: malformed TOML: {exc}") from exc
    try:
        data = PluginsFile.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            line = find_line(text, loc[0], loc[-1] if len(loc) > 1 else None) if loc else None
            at = f"{where}:{line}" if line else where
            if err["type"] == "missing" and len(loc) == 1 and loc[0] in (*SLOTS, "api"):
                problems.append(f"{where}: section [{loc[0]}] is missing; every slot needs one, e.g. "
                                f"[{loc[0]}] plugin = \"<name>\" (see `cube plugins`)")
            else:
                problems.append(f"{at}: [{'.'.join(loc)}] {err['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from exc
    return LoadedConfig(data=data, path=path, text=text)


def load_config(path: Path | None = None) -> LoadedConfig:
    """Read ``path`` (or ``$CUBE_CONFIG``, or the embedded default)."""
    if path is None and os.environ.get("CUBE_CONFIG"):
        path = Path(os.environ["CUBE_CONFIG"])
    if path is None:
        return parse_config(default_config_text())
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    return parse_config(text, path)
