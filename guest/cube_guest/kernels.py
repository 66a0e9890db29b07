"""Code-interpreter contexts: a Jupyter kernel per python/javascript/typescript/r/java context, a
bash process per bash context.

Jupyter contexts are driven through ``jupyter_client.AsyncKernelManager``; outputs are mapped to
the NDJSON lines of E2B_PROTOCOL.md §6. Kernels: ``python3`` (ipykernel), ``jslab`` and ``tslab``
(npm's tslab, JavaScript and TypeScript), ``ir`` (IRkernel), ``java`` (jjava on JShell); a
language whose kernelspec is not installed is refused (400). A bash context is one persistent
``bash`` process: each cell is written to a file and ``source``d in that shell (state such as
``cd`` and variables persists), stdout/stderr stream back, and a sentinel line carries the exit
status. A non-zero status becomes an ``error`` line (name ``ExitCode``, value the status).

Kernels run as root in the context's cwd, like upstream's Jupyter server.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import secrets
import shlex
import signal
import uuid
from abc import ABC, abstractmethod
from queue import Empty
from typing import Any

from .state import AgentState

log = logging.getLogger(__name__)

KERNEL_START_TIMEOUT_S = 600.0
SILENT_TIMEOUT_S = 30.0
LIVENESS_CHECK_S = 2.0
READY_RETRY_S = 10.0
REPLY_GRACE_S = 2.0
ABORT_RETRIES = 2
ABORT_RETRY_PAUSE_S = 0.25
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ERROR_LINE = re.compile(r"^([A-Za-z_$][\w$]*(?:Error|Exception)): (.*)$")
"""``TypeError: x is not a function``: what node prints for an uncaught exception."""
_JJAVA_EVAL = re.compile(r"^([A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)+), (.*)$", re.DOTALL)
"""``java.lang.IllegalStateException, boom``: jjava's value for an exception a cell threw."""
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Line = dict[str, Any]


class UnsupportedLanguage(ValueError):
    pass


ALIASES = {
    "python": "python", "python3": "python", "py": "python",
    "bash": "bash", "sh": "bash", "shell": "bash",
    "javascript": "javascript", "js": "javascript", "node": "javascript",
    "typescript": "typescript", "ts": "typescript",
    "r": "r",
    "java": "java",
}
KERNEL_NAMES = {"python": "python3", "javascript": "jslab", "typescript": "tslab", "r": "ir",
                "java": "java"}
"""Language -> Jupyter kernelspec name (bash runs without a kernel)."""
DEFAULT_LANGUAGES = ("python", "javascript")
"""The contexts a new sandbox lists, as upstream's server starts them (others: on first use)."""


def normalize_language(language: str | None) -> str:
    lang = (language or "python").strip().lower()
    if lang not in ALIASES:
        raise UnsupportedLanguage(f"language '{language}' is not supported by this sandbox")
    return ALIASES[lang]


