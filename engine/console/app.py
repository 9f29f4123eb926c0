"""The web console's ASGI app: pages over the store's read queries, and replay.

Every route but the login page and the stylesheet needs a signed-in session; every POST
checks the session's CSRF token first (:func:`_form`), before it looks at anything else;
replay also needs the ``replay`` role of the directory. The console reads through a store
connection of its own (read-only SQLite beside the engine's writer) and never writes: a
replay goes through the ``ingest`` path, i.e. the engine's one writer.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypercorn.middleware import ProxyFixMiddleware
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.console import charts
from engine.console.mail import head_fields
from engine.console.security import (
    LoginThrottle,
    SecurityHeaders,
    content_disposition,
    csrf_ok,
    csrf_token,
)
from engine.ops import Health
from engine.store import RequestFilter, Store

log = logging.getLogger("engine.console")

REPLAY_ROLE = "replay"
SESSION_COOKIE = "mailintegration_console"
SESSION_SECONDS = 8 * 3600
MAX_FORM_BYTES = 16 * 1024  # a POST's body: a login or a token, nothing bigger
LIST_LIMIT = 500  # rows a list page shows (the newest)
REFRESH_SECONDS = 30  # the Mailboxes page reloads itself (a meta refresh: no script)
TYPES = ("incident", "event", "service request")


@dataclass(frozen=True)
class ReplayResult:
    """What a replay did, in words for the page; ``request_number``: the request it made or
    updated, if any."""

    ok: bool
    text: str
    request_number: int | None = None


# (mailbox, the raw message, the signed-in login, the retry: engine.keys.ingest_key) -> what
# happened.
Replay = Callable[[str, bytes, str, int], Awaitable[ReplayResult]]


@dataclass
class Console:
    """What the pages need: the store to read, the replay (None: not offered), the daemon's
    health (None without a daemon), and how cookies are sent."""

    store: Store
    secret_key: str
    replay: Replay | None = None
    health: Health | None = None
    secure_cookies: bool = False
    # Behind one reverse proxy of ours: its X-Forwarded-For/-Proto/-Host are believed (the
    # client's address for the throttle, https for a Secure cookie). Never without one: any
    # client could then claim any address.
    trust_proxy: bool = False
    throttle: LoginThrottle = field(default_factory=LoginThrottle)


def _templates() -> Environment:
    # Autoescape for every template, whatever its name: mail text is hostile everywhere.
    env = Environment(
        loader=PackageLoader("engine.console", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env


def create_app(console: Console) -> ASGIApp:
    """The console as an ASGI app (served by engine.web.serve_asgi)."""
    pages = _Pages(console)
    app = Starlette(routes=console_routes(pages), exception_handlers={HTTPException: pages.error})
    sessions = _Sessions(app, console)
    outer: ASGIApp = SecurityHeaders(sessions)
    if console.trust_proxy:
        # Hypercorn types its middleware with its own scope classes.
        outer = ProxyFixMiddleware(outer, mode="legacy", trusted_hops=1)  # type: ignore[arg-type,assignment]
    return outer


class _Sessions:
    """Starlette's signed session cookie, Secure when configured or when the request came
    over HTTPS (directly, or as a trusted proxy says): one middleware for each case."""

    def __init__(self, app: ASGIApp, console: Console) -> None:
        def sessions(secure: bool) -> ASGIApp:
            return SessionMiddleware(
                app,
                secret_key=console.secret_key,
                session_cookie=SESSION_COOKIE,
                max_age=SESSION_SECONDS,
                same_site="strict",
                https_only=secure,
            )

        self.plain = sessions(console.secure_cookies)
        self.secure = sessions(True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.secure if scope.get("scheme") in ("https", "wss") else self.plain
        await app(scope, receive, send)


def console_routes(pages: _Pages) -> list[BaseRoute]:
    """Every route of the console; each POST checks the CSRF token first (_form)."""
    return [
        Route("/", pages.home),
        Route("/login", pages.login_page, methods=["GET"]),
        Route("/login", pages.login, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/mailboxes", pages.mailboxes),
        Route("/failures", pages.failures),
        Route("/requests", pages.requests),
        Route("/requests/{number:int}", pages.request),
        Route("/requests/{number:int}/replay", pages.replay, methods=["POST"]),
        Route("/attachments/{id:int}", pages.attachment),
        Route("/flow", pages.flow),
        Mount("/static", StaticFiles(packages=[("engine.console", "static")]), name="static"),
    ]


class _Pages:
    """The routes; each page checks the session first (:meth:`user`)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.store = console.store
        self.env = _templates()

    def page(self, request: Request, name: str, status: int = 200, **values: Any) -> HTMLResponse:
        """A template rendered (autoescaped) with the session's user and CSRF token."""
        values.setdefault("user", request.session.get("user"))
        body = self.env.get_template(name).render(
            csrf=csrf_token(request.session), path=request.url.path, **values
        )
        return HTMLResponse(body, status)

    @staticmethod
    def user(request: Request) -> str:
        login = request.session.get("user")
        if not isinstance(login, str):
            # Not signed in: to the login page (a 303 a browser follows with a GET).
            raise HTTPException(303, headers={"location": "/login"})
        return login

    async def error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 303:
            return RedirectResponse("/login", 303)
        return self.page(
            request, "error.html", exc.status_code, code=exc.status_code, detail=exc.detail
        )

    async def login_page(self, request: Request) -> Response:
        return self.page(request, "login.html", error=None)

    async def login(self, request: Request) -> Response:
        form = await _form(request)
        name, password = form.get("login", "")[:200], form.get("password", "")[:1000]
        client = request.client.host if request.client else "?"
        keys = (f"ip:{client}", f"login:{name.lower()}")
        throttle = self.console.throttle
        if throttle.blocked(*keys):
            log.warning("console: login of %r from %s refused: too many failures", name, client)
            return self.page(
                request, "login.html", 429, error="Too many failed logins: wait a while."
            )
        if not (name and password and await self.store.check_login(name, password)):
            throttle.failed(*keys)
            log.warning("console: failed login of %r from %s", name, client)
            return self.page(request, "login.html", 401, error="Wrong login or password.")
        throttle.succeeded(*keys)
        # A new session (and CSRF token): nothing of the anonymous one carries over.
        request.session.clear()
        request.session["user"] = name
        log.info("console: %s signed in from %s", name, client)
        return RedirectResponse("/mailboxes", 303)

    async def logout(self, request: Request) -> Response:
        await _form(request)
        request.session.clear()
        return RedirectResponse("/login", 303)

    async def home(self, request: Request) -> Response:
        self.user(request)
        return RedirectResponse("/mailboxes", 303)

    async def mailboxes(self, request: Request) -> Response:
        self.user(request)
        now = datetime.now(UTC)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        rows = await mailbox_rows(self.console, midnight.isoformat(timespec="seconds"))
        return self.page(
            request, "mailboxes.html", rows=rows, refresh=REFRESH_SECONDS, now=_ts(now)
        )

    async def failures(self, request: Request) -> Response:
        self.user(request)
        q = request.query_params
        mailbox, cause = q.get("mailbox") or None, q.get("cause") or None
        # The filter in the query: the newest LIST_LIMIT of that mailbox and cause, however
        # many others there are; the choices offered come from the newest of all.
        shown = await self.store.find_requests(
            RequestFilter(kind="message-failure", mailbox=mailbox, cause=cause), limit=LIST_LIMIT
        )
        every = await self.store.find_requests(
            RequestFilter(kind="message-failure"), limit=LIST_LIMIT
        )
        return self.page(
            request,
            "failures.html",
            rows=[_failure_row(r) for r in shown],
            mailboxes=sorted({r["mailbox"] for r in every if r["mailbox"]}),
            causes=sorted({r["cause"] for r in every if r["cause"]}),
            mailbox=mailbox,
            cause=cause,
            limit=LIST_LIMIT,
        )

    async def requests(self, request: Request) -> Response:
        self.user(request)
        q = request.query_params
        where = RequestFilter(
            type=q.get("type") or None,
            status=q.get("status") or None,
            team=q.get("team") or None,
            mailbox=q.get("mailbox") or None,
            since=_day(q.get("since")),
            until=_day(q.get("until")),
        )
        rows = await self.store.find_requests(where, limit=LIST_LIMIT)
        return self.page(
            request, "requests.html", rows=rows, f=where, types=TYPES, limit=LIST_LIMIT
        )

    async def request(self, request: Request) -> Response:
        login = self.user(request)
        detail = await self.detail(request)
        offered = self.console.replay is not None
        eml = _eml(detail)
        found = await self.store.attachment(eml["id"]) if eml is not None else None
        return self.page(
            request,
            "request.html",
            r=detail,
            eml=eml,
            head=head_fields(found[1]) if found is not None else [],
            replay_offered=offered,
            can_replay=offered and REPLAY_ROLE in await self.store.user_roles(login),
            role=REPLAY_ROLE,
        )

    async def replay(self, request: Request) -> Response:
        await _form(request)
        login = self.user(request)
        if self.console.replay is None:
            raise HTTPException(404, "this console does not replay messages")
        if REPLAY_ROLE not in await self.store.user_roles(login):
            raise HTTPException(403, f"replay needs the {REPLAY_ROLE!r} role of the directory")
        detail = await self.detail(request)
        eml = _eml(detail)
        if detail["kind"] != "message-failure" or eml is None or not detail["mailbox"]:
            raise HTTPException(409, "this request holds no message to replay")
        if eml["name"] != "message.eml":
            raise HTTPException(
                409, "only the start of this message was read: it is still on the server"
            )
        found = await self.store.attachment(eml["id"])
        if found is None:
            raise HTTPException(410, "the message's content is no longer in the store")
        log.info("console: %s replays failure event #%d", login, detail["number"])
        # After failed replays, the next is a retry of its own (not a duplicate of those).
        retry = await self.store.failed_ingests(str(found[0]["sha256"]))
        result = await self.console.replay(detail["mailbox"], found[1], login, retry)
        log.info("console: replay of #%d: %s", detail["number"], result.text)
        return self.page(request, "replay.html", r=detail, result=result)

    async def attachment(self, request: Request) -> Response:
        self.user(request)
        found = await self.store.attachment(int(request.path_params["id"]))
        if found is None:
            raise HTTPException(404, "no such attachment")
        meta, data = found
        # Never rendered: bytes to save, which the browser must not sniff, whatever the
        # sender claimed the content was.
        return Response(
            data,
            media_type="application/octet-stream",
            headers={
                "content-disposition": content_disposition(str(meta["name"])),
                "x-content-type-options": "nosniff",
            },
        )

    async def flow(self, request: Request) -> Response:
        self.user(request)
        now = datetime.now(UTC)
        since = (now - timedelta(hours=24)).isoformat(timespec="seconds")
        rows = await self.store.flow(since)
        causes = await self.store.failures_by_cause(since)
        return self.page(
            request,
            "flow.html",
            series=charts.flow_series(rows, now),
            causes=charts.cause_bars(causes),
            c=charts,
            now=_ts(now),
        )

    async def detail(self, request: Request) -> dict[str, Any]:
        detail = await self.store.request_detail(int(request.path_params["number"]))
        if detail is None:
            raise HTTPException(404, "no such request")
        return detail


