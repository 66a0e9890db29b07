"""Property-based fuzzing of the served E2B API (``/openapi.json``) with schemathesis.

One app on the fake drivers, served by uvicorn on loopback from a thread of this process; every
operation gets a bounded number of generated requests (valid and invalid, with a valid API key).
Nothing may answer 5xx, and every answer must match the schema the app itself serves (status code
documented, content type, body).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from cube_core import SandboxSpec
from cube_core._host import PluginHost  # noqa: PLC2701 - tests build the host as the core's fixture does
from cube_core.app import create_app
from cube_core.config import parse_config
from e2b_helpers import e2b_config_text, serve
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

MAX_EXAMPLES = 50
# HTTP framing, not API parameters: a generated one (e.g. `content-length: e`, seen in two runs,
# not reproduced since) is refused by the HTTP server (uvicorn's text/plain 400) before the app sees it
FRAMING_HEADERS = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


class ServedApi:
    """The app in its own event loop thread, with its lifespan running, until :meth:`stop`."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.ready = threading.Event()
        self.port = 0
        self.key = ""
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="schemathesis-api", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self.ready.wait(60) or self.error is not None:
            raise RuntimeError(f"the API did not start: {self.error!r}")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start()/stop()
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        host = PluginHost(parse_config(e2b_config_text(self.state, {"metrics_on_startup": False}))).load()
        try:
            app = create_app(host, build_templates=True)
            async with serve(app) as port:
                await asyncio.wait_for(app.state.agent.ready.wait(), timeout=30)
                service: Any = app.state.service
                self.key = service.create_api_key("fuzz")[1]
                team = service.authenticate(self.key).team_id
                # something to find: a running sandbox with a snapshot, so not every id path is a 404
                sb = await service.create(SandboxSpec(template_id="base", team_id=team))
                await service.snapshot(team, sb.sandbox_id, name="fuzz")
                self.port = port
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                self.ready.set()
                await self._stop.wait()
        finally:
            for name in list(host.plugins):
                host.unregister(name)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the API thread did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def served_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApi]:
    api = ServedApi(tmp_path_factory.mktemp("schemathesis") / "state")
    api.start()
    yield api
    api.stop()


@pytest.fixture(scope="module")
def api_schema(served_api: ServedApi) -> Any:
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{served_api.port}/openapi.json")


# GET /events streams server-sent events until the client leaves: a fuzzed call never gets a whole
# answer (each would wait out its 30 s timeout, 50 times); plugins/api_e2b/tests/test_e2b_events.py tests it.
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path="/events", method="GET")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_5xx_and_answers_match_the_served_schema(case: Any, served_api: ServedApi) -> None:
    for name in list(case.headers or {}):
        if name.lower() in FRAMING_HEADERS:
            del case.headers[name]
    case.call_and_validate(headers={"X-API-Key": served_api.key}, checks=CHECKS, timeout=30)