def installed_kernels() -> set[str]:
    """Names of the Jupyter kernelspecs this system has."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager
    except ImportError:
        return set()
    return set(KernelSpecManager().find_kernel_specs())  # type: ignore[no-untyped-call]


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def result_line(data: dict[str, Any], is_main: bool) -> Line:
    """A ``result`` line from a Jupyter MIME bundle."""
    bundle = dict(data)
    out: Line = {"type": "result", "is_main_result": is_main}
    text = bundle.pop("text/plain", None)
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] == "'":
        text = text[1:-1]
    mapping = (
        ("text/html", "html"),
        ("text/markdown", "markdown"),
        ("image/svg+xml", "svg"),
        ("image/png", "png"),
        ("image/jpeg", "jpeg"),
        ("application/pdf", "pdf"),
        ("text/latex", "latex"),
        ("application/json", "json"),
        ("application/javascript", "javascript"),
        ("e2b/data", "data"),
        ("e2b/chart", "chart"),
    )
    if text is not None:
        out["text"] = text
    for mime, key in mapping:
        if mime in bundle:
            value = bundle.pop(mime)
            if isinstance(value, str) and key in ("png", "jpeg"):
                value = value.replace("\n", "")
            out[key] = value
    if bundle:
        out["extra"] = bundle
    return out


class Execution:
    """One /execute request: lines flow from the context to the HTTP response."""

    def __init__(self, code: str, env_vars: dict[str, str] | None) -> None:
        self.code = code
        self.env_vars = {k: str(v) for k, v in (env_vars or {}).items()}
        self.lines: asyncio.Queue[Line | None] = asyncio.Queue()
        self.abandoned = False
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def emit(self, line: Line) -> None:
        if not self.abandoned:
            self.lines.put_nowait(line)


class Context(ABC):
    language: str

    def __init__(self, state: AgentState, cwd: str) -> None:
        self.id = str(uuid.uuid4())
        self.state = state
        self.cwd = cwd
        self.lock = asyncio.Lock()
        self.env_generation = -1
        self.current: Execution | None = None
        self.starting: asyncio.Task[None] | None = None
        """The kernel's start or restart, which executions wait for (see :meth:`settle`)."""

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def kernel_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        pypath = [
            p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and os.path.abspath(p) != _PACKAGE_DIR
        ]
        if pypath:
            env["PYTHONPATH"] = os.pathsep.join(pypath)
        env.update(self.state.env_vars)
        return env

    def submit(self, code: str, env_vars: dict[str, str] | None) -> Execution:
        job = Execution(code, env_vars)
        job.task = asyncio.get_running_loop().create_task(self._run_job(job))
        return job

    async def _run_job(self, job: Execution) -> None:
        try:
            async with self.lock:
                if job.abandoned:
                    return
                self.current = job
                job.started.set()
                try:
                    if self.starting is not None:
                        await asyncio.shield(self.starting)  # raises what the start raised
                    await self.run(job)
                except Exception as exc:
                    log.exception("execution in context %s failed", self.id)
                    job.emit({"type": "error", "name": type(exc).__name__, "value": str(exc),
                              "traceback": ""})
                finally:
                    self.current = None
        finally:
            job.emit({"type": "end_of_execution"})
            job.lines.put_nowait(None)
            job.finished.set()

    def begin(self, restart: bool = False) -> asyncio.Task[None]:
        """Start (or restart) the kernel in the background; executions wait for it."""
        previous = self.starting

        async def go() -> None:
            if previous is not None and not previous.done():
                with contextlib.suppress(Exception):
                    await previous
            await (self.restart() if restart else self.start())

        self.starting = asyncio.get_running_loop().create_task(go())
        return self.starting

    async def settle(self, wait_s: float | None) -> None:
        """Wait for :meth:`begin`'s start, at most ``wait_s`` (None: until done); a failure
        raises. Left running past ``wait_s``, it goes on: the next execution waits for it."""
        task = self.starting
        if task is None:
            return
        if wait_s is None:
            await asyncio.shield(task)
        else:
            done, _ = await asyncio.wait({task}, timeout=wait_s)
            if done:
                task.result()
            else:
                log.info("context %s still starting after %.0fs; executions will wait",
                         self.id, wait_s)

    async def stop(self) -> None:
        """Cancel a start still running, then shut the kernel down."""
        if self.starting is not None and not self.starting.done():
            self.starting.cancel()
            with contextlib.suppress(BaseException):
                await self.starting
        await self.shutdown()

    async def abandon(self, job: Execution) -> None:
        """The client went away (or timed out): drop its output and interrupt it."""
        job.abandoned = True
        if job.started.is_set() and not job.finished.is_set():
            with contextlib.suppress(Exception):
                await self.interrupt()

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def run(self, job: Execution) -> None: ...

    @abstractmethod
    async def interrupt(self) -> None: ...

    @abstractmethod
    async def restart(self) -> None: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    @abstractmethod
    async def reseed(self) -> None: ...

    async def warm(self) -> None:  # noqa: B027 - optional hook: most contexts need nothing
        """Do what makes the first real cell fast (run before the template snapshot)."""


# --- python (Jupyter) -------------------------------------------------------------


def _charts_source() -> str:
    with open(os.path.join(os.path.dirname(__file__), "kernel_charts.py")) as fh:
        return fh.read()


SETUP_CODE = """\
def __cube_setup(src):
    import sys, types
    mod = types.ModuleType("_cube_charts")
    exec(compile(src, "<cube charts>", "exec"), mod.__dict__)
    sys.modules["_cube_charts"] = mod
    mod.install(get_ipython())
__cube_setup({src!r})
del __cube_setup
"""

RESEED_CODE = """\
def __cube_reseed():
    import random, sys
    random.seed()
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()
__cube_reseed()
del __cube_reseed
"""