async def _form(request: Request) -> dict[str, str]:
    """A POST's form, bounded, after its CSRF token was checked: 403 without the session's
    token, whatever else the request holds."""
    if request.headers.get("content-type", "").split(";")[0].strip() != (
        "application/x-www-form-urlencoded"
    ):
        raise HTTPException(403, "a form of this console is expected (CSRF check)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "form too large")
    try:
        pairs = urllib.parse.parse_qsl(body.decode("utf-8"), max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "malformed form") from None
    form = dict(pairs)
    if not csrf_ok(request.session, form.get("csrf")):
        raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page")
    return form


def _eml(detail: dict[str, Any]) -> dict[str, Any] | None:
    """A failure event's message file: message.eml, or what was read of it (None for any
    other request, whatever its attachments are called)."""
    if detail["kind"] != "message-failure":
        return None
    for a in detail.get("attachments", []):
        if a["name"] in ("message.eml", "message-start.eml"):
            return dict(a)
    return None


_DESCRIBED = re.compile(r"^(From|Subject): (.*)$", re.MULTILINE)


def _failure_row(r: dict[str, Any]) -> dict[str, Any]:
    """A failure event with its message's sender and subject, read from the lines the
    failure processor wrote in its description (engine/processors/failure.py)."""
    found = {k: v for k, v in _DESCRIBED.findall(r["description"] or "")}
    return {**r, "sender": found.get("From", ""), "message_subject": found.get("Subject", "")}


def _day(value: str | None) -> str | None:
    """A ``YYYY-MM-DD`` filter, or None (anything else is ignored, not passed on)."""
    if value and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return value
    return None


def _ts(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


async def mailbox_rows(console: Console, today: str) -> list[dict[str, Any]]:
    """One row per mailbox the store (or the daemon) knows: state, last success, today's
    messages, how the daemon waits for it, the replica that polls it."""
    status = {r["mailbox"]: r for r in await console.store.mailbox_status()}
    outages: dict[str, list[dict[str, Any]]] = {}
    for o in await console.store.open_outage_events():
        outages.setdefault(o["mailbox"], []).append(o)
    today_counts = await console.store.messages_since(today)
    waiting = await console.store.waiting_on_server()
    health = console.health.mailboxes if console.health is not None else {}
    names = sorted(set(status) | set(outages) | set(health))
    rows = []
    for name in names:
        s = status.get(name, {})
        h = health.get(name)
        rows.append(
            {
                "mailbox": name,
                "outages": outages.get(name, []),
                "last_success": s.get("last_success"),
                "last_error": s.get("last_error"),
                "today": today_counts.get(name, 0),
                "waiting": waiting.get(name),
                "wait": h.wait if h is not None else None,
                "wait_seconds": h.wait_seconds if h is not None else None,
                "owner": s.get("owner"),
            }
        )
    return rows
