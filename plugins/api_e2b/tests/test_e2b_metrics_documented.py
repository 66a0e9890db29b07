"""docs/metrics.md and deploy/grafana/cube.json against a live ``/metrics`` (the e2b plugin on the
fakes, scraped over its admin port): every exported metric is documented with its type and labels,
and every metric the docs or the dashboard name is exported."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "metrics.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "cube.json"
ROW = re.compile(r"^\| `(cube_[a-z0-9_]+)` \| (counter|gauge|histogram) \|([^|]*)\|", re.M)
NAME = re.compile(r"\bcube_[a-z0-9_]+")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def documented() -> dict[str, tuple[str, str]]:
    """name -> (type, labels cell) from the docs' table."""
    rows = {m[1]: (m[2], m[3]) for m in ROW.finditer(DOC.read_text())}
    assert rows, "no metric rows found in docs/metrics.md"
    return rows


def dashboard_names(types: dict[str, str]) -> set[str]:
    """The metric names in the dashboard's queries (histogram series folded into their metric)."""
    exprs = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    assert exprs
    names = set()
    for name in (n for e in exprs for n in NAME.findall(e)):
        for suffix in HISTOGRAM_SERIES:
            if name.endswith(suffix) and types.get(name.removesuffix(suffix)) == "histogram":
                name = name.removesuffix(suffix)
        names.add(name)
    return names


async def create(cube, key: str) -> dict:
    r = await cube.client.post("/v2/sandboxes", json={"templateID": "base"}, headers=cube.headers(key))
    assert r.status_code == 201, r.text
    return r.json()


def exported_families(text: str) -> list:
    """The scraped families; a counter's or histogram's ``_created`` timestamp series (which the
    text parser reports as a family of its own) is part of that metric."""
    families = list(text_string_to_metric_families(text))
    metrics = {f.name for f in families if f.type in ("counter", "histogram")}
    return [f for f in families if not (f.name.endswith("_created") and f.name.removesuffix("_created") in metrics)]


async def scrape(cube) -> str:
    key = cube.key()
    sid = (await create(cube, key))["sandboxID"]
    await create(cube, key)
    await cube.client.post(f"/sandboxes/{sid}/pause", headers=cube.headers(key))
    await cube.client.get("/v2/sandboxes")  # an error answer (401)
    await cube.client.get("/health", headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"})  # edge
    server = await cube.plugin.start_metrics_server(host="127.0.0.1", port=0)
    try:
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        await cube.plugin.stop_metrics_server()
    assert r.status_code == 200
    return r.text


async def test_every_metric_documented_and_every_documented_metric_exported(cube) -> None:
    families = exported_families(await scrape(cube))
    exported = {f.name + ("_total" if f.type == "counter" else ""): f for f in families}
    docs = documented()
    assert sorted(set(exported) - set(docs)) == [], "exported but not in docs/metrics.md"
    assert sorted(set(docs) - set(exported)) == [], "in docs/metrics.md but not exported"
    for name, (kind, labels) in docs.items():
        family = exported[name]
        assert family.type == kind, (name, family.type, kind)
        seen = {label for s in family.samples for label in s.labels if label != "le"}
        assert family.samples or kind == "counter", f"{name}: no samples"
        for label in seen:
            assert f"`{label}`" in labels, f"{name}: label {label!r} not documented"
    # the scrape carried real values, not just declarations
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    assert samples[("cube_sandboxes", (("state", "paused"),))] == 1.0
    assert samples[("cube_nodes", (("status", "up"),))] == 1.0
    assert samples[("cube_node_vcpus", (("kind", "total"), ("node", cube.service.settings.node_id)))] > 0
    assert samples[("cube_sandbox_create_seconds_count", ())] == 2.0


async def test_grafana_dashboard_uses_only_exported_metrics_and_all_of_them(cube) -> None:
    families = exported_families(await scrape(cube))
    types = {f.name + ("_total" if f.type == "counter" else ""): f.type for f in families}
    used = dashboard_names(types)
    assert sorted(used - set(types)) == [], "the dashboard queries metrics Cube does not export"
    assert sorted(set(documented()) - used) == [], "documented metrics the dashboard does not show"
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] == "Cube"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
