"""The web console (engine/console), as an ASGI app called in process (httpx's
ASGITransport) over a store seeded through the engine's own paths: a real Dovecot read by
``once``, a mailbox that cannot be reached (an outage), a message from an unknown sender
(a failure event) carrying XSS attempts in its subject, sender name, attachment name and
HTML body. The browser tests are in test_console_browser.py."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import pytest_asyncio
from support import (
    LOGIN,
    LOGIN_PASSWORD,
    Mailbox,
    count_rows,
    engine_argv,
    free_port,
    import_directory,
    mailbox_xml,
    message,
    once,
    open_test_store,
    requests,
    store_args,
    wait_for,
)
from test_ops import FLOOD, _room_for_the_flood

from engine.console import Console, create_app
from engine.console.app import _Pages, console_routes
from engine.console.security import CSP, content_disposition, session_key
from engine.store import DataDirLock, RequestFilter, Store

pytestmark = pytest.mark.dovecot
asyncio = pytest.mark.asyncio

AGENT, AGENT_PASSWORD = "agent", "Agent-Pa55word"
VIEWER, VIEWER_PASSWORD = "viewer", "Viewer-Pa55word"
CONSOLE_USERS: dict[str, Any] = {
    "users": [
        {"login": AGENT, "name": "Agent", "password": AGENT_PASSWORD, "roles": ["replay"]},
        {"login": VIEWER, "name": "Viewer", "password": VIEWER_PASSWORD},
    ]
}
NEW_HIRE = "new.hire@example.com"
# Each payload would set window.__xss if it ever ran in a page.
XSS_SUBJECT = "<script>window.__xss='subject'</script> printer jammed"
XSS_SENDER = "<img src=x onerror=\"window.__xss='sender'\">"
XSS_FILE = "<svg onload=window.__xss='file'>.txt"
XSS_HTML = (
    "<p>It jams.</p><script>window.__xss='html'</script>"
    "<img src=x onerror=\"window.__xss='html-img'\">"
)


def hostile_message() -> bytes:
    """From a sender the directory does not know yet, every visible part an XSS attempt."""
    msg = EmailMessage()
    msg["From"] = f'"{XSS_SENDER}" <{NEW_HIRE}>'
    msg["To"] = "support@example.com"
    msg["Subject"] = XSS_SUBJECT
    msg["Date"] = "Fri, 27 Nov 2026 09:12:44 -0500"
    msg["Message-ID"] = "<hostile-1@example.com>"
    msg.set_content("It jams on every page.\n")
    msg.add_alternative(XSS_HTML, subtype="html")
    msg.add_attachment(b"log line\n", maintype="text", subtype="plain", filename=XSS_FILE)
    return msg.as_bytes(policy=SMTP)


# Built once: its MIME boundary is random.
HOSTILE = hostile_message()


def plain_message(subject: str, sender: str = "John Doe <john.doe@example.com>") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "support@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{abs(hash(subject))}@example.com>"
    msg.set_content("Hello, it does not work.\n")
    return msg.as_bytes(policy=SMTP)


@dataclass
class Seeded:
    """A data directory after one ``once`` over ``conf``: mailbox ``support`` (a request, a
    failure event from an unknown sender) and ``broken`` (an outage)."""

    data: Path
    conf: Path
    box: Mailbox
    tmp: Path

    async def requests(self) -> list[dict[str, Any]]:
        # The helpers run their own event loop (anyio.run): in a thread beside the test's.
        return await anyio.to_thread.run_sync(requests, self.data)

    async def failure(self) -> dict[str, Any]:
        return next(r for r in await self.requests() if r["kind"] == "message-failure")

    def fix_directory_now(self) -> None:
        """The cause of the failure fixed: the sender is now a user of the directory."""
        user = {"login": "new.hire", "email": NEW_HIRE, "name": "New Hire"}
        import_directory(self.data, self.tmp, {"users": [user]})

    async def fix_directory(self) -> None:
        await anyio.to_thread.run_sync(self.fix_directory_now)


def seed(
    tmp_path: Path,
    data: Path,
    new_mailbox: Callable[..., Mailbox],
    run_once: Callable[[Path, Path], int] = once,
) -> Seeded:
    """Seed through the engine: ``directory import`` and ``once`` against the test Dovecot
    (``run_once``: in process, or a process of its own where signals cannot be had)."""
    import_directory(data, tmp_path, CONSOLE_USERS)
    conf = tmp_path / "mailboxes.d"
    conf.mkdir()
    # No fallback user: mail from an unknown sender becomes a failure event.
    box = new_mailbox(conf / "support.xml", incidentFallbackUserLogon=None)
    box.deliver(plain_message("VPN down since this morning"), HOSTILE)
    mailbox_xml(conf / "broken.xml", port=free_port(), user="nobody", password="x", timeout=2)
    run_once(data, conf)
    kinds = sorted(r["kind"] for r in requests(data))
    assert kinds == ["mail", "message-failure", "outage"], kinds
    return Seeded(data, conf, box, tmp_path)


@pytest.fixture
def seeded(tmp_path: Path, data: Path, new_mailbox: Callable[..., Mailbox]) -> Seeded:
    return seed(tmp_path, data, new_mailbox)


async def replay_by_ingest(seeded: Seeded) -> Callable[[str, bytes, str], Any]:
    """The console command's replay (an engine of its own under the lock)."""
    from engine.console.replay import standalone

    async def opener() -> Store:
        return await open_test_store(seeded.data)

    return standalone(seeded.data, seeded.conf, opener, lock=not store_args())


