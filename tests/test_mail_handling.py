"""Issue 20, part B: watchers from To/Cc, flood protection, a message delivered to several of
our mailboxes, bounces threaded and permanent failures remembered. Through the real engine:
``ingest`` and ``once`` against the test Dovecot, a real SQLite store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import (
    DIRECTORY,
    LOGIN,
    LOGIN_PASSWORD,
    Mailbox,
    SmtpSink,
    cli,
    data_dir,
    import_directory,
    ingest,
    ledger,
    mailbox_xml,
    message,
    open_test_store,
    requests,
    smtp_server,
    store_args,
    store_rows,
)

from engine.config import load_mailbox
from engine.items import Envelope, Item
from engine.ops import Metrics
from engine.parse import dsn, parse_message
from engine.writer import Writer


@pytest.fixture
def data(store: str, tmp_path: Path) -> Path:
    """Every test here runs against each store: SQLite, then PostgreSQL (migration 7 and the
    look-ups of both stores)."""
    return data_dir(tmp_path)


OWN = "<ownAddresses>support@example.com, helpdesk@example.com</ownAddresses>"


def write(tmp_path: Path, name: str, raw: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(raw)
    return path


def config(tmp_path: Path, name: str = "box", **settings: Any) -> Path:
    return mailbox_xml(tmp_path / f"{name}.xml", port=110, user="u", password="p", **settings)


def show(data: Path, number: int) -> str:
    code, out = cli("requests", "show", str(number), "--data-dir", data, *store_args())
    assert code == 0
    return out


# -- watchers ---------------------------------------------------------------------------------


def test_to_and_cc_become_watchers_and_a_reply_keeps_and_extends_them(
    tmp_path: Path, data: Path
) -> None:
    cfg = config(tmp_path, mailHandling=OWN)  # the default flood limit, 20
    first = message(
        "VPN down",
        headers={"Cc": "Alice <ASmith@example.com>, stranger@else.org, helpdesk@example.com"},
    )
    assert ingest(data, cfg, write(tmp_path, "1.eml", first))[0] == 0
    [req] = requests(data)
    # The sender and our own addresses (To: support@, Cc: helpdesk@) are not watchers.
    assert sorted(req["watchers"], key=lambda w: w["address"]) == [
        {"address": "asmith@example.com", "login": "asmith"},
        {"address": "stranger@else.org", "login": None},
    ]
    reply = message(
        f"Re: [Incident] #{req['number']} VPN down",
        headers={"Cc": "stranger@else.org, boss@else.org"},
    )
    assert ingest(data, cfg, write(tmp_path, "2.eml", reply))[0] == 0
    [req] = requests(data)
    assert sorted(w["address"] for w in req["watchers"]) == [
        "asmith@example.com",
        "boss@else.org",
        "stranger@else.org",
    ]
    out = show(data, req["number"])
    assert "watchers: asmith@example.com (asmith)" in out
    assert "stranger@else.org (unknown)" in out and "boss@else.org (unknown)" in out


def test_watchers_can_be_turned_off_and_are_bounded(tmp_path: Path, data: Path) -> None:
    many = ", ".join(f"p{i}@else.org" for i in range(80))
    assert (
        ingest(
            data,
            config(tmp_path, "a"),
            write(tmp_path, "1.eml", message("x", headers={"Cc": many})),
        )[0]
        == 0
    )
    off = config(tmp_path, "b", mailHandling="<watchers>false</watchers>")
    assert ingest(data, off, write(tmp_path, "2.eml", message("y", headers={"Cc": many})))[0] == 0
    bounded, none = requests(data)
    # support@example.com (To) is a watcher here: this mailbox names no own address.
    assert len(bounded["watchers"]) == 50
    assert none["watchers"] == []


# -- flood protection -------------------------------------------------------------------------


def test_a_flooding_sender_gets_at_most_n_requests_the_rest_are_activities(
    tmp_path: Path, data: Path
) -> None:
    cfg = config(
        tmp_path, mailHandling="<floodMessages>3</floodMessages><floodMinutes>10</floodMinutes>"
    )
    files = [
        write(tmp_path, f"{i}.eml", message(f"Printer {i} jammed", body=f"tray {i}\n"))
        for i in range(6)
    ]
    files.append(write(tmp_path, "other.eml", message("Other", sender="asmith@example.com")))
    code, out = ingest(data, cfg, *files)  # one batch: the limit holds within a transaction
    assert code == 0, out
    made = requests(data)
    assert sorted(r["subject"] for r in made) == [
        "Other",
        "Printer 0 jammed",
        "Printer 1 jammed",
        "Printer 2 jammed",
    ]
    newest = next(r for r in made if r["subject"] == "Printer 2 jammed")
    collapsed = [a for a in newest["activities"] if "Flood protection" in a["body"]]
    assert len(collapsed) == 3
    assert "Printer 5 jammed" in collapsed[-1]["body"]
    outcomes = [r["outcome"] for r in ledger(data)]
    assert outcomes.count("created") == 4 and outcomes.count("activity") == 3


def test_the_same_text_from_many_senders_is_a_flood_too(tmp_path: Path, data: Path) -> None:
    cfg = config(tmp_path, mailHandling="<floodMessages>2</floodMessages>")
    files = [
        write(
            tmp_path,
            f"{i}.eml",
            message("WIN A PRIZE", sender=f"bot{i}@spam.example", body="Click.\n"),
        )
        for i in range(5)
    ]
    assert ingest(data, cfg, *files)[0] == 0
    assert len(requests(data)) == 2


def test_flood_off_with_zero(tmp_path: Path, data: Path) -> None:
    cfg = config(tmp_path, mailHandling="<floodMessages>0</floodMessages>")
    files = [write(tmp_path, f"{i}.eml", message(f"n{i}")) for i in range(25)]
    assert ingest(data, cfg, *files)[0] == 0
    assert len(requests(data)) == 25


def test_the_default_limit_is_20_in_10_minutes_and_is_counted_in_a_metric(
    tmp_path: Path, data: Path
) -> None:
    cfg = load_mailbox(config(tmp_path, mailHandling=None))
    assert (cfg.handling.flood_messages, cfg.handling.flood_minutes) == (20, 10)
    metrics = Metrics()

    async def go() -> None:
        store = await open_test_store(data)
        send, receive = anyio.create_memory_object_stream[Item](30)
        for i in range(23):
            raw = message(f"Alarm {i}")
            send.send_nowait(
                Envelope(mailbox=cfg, uidl=f"u{i}", raw=raw, parsed=parse_message(raw))
            )
        send.close()
        await Writer(store, created_by=LOGIN, metrics=metrics).run(receive)
        await store.close()

    anyio.run(go)
    assert len(requests(data)) == 20
    assert 'mailintegration_flood_collapsed_total{mailbox="box"} 3.0' in metrics.render().decode()


@pytest.mark.dovecot
def test_flood_over_pop3_is_exactly_once(mailbox: Mailbox) -> None:
    mailbox.configure(mailHandling="<floodMessages>2</floodMessages>")
    mailbox.deliver(*(message(f"Disk {i} full") for i in range(5)))
    assert mailbox.once() == 0
    assert len(mailbox.mail()) == 2
    mailbox.assert_exactly_once(outcomes=("created", "activity"))


# -- several mailboxes --------------------------------------------------------------------------


@pytest.mark.dovecot
@pytest.mark.parametrize(("policy", "expected"), [("onePerTeam", 2), ("oneOverall", 1)])
def test_a_message_to_several_mailboxes(
    tmp_path: Path,
    data: Path,
    new_mailbox: Callable[..., Mailbox],
    policy: str,
    expected: int,
) -> None:
    """Three mailboxes: two of team IT, one of Facilities. The same message (one Message-ID)
    delivered to each: one request per team, or one overall."""
    conf = tmp_path / "conf"
    conf.mkdir()
    handling = f"<severalMailboxes>{policy}</severalMailboxes>"
    it1 = new_mailbox(conf / "it1.xml", mailHandling=handling)
    it2 = new_mailbox(conf / "it2.xml", mailHandling=handling)
    fac = new_mailbox(
        conf / "fac.xml", team="2", incidentGroup="Building Services", mailHandling=handling
    )
    raw = message("Water leak in room 4", message_id="<leak-1@example.com>")
    for box in (it1, it2, fac):
        box.deliver(raw)
    code, _ = cli(
        "once",
        "--config-dir",
        conf,
        "--data-dir",
        data,
        "--login",
        LOGIN,
        "--password",
        LOGIN_PASSWORD,
        *store_args(),
    )
    assert code == 0
    made = requests(data)
    assert len(made) == expected
    assert len({r["team"] for r in made}) == expected
    rows = ledger(data)
    assert len(rows) == 3
    copies = [r for r in rows if r["outcome"].startswith("ignored: already request")]
    assert len(copies) == 3 - expected
    assert all(r["request_number"] in {m["number"] for m in made} for r in copies)
    history = " ".join(h["text"] for m in made for h in m["history"])
    assert "was also delivered to mailbox" in history
    for box in (it1, it2, fac):
        assert box.left() == 0


# -- bounces ----------------------------------------------------------------------------------


def dsn_bounce(recipient: str, status: str, original_id: str, subject: str = "x") -> bytes:
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.com>\r\n"
        "To: support@example.com\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <bounce-" + original_id + ">\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
        "\r\n--B\r\nContent-Type: text/plain\r\n\r\n"
        "I'm sorry to have to inform you that your message could not be delivered.\r\n"
        "\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.com\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        "Action: failed\r\n"
        f"Status: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} User unknown\r\n"
        "\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: support@example.com\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{original_id}>\r\n"
        "\r\n--B--\r\n"
    ).encode()


def plain_bounce(text: str) -> bytes:
    return (
        "From: MAILER-DAEMON@mx.example.com\r\nTo: support@example.com\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nReturn-Path: <>\r\n"
        "Message-ID: <plain-bounce@mx.example.com>\r\n\r\n" + text
    ).encode()


def test_dsn_and_plain_bounces_are_read() -> None:
    b = dsn.read(dsn_bounce("gone@else.org", "5.1.1", "orig-1@example.com"))
    assert (b.status, b.recipients, b.original_message_id) == (
        "5.1.1",
        ("gone@else.org",),
        "orig-1@example.com",
    )
    assert b.permanent
    postfix = dsn.read(
        plain_bounce(
            "This is the mail system at host mx.example.com.\r\n\r\n"
            "<Gone@Else.org>: host mx.else.org said: 550 5.1.1 <gone@else.org>: Recipient\r\n"
            "    address rejected: User unknown\r\n"
        )
    )
    assert postfix.recipients == ("gone@else.org",) and postfix.status == "5.1.1"
    delayed = dsn.read(dsn_bounce("slow@else.org", "4.4.1", "o@x"))
    assert not delayed.permanent


def test_a_bounce_of_a_request_s_message_becomes_an_activity_on_it(
    tmp_path: Path, data: Path
) -> None:
    cfg = config(tmp_path)
    original = message("Broken chair", message_id="<chair-1@example.com>")
    assert ingest(data, cfg, write(tmp_path, "1.eml", original))[0] == 0
    bounce = dsn_bounce("john.doe@example.com", "5.2.2", "chair-1@example.com")
    code, out = ingest(data, cfg, write(tmp_path, "2.eml", bounce))
    assert code == 0 and "activity" in out, out
    [req] = requests(data)
    [act] = req["activities"]
    assert act["automatic"]
    assert act["body"].startswith("Delivery failed (5.2.2) for john.doe@example.com.")


def test_a_plain_bounce_naming_a_request_number_threads_onto_it(tmp_path: Path, data: Path) -> None:
    cfg = config(tmp_path)
    assert ingest(data, cfg, write(tmp_path, "1.eml", message("Screen flickers")))[0] == 0
    [req] = requests(data)
    text = (
        "Your message to gone@else.org couldn't be delivered.\r\n"
        "Remote Server returned '550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'\r\n\r\n"
        f"Subject: [Incident] #{req['number']} Screen flickers\r\n"
    )
    assert ingest(data, cfg, write(tmp_path, "2.eml", plain_bounce(text)))[0] == 0
    [req] = requests(data)
    assert len(req["activities"]) == 1 and req["activities"][0]["automatic"]


@pytest.fixture
def sink() -> Iterator[tuple[SmtpSink, int]]:
    s = SmtpSink()
    with smtp_server(s) as port:
        yield s, port


@pytest.mark.dovecot
def test_a_permanent_bounce_stops_auto_replies_to_that_address(
    mailbox: Mailbox, sink: tuple[SmtpSink, int], capfd: pytest.CaptureFixture[str]
) -> None:
    received, port = sink[0].received, sink[1]
    mailbox.configure(
        "noreq",
        createNewRequests="False",
        smtp=f"<serverName>127.0.0.1</serverName><port>{port}</port>"
        "<from>Service Desk &lt;servicedesk@example.com&gt;</from>",
    )
    mailbox.deliver(message("Need a laptop", sender="gone@else.org"))
    assert mailbox.once() == 0
    assert [r for _, r, _ in received] == [["gone@else.org"]]
    [row] = mailbox.ledger()
    assert row["outcome"] == "refused: replied"
    mailbox.deliver(dsn_bounce("gone@else.org", "5.1.1", "our-reply-1@example.com"))
    assert mailbox.once() == 0
    assert mailbox.ledger()[-1]["outcome"] == "ignored: bounce 5.1.1: 1 address(es) undeliverable"
    mailbox.deliver(message("Still need a laptop", sender="Gone@Else.org"))
    capfd.readouterr()
    assert mailbox.once() == 0
    assert mailbox.ledger()[-1]["outcome"] == "refused: no reply (undeliverable address)"
    assert len(received) == 1
    assert "no reply: gone@else.org is undeliverable (since " in capfd.readouterr().err.lower()
    [row] = store_rows(mailbox.data, "SELECT address, status FROM undeliverable")
    assert (row["address"], row["status"]) == ("gone@else.org", "5.1.1")
    assert mailbox.left() == 0


# -- historic import --------------------------------------------------------------------------


def dated(raw: bytes, date: str) -> bytes:
    return raw.replace(b"Date: Fri, 27 Nov 2026 09:12:44 -0500", f"Date: {date}".encode(), 1)


@pytest.mark.dovecot
def test_historic_import_creates_closed_requests_and_leaves_older_mail_on_the_server(
    mailbox: Mailbox,
) -> None:
    old = dated(message("Old printer trouble"), "Mon, 05 Jan 2026 10:00:00 +0000")
    new = dated(
        message("Laptop battery", message_id="<bat-1@example.com>"),
        "Mon, 01 Jun 2026 10:00:00 +0000",
    )
    mailbox.deliver(old, new)
    assert mailbox.once("--since", "2026-03-01", "--status", "closed") == 0
    [req] = mailbox.mail()
    assert (req["subject"], req["status"]) == ("Laptop battery", "closed")
    assert any("historic import" in h["text"] for h in req["history"])
    assert mailbox.left() == 1  # the old one: skipped, still there, not in the ledger
    assert [r["outcome"] for r in mailbox.ledger()] == ["created"]
    # A reply in the backlog adds to the closed request without reopening it.
    reply = dated(
        message(f"Re: [Incident] #{req['number']} Laptop battery"),
        "Tue, 02 Jun 2026 10:00:00 +0000",
    )
    mailbox.deliver(reply)
    assert mailbox.once("--since", "2026-03-01", "--status", "closed") == 0
    [req] = mailbox.mail()
    assert req["status"] == "closed" and len(req["activities"]) == 1
    # A run without --since takes the old message as any other.
    assert mailbox.once() == 0
    assert sorted((r["subject"], r["status"]) for r in mailbox.mail()) == [
        ("Laptop battery", "closed"),
        ("Old printer trouble", "new"),
    ]
    assert mailbox.left() == 0


@pytest.mark.dovecot
def test_historic_import_sends_no_automatic_reply(
    mailbox: Mailbox, sink: tuple[SmtpSink, int]
) -> None:
    mailbox.configure(
        "noreq",
        createNewRequests="False",
        smtp=f"<serverName>127.0.0.1</serverName><port>{sink[1]}</port>"
        "<from>Service Desk &lt;servicedesk@example.com&gt;</from>",
    )
    mailbox.deliver(message("Need a laptop"))
    assert mailbox.once("--since", "2026-01-01", "--status", "closed") == 0
    assert [r["outcome"] for r in mailbox.ledger()] == ["refused: no reply (historic import)"]
    assert sink[0].received == []


def test_since_must_be_a_date(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli("once", "--config", config(tmp_path), "--data-dir", data, "--since", "last week")
    assert "is not a date" in capsys.readouterr().err


# -- inline images and signature files --------------------------------------------------------


def html_with_images() -> bytes:
    from email.message import EmailMessage
    from email.policy import SMTP

    msg = EmailMessage()
    msg["From"] = "John Doe <john.doe@example.com>"
    msg["To"] = "support@example.com"
    msg["Subject"] = "Screen artefacts"
    msg["Message-ID"] = "<cid-1@example.com>"
    msg.set_content("See the screenshot.")
    msg.add_alternative(
        '<p>Look:</p><img src="cid:shot@x"><p>Regards</p><img src="cid:logo@x">', subtype="html"
    )
    html = msg.get_payload()[1]
    for cid, name, size in (("shot@x", "shot.png", 5000), ("logo@x", "logo.png", 300)):
        html.add_related(
            b"\x89PNG" + name.encode() * (size // 8),
            maintype="image",
            subtype="png",
            cid=f"<{cid}>",
            filename=name,
            disposition="inline",
        )
    msg.add_attachment(
        b"%PDF-1.4 our legal footer", maintype="application", subtype="pdf", filename="legal.pdf"
    )
    msg.add_attachment(
        b"\x89PNG small but attached", maintype="image", subtype="png", filename="tiny.png"
    )
    return msg.as_bytes(policy=SMTP)


def test_inline_images_keep_their_content_id_and_signature_files_are_dropped(
    tmp_path: Path, data: Path
) -> None:
    import hashlib

    legal = hashlib.sha256(b"%PDF-1.4 our legal footer").hexdigest()
    rules = f"<inlineImagesBelowBytes>1024</inlineImagesBelowBytes><sha256>{legal.upper()}</sha256>"
    cfg = config(tmp_path, ignoredAttachmentRules=rules)
    assert ingest(data, cfg, write(tmp_path, "1.eml", html_with_images()))[0] == 0
    [req] = requests(data)
    # The screenshot (inline, 5 KB) is kept; the 300-byte logo and the listed PDF are not;
    # a small image attached as a file is kept.
    assert sorted(a["name"] for a in req["attachments"]) == ["shot.png", "tiny.png"]
    cfg_all = config(tmp_path, "all")
    assert (
        ingest(
            data,
            cfg_all,
            write(tmp_path, "2.eml", html_with_images().replace(b"cid-1@", b"cid-2@")),
        )[0]
        == 0
    )
    assert len(requests(data)[1]["attachments"]) == 4
    parsed = parse_message(html_with_images())
    assert {a.name: a.content_id for a in parsed.attachments if a.inline} == {
        "shot.png": "shot@x",
        "logo.png": "logo@x",
    }


# -- forwards ---------------------------------------------------------------------------------

GMAIL_FORWARD = """FYI, see below.

