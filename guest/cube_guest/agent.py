"""Assembly and lifecycle of the agent: HTTP servers, interpreter, control channel, ops."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import resource
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from . import AGENT_VERSION, ENVD_VERSION, volumes
from .connect import FLAG_END_STREAM, decode_envelopes, encode_envelope
from .control import ControlChannel, OpError, Reply, decode_entropy
from .envd import Envd
from .metrics import MetricsSampler
from .state import AgentState
from .system import (
    TRUST_ENV,
    install_trust,
    new_machine_id,
    reseed_kernel_rng,
    set_aslr,
    set_clock,
    set_hostname,
)

log = logging.getLogger(__name__)

EXEC_OUTPUT_CAP = 64 << 10
KEEPALIVE_TIMEOUT_S = 630.0
SHUTDOWN_TIMEOUT_S = 2.0  # open streams (commands, watches) are cut after this on exit


@dataclass
class Options:
    envd_port: int = 49983
    interpreter_port: int | None = 49999
    ctl: str | None = "/dev/virtio-ports/cube.ctl"
    home: str | None = None
    bind: str = "0.0.0.0"
    default_user: str = "user"
    state_dir: str = "/run/cube-guest"
    system_root: str = "/"
    system_calls: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _runner_kwargs() -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "access_log": None,
        "keepalive_timeout": KEEPALIVE_TIMEOUT_S,
        "auto_decompress": False,
    }
    major, minor = (int(x) for x in aiohttp.__version__.split(".")[:2])
    if (major, minor) >= (3, 9):
        kwargs["handler_cancellation"] = True  # 3.8 always cancels on disconnect
        kwargs["shutdown_timeout"] = SHUTDOWN_TIMEOUT_S  # a TCPSite argument in 3.8
    return kwargs


def _site_kwargs() -> dict[str, Any]:
    major, minor = (int(x) for x in aiohttp.__version__.split(".")[:2])
    if (major, minor) < (3, 9):
        return {"shutdown_timeout": SHUTDOWN_TIMEOUT_S}
    return {}


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (max(hard, 65536), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return
        except (ValueError, OSError):
            continue


class Agent:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.state = AgentState(default_user=opts.default_user, home_override=opts.home)
        self.envd = Envd(self.state, allow_clock=opts.system_calls)
        self.interpreter: Any = None
        self.runners: list[web.AppRunner] = []
        self.control: ControlChannel | None = None
        self.interpreter_ready = False
        self.observer = MetricsSampler()  # its own CPU baseline: the host samples at its own pace
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        os.umask(0o022)
        raise_fd_limit()
        os.makedirs(self.opts.state_dir, mode=0o755, exist_ok=True)
        await self._serve(self.envd.app(), self.opts.envd_port)
        log.info("envd listening on %s:%d", self.opts.bind, self.opts.envd_port)
        if self.opts.interpreter_port is not None:
            await self._start_interpreter(self.opts.interpreter_port)
        self.ready.set()
        if self.opts.ctl:
            self.control = ControlChannel(
                self.opts.ctl, asyncio.get_running_loop(), self._ops(), self._ready_event
            )
            self.control.start()
        print("CUBE_AGENT_READY", flush=True)

    async def _start_interpreter(self, port: int) -> None:
        scratch = os.path.join(self.opts.state_dir, "interpreter")
        os.makedirs(scratch, mode=0o700, exist_ok=True)
        os.environ.setdefault("JUPYTER_RUNTIME_DIR", os.path.join(scratch, "runtime"))
        try:
            from .interpreter import Interpreter
        except ImportError as exc:
            log.error("code interpreter unavailable: %s", exc)
            return
        self.interpreter = Interpreter(self.state, scratch)
        await self._serve(self.interpreter.app(), port)
        log.info("code interpreter listening on %s:%d", self.opts.bind, port)
        started = time.monotonic()
        try:
            await self.interpreter.warm()
            self.interpreter_ready = True
            log.info("default python context ready in %.1fs", time.monotonic() - started)
        except Exception:
            log.exception("default python context failed to start")

    async def _serve(self, app: web.Application, port: int) -> None:
        runner = web.AppRunner(app, **_runner_kwargs())
        await runner.setup()
        site = web.TCPSite(runner, self.opts.bind, port, reuse_address=True, **_site_kwargs())
        await site.start()
        self.runners.append(runner)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.start()
        await self._stop.wait()
        await self.stop()

    async def stop(self) -> None:
        if self.control is not None:
            self.control.stop()
        await self.envd.processes.shutdown()
        for runner in reversed(self.runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self.runners.clear()

    # -- control ops -------------------------------------------------------------------

    def _ready_event(self) -> Reply:
        return {
            "event": "ready",
            "boot_id": self.state.boot_id,
            "agent_version": AGENT_VERSION,
            "envd_version": ENVD_VERSION,
            "envd_port": self.opts.envd_port,
            "interpreter_port": self.opts.interpreter_port,
            "interpreter": self.interpreter_ready,
        }

    def _ops(self) -> dict[str, Any]:
        return {
            "ping": self.op_ping,
            "personalize": self.op_personalize,
            "apply": self.op_apply,
            "reseed": self.op_reseed,
            "sync_clock": self.op_sync_clock,
            "warm_up": self.op_warm_up,
            "prepare_snapshot": self.op_prepare_snapshot,
            "exec": self.op_exec,
            "observe": self.op_observe,
            "mount_volumes": self.op_mount_volumes,
        }

    async def op_ping(self, req: dict[str, Any]) -> Reply:
        return {"boot_id": self.state.boot_id, "uptime_s": round(self.state.uptime(), 3),
                "envd_version": ENVD_VERSION, "interpreter": self.interpreter_ready}

    async def _reseed(self, entropy: bytes) -> list[str]:
        applied = []
        if self.opts.system_calls:
            reseed_kernel_rng(entropy)
            applied.append("kernel_rng")
        random.seed(os.urandom(32) + entropy)
        applied.append("agent_random")
        if self.interpreter is not None:
            await self.interpreter.contexts.reseed_all()
            applied.append("kernels")
        return applied

    async def op_reseed(self, req: dict[str, Any]) -> Reply:
        applied = await self._reseed(decode_entropy(req))
        return {"applied": applied}

    async def op_sync_clock(self, req: dict[str, Any]) -> Reply:
        """Set the wall clock (after a resume: a stopped VM's clock stood still while paused)."""
        clock_ns = req.get("clock_ns")
        if not isinstance(clock_ns, int) or isinstance(clock_ns, bool):
            raise OpError("'clock_ns' must be an integer (ns since the epoch)")
        if not self.opts.system_calls:
            return {"applied": []}
        behind_ns = clock_ns - time.time_ns()
        set_clock(clock_ns)
        return {"applied": ["clock"], "behind_ms": round(behind_ns / 1e6, 1)}

    async def op_warm_up(self, req: dict[str, Any]) -> Reply:
        """Run, once, what a new sandbox's first requests run: a command through envd's own
        Connect endpoint (as the SDK's ``commands.run`` does) and a file stat, over loopback.

        A warm-pool member does this before it is paused, so those code paths are already
        loaded (and, under TCG emulation, already translated) when a user's first request
        arrives. It leaves nothing behind: the finished process is forgotten."""
        started = time.monotonic()
        url = f"http://127.0.0.1:{self.opts.envd_port}"
        # the request of the E2B SDK's commands.run (envd >= 0.4: no Authorization, so envd's
        # default user; stdin off; a deadline and a keep-alive ping interval), so the same
        # branches are warm
        body = encode_envelope({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "true"]},
                                "stdin": False})
        headers = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1",
                   "Connect-Timeout-Ms": "60000", "Keepalive-Ping-Interval": "50"}
        if self.state.access_token:  # a member personalized at pool join has its sandbox's token
            headers["X-Access-Token"] = self.state.access_token
        timeout = aiohttp.ClientTimeout(total=float(req.get("timeout", 20)))
        async with aiohttp.ClientSession(timeout=timeout) as http:
            start = f"{url}/process.Process/Start"
            async with http.post(start, data=body, headers=headers) as resp:
                raw = await resp.read()
            if resp.status != 200:
                raise OpError(f"warm-up command failed: HTTP {resp.status}")
            async with http.post(f"{url}/filesystem.Filesystem/Stat", json={"path": "/tmp"},
                                 headers={**headers, "Content-Type": "application/json"}) as resp:
                await resp.read()
        events = [m for flags, m in decode_envelopes(raw) if not flags & FLAG_END_STREAM]
        self.envd.processes.forget_finished()
        return {"ms": round((time.monotonic() - started) * 1000, 1), "events": len(events),
                "envd_port": self.opts.envd_port}

    async def op_personalize(self, req: dict[str, Any]) -> Reply:
        entropy = decode_entropy(req)
        env_vars = req.get("env_vars") or {}
        metadata = req.get("metadata") or {}
        if not isinstance(env_vars, dict) or not isinstance(metadata, dict):
            raise OpError("'env_vars' and 'metadata' must be objects")
        token = req.get("access_token")
        if token is not None and not isinstance(token, str):
            raise OpError("'access_token' must be a string or null")
        trust = req.get("trust_pem")
        if trust is not None and not (isinstance(trust, str) and "-----BEGIN CERTIFICATE" in trust):
            raise OpError("'trust_pem' must be PEM certificates or null")
        aslr = req.get("aslr")
        if aslr is not None and not isinstance(aslr, bool):
            raise OpError("'aslr' must be a boolean or null")
        marks = [time.monotonic()]
        applied = await self._reseed(entropy)
        marks.append(time.monotonic())
        clock_ns = req.get("clock_ns")
        if isinstance(clock_ns, int) and self.opts.system_calls:
            set_clock(clock_ns)
            applied.append("clock")
        hostname = req.get("hostname")
        if isinstance(hostname, str) and hostname:
            set_hostname(hostname, system_root=self.opts.system_root,
                         syscall=self.opts.system_calls)
            applied.append("hostname")
        if aslr is not None and self.opts.system_calls:
            set_aslr(aslr)  # before envd runs the sandbox's first process (the warm-up's too)
            applied.append("aslr")
        marks.append(time.monotonic())
        new_machine_id(system_root=self.opts.system_root)
        applied.append("machine_id")
        marks.append(time.monotonic())
        install_trust(trust, system_root=self.opts.system_root)
        applied.append("trust")
        marks.append(time.monotonic())
        state = self.state
        state.sandbox_id = req.get("sandbox_id") or state.sandbox_id
        state.template_id = req.get("template_id") or state.template_id
        state.metadata = dict(metadata)
        env = {str(k): str(v) for k, v in env_vars.items()}
        env.setdefault("E2B_SANDBOX", "true")
        if trust:
            for name, value in TRUST_ENV.items():
                env.setdefault(name, value)
        if state.sandbox_id:
            env.setdefault("E2B_SANDBOX_ID", str(state.sandbox_id))
        if state.template_id:
            env.setdefault("E2B_TEMPLATE_ID", str(state.template_id))
        state.update_env(env)
        state.access_token = token or None
        applied += ["env_vars", "access_token"]
        marks.append(time.monotonic())
        log.info("personalized as sandbox %s", state.sandbox_id)
        # a pool member's or the snapshot source's events are not this sandbox's
        state.events.clear()
        state.events.add("info", "sandbox started", sandbox_id=state.sandbox_id,
                         template_id=state.template_id, envd_version=ENVD_VERSION)
        steps = ("reseed", "clock_hostname", "machine_id", "trust", "identity_env")
        timings = {k: round((b - a) * 1000, 2)
                   for k, a, b in zip(steps, marks[:-1], marks[1:], strict=True)}
        return {"boot_id": state.boot_id, "applied": applied, "timings_ms": timings}

    async def op_apply(self, req: dict[str, Any]) -> Reply:
        """What a create leaves for a warm-pool member personalized at join (its id, token,
        hostname, machine-id and RNG state are already its sandbox's): the clock and the env vars,
        and whether it keeps its access token (a non-secure sandbox has none). Spawns nothing:
        ``clock_settime`` and envd's in-memory state."""
        started = time.monotonic()
        clock_ns, env_vars = req.get("clock_ns"), req.get("env_vars", {})
        keep = req.get("keep_token", True)
        if not isinstance(clock_ns, int) or isinstance(clock_ns, bool):
            raise OpError("'clock_ns' must be an integer (ns since the epoch)")
        if not isinstance(env_vars, dict) or not isinstance(keep, bool):
            raise OpError("'env_vars' must be an object and 'keep_token' a boolean")
        applied = []
        if self.opts.system_calls:
            set_clock(clock_ns)
            applied.append("clock")
        state = self.state
        state.update_env({str(k): str(v) for k, v in env_vars.items()})
        if not keep:
            state.access_token = None
        applied += ["env_vars", "access_token"]
        state.events.clear()  # the warm-up's events are not this sandbox's
        state.events.add("info", "sandbox started", sandbox_id=state.sandbox_id,
                         template_id=state.template_id, envd_version=ENVD_VERSION)
        return {"boot_id": state.boot_id, "applied": applied,
                "timings_ms": {"apply": round((time.monotonic() - started) * 1000, 2)}}

    async def op_mount_volumes(self, req: dict[str, Any]) -> Reply:
        """Mount the host's volumes: ``volumes`` is ``[{"slot", "path", "read_only"}]``."""
        mounted = await volumes.mount_all(volumes.parse(req), system_calls=self.opts.system_calls)
        for path in mounted:
            self.state.events.add("info", "volume mounted", path=path)
        return {"mounted": mounted}

    async def op_observe(self, req: dict[str, Any]) -> Reply:
        """The current metrics and the log entries after the host's cursor ``after`` (at most
        ``limit``)."""
        after, limit = req.get("after", 0), req.get("limit", 500)
        if not isinstance(after, int) or not isinstance(limit, int) or after < 0 \
                or not 0 < limit <= 1000:
            raise OpError("'after' (int >= 0) and 'limit' (1..1000) are required")
        metrics = await asyncio.get_running_loop().run_in_executor(None, self.observer.sample)
        return {"metrics": metrics, "logs": self.state.events.since(after, limit),
                "last_seq": self.state.events.last_seq}

    async def op_prepare_snapshot(self, req: dict[str, Any]) -> Reply:
        closed = 0
        for runner in self.runners:
            server = runner.server
            if server is None:
                continue
            for handler in list(server.connections):
                if getattr(handler, "_waiter", None) is not None:
                    closed += 1
                handler.close()  # idle: now; busy: after the current response
        await asyncio.sleep(0)
        for h in logging.getLogger().handlers:
            h.flush()
        # Every object alive now moves to the collector's permanent generation: a clone's later
        # collections never walk them, so they do not write the GC header of every object this
        # snapshot holds (each write breaks copy-on-write of a template page: guest RAM the clone
        # owns privately). Measured on a fork of the agent's modules: a full collection in the
        # child wrote 10 MiB of its parent's pages, 0.1 MiB after a freeze. An idle clone runs
        # none (docs/bench.md, "Session 23"); a busy one eventually does. No gc.collect() first:
        # under TCG it would add to every pause.
        gc.freeze()
        await asyncio.get_running_loop().run_in_executor(None, os.sync)
        return {"closed_idle": closed, "frozen": gc.get_freeze_count()}

    async def op_exec(self, req: dict[str, Any]) -> Reply:
        cmd = req.get("cmd")
        if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
            raise OpError("'cmd' must be a non-empty list of strings")
        timeout = float(req.get("timeout", 30))
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise OpError(f"cannot run {cmd[0]!r}: {exc}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = await proc.communicate()
            raise OpError(f"timed out after {timeout}s") from None
        return {
            "exit_code": proc.returncode,
            "stdout": out[:EXEC_OUTPUT_CAP].decode("utf-8", "replace"),
            "stderr": err[:EXEC_OUTPUT_CAP].decode("utf-8", "replace"),
            "truncated": len(out) > EXEC_OUTPUT_CAP or len(err) > EXEC_OUTPUT_CAP,
        }