@pytest_asyncio.fixture
async def console(seeded: Seeded) -> AsyncIterator[tuple[Console, httpx.AsyncClient]]:
    store = await open_test_store(seeded.data)
    try:
        c = Console(store, session_key(seeded.data), replay=await replay_by_ingest(seeded))
        transport = httpx.ASGITransport(app=create_app(c))
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            yield c, client
    finally:
        await store.close()


def token(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


async def log_in(
    client: httpx.AsyncClient, login: str = AGENT, password: str = AGENT_PASSWORD
) -> httpx.Response:
    page = await client.get("/login")
    return await client.post(
        "/login", data={"csrf": token(page.text), "login": login, "password": password}
    )


# -- sign-in, session, CSRF ---------------------------------------------------------------


@asyncio
async def test_every_page_needs_a_login_and_the_login_checks_the_directory_hash(
    console: tuple[Console, httpx.AsyncClient],
) -> None:
    _, client = console
    for path in (
        "/",
        "/mailboxes",
        "/failures",
        "/requests",
        "/requests/1",
        "/flow",
        "/attachments/1",
    ):
        r = await client.get(path)
        assert (r.status_code, r.headers["location"]) == (303, "/login"), path
    assert (await log_in(client, AGENT, "wrong")).status_code == 401
    # The engine's own login has a password too, but no user without one can sign in.
    assert (await log_in(client, "jdoe", "")).status_code == 401
    r = await log_in(client)
    assert (r.status_code, r.headers["location"]) == (303, "/mailboxes")
    assert (await client.get("/mailboxes")).status_code == 200


@asyncio
async def test_the_session_cookie_is_signed_httponly_and_samesite_strict(
    console: tuple[Console, httpx.AsyncClient], seeded: Seeded
) -> None:
    _, client = console
    cookie = (await log_in(client)).headers["set-cookie"]
    flags = {p.strip().lower() for p in cookie.split(";")}
    assert {"httponly", "samesite=strict", "path=/"} <= flags
    assert "secure" not in flags
    # A forged session (another key) is no session at all.
    name, value = cookie.split(";")[0].split("=", 1)
    client.cookies.clear()
    forged = value[:-4] + ("AAAA" if not value.endswith("AAAA") else "BBBB")
    client.cookies.set(name, forged)
    assert (await client.get("/mailboxes")).status_code == 303
    # The key file is the owner's only.
    mode = stat.S_IMODE((seeded.data / "console.key").stat().st_mode)
    assert mode == 0o600


@asyncio
async def test_behind_tls_the_cookie_is_secure(seeded: Seeded) -> None:
    store = await open_test_store(seeded.data)
    try:
        c = Console(store, session_key(seeded.data), secure_cookies=True)
        transport = httpx.ASGITransport(app=create_app(c))
        async with httpx.AsyncClient(transport=transport, base_url="https://console") as client:
            cookie = (await log_in(client)).headers["set-cookie"]
        assert "secure" in {p.strip().lower() for p in cookie.split(";")}
    finally:
        await store.close()


@asyncio
async def test_a_trusted_proxys_forwarded_headers_are_believed_and_no_one_elses(
    seeded: Seeded,
) -> None:
    """X-Forwarded-Proto makes the cookie Secure, and X-Forwarded-For is the address the
    login throttle counts, only with --console-trust-proxy."""
    store = await open_test_store(seeded.data)
    forwarded = {"x-forwarded-proto": "https", "x-forwarded-for": "192.0.2.7"}

    async def cookie_flags(trust: bool, headers: dict[str, str]) -> set[str]:
        c = Console(store, session_key(seeded.data), trust_proxy=trust)
        transport = httpx.ASGITransport(app=create_app(c))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://console", headers=headers
        ) as client:
            cookie = (await log_in(client)).headers["set-cookie"]
        return {p.strip().lower() for p in cookie.split(";")}

    try:
        assert "secure" not in await cookie_flags(False, forwarded)
        assert "secure" in await cookie_flags(True, forwarded)
        assert "secure" not in await cookie_flags(True, {})
        c = Console(store, session_key(seeded.data), trust_proxy=True)
        transport = httpx.ASGITransport(app=create_app(c))
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            for i in range(5):
                client.headers["x-forwarded-for"] = "192.0.2.66"
                assert (await log_in(client, f"guess{i}", "x")).status_code == 401
            assert (await log_in(client, "guess9", "x")).status_code == 429
            client.headers["x-forwarded-for"] = "192.0.2.7"  # another client behind it
            assert (await log_in(client)).status_code == 303
    finally:
        await store.close()