---------- Forwarded message ---------
From: Alice Smith <asmith@example.com>
Date: Mon, 1 Jun 2026 at 10:00
Subject: My badge does not open door 3
To: <sd@example.com>

It beeps red.
"""

OUTLOOK_FORWARD = """Please handle.

________________________________
From: Stranger Person <stranger@else.org>
Sent: Monday, June 1, 2026 10:00 AM
To: Service Desk <sd@example.com>
Subject: Broken chair

The chair in room 4 is broken.
"""

ORIGINAL_MESSAGE = """-----Original Message-----
De : "Alice Smith" <asmith@example.com>
Envoyé : lundi 1 juin 2026 10:00
Objet : Imprimante

Elle ne marche pas.
"""


@pytest.mark.parametrize(
    ("subject", "body", "original"),
    [
        ("Fwd: My badge does not open door 3", GMAIL_FORWARD, "asmith@example.com"),
        ("FW: Broken chair", OUTLOOK_FORWARD, "stranger@else.org"),
        ("TR: Imprimante", ORIGINAL_MESSAGE, "asmith@example.com"),
        (
            "WG: Drucker",
            "Von: Alice <asmith@example.com>\nGesendet: Montag\n\nKaputt.\n",
            "asmith@example.com",
        ),
        (
            "RV: Impresora",
            "De: asmith@example.com\nEnviado el: lunes\n\nRota.\n",
            "asmith@example.com",
        ),
        ("Badge", GMAIL_FORWARD, "asmith@example.com"),  # the block alone says it forwards
    ],
)
def test_forwards_name_their_original_sender(subject: str, body: str, original: str) -> None:
    from engine.parse import forwards

    found = forwards.original_sender(subject, body, ())
    assert found is not None and found[1] == original


@pytest.mark.parametrize(
    ("subject", "body"),
    [
        ("AW: Drucker", "Von: Alice <asmith@example.com>\nGesendet: Montag\n\nKaputt.\n"),
        ("Re: Printer", "Thanks!\n\nOn Mon, Alice wrote:\n> From: x@y.org\n"),
        ("Printer", "-----Original Message-----\nFrom: asmith@example.com\n"),
    ],
)
def test_replies_are_not_forwards(subject: str, body: str) -> None:
    from engine.parse import forwards

    assert forwards.original_sender(subject, body, ()) is None


def test_an_agent_s_forward_makes_the_customer_the_requester(tmp_path: Path, data: Path) -> None:
    cfg = config(tmp_path)
    agent = message(
        "Fwd: My badge does not open door 3", sender="System <sd@example.com>", body=GMAIL_FORWARD
    )
    customer = message(
        "Fwd: My badge", sender="John Doe <john.doe@example.com>", body=GMAIL_FORWARD
    )
    assert (
        ingest(data, cfg, write(tmp_path, "1.eml", agent), write(tmp_path, "2.eml", customer))[0]
        == 0
    )
    by_agent, by_customer = requests(data)
    assert by_agent["requester"] == "asmith"
    assert {"address": "sd@example.com", "login": LOGIN} in by_agent["watchers"]
    assert "Forwarded by System <sd@example.com>" in by_agent["description"]
    # John can not sign in: not an agent; his forward is his own request.
    assert by_customer["requester"] == "jdoe"
    # Given the role "agent" in the directory, his forwards name their original sender.
    directory = dict(DIRECTORY)
    directory["users"] = [
        {**u, "roles": ["agent"]} if u["login"] == "jdoe" else u for u in DIRECTORY["users"]
    ]
    import_directory(data, tmp_path, directory)
    again = message("Fwd: My badge", sender="john.doe@example.com", body=GMAIL_FORWARD)
    assert ingest(data, cfg, write(tmp_path, "3.eml", again))[0] == 0
    assert requests(data)[2]["requester"] == "asmith"


def test_forwards_from_anyone_and_a_forward_attached_whole(tmp_path: Path, data: Path) -> None:
    from email.message import EmailMessage
    from email.policy import SMTP

    cfg = config(tmp_path, mailHandling="<forwards>anyone</forwards>")
    inner = message("Broken chair", sender="Alice Smith <asmith@example.com>")
    outer = EmailMessage()
    outer["From"] = "John Doe <john.doe@example.com>"
    outer["To"] = "support@example.com"
    outer["Subject"] = "Fw: Broken chair"
    outer["Message-ID"] = "<outer-1@example.com>"
    outer.set_content("See attached.")
    outer.add_attachment(inner, maintype="message", subtype="rfc822")
    assert ingest(data, cfg, write(tmp_path, "1.eml", outer.as_bytes(policy=SMTP)))[0] == 0
    [req] = requests(data)
    assert req["requester"] == "asmith"
    off = config(tmp_path, "off", mailHandling="<forwards>off</forwards>")
    agent = message(
        "Fwd: badge", sender="sd@example.com", body=GMAIL_FORWARD, message_id="<o2@x.org>"
    )
    assert ingest(data, off, write(tmp_path, "2.eml", agent))[0] == 0
    assert requests(data)[1]["requester"] == LOGIN


# -- reference tokens ---------------------------------------------------------------------------


def test_a_reply_threads_by_the_reference_token_alone_and_a_guessed_one_does_not(
    tmp_path: Path, data: Path
) -> None:
    import re

    from engine.parse import tokens

    cfg = config(tmp_path)
    assert ingest(data, cfg, write(tmp_path, "1.eml", message("Mouse broken")))[0] == 0
    [req] = requests(data)
    out = show(data, req["number"])
    m = re.search(r"reference: (\[ref:MI-(\d+)-([0-9a-f]{8})\])", out)
    assert m is not None and int(m.group(2)) == req["number"]
    token = m.group(1)
    # No subject tag, no In-Reply-To or References: only the token in the quoted footer.
    reply = message("Mouse", body=f"It works now, thanks.\n\n> Regards, the desk\n> {token}\n")
    guessed = message("Mouse", body=f"Still broken.\n[ref:MI-{req['number']}-00000000]\n")
    assert (
        ingest(data, cfg, write(tmp_path, "2.eml", reply), write(tmp_path, "3.eml", guessed))[0]
        == 0
    )
    first, second = requests(data)
    assert len(first["activities"]) == 1 and "It works now" in first["activities"][0]["body"]
    assert second["subject"] == "Mouse" and "Still broken" in second["description"]
    # Another store has another key: the same number gets another token.
    assert tokens.token(req["number"], "another key") != token
    # A mailbox with its own format, and one with tokens off.
    own = config(
        tmp_path, "own", mailHandling="<referenceToken>#desk-{number}/{hmac}#</referenceToken>"
    )
    sig = token.split("-")[-1].rstrip("]")
    own_reply = message("Mouse", body=f"again #desk-{req['number']}/{sig}#\n")
    assert ingest(data, own, write(tmp_path, "4.eml", own_reply))[0] == 0
    assert len(requests(data)[0]["activities"]) == 2
    off = config(tmp_path, "off", mailHandling="<referenceToken>off</referenceToken>")
    assert ingest(data, off, write(tmp_path, "5.eml", message("Mouse", body=f"x {token}")))[0] == 0
    assert len(requests(data)) == 3


def test_a_token_format_without_its_placeholders_is_refused(tmp_path: Path) -> None:
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="referenceToken"):
        load_mailbox(
            config(tmp_path, mailHandling="<referenceToken>[ref:{number}]</referenceToken>")
        )


def test_the_description_marks_where_each_inline_image_sat() -> None:
    from email.message import EmailMessage
    from email.policy import SMTP

    msg = EmailMessage()
    msg["From"] = "john.doe@example.com"
    msg["Subject"] = "Screen"
    msg.set_content(
        '<p>Look:</p><img alt="the &lt;error&gt;" src="cid:shot@x"><p>Regards</p>'
        "<img src='cid:logo@x'>",
        subtype="html",
    )
    msg.make_related()
    msg.add_related(
        b"\x89PNG", maintype="image", subtype="png", cid="<shot@x>", disposition="inline"
    )
    parsed = parse_message(msg.as_bytes(policy=SMTP))
    assert (
        parsed.body
        == "Look:\n\n[image: the <error> (cid:shot@x)]\n\nRegards\n\n[image: cid:logo@x]"
    )
    assert [a.content_id for a in parsed.attachments] == ["shot@x"]


def test_a_store_that_recorded_migration_7_as_a_no_op_catches_up(tmp_path: Path) -> None:
    """Builds of other branches recorded 7 while it was a reserved no-op: opened by this one,
    such a store gets 7's tables (and its reference key) all the same."""
    import sqlite3

    from engine.store import open_store

    async def open_and_close() -> None:
        await (await open_store(tmp_path / "d")).close()

    anyio.run(open_and_close)
    db = sqlite3.connect(tmp_path / "d" / "mailintegration.sqlite3")
    for table in ("watchers", "undeliverable", "request_origins", "engine_keys"):
        db.execute(f"DROP TABLE {table}")
    db.commit()
    db.close()
    anyio.run(open_and_close)
    db = sqlite3.connect(tmp_path / "d" / "mailintegration.sqlite3")
    try:
        [(key,)] = db.execute("SELECT value FROM engine_keys WHERE name = 'reference'").fetchall()
        assert len(key) == 64
        assert db.execute("SELECT count(*) FROM watchers").fetchone() == (0,)
    finally:
        db.close()