def _env_code(values: dict[str, str]) -> str:
    return f"import os as __cube_os\n__cube_os.environ.update({values!r})\ndel __cube_os\n"


def _env_push_code(values: dict[str, str]) -> str:
    return (
        "import os as __cube_os\n"
        f"__cube_saved_env = {{k: __cube_os.environ.get(k) for k in {list(values)!r}}}\n"
        f"__cube_os.environ.update({values!r})\n"
        "del __cube_os\n"
    )


ENV_POP_CODE = """\
import os as __cube_os
for __cube_k, __cube_v in __cube_saved_env.items():
    if __cube_v is None:
        __cube_os.environ.pop(__cube_k, None)
    else:
        __cube_os.environ[__cube_k] = __cube_v
del __cube_os, __cube_k, __cube_v, __cube_saved_env
"""


def _json(value: object) -> str:
    """A JSON literal: also a valid JavaScript/TypeScript expression, and for ASCII-escaped
    strings a valid R string literal."""
    return json.dumps(value, ensure_ascii=True)


def node_env_code(values: dict[str, str]) -> str:
    return f"void Object.assign(process.env, JSON.parse({_json(_json(values))}));"


def node_env_push_code(values: dict[str, str]) -> str:
    keys = _json(list(values))
    return (
        f"process.env.__CUBE_SAVED_ENV = JSON.stringify({keys}"
        ".map(function (k) { return [k, k in process.env ? process.env[k] : null]; }));\n"
        f"void Object.assign(process.env, JSON.parse({_json(_json(values))}));"
    )


NODE_ENV_POP_CODE = """\
for (const [k, v] of JSON.parse(process.env.__CUBE_SAVED_ENV || "[]")) {
  if (v === null) { delete process.env[k]; } else { process.env[k] = v; }
}
delete process.env.__CUBE_SAVED_ENV;
"""


def _r_args(values: dict[str, str]) -> str:
    return ", ".join(f"{_json(k)} = {_json(v)}" for k, v in values.items())


def r_env_code(values: dict[str, str]) -> str:
    return f"invisible(Sys.setenv({_r_args(values)}))"


def r_env_push_code(values: dict[str, str]) -> str:
    keys = ", ".join(_json(k) for k in values)
    return (f".cube_saved_env <- Sys.getenv(c({keys}), unset = NA, names = TRUE)\n"
            f"invisible(Sys.setenv({_r_args(values)}))")


def _java_sets(values: dict[str, str]) -> str:
    # a JSON string literal (ASCII, \uXXXX escapes) is a Java string literal too
    return "\n".join(f"System.setProperty({_json(k)}, {_json(v)});" for k, v in values.items())


def java_env_code(values: dict[str, str]) -> str:
    """Java cannot change its process environment: like upstream, env vars become system
    properties (``System.getProperty``); the sandbox's own env vars are the kernel's environment
    (``System.getenv``) from its start."""
    return _java_sets(values)


def java_env_push_code(values: dict[str, str]) -> str:
    keys = ", ".join(_json(k) for k in values)
    return ("var cubeSavedEnv = new java.util.HashMap<String, String>();\n"
            f"for (String k : new String[] {{{keys}}})\n"
            "    cubeSavedEnv.put(k, System.getProperty(k));\n" + _java_sets(values))


JAVA_ENV_POP_CODE = """\
for (var e : cubeSavedEnv.entrySet()) {
    if (e.getValue() == null) System.clearProperty(e.getKey());
    else System.setProperty(e.getKey(), e.getValue());
}
"""


R_ENV_POP_CODE = """\
local({
  for (k in names(.cube_saved_env)) {
    v <- .cube_saved_env[[k]]
    if (is.na(v)) Sys.unsetenv(k) else do.call(Sys.setenv, stats::setNames(list(v), k))
  }
})
rm(.cube_saved_env)
"""