@asyncio
async def test_every_post_without_the_sessions_csrf_token_is_refused(
    console: tuple[Console, httpx.AsyncClient], seeded: Seeded
) -> None:
    c, client = console
    number = (await seeded.failure())["number"]
    await log_in(client)
    posts = [
        r.path.replace("{number:int}", str(number))
        for r in console_routes(_Pages(c))
        if "POST" in (getattr(r, "methods", None) or ())
    ]
    assert sorted(posts) == ["/login", "/logout", f"/requests/{number}/replay"]
    page = (await client.get(f"/requests/{number}")).text
    for path in posts:
        for data in ({}, {"csrf": "forged"}, {"csrf": token(page) + "x"}):
            r = await client.post(path, data={**data, "login": AGENT, "password": AGENT_PASSWORD})
            assert r.status_code == 403, (path, data)
        r = await client.post(
            path, content=f"csrf={token(page)}", headers={"content-type": "text/plain"}
        )
        assert r.status_code == 403, path
    # Nothing was replayed, and the session still stands.
    assert [r["kind"] for r in (await seeded.requests())].count("mail") == 1
    assert (await client.get("/mailboxes")).status_code == 200


@asyncio
async def test_failed_logins_are_throttled(console: tuple[Console, httpx.AsyncClient]) -> None:
    _, client = console
    codes = [(await log_in(client, AGENT, f"wrong{i}")).status_code for i in range(6)]
    assert codes == [401] * 5 + [429]
    # Even the right password waits now: a guesser learns nothing.
    assert (await log_in(client)).status_code == 429


# -- what every answer carries ------------------------------------------------------------


@asyncio
async def test_every_answer_carries_a_strict_csp_and_nosniff(
    console: tuple[Console, httpx.AsyncClient], seeded: Seeded
) -> None:
    _, client = console
    await log_in(client)
    number = (await seeded.failure())["number"]
    for path in (
        "/login",
        "/mailboxes",
        "/failures",
        "/requests",
        f"/requests/{number}",
        "/flow",
        "/nope",
        "/static/console.css",
    ):
        r = await client.get(path)
        assert r.headers["content-security-policy"] == CSP, path
        assert "default-src 'self'" in CSP and "frame-ancestors 'none'" in CSP
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["x-frame-options"] == "DENY", path
        if r.headers["content-type"].startswith("text/html"):
            assert "<script" not in r.text.lower(), path


# -- pages ----------------------------------------------------------------------------------