def test_the_parser_s_bounce_fields_mark_the_address_undeliverable(
    tmp_path: Path, data: Path
) -> None:
    """An Exim bounce naming its recipient only in X-Failed-Recipients: the parser's
    bounce_recipients (engine.parse) say who, the writer records it."""
    raw = (
        b"From: Mail Delivery System <Mailer-Daemon@mx.example.com>\r\n"
        b"To: support@example.com\r\nSubject: Mail delivery failed: returning message to sender\r\n"
        b"X-Failed-Recipients: Gone@Else.org\r\nAuto-Submitted: auto-replied\r\n"
        b"Message-ID: <exim-1@mx.example.com>\r\n\r\n"
        b"This message was created automatically by mail delivery software.\r\n\r\n"
        b"A message that you sent could not be delivered to one or more of its recipients.\r\n"
        b"  SMTP error from remote mail server after RCPT TO:\r\n"
        b"  550 5.1.1 User unknown\r\n"
    )
    code, out = ingest(data, config(tmp_path), write(tmp_path, "b.eml", raw))
    assert code == 0 and "ignored: bounce 5.1.1: 1 address(es) undeliverable" in out, out
    [row] = store_rows(data, "SELECT address, status FROM undeliverable")
    assert (row["address"], row["status"]) == ("gone@else.org", "5.1.1")