class Turn:
    """What one execution's messages said so far."""

    def __init__(self) -> None:
        self.idle = False
        self.reply: dict[str, Any] | None = None
        self.counted = False
        self.errored = False
        self.stderr: list[str] = []

    def aborted(self) -> bool:
        """The kernel dropped the request without running it (nothing was published)."""
        status = (self.reply or {}).get("status")
        return status in ("aborted", "abort") and not (self.counted or self.errored or self.stderr)

    def finish(self, job: Execution) -> bool:
        """Emit what only the shell reply told (count; an error the kernel printed to stderr
        instead of publishing it, as tslab does). True if the execution failed."""
        reply = self.reply or {}
        if not self.counted and isinstance(reply.get("execution_count"), int):
            job.emit({"type": "number_of_executions",
                      "execution_count": reply["execution_count"]})
        if reply.get("status") != "error":
            return self.errored
        if not self.errored:
            text = "".join(self.stderr)
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            match = next(filter(None, map(_ERROR_LINE.match, lines)), None)
            name, value = (match.group(1), match.group(2)) if match else (
                "Error", lines[0] if lines else "the execution failed")
            job.emit({"type": "error", "name": reply.get("ename") or name,
                      "value": reply.get("evalue") or value, "traceback": text})
        return True


class JupyterContext(Context):
    """A context backed by a Jupyter kernel; subclasses give the language's glue code."""

    kernel_name: str
    error_pause_s = 0.0
    """Wait this long after a failed execution (tslab drops requests that come within 200 ms)."""

    def __init__(self, state: AgentState, cwd: str) -> None:
        super().__init__(state, cwd)
        self.km: Any = None
        self.kc: Any = None
        self._listeners: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        from jupyter_client.manager import AsyncKernelManager

        env = self.kernel_env()
        env.update(self.extra_env())
        self.km = AsyncKernelManager(kernel_name=self.kernel_name)  # type: ignore[no-untyped-call]
        await self.km.start_kernel(cwd=self.cwd, env=env)
        await self._connect()

    async def _connect(self) -> None:
        self.kc = self.km.client()
        # no heartbeat channel: liveness is the kernel's process (km.is_alive); its pings woke
        # every kernel and a thread of the agent each second, minutes of CPU under TCG
        self.kc.start_channels(hb=False)
        await self._wait_ready()
        self._tasks = [
            asyncio.get_running_loop().create_task(self._route_iopub()),
            asyncio.get_running_loop().create_task(self._drain_shell()),
        ]
        setup = self.setup_code()
        if setup:
            await self.silent(setup)
        self.env_generation = self.state.env_generation

    async def _wait_ready(self) -> None:
        """Wait for the kernel's ``kernel_info_reply``, with its iopub connected (as
        jupyter_client's ``wait_for_ready``, which asks again every second: a start of minutes
        under TCG then answered hundreds of requests). Asks again after READY_RETRY_S."""
        deadline = asyncio.get_running_loop().time() + KERNEL_START_TIMEOUT_S
        while True:
            self.kc.kernel_info()
            asked = asyncio.get_running_loop().time()
            while asyncio.get_running_loop().time() - asked < READY_RETRY_S:
                try:
                    msg = await self.kc.get_shell_msg(timeout=LIVENESS_CHECK_S)
                except Empty:
                    if not await self.km.is_alive():
                        raise RuntimeError("the kernel died before it replied") from None
                    continue
                if msg["msg_type"] != "kernel_info_reply":
                    continue
                try:  # iopub connected? (a SUB socket misses what came before it joined)
                    await self.kc.get_iopub_msg(timeout=0.2)
                except Empty:
                    break  # ask again
                self.kc._handle_kernel_info_reply(msg)  # the protocol version it speaks
                return
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"the kernel did not reply in {KERNEL_START_TIMEOUT_S:.0f}s")

    def extra_env(self) -> dict[str, str]:
        return {}

    def setup_code(self) -> str | None:
        """Run silently once the kernel is up (and after each restart)."""
        return None

    @abstractmethod
    def env_code(self, values: dict[str, str]) -> str:
        """Set these environment variables in the kernel's process."""

    @abstractmethod
    def env_push_code(self, values: dict[str, str]) -> str:
        """Set these variables, remembering the previous values for :meth:`env_pop_code`."""

    @abstractmethod
    def env_pop_code(self) -> str:
        """Restore what :meth:`env_push_code` changed."""

    def reseed_code(self) -> str | None:
        """Reseed the language's random generator from fresh entropy (None: it cannot be)."""
        return None

    def error_name_value(self, ename: str, evalue: str) -> tuple[str, str]:
        """An ``error`` line's ``name`` and ``value`` from the kernel's ``ename``/``evalue``."""
        return ename, evalue

    def warm_code(self) -> str | None:
        """A cell that loads what every real cell needs (run once, before the snapshot)."""
        return None

    async def warm(self) -> None:
        code = self.warm_code()
        if code:
            await self.silent(code, timeout=KERNEL_START_TIMEOUT_S)

    async def _route_iopub(self) -> None:
        while True:
            try:
                msg = await self.kc.get_iopub_msg()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("iopub read failed")
                await asyncio.sleep(0.5)
                continue
            parent = (msg.get("parent_header") or {}).get("msg_id")
            queue = self._listeners.get(parent) if parent else None
            if queue is not None:
                queue.put_nowait(msg)

    async def _drain_shell(self) -> None:
        """Shell replies go to the execution they answer (``execute_reply`` carries the status
        and count of kernels that publish no ``error``/``execute_input``, such as tslab)."""
        while True:
            try:
                msg = await self.kc.get_shell_msg()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)
                continue
            parent = (msg.get("parent_header") or {}).get("msg_id")
            queue = self._listeners.get(parent) if parent else None
            if queue is not None:
                queue.put_nowait(msg)

    def _send(self, code: str, *, silent: bool) -> tuple[str, asyncio.Queue[dict[str, Any]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        msg_id: str = self.kc.execute(
            code, silent=silent, store_history=not silent, allow_stdin=False
        )
        self._listeners[msg_id] = queue
        return msg_id, queue

    async def silent(self, code: str, timeout: float = SILENT_TIMEOUT_S) -> None:
        msg_id, queue = self._send(code, silent=True)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    msg = await queue.get()
                    mtype = msg["msg_type"]
                    if mtype == "error":
                        log.warning("silent code failed: %s", msg["content"].get("evalue"))
                    if mtype == "status" and msg["content"].get("execution_state") == "idle":
                        return
        finally:
            self._listeners.pop(msg_id, None)

    async def _sync_env(self) -> None:
        if self.env_generation != self.state.env_generation:
            self.env_generation = self.state.env_generation
            if self.state.env_vars:
                await self.silent(self.env_code(self.state.env_vars))

    async def run(self, job: Execution) -> None:
        await self._sync_env()
        if job.env_vars:
            await self.silent(self.env_push_code(job.env_vars))
        attempt = 0
        while True:
            turn = await self._execute(job)
            if turn is None:
                return  # the kernel died (and was restarted)
            if not turn.aborted() or attempt == ABORT_RETRIES:
                break
            attempt += 1
            # A kernel drops requests that arrive just after a failed cell (ipykernel's
            # stop_on_error abort window, tslab's 200 ms queue reset): nothing ran, send it again.
            log.info("context %s: the kernel aborted the execution, sending it again", self.id)
            await asyncio.sleep(ABORT_RETRY_PAUSE_S)
        failed = turn.finish(job)
        if failed and self.error_pause_s:
            await asyncio.sleep(self.error_pause_s)
        if job.env_vars:
            await self.silent(self.env_pop_code())

    async def _execute(self, job: Execution) -> Turn | None:
        """Send the cell and relay its messages; None if the kernel died meanwhile."""
        msg_id, queue = self._send(job.code, silent=False)
        turn = Turn()
        try:
            while True:
                wait = REPLY_GRACE_S if turn.idle else LIVENESS_CHECK_S
                try:
                    msg = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    if turn.idle:
                        return turn  # idle came, the reply did not: do without it
                    if not await self.km.is_alive():
                        job.emit({"type": "error", "name": "DeadKernelError",
                                  "value": "the kernel died during the execution",
                                  "traceback": ""})
                        await self.restart()
                        return None
                    continue
                if self._handle(job, msg, turn):
                    return turn
        finally:
            self._listeners.pop(msg_id, None)

    def _handle(self, job: Execution, msg: dict[str, Any], turn: Turn) -> bool:
        """Map one iopub message (or the shell reply); True when the execution is over."""
        mtype = msg["msg_type"]
        content = msg.get("content") or {}
        if mtype == "execute_input":
            turn.counted = True
            job.emit({"type": "number_of_executions",
                      "execution_count": content.get("execution_count")})
        elif mtype == "execute_reply":
            turn.reply = content
            return turn.idle
        elif mtype == "stream":
            name = content.get("name")
            if name in ("stdout", "stderr"):
                date = (msg.get("header") or {}).get("date")
                stamp = (
                    date.isoformat() if isinstance(date, dt.datetime) else str(date or now_iso())
                )
                text = content.get("text", "")
                if name == "stderr":
                    turn.stderr.append(text)
                job.emit({"type": name, "text": text, "timestamp": stamp})
        elif mtype == "execute_result":
            job.emit(result_line(content.get("data") or {}, True))
        elif mtype == "display_data":
            job.emit(result_line(content.get("data") or {}, False))
        elif mtype == "error":
            turn.errored = True
            name, value = self.error_name_value(content.get("ename", ""), content.get("evalue", ""))
            job.emit({
                "type": "error",
                "name": name,
                "value": value,
                "traceback": "\n".join(content.get("traceback") or []),
            })
        elif mtype == "status" and content.get("execution_state") == "idle":
            turn.idle = True
            return turn.reply is not None or bool(content.get("cube_restart"))
        return False

    async def interrupt(self) -> None:
        await self.km.interrupt_kernel()

    async def restart(self) -> None:
        if self.current is not None:
            self.current.emit({"type": "error", "name": "ContextRestarted",
                               "value": "the context was restarted", "traceback": ""})
        for queue in self._listeners.values():  # end whatever is waiting for the old kernel
            queue.put_nowait({"msg_type": "status",
                              "content": {"execution_state": "idle", "cube_restart": True}})
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self._listeners.clear()
        if self.kc is not None:
            self.kc.stop_channels()
        await self.km.restart_kernel(now=True)
        await self._connect()
        self.env_generation = -1

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            with contextlib.suppress(Exception):
                await self.km.shutdown_kernel(now=True)

    async def reseed(self) -> None:
        code = self.reseed_code()
        if code:
            await self.silent(code, timeout=5.0)


class PythonContext(JupyterContext):
    language = "python"
    kernel_name = "python3"

    def extra_env(self) -> dict[str, str]:
        env = {"PYDEVD_DISABLE_FILE_VALIDATION": "1"}
        if "MPLBACKEND" not in self.state.env_vars and "MPLBACKEND" not in os.environ:
            env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
        return env

    def setup_code(self) -> str:
        return SETUP_CODE.format(src=_charts_source())

    def env_code(self, values: dict[str, str]) -> str:
        return _env_code(values)

    def env_push_code(self, values: dict[str, str]) -> str:
        return _env_push_code(values)

    def env_pop_code(self) -> str:
        return ENV_POP_CODE

    def reseed_code(self) -> str:
        return RESEED_CODE


class NodeContext(JupyterContext):
    """JavaScript (``jslab``) or TypeScript (``tslab``); the glue code is valid in both.

    V8's ``Math.random`` cannot be reseeded, so there is no reseed code."""

    def __init__(self, state: AgentState, cwd: str, language: str) -> None:
        super().__init__(state, cwd)
        self.language = language
        self.kernel_name = KERNEL_NAMES[language]

    error_pause_s = 0.25

    def extra_env(self) -> dict[str, str]:
        return {"NO_COLOR": "1"}

    def warm_code(self) -> str:
        # tslab type-checks every cell: the first one loads the TypeScript libs and @types/node
        return "void process.env.HOME;"

    def env_code(self, values: dict[str, str]) -> str:
        return node_env_code(values)

    def env_push_code(self, values: dict[str, str]) -> str:
        return node_env_push_code(values)

    def env_pop_code(self) -> str:
        return NODE_ENV_POP_CODE


class RContext(JupyterContext):
    language = "r"
    kernel_name = "ir"

    def env_code(self, values: dict[str, str]) -> str:
        return r_env_code(values)

    def env_push_code(self, values: dict[str, str]) -> str:
        return r_env_push_code(values)

    def env_pop_code(self) -> str:
        return R_ENV_POP_CODE

    def reseed_code(self) -> str:
        return f"set.seed({secrets.randbelow(2**31 - 1)}L)"


class JavaContext(JupyterContext):
    """jjava (JShell). Not a default context (nor upstream's): its JVM starts on first use, see
    guest/README.md for the cost under TCG. ``java.util.Random`` seeds itself per instance, so
    there is no reseed code."""

    language = "java"
    kernel_name = "java"

    def error_name_value(self, ename: str, evalue: str) -> tuple[str, str]:
        """jjava wraps an exception the cell threw as ``RuntimeException`` with the value
        ``"<class>, <message>"``; upstream's kernel (IJava, which jjava forked) reports JShell's
        ``EvalException`` with the exception's own message: give that shape (the class stays at
        the top of the traceback). A null message is jjava's ``"null"``, IJava's ``""``."""
        m = _JJAVA_EVAL.match(evalue) if ename == "RuntimeException" else None
        if m is None:
            return ename, evalue
        return "EvalException", "" if m.group(2) == "null" else m.group(2)

    def env_code(self, values: dict[str, str]) -> str:
        return java_env_code(values)

    def env_push_code(self, values: dict[str, str]) -> str:
        return java_env_push_code(values)

    def env_pop_code(self) -> str:
        return JAVA_ENV_POP_CODE


# --- bash -------------------------------------------------------------------------------


class BashContext(Context):
    language = "bash"

    def __init__(self, state: AgentState, cwd: str, scratch_dir: str) -> None:
        super().__init__(state, cwd)
        self.scratch_dir = scratch_dir
        self.proc: asyncio.subprocess.Process | None = None
        self.token = secrets.token_hex(12)
        self.count = 0
        self._write_lock = asyncio.Lock()

    async def start(self) -> None:
        env = self.kernel_env()
        env.setdefault("TERM", "dumb")
        self.proc = await asyncio.create_subprocess_exec(
            "/bin/bash", "--noprofile", "--norc",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.cwd,
            env=env,
            start_new_session=True,
        )
        await self._write("trap ':' INT\n")
        self.env_generation = self.state.env_generation

    async def _write(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        async with self._write_lock:
            self.proc.stdin.write(text.encode())
            await self.proc.stdin.drain()

    async def run(self, job: Execution) -> None:
        if self.proc is None or self.proc.returncode is not None:
            await self.start()
        proc = self.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        self.count += 1
        job.emit({"type": "number_of_executions", "execution_count": self.count})
        script = os.path.join(self.scratch_dir, f"cell-{self.id}.sh")
        with open(script, "w") as fh:
            fh.write(job.code + "\n")
        lines: list[str] = []
        if self.env_generation != self.state.env_generation:
            self.env_generation = self.state.env_generation
            lines += [f"export {k}={shlex.quote(v)}" for k, v in self.state.env_vars.items()
                      if _ENV_NAME.match(k)]
        restore: list[str] = []
        for i, (key, value) in enumerate(job.env_vars.items()):
            if not _ENV_NAME.match(key):
                continue
            lines.append(f'__cube_had{i}="${{{key}+1}}"; __cube_old{i}="${{{key}-}}"; '
                         f"export {key}={shlex.quote(value)}")
            restore.append(f'if [ -n "$__cube_had{i}" ]; then export {key}="$__cube_old{i}"; '
                           f"else unset {key}; fi; unset __cube_had{i} __cube_old{i}")
        lines.append(f"source {shlex.quote(script)} </dev/null")
        lines.append("__cube_rc=$?")
        lines += restore
        lines.append(f"printf '\\n{self.token} %d\\n' \"$__cube_rc\"")
        lines.append(f"printf '\\n{self.token}\\n' >&2")
        await self._write("\n".join(lines) + "\n")
        out_task = asyncio.create_task(self._relay(proc.stdout, "stdout", job))
        err_task = asyncio.create_task(self._relay(proc.stderr, "stderr", job))
        rc_text = await out_task
        await err_task
        if rc_text is None:  # the shell exited (`exit` in the cell, or a restart)
            job.emit({"type": "error", "name": "ShellExited",
                      "value": "the bash process exited; the next cell starts a new one",
                      "traceback": ""})
            if self.proc is proc:
                await self._reap()
            return
        rc = int(rc_text or 0)
        if rc != 0:
            job.emit({"type": "error", "name": "ExitCode", "value": str(rc), "traceback": ""})

    async def _relay(self, reader: asyncio.StreamReader, name: str, job: Execution) -> str | None:
        """Forward output until the sentinel; return the text after it (stdout: status)."""
        marker = f"\n{self.token}".encode()
        buf = b""
        while True:
            chunk = await reader.read(32 << 10)
            if not chunk:
                if buf:
                    job.emit({"type": name, "text": buf.decode("utf-8", "replace"),
                              "timestamp": now_iso()})
                return None
            buf += chunk
            idx = buf.find(marker)
            if idx >= 0:
                end = buf.find(b"\n", idx + len(marker))
                if end < 0:
                    continue
                head = buf[:idx]
                if head:
                    job.emit({"type": name, "text": head.decode("utf-8", "replace"),
                              "timestamp": now_iso()})
                return buf[idx + len(marker) : end].decode().strip()
            # Keep a tail that might be the start of the marker.
            keep = len(marker)
            if len(buf) > keep:
                head, buf = buf[:-keep], buf[-keep:]
                job.emit({"type": name, "text": head.decode("utf-8", "replace"),
                          "timestamp": now_iso()})

    async def _reap(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            self.proc = None

    async def interrupt(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)

    async def restart(self) -> None:
        await self._reap()
        self.count = 0
        await self.start()

    async def shutdown(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
            self.proc = None

    async def reseed(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self._write(f"RANDOM={secrets.randbelow(32768)}\n")


# --- the set of contexts ------------------------------------------------------------------


class ContextManager:
    def __init__(self, state: AgentState, scratch_dir: str) -> None:
        self.state = state
        self.scratch_dir = scratch_dir
        self.contexts: dict[str, Context] = {}
        self.defaults: dict[str, Context] = {}
        self._default_locks: dict[str, asyncio.Lock] = {}
        self._available: set[str] | None = None

    def default_cwd(self) -> str:
        try:
            return self.state.workdir(self.state.user())
        except LookupError:
            return "/"

    def available(self) -> set[str]:
        """The languages this system can run: bash, and those whose kernel is installed."""
        if self._available is None:
            kernels = installed_kernels()
            self._available = {"bash"} | {
                lang for lang, kernel in KERNEL_NAMES.items() if kernel in kernels
            }
        return self._available

    def _check(self, language: str | None) -> str:
        lang = normalize_language(language)
        if lang not in self.available():
            have = ", ".join(sorted(self.available()))
            raise UnsupportedLanguage(
                f"language '{language}' is not installed in this sandbox (it has: {have})"
            )
        return lang

    async def create(self, language: str | None, cwd: str | None,
                     wait_s: float | None = None) -> Context:
        """A new context, once its kernel is up or ``wait_s`` has passed (it then keeps
        starting and executions wait for it: a cold tslab start under TCG takes longer than
        the SDK's 60 s request timeout)."""
        lang = self._check(language)
        cwd = cwd or self.default_cwd()
        ctx: Context
        if lang == "python":
            ctx = PythonContext(self.state, cwd)
        elif lang in ("javascript", "typescript"):
            ctx = NodeContext(self.state, cwd, lang)
        elif lang == "r":
            ctx = RContext(self.state, cwd)
        elif lang == "java":
            ctx = JavaContext(self.state, cwd)
        elif lang == "bash":
            ctx = BashContext(self.state, cwd, self.scratch_dir)
        else:  # a kernelspec we have no glue code for
            raise UnsupportedLanguage(f"language '{language}' is not supported by this sandbox")
        ctx.begin()
        try:
            await ctx.settle(wait_s)
        except BaseException:
            await ctx.stop()
            raise
        self.contexts[ctx.id] = ctx
        log.info("context %s (%s) ready in %s", ctx.id, lang, cwd)
        return ctx

    async def default(self, language: str | None, wait_s: float | None = None) -> Context:
        lang = self._check(language)
        lock = self._default_locks.setdefault(lang, asyncio.Lock())
        async with lock:
            ctx = self.defaults.get(lang)
            if ctx is None or ctx.id not in self.contexts:
                ctx = await self.create(lang, None, wait_s)
                self.defaults[lang] = ctx
            return ctx

    def get(self, context_id: str) -> Context | None:
        return self.contexts.get(context_id)

    async def remove(self, context_id: str) -> bool:
        ctx = self.contexts.pop(context_id, None)
        if ctx is None:
            return False
        for lang, dflt in list(self.defaults.items()):
            if dflt is ctx:
                del self.defaults[lang]
        await ctx.stop()
        return True

    async def reseed_all(self) -> None:
        async def one(ctx: Context) -> None:
            try:
                await ctx.reseed()
            except Exception as exc:
                log.warning("reseeding context %s: %s", ctx.id, exc)

        await asyncio.gather(*(one(c) for c in list(self.contexts.values())))

    async def shutdown(self) -> None:
        await asyncio.gather(
            *(c.stop() for c in list(self.contexts.values())), return_exceptions=True
        )
        self.contexts.clear()


def dumps_line(line: Line) -> bytes:
    return (json.dumps(line, default=str, separators=(",", ":")) + "\n").encode()