@asyncio
async def test_mailboxes_shows_the_outage_with_its_cause_and_since_and_the_ok_one(
    console: tuple[Console, httpx.AsyncClient], seeded: Seeded
) -> None:
    _, client = console
    await log_in(client)
    page = (await client.get("/mailboxes")).text
    assert '<meta http-equiv="refresh" content="30">' in page
    rows = dict(re.findall(r'data-mailbox="([^"]+)">(.*?)</tr>', page, re.S))
    assert set(rows) == {"support", "broken"}
    outage = next(r for r in (await seeded.requests()) if r["kind"] == "outage")
    assert f"OUTAGE: {outage['cause']} since {outage['created_at']}" in rows["broken"]
    assert f'href="/requests/{outage["number"]}"' in rows["broken"]
    assert "OK" in rows["support"] and "OUTAGE" not in rows["support"]
    # Both messages of today were recorded (one request, one failure event).
    assert re.search(r"<td>2</td>", rows["support"]), rows["support"]


def test_mailboxes_shows_the_messages_waiting_on_the_server(mailbox: Mailbox) -> None:
    """A message over maxMessageBytes stays on the server (a "kept" failure event): the
    Mailboxes page says how many wait there, and since when."""
    mailbox.configure(maxMessageBytes="2048")
    mailbox.deliver(message("Too big", body="x" * 20_000))
    mailbox.once()
    import_directory(mailbox.data, mailbox.data.parent, CONSOLE_USERS)

    async def go() -> str:
        store = await open_test_store(mailbox.data)
        try:
            app = create_app(Console(store, session_key(mailbox.data)))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
                await log_in(client)
                return (await client.get("/mailboxes")).text
        finally:
            await store.close()

    page = anyio.run(go)
    assert mailbox.left() == 1
    row = re.search(r'data-mailbox="m">(.*?)</tr>', page, re.S)
    assert row and re.search(r"<td>1, the oldest seen \d{4}-\d\d-\d\dT", row.group(1)), page


@asyncio
async def test_failed_mail_lists_cause_sender_subject_date_and_filters(
    console: tuple[Console, httpx.AsyncClient], seeded: Seeded
) -> None:
    _, client = console
    await log_in(client)
    failure = await seeded.failure()
    page = (await client.get("/failures")).text
    assert f'href="/requests/{failure["number"]}"' in page
    assert failure["cause"] in page and failure["created_at"] in page
    # Escaped, never markup: the payloads are text in the page.
    assert "&lt;script&gt;window.__xss=&#39;subject&#39;&lt;/script&gt; printer jammed" in page
    assert NEW_HIRE in page and "<img" not in page
    for query, shown in (
        ("?mailbox=support", True),
        ("?mailbox=broken", False),
        (f"?cause={failure['cause']}", True),
        ("?cause=bad-mime", False),
    ):
        page = (await client.get("/failures" + query)).text
        assert (f'href="/requests/{failure["number"]}"' in page) is shown, query


@asyncio
async def test_requests_filter_by_type_status_team_mailbox_and_date(
    console: tuple[Console, httpx.AsyncClient], seeded: Seeded
) -> None:
    _, client = console
    await log_in(client)
    rows = await seeded.requests()
    mail = next(r for r in rows if r["kind"] == "mail")
    day = mail["created_at"][:10]

    async def numbers(query: str) -> set[int]:
        page = (await client.get("/requests" + query)).text
        return {int(n) for n in re.findall(r'<td><a href="/requests/(\d+)">', page)}

    everything = {r["number"] for r in rows}
    assert await numbers("") == everything
    assert await numbers("?type=incident") == {mail["number"]}
    assert await numbers("?type=event") == everything - {mail["number"]}
    assert await numbers(f"?status={mail['status']}&mailbox=support&type=incident") == {
        mail["number"]
    }
    assert await numbers("?team=IT") == await numbers("?team=1") == everything
    assert await numbers("?team=Facilities") == set()
    assert await numbers(f"?since={day}&until={day}") == everything
    assert await numbers("?since=2999-01-01") == set()
    # A malformed date is no filter, and no SQL.
    assert await numbers("?since=x'%20OR%201=1--") == everything


