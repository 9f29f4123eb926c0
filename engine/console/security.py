"""The web console's security: the session key, CSRF tokens, the login's rate limit, the
headers every answer carries, and a download's Content-Disposition.

Mail is hostile input shown to agents, so the console assumes every text it shows tries to
run a script: Jinja2 escapes every value (autoescape), the pages carry no script at all, and
the Content-Security-Policy forbids any that would slip in (``default-src 'self'``, no inline
script, no frames, forms only to the console).
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import time
import unicodedata
import urllib.parse
from collections import OrderedDict, deque
from pathlib import Path

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.store import private_file

KEY_FILE = "console.key"

CSP = (
    "default-src 'self'; script-src 'none'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def session_key(data_dir: Path) -> str:
    """The key that signs session cookies: made once into ``console.key`` in the data
    directory, mode 0600 from its creation (O_EXCL: two consoles starting together agree on
    the file that won); one found open to others is made private, with a warning."""
    path = data_dir / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fd = -1
    if fd == -1:
        private_file(path)
        key = path.read_text(encoding="ascii").strip()
        if len(key) < 32:
            raise ValueError(f"{path} holds no usable key: remove it to make a new one")
        return key
    key = secrets.token_hex(32)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return key


def csrf_token(session: dict[str, object]) -> str:
    """The session's CSRF token (made on first use); every form carries it."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def csrf_ok(session: dict[str, object], sent: object) -> bool:
    """Whether a POST's token is the session's (in constant time)."""
    token = session.get("csrf")
    return isinstance(token, str) and isinstance(sent, str) and hmac.compare_digest(token, sent)


class LoginThrottle:
    """At most ``attempts`` failed logins per client address and per login name within
    ``window`` seconds; bounded in memory (the oldest keys are forgotten past ``keys``)."""

    def __init__(self, attempts: int = 5, window: float = 300.0, keys: int = 10_000) -> None:
        self.attempts, self.window, self.keys = attempts, window, keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and now - times[0] > self.window:
            times.popleft()
        return times

    def blocked(self, *keys: str) -> bool:
        now = time.monotonic()
        return any(len(self._recent(k, now)) >= self.attempts for k in keys)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        for key in keys:
            times = self._recent(key, now)
            times.append(now)
            self._failures[key] = times
            self._failures.move_to_end(key)
            while len(self._failures) > self.keys:
                self._failures.popitem(last=False)

    def succeeded(self, *keys: str) -> None:
        for key in keys:
            self._failures.pop(key, None)


_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]")


def content_disposition(name: str) -> str:
    """``attachment`` with the received file name made safe (RFC 6266): an ASCII fallback
    with nothing that could end the header or the parameter, and the name itself
    percent-encoded in ``filename*`` (RFC 5987). Never the name as received."""
    # Control characters and separators gone, length bounded, no path.
    cleaned = "".join(
        c for c in unicodedata.normalize("NFC", name) if unicodedata.category(c)[0] != "C"
    )
    cleaned = cleaned.replace("/", "_").replace("\\", "_").strip(" .")[:200] or "attachment"
    ascii_name = _UNSAFE.sub("_", cleaned).strip(" .") or "attachment"
    quoted = urllib.parse.quote(cleaned, safe="")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quoted}"


class SecurityHeaders:
    """An ASGI middleware: every answer gets :data:`HEADERS` (a header a route set wins)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
