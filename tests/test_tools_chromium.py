"""Headless Debian Chromium driven by Playwright (tools/browser.py): a smoke test."""

from __future__ import annotations

import http.server
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from tools.browser import CHROMIUM_ARGS, find_chromium, launch_chromium

pytestmark = pytest.mark.chromium

PAGE = b"""<!doctype html>
<html><head><title>smoke</title></head>
<body>
<h1 id="title">Mailboxes</h1>
<p id="count" data-source="server">3</p>
<p id="computed"></p>
<script>
  document.getElementById("computed").textContent =
    String(Number(document.getElementById("count").textContent) * 2);
  window.smokeLoaded = true;
</script>
</body></html>"""


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    """A page served on 127.0.0.1 (ephemeral port)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(5)


def _chromium_processes() -> dict[int, list[str]]:
    """pid -> argv of the Chromium processes started (indirectly) by this process."""
    parents: dict[int, int] = {}
    argv: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
        argv[int(entry.name)] = [part.decode(errors="replace") for part in cmdline if part]
    ours: set[int] = set()
    frontier = [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        ours.update(children)
        frontier += children
    return {pid: argv[pid] for pid in ours if argv.get(pid) and "chromium" in argv[pid][0]}


def test_page_on_loopback_is_rendered_read_and_screenshotted(
    browser_page: Page, site: str, tmp_path: Path
) -> None:
    browser_page.goto(site)
    assert browser_page.title() == "smoke"
    assert browser_page.inner_text("#title") == "Mailboxes"
    assert browser_page.get_attribute("#count", "data-source") == "server"
    assert browser_page.inner_text("#computed") == "6"  # JavaScript ran
    assert browser_page.evaluate("window.smokeLoaded") is True
    assert browser_page.evaluate("window.neverSet === undefined") is True

    shot = tmp_path / "smoke.png"
    browser_page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width == 1280 and height >= 100  # Playwright's default viewport width


def test_debian_chromium_runs_with_the_test_flags_and_a_fresh_profile(
    browser_page: Page, site: str
) -> None:
    browser_page.goto(site)
    processes = _chromium_processes()
    browsers = [argv for argv in processes.values() if "--remote-debugging-pipe" in argv]
    assert len(browsers) == 1, processes
    argv = browsers[0]
    chromium = find_chromium()
    assert chromium is not None
    # /usr/bin/chromium is Debian's wrapper script; it execs the real binary.
    assert argv[0].startswith("/usr/lib/chromium/")
    assert "--headless" in argv or any(a.startswith("--headless=") for a in argv)
    assert set(CHROMIUM_ARGS) <= set(argv)
    [profile] = [a.split("=", 1)[1] for a in argv if a.startswith("--user-data-dir=")]
    assert Path(profile).is_dir()
    assert Path(profile).name.startswith("playwright_chromiumdev_profile-")


def test_closing_the_browser_ends_its_processes_and_removes_the_profile(
    chromium_browser: Browser, site: str
) -> None:
    # One sync Playwright per thread: the module's browser lives in this one, so this
    # browser of the test's own is started and closed in a thread of its own.
    seen: dict[str, object] = {}

    def browse() -> None:
        with launch_chromium() as browser:
            browser.new_page().goto(site)
            seen["processes"] = _chromium_processes()

    before = set(_chromium_processes())
    worker = threading.Thread(target=browse)
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    during = seen["processes"]
    assert isinstance(during, dict)
    own = {pid: argv for pid, argv in during.items() if pid not in before}
    [profile] = {
        a.split("=", 1)[1] for argv in own.values() for a in argv
        if a.startswith("--user-data-dir=")
    }  # fmt: skip
    assert not set(own) & set(_chromium_processes())  # all gone
    assert not Path(profile).exists()
    assert chromium_browser.is_connected()  # the module's browser is untouched