@asyncio
async def test_request_detail_shows_the_html_body_as_text_and_attachments_download_safely(
    console: tuple[Console, httpx.AsyncClient], seeded: Seeded
) -> None:
    _, client = console
    await log_in(client)
    failure = await seeded.failure()
    page = (await client.get(f"/requests/{failure['number']}")).text
    eml = failure["attachments"][0]
    assert eml["name"] == "message.eml"
    # The message's own header fields, decoded, the sender's name with them: as text.
    assert "<img" not in page and "<script" not in page
    assert "&lt;img src=x onerror=&#34;window.__xss=&#39;sender&#39;&#34;&gt;" in page
    assert "<dt>Subject</dt><dd>&lt;script&gt;window.__xss=&#39;subject&#39;" in page
    found = re.search(r'href="/attachments/(\d+)" id="download-eml"', page)
    assert found
    r = await client.get(f"/attachments/{found.group(1)}")
    assert r.status_code == 200
    assert r.content == HOSTILE
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == (
        "attachment; filename=\"message.eml\"; filename*=UTF-8''message.eml"
    )
    assert r.headers["x-content-type-options"] == "nosniff"
    assert (await client.get("/attachments/999999")).status_code == 404


def test_a_received_file_name_never_escapes_its_header_parameter() -> None:
    for hostile, ascii_name in (
        ('a"; filename="evil.html', "a__ filename__evil.html"),
        ("..\\..\\etc/passwd", "_.._etc_passwd"),
        ("x\r\nSet-Cookie: a=b", "xSet-Cookie_ a_b"),
        ("rapport é.pdf", "rapport _.pdf"),
        ("", "attachment"),
        ("...", "attachment"),
    ):
        header = content_disposition(hostile)
        assert header.startswith(f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''"), (
            hostile,
            header,
        )
        assert "\r" not in header and "\n" not in header
        assert header.count('"') == 2
    assert content_disposition("rapport é.pdf").endswith("rapport%20%C3%A9.pdf")


@asyncio
async def test_flow_draws_messages_per_minute_and_failures_by_cause_as_svg(
    console: tuple[Console, httpx.AsyncClient], seeded: Seeded
) -> None:
    _, client = console
    await log_in(client)
    page = (await client.get("/flow")).text
    assert page.count("<svg") == 2  # the one mailbox that had mail, and the causes
    assert re.search(
        r'<rect x="[\d.]+" y="[\d.]+" width="[\d.]+" height="[\d.]+" class="bar">', page
    )
    assert "support <span" in page and "2 messages" in page
    cause = (await seeded.failure())["cause"]
    assert f"{cause}: 1" in page


# -- replay -------------------------------------------------------------------------------


@asyncio
async def test_replay_needs_the_role_and_goes_through_ingest_once_the_cause_is_fixed(
    console: tuple[Console, httpx.AsyncClient], seeded: Seeded
) -> None:
    _, client = console
    failure = await seeded.failure()
    url = f"/requests/{failure['number']}"
    await log_in(client, VIEWER, VIEWER_PASSWORD)
    page = (await client.get(url)).text
    assert 'id="replay"' not in page and "needs the <code>replay</code> role" in page
    r = await client.post(url + "/replay", data={"csrf": token(page)})
    assert r.status_code == 403
    await client.post("/logout", data={"csrf": token(page)})

    await log_in(client)
    page = (await client.get(url)).text
    assert 'id="replay"' in page
    # Not fixed yet: it fails again, and says so; still one failure event (a note on it).
    r = await client.post(url + "/replay", data={"csrf": token(page)})
    assert r.status_code == 200
    assert 'class="error"' in r.text and "failed" in r.text
    await seeded.fix_directory()
    r = await client.post(url + "/replay", data={"csrf": token(page)})
    outcome = re.search(r'id="replay-outcome" class="ok">(.*?)</p>', r.text)
    assert outcome and outcome.group(1).startswith("created"), r.text
    number = int(re.search(r'id="replayed-request">#(\d+)', r.text).group(1))  # type: ignore[union-attr]
    new = next(x for x in (await seeded.requests()) if x["number"] == number)
    assert new["kind"] == "mail" and new["requester"] == "new.hire"
    assert new["subject"] == XSS_SUBJECT
    # Nothing wiped: the failure event is still there, with its message.
    again = next(x for x in (await seeded.requests()) if x["number"] == failure["number"])
    assert again["attachments"] == failure["attachments"]
    # Once replayed, twice is a duplicate: the ledger knows the message by its hash.
    r = await client.post(url + "/replay", data={"csrf": token(page)})
    assert "duplicate" in r.text
    assert [x["kind"] for x in (await seeded.requests())].count("mail") == 2


