"""Processors, failure events and outage events as pure decisions: no store, no writer.

The directory a processor reads is a :class:`DirectoryView` built here from dictionaries;
failure and outage decisions get what the writer would have looked up."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import mailbox_xml

from engine.config import MailboxConfig, load_mailbox
from engine.errors import FetchTimeout, MessageKept, ParseError, TLSError
from engine.model import DirectoryView, Origin, ParsedMessage, RequestRef, Team, User, Watcher
from engine.processors import (
    AddActivity,
    AddNote,
    Close,
    Context,
    Ignore,
    NewEvent,
    NewRequest,
    decide,
    describe,
    failure,
    outage,
    replaced,
)

TEAM = Team(id=1, number=1, name="IT", default_group="Service Desk")
JOHN = User(id=7, login="jdoe", email="john.doe@example.com", name="John Doe", site="Québec")
FALLBACK = User(id=9, login="unknown.user", email=None, name="Unknown", site=None)
CLOSED = RequestRef(number=12, team_id=1, type="incident", status="closed", kind="mail")
NOW = datetime(2024, 5, 1, 8, 30, 15, tzinfo=UTC)


def view(
    users: Sequence[User] = (JOHN, FALLBACK), requests: Sequence[RequestRef] = (CLOSED,)
) -> DirectoryView:
    """A directory of plain dictionaries: all a processor may ask, and nothing to write with."""
    by_email = {u.email.casefold(): u for u in users if u.email}
    by_login = {u.login: u for u in users}
    by_number = {r.number: r for r in requests}

    async def user_by_email(email: str) -> User | None:
        return by_email.get(email.casefold())

    async def user_by_login(login: str) -> User | None:
        return by_login.get(login)

    async def team(ref: str | int | None) -> Team | None:
        return TEAM if ref in (None, 1, "1", "IT") else None

    async def request(number: int) -> RequestRef | None:
        return by_number.get(number)

    async def request_by_message_id(ids: Sequence[str]) -> RequestRef | None:
        return CLOSED if "thread@example.com" in ids else None

    return DirectoryView(user_by_email, user_by_login, team, request, request_by_message_id)


@pytest.fixture
def cfg(tmp_path: Path) -> MailboxConfig:
    path = mailbox_xml(tmp_path / "box.xml", port=110, user="u", password="Canary-pw-5e1f")
    return load_mailbox(path, name="box")


def parsed(**changes: object) -> ParsedMessage:
    msg = ParsedMessage(
        raw=b"Subject: Printer jammed\r\n\r\nbody",
        sha256="c" * 64,
        message_id="m1@example.com",
        subject="Printer jammed",
        from_name="John",
        from_addr="john.doe@example.com",
        to=(),
        date=None,
        in_reply_to=None,
        references=(),
        body="It is jammed again.",
        html=None,
        attachments=(),
        auto_submitted=False,
        auto_reason=None,
        is_bounce=False,
    )
    return dataclasses.replace(msg, **changes)  # type: ignore[arg-type]


def run_decide(msg: ParsedMessage, cfg: MailboxConfig, directory: DirectoryView) -> object:
    return anyio.run(decide, msg, Context(mailbox=cfg, team=TEAM), directory)


# -- processors over a read-only view ------------------------------------------------------


def test_the_directory_view_holds_only_read_methods() -> None:
    names = {f.name for f in dataclasses.fields(DirectoryView)}
    assert names == {
        "user_by_email",
        "user_by_login",
        "team",
        "request",
        "request_by_message_id",
        "correlated_event",
        "request_by_foreign_number",
        "has_name",
        "flood",
        "origins",
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        view().team = view().team  # type: ignore[misc]


def test_a_known_sender_gets_a_new_incident(cfg: MailboxConfig) -> None:
    d = run_decide(parsed(), cfg, view())
    assert isinstance(d, NewRequest)
    assert (d.type, d.requester, d.site, d.subject) == (
        "incident",
        JOHN,
        "Québec",
        "Printer jammed",
    )
    assert describe(d).startswith("new incident 'Printer jammed': requester jdoe")


def test_a_reply_to_a_closed_request_reopens_it(cfg: MailboxConfig) -> None:
    d = run_decide(parsed(subject="Re: [Incident] #12 Printer"), cfg, view())
    assert isinstance(d, AddActivity)
    assert d.request == CLOSED and d.reopen and d.via == "subject"
    thread = run_decide(parsed(in_reply_to="thread@example.com"), cfg, view())
    assert isinstance(thread, AddActivity) and thread.via == "thread"


def test_an_auto_reply_to_nothing_known_is_ignored(cfg: MailboxConfig) -> None:
    d = run_decide(
        parsed(auto_submitted=True, auto_reason="Auto-Submitted: auto-replied"), cfg, view()
    )
    assert d == Ignore("auto-reply")
    assert describe(d) == "ignored: auto-reply"


# -- failure events ------------------------------------------------------------------------


def test_an_unparseable_message_becomes_a_failure_event_holding_it() -> None:
    raw = b"Subject: =?bogus?= Broken\r\nFrom: a@b.example\r\nMessage-ID: <x1@b.example>\r\n\r\n."
    msg = failure.failed("box", "IT", "uid-7", raw, None)
    assert (msg.message_id, msg.sha256) == ("x1@b.example", hashlib.sha256(raw).hexdigest())
    d = failure.decide(msg, ParseError("the MIME tree is broken"), None)
    assert isinstance(d, NewEvent)
    assert (d.kind, d.team, d.mailbox, d.cause) == ("message-failure", "IT", "box", "unparseable")
    assert (d.message_id, d.sha256) == ("x1@b.example", msg.sha256)
    assert [(a.name, a.content_type, a.data) for a in d.attachments] == [
        ("message.eml", "message/rfc822", raw)
    ]
    assert "Subject: =?bogus?= Broken" in d.description
    assert "What went wrong: the MIME tree is broken" in d.description
    assert "UIDL: uid-7" in d.description and f"Size: {len(raw)} bytes" in d.description


def test_a_message_left_on_the_server_says_so_and_holds_what_was_read() -> None:
    msg = failure.failed("box", None, "uid-8", b"Subject: big\r\n\r\nstart", None)
    d = failure.decide(msg, MessageKept("too-large", 9_000_000, "over maxMessageBytes"), None)
    assert isinstance(d, NewEvent)
    assert [a.name for a in d.attachments] == ["message-start.eml"]
    assert "bytes read of 9000000" in d.description
    assert "The message is still on the server." in d.description
    nothing = failure.decide(
        dataclasses.replace(msg, raw=b""), MessageKept("too-large", 1, "y"), None
    )
    assert isinstance(nothing, NewEvent) and nothing.attachments == ()


def test_a_message_failing_again_adds_to_its_failure_event() -> None:
    msg = failure.failed("box", None, "uid-9", b"x", parsed())
    assert (msg.message_id, msg.sha256) == ("m1@example.com", "c" * 64)
    d = failure.decide(msg, RuntimeError("a processor bug"), 41)
    assert d == AddNote(
        41,
        "The same message arrived again in mailbox box (UIDL uid-9) and still could not be "
        "processed: a processor bug",
    )
    assert failure.cause(RuntimeError()) == "processor-error"


# -- outage events -------------------------------------------------------------------------


def test_a_mailbox_that_works_again_closes_every_open_outage() -> None:
    d = outage.decide(
        "box",
        None,
        {"timeout": 3, "tls": 5},
        team=None,
        config=None,
        file_name="box.xml",
        now=NOW,
    )
    assert [(c.number, c.cause) for c in d if isinstance(c, Close)] == [(3, "timeout"), (5, "tls")]
    assert all(isinstance(c, Close) and "works again" in c.note for c in d)
    none = outage.decide("box", None, {}, team=None, config=None, file_name="b", now=NOW)
    assert none == []


def test_a_failing_mailbox_has_one_outage_per_cause(cfg: MailboxConfig) -> None:
    again = outage.decide(
        "box", FetchTimeout("no answer"), {"timeout": 3}, team="IT", config=cfg,
        file_name="box.xml", now=NOW,
    )  # fmt: skip
    assert again == [AddNote(3, "2024-05-01T08:30:15+00:00: still failing: no answer")]
    [new] = outage.decide(
        "box", TLSError("bad certificate"), {"timeout": 3}, team="IT", config=cfg,
        file_name="box.xml", now=NOW,
    )  # fmt: skip
    assert isinstance(new, NewEvent)
    assert (new.kind, new.cause, new.team, new.mailbox) == ("outage", "tls", "IT", "box")
    assert new.subject == "Mail integration: mailbox box cannot be read (tls)"
    [copy] = new.attachments
    assert (copy.name, copy.content_type) == ("box.xml", "application/xml")
    assert b"Canary-pw-5e1f" not in copy.data and b"<userName>u</userName>" in copy.data


def test_an_outage_of_a_file_that_did_not_load_attaches_nothing() -> None:
    [new] = outage.decide(
        "box", TLSError("x"), {}, team=None, config=None, file_name="box.xml", now=NOW
    )
    assert isinstance(new, NewEvent) and new.attachments == ()
    assert "No copy of the configuration is attached" in new.description


_NEW = NewRequest("incident", "s", "d", None, JOHN, None, None, None, None, ())
_ACTIVITY = AddActivity(CLOSED, "John", "b", (), reopen=True)
_WATCHERS = st.lists(
    st.builds(Watcher, st.emails(), st.none() | st.integers(1, 9)), max_size=3
).map(tuple)
_CHANGES = st.fixed_dictionaries(
    {},
    optional={
        "watchers": _WATCHERS,
        "body": st.text(max_size=5),
        "origin": st.none()
        | st.builds(Origin, st.text(max_size=5), st.integers(1, 3), st.emails(), st.text()),
        "nonsense": st.integers(),
    },
)


@given(decision=st.sampled_from([_NEW, _ACTIVITY]), changes=_CHANGES)
def test_a_decision_replaced_is_dataclasses_replace(
    decision: NewRequest | AddActivity, changes: dict[str, object]
) -> None:
    """The intake's fast copy of a decision is dataclasses.replace's: the same value, type
    and hash, the original unchanged, and a change of no field refused the same way."""
    try:
        expected = dataclasses.replace(decision, **changes)  # type: ignore[arg-type]
    except TypeError:
        with pytest.raises(TypeError):
            replaced(decision, **changes)
        return
    got = replaced(decision, **changes)
    assert type(got) is type(expected)
    assert got == expected and hash(got) == hash(expected) and repr(got) == repr(expected)
    assert decision == dataclasses.replace(decision)


def test_a_forward_from_one_who_is_not_an_agent_is_not_searched_for(
    cfg: MailboxConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With forwards taken from agents (the default), a message from anyone else is not
    searched for a forward block at all: it would be its sender's own request whatever it
    says. An agent's forward still names its original sender."""
    from engine.parse import forwards

    searched: list[str] = []
    real = forwards.original_sender

    def spy(subject: str, body: str, attachments: object) -> tuple[str, str] | None:
        searched.append(subject)
        return real(subject, body, attachments)  # type: ignore[arg-type]

    monkeypatch.setattr(forwards, "original_sender", spy)
    body = "FYI\n\n-----Original Message-----\nFrom: Ann Smith <asmith@example.com>\nSubject: x\n"
    msg = parsed(subject="Fwd: badge", body=body)
    d = run_decide(msg, cfg, view())
    assert isinstance(d, NewRequest) and d.requester == JOHN and searched == []
    agent = dataclasses.replace(JOHN, agent=True)
    ann = User(id=8, login="asmith", email="asmith@example.com", name="Ann", site=None)
    d = run_decide(msg, cfg, view(users=(agent, ann, FALLBACK)))
    assert isinstance(d, NewRequest) and d.requester == ann and searched == ["Fwd: badge"]


