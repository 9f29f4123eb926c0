"""Headless Chromium for browser tests: Debian's /usr/bin/chromium driven by Playwright.

Playwright for Python is the driver: its wheel carries its own driver process, so no
second Debian package (chromedriver) has to match the browser's version, and its API
waits for elements, evaluates JavaScript in the page (to check that an injected script did
not run) and takes screenshots. Its browser download (`playwright install`) is never used:
`executable_path` points at Debian's Chromium, installed by scripts/setup.sh.

    with launch_chromium() as browser:
        page = browser.new_page()
        page.goto("http://127.0.0.1:PORT/")
        page.screenshot(path="page.png")

Every launch gets a fresh profile: Playwright passes `--user-data-dir` with a new
temporary directory and removes it on close. The flags below keep Chromium off the
network (this machine refuses outside connections, many at a time without them) and quiet.
The sync API runs one Playwright per thread and never in a thread that runs an asyncio
loop: a second browser beside the `chromium_browser` fixture's is launched in a thread of
its own; async tests use `playwright.async_api` with the same `executable_path` and
`CHROMIUM_ARGS`. Measured here: launch 1.6 s, a page with a screenshot well under 1 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Browser, sync_playwright

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "find_chromium", "launch_chromium"]

CHROMIUM = Path("/usr/bin/chromium")
# Playwright adds --headless and a fresh --user-data-dir itself (and refuses the latter in
# `args`); these are the rest of what a test browser needs here.
CHROMIUM_ARGS = (
    "--no-sandbox",  # root in CI: Chromium's sandbox refuses to start as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
_LAUNCH_TIMEOUT_MS = 30_000


def find_chromium() -> Path | None:
    """Debian's Chromium (`CHROMIUM_BINARY` overrides the path), or None if absent."""
    override = os.environ.get("CHROMIUM_BINARY")
    candidates = [Path(override)] if override else [CHROMIUM]
    if not override and (found := shutil.which("chromium")):
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


@contextlib.contextmanager
def launch_chromium(executable: Path | None = None) -> Iterator[Browser]:
    """Start headless Chromium with a fresh profile; closed (processes and profile) on exit.

    Raises FileNotFoundError when Chromium is not installed.
    """
    binary = executable or find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(binary),
            headless=True,
            args=list(CHROMIUM_ARGS),
            timeout=_LAUNCH_TIMEOUT_MS,
        )
        try:
            yield browser
        finally:
            browser.close()
