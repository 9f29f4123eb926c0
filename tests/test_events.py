"""Issue 3: the event processor, failure events for unprocessable mail, outage events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support import (
    EVENT,
    Mailbox,
    attachment_bytes,
    both,
    cli,
    free_port,
    mailbox_xml,
    message,
    once,
    requests,
)

pytestmark = pytest.mark.dovecot

SCOM_ALERT = (
    b"From: SCOM Alerts <scom@monitoring.example.com>\r\n"
    b"To: events@example.com\r\n"
    b"Subject: Alert: Logical disk free space is low on SRV-SQL01 (C:)\r\n"
    b"Date: Fri, 27 Nov 2026 03:14:07 +0000\r\n"
    b"Message-ID: <scom-4411@monitoring.example.com>\r\n"
    b"Auto-Submitted: auto-generated\r\n"
    b"X-SCOM-Severity: Critical\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Alert: Logical Disk Free Space is low\r\n"
    b"Source: C: on SRV-SQL01.corp.example.com\r\n"
    b"Severity: Critical\r\n"
    b"Description: The disk C: has only 2% (812 MB) free space.\r\n"
)


def scom_update(number: int) -> bytes:
    return (
        "From: SCOM Alerts <scom@monitoring.example.com>\r\n"
        "To: events@example.com\r\n"
        f"Subject: RE: [Event] #{number} Alert closed: Logical disk free space on SRV-SQL01\r\n"
        "Date: Fri, 27 Nov 2026 04:02:51 +0000\r\n"
        "Message-ID: <scom-4412@monitoring.example.com>\r\n"
        "Auto-Submitted: auto-generated\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Resolution state: Closed\r\nThe disk C: has 31% free space.\r\n"
    ).encode()


@both
def test_alert_creates_event_and_its_update_adds_activity(mailbox: Mailbox) -> None:
    mailbox.configure(
        "events",
        processor=EVENT,
        incidentGroup=None,
        incidentFallbackUserLogon=None,
        group="Monitoring",
        assignee="oncall",
        incidentSource="SCOM",
    )
    mailbox.deliver(SCOM_ALERT)
    assert mailbox.once() == 0
    [event] = mailbox.requests()
    assert event["type"] == "event" and event["kind"] == "mail" and event["status"] == "new"
    assert event["group"] == "Monitoring"
    assert event["assignee"] == "oncall"
    assert event["source"] == "SCOM"
    assert "only 2% (812 MB)" in event["description"]
    mailbox.deliver(scom_update(event["number"]))
    assert mailbox.once() == 0
    [event] = mailbox.requests()
    [activity] = event["activities"]
    assert "31% free space" in activity["body"]
    assert mailbox.left() == 0


def _deep(depth: int) -> bytes:
    head = (
        "From: a@example.com\r\nTo: b@example.com\r\nSubject: deep\r\n"
        "Message-ID: <deep-1@example.com>\r\nMIME-Version: 1.0\r\n"
    )
    parts = [head]
    for i in range(depth):
        parts.append(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n')
    parts.append("Content-Type: text/plain\r\n\r\nbottom\r\n")
    for i in reversed(range(depth)):
        parts.append(f"--b{i}--\r\n")
    return "".join(parts).encode()


@both
def test_unprocessable_message_between_good_ones_becomes_failure_event(mailbox: Mailbox) -> None:
    bad = _deep(200)
    mailbox.deliver(message("Good one"))
    mailbox.deliver(bad)
    mailbox.deliver(message("Good two"))
    assert mailbox.once() == 1  # a failed message is not "everything succeeded"
    reqs = mailbox.requests()
    mail = [r for r in reqs if r["kind"] == "mail"]
    [failure] = [r for r in reqs if r["kind"] == "message-failure"]
    assert [r["subject"] for r in mail] == ["Good one", "Good two"]
    assert failure["type"] == "event" and failure["mailbox"] == "m"
    assert failure["cause"] == "limit-exceeded"
    assert "What to do" in failure["description"]
    [att] = failure["attachments"]
    assert att["name"] == "message.eml"
    assert attachment_bytes(mailbox.data, att["sha256"]) == bad
    assert mailbox.left() == 0
    outcomes = [r["outcome"] for r in mailbox.ledger()]
    assert outcomes == ["created", "failed: limit-exceeded", "created"]

    # The same message again: an activity on the same failure event, not a second event.
    mailbox.deliver(bad)
    mailbox.once()
    failures = [r for r in mailbox.requests() if r["kind"] == "message-failure"]
    assert len(failures) == 1
    assert len(failures[0]["activities"]) == 1


@both
def test_unknown_sender_without_fallback_user_becomes_failure_event(mailbox: Mailbox) -> None:
    mailbox.configure(
        incidentFallbackUserLogon=None,
    )
    mailbox.deliver(message("Who am I", sender="stranger@nowhere.example"))
    mailbox.deliver(message("Known"))
    mailbox.once()
    kinds = sorted((r["kind"], r["cause"]) for r in mailbox.requests())
    assert kinds == [("mail", None), ("message-failure", "unknown-fallback-user")]
    assert mailbox.left() == 0


def _everything_in(data: Path, logfile: Path | None = None) -> bytes:
    blob = b""
    for p in data.rglob("*"):
        if p.is_file():
            blob += p.read_bytes()
    if logfile is not None and logfile.exists():
        blob += logfile.read_bytes()
    return blob


@both
def test_wrong_password_outage_event_updates_then_closes(
    tmp_path: Path, mailbox: Mailbox, capfd: Any
) -> None:
    wrong = "Canary-Wr0ng-Pw-77"
    mailbox.configure("box", password=wrong)
    log = tmp_path / "engine.log"
    mailbox.deliver(message("Waiting on the server"))
    assert mailbox.once("--log-file", log) == 1
    [outage] = mailbox.requests(type="event")
    assert outage["kind"] == "outage" and outage["cause"] == "authentication"
    assert outage["status"] == "new" and outage["mailbox"] == "box"
    [config_att] = outage["attachments"]
    redacted = attachment_bytes(mailbox.data, config_att["sha256"])
    assert b"<password>********</password>" in redacted
    assert b"<userName>" + mailbox.user.encode() in redacted
    for _ in range(2):
        assert mailbox.once("--log-file", log) == 1
    [outage] = mailbox.requests(type="event")
    assert len(outage["activities"]) == 2
    assert all("still failing" in a["body"] for a in outage["activities"])
    assert mailbox.left() == 1
    captured = capfd.readouterr()
    blob = _everything_in(mailbox.data, log) + captured.out.encode() + captured.err.encode()
    assert wrong.encode() not in blob

    mailbox.configure()
    assert mailbox.once() == 0
    reqs = mailbox.requests()
    [outage] = [r for r in reqs if r["kind"] == "outage"]
    assert outage["status"] == "processed"
    assert "works again" in outage["activities"][-1]["body"]
    assert [r["subject"] for r in reqs if r["kind"] == "mail"] == ["Waiting on the server"]


def test_server_down_and_tls_failure_are_outages_of_their_own_causes(
    tmp_path: Path, mailbox: Mailbox, dovecot: Any
) -> None:
    down = mailbox_xml(tmp_path / "down.xml", port=free_port(), user="x", password="y")
    tls = mailbox_xml(
        tmp_path / "tls.xml",
        port=dovecot.pop3s_port,
        user=mailbox.user,
        password=mailbox.password,
        use_ssl=True,
        host="localhost",
    )
    assert once(mailbox.data, down) == 1
    assert once(mailbox.data, tls) == 1
    got = sorted((r["mailbox"], r["cause"]) for r in mailbox.requests(type="event"))
    assert got == [("down", "unreachable"), ("tls", "tls")]


def test_invalid_config_file_becomes_outage_without_a_copy(tmp_path: Path, data: Path) -> None:
    """A file that does not load is never attached (it may be anything): the description
    names file, line and element, and says why no copy is attached."""
    cfg = tmp_path / "broken.xml"
    cfg.write_text(
        "<?xml version='1.0'?>\n<mailIntegration>\n"
        "  <messageProcessorTypeName>EndUserIncidentMailMessageProcessor"
        "</messageProcessorTypeName>\n"
        "  <server>\n    <gatewayTypeName>SidePopMailboxGateway</gatewayTypeName>\n"
        "    <serverName>pop.example.com</serverName>\n    <userName>u</userName>\n"
        "    <password>Canary-Cfg-Pw-31</password>\n    <useSsl>maybe</useSsl>\n"
        "  </server>\n</mailIntegration>\n",
        encoding="utf-8",
    )
    assert once(data, cfg) == 1
    [outage] = requests(data, type="event")
    assert outage["cause"] == "config"
    assert "line 9" in outage["description"] and "useSsl" in outage["description"]
    assert "No copy of the configuration is attached" in outage["description"]
    assert outage["attachments"] == []
    assert b"Canary-Cfg-Pw-31" not in _everything_in(data)


def test_events_are_listed_with_kind_mailbox_and_cause(tmp_path: Path, data: Path) -> None:
    cfg = mailbox_xml(tmp_path / "down.xml", port=free_port(), user="x", password="y")
    once(data, cfg)
    code, out = cli(
        "requests",
        "list",
        "--type",
        "event",
        "--status",
        "new",
        "--json",
        "--data-dir",
        data,
    )
    assert code == 0
    [row] = json.loads(out)
    assert (row["kind"], row["mailbox"], row["cause"]) == ("outage", "down", "unreachable")
    code, out = cli("requests", "list", "--type", "incident", "--json", "--data-dir", data)
    assert json.loads(out) == []


def test_unknown_fallback_user_or_site_in_the_config_is_a_directory_outage(
    mailbox: Mailbox,
) -> None:
    mailbox.configure(
        "dir",
        incidentFallbackUserLogon="nobody.here",
        incidentFallbackSiteName="Atlantis",
    )
    mailbox.deliver(message("Waits for the directory"))
    assert mailbox.once() == 1
    [outage] = mailbox.requests(type="event")
    assert (outage["kind"], outage["cause"]) == ("outage", "directory")
    assert "'nobody.here' is not a user" in outage["description"]
    assert "'Atlantis' is not in the directory" in outage["description"]
    # Nothing was fetched: the mail waits on the server until the directory is fixed.
    assert mailbox.left() == 1
    mailbox.configure()
    assert mailbox.once() == 0
    reqs = mailbox.requests()
    assert [r["status"] for r in reqs if r["kind"] == "outage"] == ["processed"]
    assert [r["subject"] for r in reqs if r["kind"] == "mail"] == ["Waits for the directory"]