@asyncio
async def test_the_console_commands_replay_waits_for_no_lock_a_daemon_holds(
    console: tuple[Console, httpx.AsyncClient], seeded: Seeded
) -> None:
    """Without a daemon, a replay takes the data directory's lock; while another engine
    holds it, it writes nothing and says where to replay instead."""
    if store_args():
        pytest.skip("SQLite's lock")
    _, client = console
    await seeded.fix_directory()
    await log_in(client)
    url = f"/requests/{(await seeded.failure())['number']}"
    page = (await client.get(url)).text
    lock = DataDirLock(seeded.data)
    lock.acquire()
    try:
        r = await client.post(url + "/replay", data={"csrf": token(page)})
    finally:
        lock.release()
    assert 'class="error">not replayed: the data directory' in r.text
    assert "replay from its console (run --console)" in r.text
    assert [x["kind"] for x in await seeded.requests()].count("mail") == 1
    r = await client.post(url + "/replay", data={"csrf": token(page)})
    assert 'class="ok">created' in r.text


@asyncio
async def test_the_new_requests_page_shows_every_payload_as_text(
    console: tuple[Console, httpx.AsyncClient], seeded: Seeded
) -> None:
    _, client = console
    await seeded.fix_directory()
    await log_in(client)
    url = f"/requests/{(await seeded.failure())['number']}"
    page = (await client.get(url)).text
    r = await client.post(url + "/replay", data={"csrf": token(page)})
    number = re.search(r'id="replayed-request">#(\d+)', r.text).group(1)  # type: ignore[union-attr]
    page = (await client.get(f"/requests/{number}")).text
    assert "<script" not in page and "<img" not in page and "<svg onload" not in page
    # The subject as text; the HTML body (the engine kept it sanitized) as text too; the
    # attachment's name (the engine made it safe for a file name) as text.
    assert "&lt;script&gt;window.__xss=&#39;subject&#39;&lt;/script&gt; printer jammed" in page
    assert "&lt;p&gt;It jams.&lt;/p&gt;&lt;img src=&#34;x&#34;&gt;" in page
    att = re.search(r'href="/attachments/(\d+)" class="attachment">_svg onload=window', page)
    assert att, page
    r = await client.get(f"/attachments/{att.group(1)}")
    assert r.content == b"log line\n"
    assert r.headers["content-disposition"].startswith('attachment; filename="_svg onload_')


# -- the store's reads, in both stores ------------------------------------------------------


def test_the_consoles_store_reads_agree_in_sqlite_and_postgresql(
    store: str, tmp_path: Path, data: Path, new_mailbox: Callable[..., Mailbox]
) -> None:
    """find_requests, attachment, open_outage_events, messages_since, flow,
    failures_by_cause and user_roles, over data the engine wrote, in each store."""
    s = seed(tmp_path, data, new_mailbox)
    outage = next(r["number"] for r in requests(data) if r["kind"] == "outage")

    async def reads() -> None:
        st = await open_test_store(data)
        try:
            failures = await st.find_requests(RequestFilter(kind="message-failure"), limit=10)
            assert len(failures) == 1 and failures[0]["mailbox"] == "support"
            assert await st.find_requests(RequestFilter(team="it", type="incident"), limit=10)
            assert await st.find_requests(RequestFilter(mailbox="nope"), limit=10) == []
            assert len(await st.find_requests(RequestFilter(), limit=2)) == 2
            detail = await st.request_detail(failures[0]["number"])
            assert detail is not None
            found = await st.attachment(detail["attachments"][0]["id"])
            assert found is not None and found[0]["name"] == "message.eml"
            assert found[1] == HOSTILE
            outages = await st.open_outage_events()
            assert [(o["mailbox"], o["number"]) for o in outages] == [("broken", outage)]
            assert await st.messages_since("2000-01-01") == {"support": 2}
            assert await st.messages_since("2999-01-01") == {}
            assert await st.waiting_on_server() == {}  # nothing kept on the server here
            flow = await st.flow("2000-01-01")
            assert sum(n for box, _, n in flow if box == "support") == 2
            assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d", m) for _, m, _ in flow)
            assert await st.failures_by_cause("2000-01-01") == {failures[0]["cause"]: 1}
            assert await st.user_roles(AGENT) == {"replay"}
            assert await st.user_roles(AGENT.upper()) == {"replay"}
            assert await st.user_roles(VIEWER) == set()
            assert await st.user_roles(LOGIN) == set()
        finally:
            await st.close()

    anyio.run(reads)
    # A second import without "roles" keeps them; an empty list takes them away.
    import_directory(data, tmp_path, {"users": [{"login": AGENT, "name": "Agent"}]})
    import_directory(data, tmp_path, {"users": [{"login": AGENT.upper(), "roles": []}]})

    async def after() -> tuple[set[str], bool]:
        st = await open_test_store(data)
        try:
            return await st.user_roles(AGENT), await st.check_login(AGENT, AGENT_PASSWORD)
        finally:
            await st.close()

    assert anyio.run(after) == (set(), True)
    assert s.conf.is_dir()


