"""The live page in Debian's Chromium (Playwright): it goes live, follows workers and tasks, submits,
shows user text as text, asks for a token, and requests nothing from outside the gateway."""

from __future__ import annotations

import signal

import pytest

from tests.conftest import wait_until
from tests.web_support import chromium_or_skip, start_web, web_grid

import playwright.sync_api as playwright_api  # noqa: E402 (the module is the API)
expect = playwright_api.expect

XSS = '<img src=x onerror="window.__xss=1">'
#: generous: the 2-core test machine is shared with other test runs
UI_TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    with web_grid(tmp_path_factory.mktemp("webui")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def browser():
    executable = chromium_or_skip()
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Page:
    """A fresh browser page that records every request it makes and every script error."""

    def __init__(self, browser, url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.goto(url)

    def by(self, testid: str):
        return self.page.locator(f"[data-testid={testid}]")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, grid):
    p = Page(browser, grid.web.url + "/")
    yield p
    p.close()
    outside = [u for u in p.requests if not u.startswith(grid.web.url + "/")]
    assert not outside, f"requests outside the gateway: {outside}"
    assert not p.errors, f"script errors: {p.errors}"


def test_the_page_goes_live_and_shows_workers_and_counts(page):
    expect(page.by("connection")).to_have_text("live", timeout=UI_TIMEOUT_MS)
    expect(page.by("count-workers")).to_have_text("1", timeout=UI_TIMEOUT_MS)
    expect(page.by("workers").locator("tr[data-worker=w1]")).to_have_count(1, timeout=UI_TIMEOUT_MS)
    for counter in ("count-queued", "count-running", "count-done", "count-failed"):
        assert page.by(counter).text_content().strip().isdigit()


def test_the_worker_count_follows_a_worker_joining_and_being_killed(page, grid):
    expect(page.by("connection")).to_have_text("live", timeout=UI_TIMEOUT_MS)
    w2 = grid.start_worker("--name", "w2")
    expect(page.by("count-workers")).to_have_text("2", timeout=UI_TIMEOUT_MS)
    expect(page.by("workers").locator("tr[data-worker=w2]")).to_have_count(1, timeout=UI_TIMEOUT_MS)
    grid.kill(w2, signal.SIGKILL)
    expect(page.by("count-workers")).to_have_text("1", timeout=UI_TIMEOUT_MS)
    expect(page.by("workers").locator("tr[data-worker=w2]")).to_have_count(0, timeout=UI_TIMEOUT_MS)


def test_a_task_submitted_with_the_form_appears_and_succeeds(page):
    expect(page.by("connection")).to_have_text("live", timeout=UI_TIMEOUT_MS)
    done_before = int(page.by("count-done").text_content())
    form = page.by("submit-form")
    form.locator("[name=task]").fill("square")
    form.locator("[name=args]").fill("[12]")
    form.locator("button[type=submit]").click()
    result = page.page.locator("#submit-result")
    expect(result).to_contain_text("succeeded", timeout=UI_TIMEOUT_MS)
    assert "144" in result.text_content()
    task_id = result.text_content().split()[0]
    row = page.by("tasks").locator(f'tr[data-task-id="{task_id}"]')
    expect(row).to_have_attribute("data-state", "succeeded", timeout=UI_TIMEOUT_MS)
    wait_until(lambda: int(page.by("count-done").text_content()) > done_before, 20, what="done count to move")


def test_bad_args_in_the_form_are_refused_with_a_message(page):
    form = page.by("submit-form")
    form.locator("[name=task]").fill("square")
    form.locator("[name=args]").fill("[1,")
    form.locator("button[type=submit]").click()
    expect(page.page.locator("#submit-result")).to_contain_text("not valid JSON", timeout=UI_TIMEOUT_MS)


def test_user_text_is_shown_as_text_and_runs_nothing(page, grid):
    expect(page.by("connection")).to_have_text("live", timeout=UI_TIMEOUT_MS)
    task_id = grid.web.submit("sleep", XSS)
    assert grid.web.result(task_id)["state"] == "failed"
    row = page.by("tasks").locator(f'tr[data-task-id="{task_id}"]')
    expect(row).to_have_attribute("data-state", "failed", timeout=UI_TIMEOUT_MS)
    failure = page.page.locator(f'#failures li[data-task-id="{task_id}"]')
    expect(failure).to_contain_text(XSS, timeout=UI_TIMEOUT_MS)
    failure.click()
    detail = page.page.locator("#detail")
    expect(detail).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(detail.locator("#detail-body")).to_contain_text("Traceback", timeout=UI_TIMEOUT_MS)
    expect(detail).to_contain_text(XSS)
    assert page.page.evaluate("window.__xss") is None
    assert page.page.locator("img").count() == 0


def test_the_page_asks_for_a_token_where_tokens_are_on(browser, grid, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("page-token-0001 read\n")
    web = start_web(grid, "--tokens", str(tokens))
    p = Page(browser, web.url + "/")
    try:
        dialog = p.page.locator("#token-dialog")
        expect(dialog).to_be_visible(timeout=UI_TIMEOUT_MS)
        dialog.locator("[name=token]").fill("page-token-0001")
        dialog.locator("button[type=submit]").click()
        expect(p.by("connection")).to_have_text("live", timeout=UI_TIMEOUT_MS)
        expect(p.by("count-workers")).to_have_text("1", timeout=UI_TIMEOUT_MS)
        assert all(u.startswith(web.url + "/") for u in p.requests)
    finally:
        p.close()
        web.stop()