# ------------------------------------------------------------------ quoted history, fast path


def _split_quoted_reference(body: str) -> tuple[str, str]:
    """split_quoted as first written: the line pattern anchored with "^" in MULTILINE mode."""
    from engine.processors.common import QUOTE_START_LINE

    m = re.compile("^" + QUOTE_START_LINE, re.IGNORECASE | re.MULTILINE).search(body)
    if m is None:
        return body.strip("\n"), ""
    new, quoted = body[: m.start()].rstrip(), body[m.start() :].strip("\n")
    if not new:
        return body.strip("\n"), ""
    return new, quoted


_QUOTE_PIECES = st.sampled_from(
    [
        "\n",
        "\n\n",
        "\r\n",
        ">",
        "> ",
        " >",
        "On Mon, 1 Dec 2026, Ann wrote:",
        "wrote:",
        "Le 1 déc. 2026, Ann a écrit :",
        "Am 1.12.2026 schrieb Ann <a@b>:",
        "El lunes escribió:",
        "-----Original Message-----",
        "-- Message d'origine --",
        "__________",
        "_____",
        "From: Ann",
        "De: Ann",
        "Von: Ann",
        "Sent: Monday",
        "Date: x",
        "Gesendet: Mo",
        "ON",
        "oN x WROTE:",
        "hello",
        "  ",
        "\t",
        "é",
        "x" * 210,
    ]
)


@given(st.lists(st.one_of(_QUOTE_PIECES, st.text(max_size=12)), max_size=24))
def test_property_split_quoted_is_the_line_anchored_pattern(pieces: list[str]) -> None:
    from engine.processors.common import split_quoted

    body = "".join(pieces)
    assert split_quoted(body) == _split_quoted_reference(body)


@pytest.mark.parametrize(
    ("body", "new"),
    [
        ("Thanks!\n\nOn Mon, Ann wrote:\n> old", "Thanks!"),
        ("> only a quote\nthen text", "> only a quote\nthen text"),
        ("Fixed.\nFrom: Ann\nSent: Monday\nold", "Fixed."),
        ("no quote at all\n", "no quote at all"),
        ("", ""),
    ],
)
def test_split_quoted_finds_the_first_quoted_line(body: str, new: str) -> None:
    from engine.processors.common import split_quoted

    assert split_quoted(body)[0] == new
    assert split_quoted(body) == _split_quoted_reference(body)