# -- in the daemon, over real HTTP ----------------------------------------------------------


class Browserless:
    """A client of the console over real HTTP with a cookie jar (urllib): the daemon's
    console is a real server; the browser tests are in test_console_browser.py."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(CookieJar()), _NoRedirect()
        )

    def get(self, path: str) -> tuple[int, str]:
        return self._open(urllib.request.Request(self.base + path))

    def post(self, path: str, **form: str) -> tuple[int, str]:
        body = urllib.parse.urlencode(form).encode()
        return self._open(urllib.request.Request(self.base + path, data=body, method="POST"))

    def _open(self, req: urllib.request.Request) -> tuple[int, str]:
        try:
            with self.opener.open(req, timeout=10) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_the_daemons_console_survives_a_flood_and_replays_through_the_daemons_writer(
    tmp_path: Path, seeded: Seeded
) -> None:
    """``run --console``: 1,100 idle connections to the console (the flood of issue 12)
    neither stop the daemon's mail nor the console; a replay goes through the daemon's own
    writer (the console command's way, the data directory's lock, would be refused while
    the daemon holds it)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MAILINTEGRATION_LOGIN=LOGIN, MAILINTEGRATION_PASSWORD=LOGIN_PASSWORD)
    argv = engine_argv(
        "run", "--config-dir", seeded.conf, "--data-dir", seeded.data, "--http-port", "0"
    )
    argv += ["--console", str(port), "--poll-interval", "0.5", "--reload-seconds", "0.3"]
    log = tmp_path / "daemon.log"
    client = Browserless(base)
    flood: list[socket.socket] = []
    with _room_for_the_flood(), open(log, "wb") as err:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: _login_page(client, proc, log) == 200, 30, "the daemon's console")
            started = time.monotonic()
            for _ in range(FLOOD):
                if time.monotonic() - started > 60:
                    break
                with contextlib.suppress(OSError):  # refused: nothing is held for it
                    flood.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            assert len(flood) == FLOOD
            seeded.box.deliver(plain_message("During the flood"))
            wait_for(
                lambda: count_rows(seeded.data, "SELECT count(*) FROM ledger") == 3,
                20,
                "the mailbox read during the flood",
            )
            wait_for(lambda: _login_page(client, proc, log) == 200, 20, "the console, flooded")
            for sock in flood:
                sock.close()
            flood.clear()

            code, page = client.get("/login")
            code, _ = client.post("/login", csrf=token(page), login=AGENT, password=AGENT_PASSWORD)
            assert code == 303
            code, page = client.get("/mailboxes")
            support = re.search(r'data-mailbox="support">(.*?)</tr>', page, re.S)
            assert support and "<td>poll (every" in support.group(1), page
            seeded.fix_directory_now()
            number = next(
                r["number"] for r in requests(seeded.data) if r["kind"] == "message-failure"
            )
            code, page = client.get(f"/requests/{number}")
            code, page = client.post(f"/requests/{number}/replay", csrf=token(page))
            assert code == 200
            assert re.search(r'id="replay-outcome" class="ok">created', page), page
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()[-3000:]
        finally:
            for sock in flood:
                sock.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    mail = [r for r in requests(seeded.data) if r["kind"] == "mail"]
    assert sorted(r["subject"] for r in mail) == sorted(
        ["VPN down since this morning", "During the flood", XSS_SUBJECT]
    )
    assert "Too many open files" not in log.read_text()


def _login_page(client: Browserless, proc: subprocess.Popen[bytes], log: Path) -> int:
    assert proc.poll() is None, log.read_text()[-3000:]
    try:
        return client.get("/login")[0]
    except OSError:
        return 0
