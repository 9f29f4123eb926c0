"""Issue 3: the event processor, failure events for unprocessable mail, outage events."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from support import (
    EVENT,
    attachment_bytes,
    cli,
    gateway_elements,
    import_directory,
    ledger,
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


@pytest.fixture
def gateway() -> str:
    """The protocol of the mailboxes ``env["mailbox"]`` writes; the event, failure and
    outage tests run for both (``@both``)."""
    return "pop3"


both = pytest.mark.parametrize("gateway", ["pop3", "imap"])


@pytest.fixture
def env(
    tmp_path: Path,
    dovecot: Any,
    pop3_user: tuple[str, str],
    gateway: str,
    request: pytest.FixtureRequest,
) -> dict[str, Any]:
    if gateway == "imap":
        request.getfixturevalue("require_imap")
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    user, password = pop3_user

    def mailbox(path: Path, **kw: Any) -> Path:
        return mailbox_xml(path, **{**gateway_elements(dovecot, gateway), **kw})

    return {
        "data": data,
        "tmp": tmp_path,
        "user": user,
        "password": password,
        "mailbox": mailbox,
    }


@both
def test_alert_creates_event_and_its_update_adds_activity(
    env: dict[str, Any], dovecot: Any
) -> None:
    cfg = env["mailbox"](
        env["tmp"] / "events.xml",
        user=env["user"],
        password=env["password"],
        processor=EVENT,
        incidentGroup=None,
        incidentFallbackUserLogon=None,
        group="Monitoring",
        assignee="oncall",
        incidentSource="SCOM",
    )
    dovecot.deliver(env["user"], SCOM_ALERT)
    assert once(env["data"], cfg) == 0
    [event] = requests(env["data"])
    assert event["type"] == "event" and event["kind"] == "mail" and event["status"] == "new"
    assert event["group"] == "Monitoring"
    assert event["assignee"] == "oncall"
    assert event["source"] == "SCOM"
    assert "only 2% (812 MB)" in event["description"]
    dovecot.deliver(env["user"], scom_update(event["number"]))
    assert once(env["data"], cfg) == 0
    [event] = requests(env["data"])
    [activity] = event["activities"]
    assert "31% free space" in activity["body"]
    assert dovecot.count(env["user"]) == 0


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
def test_unprocessable_message_between_good_ones_becomes_failure_event(
    env: dict[str, Any], dovecot: Any
) -> None:
    cfg = env["mailbox"](env["tmp"] / "m.xml", user=env["user"], password=env["password"])
    bad = _deep(200)
    dovecot.deliver(env["user"], message("Good one"))
    dovecot.deliver(env["user"], bad)
    dovecot.deliver(env["user"], message("Good two"))
    assert once(env["data"], cfg) == 1  # a failed message is not "everything succeeded"
    reqs = requests(env["data"])
    mail = [r for r in reqs if r["kind"] == "mail"]
    [failure] = [r for r in reqs if r["kind"] == "message-failure"]
    assert [r["subject"] for r in mail] == ["Good one", "Good two"]
    assert failure["type"] == "event" and failure["mailbox"] == "m"
    assert failure["cause"] == "limit-exceeded"
    assert "What to do" in failure["description"]
    [att] = failure["attachments"]
    assert att["name"] == "message.eml"
    assert attachment_bytes(env["data"], att["sha256"]) == bad
    assert dovecot.count(env["user"]) == 0
    outcomes = [r["outcome"] for r in ledger(env["data"])]
    assert outcomes == ["created", "failed: limit-exceeded", "created"]

    # The same message again: an activity on the same failure event, not a second event.
    dovecot.deliver(env["user"], bad)
    once(env["data"], cfg)
    failures = [r for r in requests(env["data"]) if r["kind"] == "message-failure"]
    assert len(failures) == 1
    assert len(failures[0]["activities"]) == 1


@both
def test_unknown_sender_without_fallback_user_becomes_failure_event(
    env: dict[str, Any], dovecot: Any
) -> None:
    cfg = env["mailbox"](
        env["tmp"] / "m.xml",
        user=env["user"],
        password=env["password"],
        incidentFallbackUserLogon=None,
    )
    dovecot.deliver(env["user"], message("Who am I", sender="stranger@nowhere.example"))
    dovecot.deliver(env["user"], message("Known"))
    once(env["data"], cfg)
    kinds = sorted((r["kind"], r["cause"]) for r in requests(env["data"]))
    assert kinds == [("mail", None), ("message-failure", "unknown-fallback-user")]
    assert dovecot.count(env["user"]) == 0


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
    env: dict[str, Any], dovecot: Any, capfd: Any
) -> None:
    wrong = "Canary-Wr0ng-Pw-77"
    cfg = env["mailbox"](env["tmp"] / "box.xml", user=env["user"], password=wrong)
    log = env["tmp"] / "engine.log"
    dovecot.deliver(env["user"], message("Waiting on the server"))
    assert once(env["data"], cfg, "--log-file", log) == 1
    [outage] = requests(env["data"], type="event")
    assert outage["kind"] == "outage" and outage["cause"] == "authentication"
    assert outage["status"] == "new" and outage["mailbox"] == "box"
    [config_att] = outage["attachments"]
    redacted = attachment_bytes(env["data"], config_att["sha256"])
    assert b"<password>********</password>" in redacted
    assert b"<userName>" + env["user"].encode() in redacted
    for _ in range(2):
        assert once(env["data"], cfg, "--log-file", log) == 1
    [outage] = requests(env["data"], type="event")
    assert len(outage["activities"]) == 2
    assert all("still failing" in a["body"] for a in outage["activities"])
    assert dovecot.count(env["user"]) == 1
    captured = capfd.readouterr()
    blob = _everything_in(env["data"], log) + captured.out.encode() + captured.err.encode()
    assert wrong.encode() not in blob

    env["mailbox"](cfg, user=env["user"], password=env["password"])
    assert once(env["data"], cfg) == 0
    reqs = requests(env["data"])
    [outage] = [r for r in reqs if r["kind"] == "outage"]
    assert outage["status"] == "processed"
    assert "works again" in outage["activities"][-1]["body"]
    assert [r["subject"] for r in reqs if r["kind"] == "mail"] == ["Waiting on the server"]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def test_server_down_and_tls_failure_are_outages_of_their_own_causes(
    env: dict[str, Any], dovecot: Any
) -> None:
    down = mailbox_xml(env["tmp"] / "down.xml", port=_closed_port(), user="x", password="y")
    tls = mailbox_xml(
        env["tmp"] / "tls.xml",
        port=dovecot.pop3s_port,
        user=env["user"],
        password=env["password"],
        use_ssl=True,
        host="localhost",
    )
    assert once(env["data"], down) == 1
    assert once(env["data"], tls) == 1
    got = sorted((r["mailbox"], r["cause"]) for r in requests(env["data"], type="event"))
    assert got == [("down", "unreachable"), ("tls", "tls")]


def test_invalid_config_file_becomes_outage_without_a_copy(env: dict[str, Any]) -> None:
    """A file that does not load is never attached (it may be anything): the description
    names file, line and element, and says why no copy is attached."""
    cfg = env["tmp"] / "broken.xml"
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
    assert once(env["data"], cfg) == 1
    [outage] = requests(env["data"], type="event")
    assert outage["cause"] == "config"
    assert "line 9" in outage["description"] and "useSsl" in outage["description"]
    assert "No copy of the configuration is attached" in outage["description"]
    assert outage["attachments"] == []
    assert b"Canary-Cfg-Pw-31" not in _everything_in(env["data"])


def test_events_are_listed_with_kind_mailbox_and_cause(env: dict[str, Any]) -> None:
    cfg = mailbox_xml(env["tmp"] / "down.xml", port=_closed_port(), user="x", password="y")
    once(env["data"], cfg)
    code, out = cli(
        "requests",
        "list",
        "--type",
        "event",
        "--status",
        "new",
        "--json",
        "--data-dir",
        env["data"],
    )
    assert code == 0
    [row] = json.loads(out)
    assert (row["kind"], row["mailbox"], row["cause"]) == ("outage", "down", "unreachable")
    code, out = cli("requests", "list", "--type", "incident", "--json", "--data-dir", env["data"])
    assert json.loads(out) == []


def test_unknown_fallback_user_or_site_in_the_config_is_a_directory_outage(
    env: dict[str, Any], dovecot: Any
) -> None:
    cfg = mailbox_xml(
        env["tmp"] / "dir.xml",
        port=dovecot.pop3_port,
        user=env["user"],
        password=env["password"],
        incidentFallbackUserLogon="nobody.here",
        incidentFallbackSiteName="Atlantis",
    )
    dovecot.deliver(env["user"], message("Waits for the directory"))
    assert once(env["data"], cfg) == 1
    [outage] = requests(env["data"], type="event")
    assert (outage["kind"], outage["cause"]) == ("outage", "directory")
    assert "'nobody.here' is not a user" in outage["description"]
    assert "'Atlantis' is not in the directory" in outage["description"]
    # Nothing was fetched: the mail waits on the server until the directory is fixed.
    assert dovecot.count(env["user"]) == 1
    mailbox_xml(cfg, port=dovecot.pop3_port, user=env["user"], password=env["password"])
    assert once(env["data"], cfg) == 0
    reqs = requests(env["data"])
    assert [r["status"] for r in reqs if r["kind"] == "outage"] == ["processed"]
    assert [r["subject"] for r in reqs if r["kind"] == "mail"] == ["Waits for the directory"]
