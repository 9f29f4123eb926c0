"""Issue 17, part 2: service requests from mail (``EndUserNewSRMailMessageProcessor``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import Mailbox, cli, ledger, mailbox_xml, message, once, requests

from engine.config import MailboxConfig, load_mailbox
from engine.model import DirectoryView, ParsedMessage, Team, User
from engine.parse import parse_message
from engine.processors import Context, NewRequest, decide
from engine.processors.service_request import BadServiceRequest, read_fields, split_form

SR = "ESI.Octopus.MailIntegration.EndUserNewSRMailMessageProcessor"
TEAM = Team(id=1, number=1, name="IT", default_group="Service Desk")
JOHN = User(id=7, login="jdoe", email="john.doe@example.com", name="John Doe", site="Québec")
ALICE = User(id=8, login="asmith", email="asmith@example.com", name="Alice Smith", site=None)
FALLBACK = User(id=9, login="unknown.user", email=None, name="Unknown", site="Montréal")

FORM = """Hello, I need a laptop for our new colleague.

CreateSR
Form: New laptop
Requester: asmith@example.com
Site: Montréal
Category: Hardware
Justification: She starts on Monday
  and works from home two days a week.
Model: 14-inch
CreateSR

Thanks!
"""


def test_the_form_is_read_between_the_markers_with_indented_continuations() -> None:
    form, outside = split_form(FORM, "CreateSR")
    assert form is not None
    assert outside == "Hello, I need a laptop for our new colleague.\n\n\nThanks!"
    fields = read_fields(form)
    assert fields[0] == ("Form", "New laptop")
    assert ("Justification", "She starts on Monday\nand works from home two days a week.") in fields
    assert fields[-1] == ("Model", "14-inch")


def test_half_a_form_or_a_line_that_is_no_field_is_refused() -> None:
    with pytest.raises(BadServiceRequest, match="no closing one"):
        split_form("createsr\nForm: x\n", "CreateSR")
    with pytest.raises(BadServiceRequest, match="line 2 of the form"):
        read_fields("Form: x\nthis is prose\n")
    with pytest.raises(BadServiceRequest, match="continues no field"):
        read_fields("  indented first\n")


def view(users: Sequence[User] = (JOHN, ALICE, FALLBACK)) -> DirectoryView:
    by_email = {u.email: u for u in users if u.email}
    by_login = {u.login: u for u in users}
    names = {("sites", "Montréal"), ("categories", "Hardware")}

    async def user_by_email(email: str) -> User | None:
        return by_email.get(email.casefold())

    async def user_by_login(login: str) -> User | None:
        return by_login.get(login)

    async def team(ref: str | int | None) -> Team | None:
        return TEAM

    async def none(_: object) -> None:
        return None

    async def has_name(table: str, name: str) -> bool:
        return (table, name) in names

    return DirectoryView(user_by_email, user_by_login, team, none, none, has_name=has_name)


def config(tmp_path: Path, **extra: str) -> MailboxConfig:
    path = mailbox_xml(
        tmp_path / "sr.xml", port=110, user="u", password="Canary-pw-3b", processor=SR, **extra
    )
    return load_mailbox(path)


def parsed(body: str, subject: str = "Laptop for Alice") -> ParsedMessage:
    return parse_message(message(subject, body=body))


def run(msg: ParsedMessage, cfg: MailboxConfig) -> Any:
    return anyio.run(decide, msg, Context(mailbox=cfg, team=TEAM), view())


def test_a_form_becomes_a_service_request_with_resolved_fields(tmp_path: Path) -> None:
    d = run(parsed(FORM), config(tmp_path))
    assert isinstance(d, NewRequest)
    assert d.type == "service request" and d.subject == "Laptop for Alice"
    assert d.form == "New laptop"
    assert d.requester == ALICE and d.site == "Montréal"
    assert dict(d.fields) == {
        "Justification": "She starts on Monday\nand works from home two days a week.",
        "Model": "14-inch",
        "Category": "Hardware",
    }
    assert d.description == "Hello, I need a laptop for our new colleague.\n\n\nThanks!"


def test_the_mailbox_default_form_and_the_sender_as_requester(tmp_path: Path) -> None:
    cfg = config(tmp_path, serviceRequestForm="General request", newSRBodyEnclosingToken="##SR##")
    d = run(parsed("Please.\n##SR##\nModel: 13-inch\n##SR##\n"), cfg)
    assert isinstance(d, NewRequest)
    assert (
        d.form == "General request" and d.requester == JOHN and d.fields == (("Model", "13-inch"),)
    )
    assert d.description == "Please."


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("Requester: nobody@example.com", "the requester 'nobody@example.com' is not a user"),
        ("Site: Atlantis", "the site 'Atlantis' is not in the directory"),
        ("Category: Teleportation", "the category 'Teleportation' is not in the directory"),
    ],
)
def test_an_unknown_directory_field_fails_clearly(tmp_path: Path, line: str, words: str) -> None:
    body = f"CreateSR\nForm: New laptop\n{line}\nCreateSR\n"
    with pytest.raises(BadServiceRequest, match=words):
        run(parsed(body), config(tmp_path))


def test_no_form_named_and_no_default_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(BadServiceRequest, match="names no form"):
        run(parsed("CreateSR\nModel: x\nCreateSR\n"), config(tmp_path))


@pytest.mark.dovecot
def test_service_requests_end_to_end(tmp_path: Path, mailbox: Mailbox) -> None:
    """A good form becomes a service request; one naming an unknown site becomes a failure
    event and no request at all."""
    good = message("Laptop for Alice", body=FORM)
    bad = message("Desk", body="CreateSR\nForm: Desk\nSite: Atlantis\nCreateSR\n")
    mailbox.configure(processor=SR)
    mailbox.deliver(good, bad)
    data, cfg = mailbox.data, mailbox.config
    assert once(data, cfg) == 1  # one message became a failure event
    sr, failed = requests(data)
    assert sr["type"] == "service request" and sr["form"] == "New laptop"
    assert sr["requester"] == "asmith" and sr["site"] == "Montréal"
    assert sr["fields"]["Model"] == "14-inch" and sr["fields"]["Category"] == "Hardware"
    assert sr["subject"] == "Laptop for Alice" and "Thanks!" in sr["description"]
    assert failed["kind"] == "message-failure" and "Atlantis" in failed["description"]
    outcomes = sorted(r["outcome"] for r in ledger(data))
    assert outcomes == ["created", "failed: bad-service-request"]
    assert mailbox.left() == 0
    code, out = cli("requests", "show", str(sr["number"]), "--data-dir", data)
    assert code == 0 and "form: New laptop" in out and "Model: 14-inch" in out
    code, out = cli("requests", "list", "--type", "service request", "--data-dir", data)
    assert code == 0 and "Laptop for Alice" in out and "1 request(s)" in out
