"""The web console in a real browser (Debian's headless Chromium driven by Playwright, see
tools/browser.py) and over real HTTP: the ``console`` command and ``run --console``, with
the data seeded through the engine (test_console.seed). Each page's screenshot is taken into
a temporary folder, or into the folder MAILINTEGRATION_SCREENSHOTS names: the README's
(docs/screenshots) are refreshed on purpose, not by every test run in a clean clone."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from support import (
    LOGIN,
    LOGIN_PASSWORD,
    Mailbox,
    data_dir,
    engine_argv,
    free_port,
    requests,
    wait_for,
)
from test_console import AGENT, AGENT_PASSWORD, HOSTILE, XSS_SUBJECT, Seeded, seed

from tools.dovecot import Dovecot

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.dovecot

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
SHOTS_ENV = "MAILINTEGRATION_SCREENSHOTS"
# A global each payload of test_console would set if it ever ran.
XSS_UNSET = "typeof window.__xss === 'undefined'"
# Elements the payloads would have become, had the page not escaped them.
INJECTED = "script, [onerror], [onload], iframe, object"


@contextlib.contextmanager
def process(argv: list[str], log: Path, ready: Callable[[], bool], what: str) -> Iterator[Any]:
    """A process of the engine, stopped by SIGTERM (then killed) whatever the test did."""
    env = dict(os.environ, MAILINTEGRATION_LOGIN=LOGIN, MAILINTEGRATION_PASSWORD=LOGIN_PASSWORD)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
        try:

            def up() -> bool:
                assert proc.poll() is None, log.read_text()[-3000:]
                return ready()

            wait_for(up, 30, what)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status) == 200
    except OSError:
        return False


@contextlib.contextmanager
def console_command(s: Seeded, tmp_path: Path) -> Iterator[str]:
    """``mailintegration console`` on the seeded data directory; yields its base URL."""
    port = free_port()
    argv = engine_argv(
        "console", "--data-dir", s.data, "--config-dir", s.conf, "--listen", f"127.0.0.1:{port}"
    )
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path / "console.log"
    with process(argv, log, lambda: answers(url + "login"), "the console"):
        yield url
    assert f"console on {url}" in log.read_text()


def check_no_script_ran(page: Page) -> None:
    assert page.evaluate(XSS_UNSET), page.url
    assert page.locator(INJECTED).count() == 0, page.url


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: ``$MAILINTEGRATION_SCREENSHOTS`` (relative to the repository),
    else a temporary folder."""
    named = os.environ.get(SHOTS_ENV)
    return REPO / named if named else tmp_path_factory.mktemp("screenshots")


def shot(page: Page, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.png"
    page.screenshot(path=str(target), full_page=True)
    assert target.read_bytes().startswith(b"\x89PNG"), target


def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a thread of its own: Playwright's sync API runs an event loop in this
    one (tools/browser.py), so the helpers' own (anyio.run) must run elsewhere."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result(timeout=120)


def once_process(data: Path, conf: Path) -> int:
    """``once`` in a process: it handles signals, which only the main thread may."""
    argv = engine_argv("once", "--config-dir", conf, "--data-dir", data)
    argv += ["--login", LOGIN, "--password", LOGIN_PASSWORD]
    return subprocess.run(argv, cwd=REPO, capture_output=True, timeout=120).returncode


def seeded_in_thread(tmp_path: Path, dovecot: Dovecot) -> Seeded:
    def go() -> Seeded:
        data = data_dir(tmp_path)

        def new_mailbox(path: Path, **settings: Any) -> Mailbox:
            return Mailbox.create(dovecot, data, path, **settings)

        return seed(tmp_path, data, new_mailbox, once_process)

    return in_thread(go)


@pytest.mark.chromium
def test_an_agent_logs_in_sees_the_outage_downloads_a_failed_message_and_replays_it(
    tmp_path: Path, dovecot: Dovecot, browser_page: Page, shots: Path
) -> None:
    s = seeded_in_thread(tmp_path, dovecot)
    page = browser_page
    with console_command(s, tmp_path) as url:
        page.goto(url)
        assert page.url == url + "login"
        shot(page, shots, "login")
        page.fill("input[name=login]", AGENT)
        page.fill("input[name=password]", AGENT_PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(url + "mailboxes")
        broken = page.locator("tr[data-mailbox=broken]")
        assert "OUTAGE: unreachable since" in broken.inner_text()
        assert page.locator("tr[data-mailbox=support] .state-ok").inner_text() == "OK"
        shot(page, shots, "mailboxes")

        page.click("text=Failed mail")
        row = page.locator("#failures tbody tr").first
        # The payloads are on the page, as text.
        assert XSS_SUBJECT in row.inner_text()
        check_no_script_ran(page)
        shot(page, shots, "failed-mail")

        row.locator("a").click()
        page.wait_for_url(re.compile(r".*/requests/\d+$"))
        failure_url = page.url
        assert "<img src=x onerror=" in page.locator("dl.head").inner_text()  # the sender
        check_no_script_ran(page)
        shot(page, shots, "failure-event")
        with page.expect_download() as download:
            page.click("#download-eml")
        assert download.value.suggested_filename == "message.eml"
        assert Path(download.value.path()).read_bytes() == HOSTILE

        # A POST without the CSRF token, from the console's own page, is refused.
        status = page.evaluate(
            "fetch(location.pathname + '/replay', {method: 'POST', headers: "
            "{'content-type': 'application/x-www-form-urlencoded'}, body: 'x=1'})"
            ".then(r => r.status)"
        )
        assert status == 403

        in_thread(s.fix_directory_now)  # the cause fixed: the sender is a user now
        page.click("#replay")
        outcome = page.locator("#replay-outcome")
        assert outcome.inner_text().startswith("created"), outcome.inner_text()
        shot(page, shots, "replay")
        page.click("#replayed-request")
        assert page.locator("h1 .subject").inner_text() == XSS_SUBJECT
        check_no_script_ran(page)
        shot(page, shots, "request")
        page.goto(failure_url)  # the failure event is still there
        assert page.locator("#download-eml").count() == 1

        page.click("text=Requests")
        assert page.locator("#requests tbody tr").count() == 4
        shot(page, shots, "requests")
        page.click("text=Flow")
        assert page.locator("svg rect.bar").count() >= 2
        shot(page, shots, "flow")
        check_no_script_ran(page)
    kinds = [r["kind"] for r in in_thread(requests, s.data)]
    assert sorted(kinds) == ["mail", "mail", "message-failure", "outage"]
