"""The dashboard in a real browser (Playwright for Python driving Debian's chromium, headless)
against a real ``cube serve`` with real guests: sign in with a team's key, a sandbox created with
the e2b SDK appears live (server-sent events; the page is not reloaded), killing it from the UI
makes the SDK's next call fail with "not found", a team sees only its own sandboxes, the operator
token sees every team's. Screenshots go to a temporary directory; to refresh the ones in docs/img/
(the README shows one) run it with ``CUBE_E2E_SCREENSHOTS=docs/img``."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cube_e2e import CubeServer
from e2b import NotFoundException, Sandbox
from playwright.sync_api import Browser, Page, expect, sync_playwright

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

CHROMIUM = "/usr/bin/chromium"  # Debian's (scripts/apt-packages.txt); Playwright's own download cannot work here


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def signed_in(browser: Browser, server: CubeServer, secret: str) -> Page:
    page = browser.new_context(viewport={"width": 1440, "height": 820}).new_page()
    page.goto(f"{server.url}/dashboard")
    expect(page).to_have_url(f"{server.url}/dashboard/login")
    page.fill("#secret", secret)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{server.url}/dashboard/sandboxes")
    return page


def row(page: Page, sandbox_id: str):  # noqa: ANN201 - playwright's Locator
    return page.locator(f"tr[data-sandbox='{sandbox_id}']")


def test_live_list_kill_and_team_scoping(e2b_env: CubeServer, browser: Browser, tmp_path: Path) -> None:
    img = Path(os.environ.get("CUBE_E2E_SCREENSHOTS") or tmp_path)  # a test run leaves the checkout clean
    server = e2b_env
    page = signed_in(browser, server, server.key_a)
    expect(page.get_by_test_id("who")).to_have_text("team-a")
    page.evaluate("window.__notReloaded = true")

    sb = Sandbox.create("base", timeout=300, metadata={"from": "e2e-dashboard"})
    created = time.monotonic()
    other: Sandbox | None = None
    try:
        expect(row(page, sb.sandbox_id)).to_be_visible(timeout=30_000)
        appeared_s = time.monotonic() - created
        assert page.evaluate("window.__notReloaded") is True  # it came over SSE, not a reload
        other = Sandbox.create("base", timeout=300, api_key=server.key_b)
        expect(row(page, sb.sandbox_id)).to_contain_text("running")
        expect(row(page, sb.sandbox_id)).to_contain_text("from=e2e-dashboard")
        expect(row(page, other.sandbox_id)).to_have_count(0)  # team-b's is not team-a's
        isolation = row(page, sb.sandbox_id).locator("td").nth(4).inner_text()
        assert isolation in ("kvm", "tcg"), isolation

        # a few samples (every 5 s) for the sparklines, then the screenshots
        sb.commands.run("head -c 60000000 /dev/urandom | sha256sum >/dev/null; sleep 8; "
                        "head -c 30000000 /dev/urandom | sha256sum >/dev/null", timeout=120)
        time.sleep(max(0.0, 16 - (time.monotonic() - created)))
        sb.set_timeout(600)  # an event: the page refreshes with the new samples
        expect(row(page, sb.sandbox_id).locator(".spark canvas").first).to_be_visible(timeout=20_000)
        img.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(img / "dashboard-sandboxes.png"))
        detail = page.context.new_page()
        detail.goto(f"{server.url}/dashboard/sandboxes/{sb.sandbox_id}")
        expect(detail.locator(".chart canvas").first).to_be_visible(timeout=20_000)
        detail.screenshot(path=str(img / "dashboard-sandbox.png"), full_page=True)
        detail.close()

        # the operator sees both teams' sandboxes
        operator = signed_in(browser, server, server.operator_token)
        expect(operator.get_by_test_id("who")).to_have_text("operator (all teams)")
        expect(row(operator, sb.sandbox_id)).to_be_visible()
        expect(row(operator, other.sandbox_id)).to_be_visible()
        operator.close()

        # kill from the UI: the row goes, and the SDK's next call is "not found"
        page.get_by_role("button", name=f"Kill {sb.sandbox_id}").click()
        expect(row(page, sb.sandbox_id)).to_have_count(0, timeout=30_000)
        with pytest.raises(NotFoundException):
            sb.get_info()
        print(f"sandbox in the browser {appeared_s:.2f} s after Sandbox.create returned")
    finally:
        for s in (sb, other):
            if s is not None:
                try:
                    s.kill()
                except NotFoundException:
                    pass
