"""Issue 2: one POP3 mailbox → incidents and activities in the SQLite store, exactly once.

Every test here talks to a real Dovecot on 127.0.0.1 and a real SQLite file in tmp_path.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import (
    LOGIN,
    LOGIN_PASSWORD,
    Mailbox,
    attachment_bytes,
    both,
    cli,
    import_directory,
    message,
)

from engine.gateways.pop3 import Pop3Gateway
from engine.store.sqlite import SqliteTransaction

pytestmark = pytest.mark.dovecot


@both
def test_known_sender_creates_incident_with_that_requester(mailbox: Mailbox) -> None:
    mailbox.deliver(message("Printer jams", body="The printer jams.\n"))
    assert mailbox.once() == 0
    [req] = mailbox.requests()
    assert req["type"] == "incident"
    assert req["status"] == "new"
    assert req["subject"] == "Printer jams"
    assert "The printer jams." in req["description"]
    assert req["requester"] == "jdoe" and req["user"] == "jdoe"
    assert req["site"] == "Québec"  # the user's own site wins over the fallback
    assert req["group"] == "Service Desk"
    assert req["source"] == "Email"
    assert req["team"] == "IT"
    assert req["created_by"] == LOGIN
    assert mailbox.left() == 0


@both
def test_unknown_sender_gets_fallback_user_and_site(mailbox: Mailbox) -> None:
    mailbox.deliver(message("VPN down", sender="Nobody <nobody@else.example>"))
    mailbox.deliver(message("No site", sender="Alice <ASMITH@example.com>"))
    assert mailbox.once() == 0
    first, second = mailbox.requests()
    assert first["requester"] == "unknown.user"
    assert first["site"] == "Montréal"
    # Known sender (matched case-insensitively) without a site of her own → the fallback site.
    assert second["requester"] == "asmith"
    assert second["site"] == "Montréal"


@pytest.mark.parametrize(
    "form",
    [
        "RE: [Incident] #{n} Printer",
        "RE: [Incident] IT #{n} Printer",
        "TR: [Incident] OCTOPUS_PROD {n} - Printer",
        "AW: FW: [Incident] #{n}",
    ],
)
def test_reply_with_request_number_adds_activity(mailbox: Mailbox, form: str) -> None:
    mailbox.deliver(message("Printer jams"))
    assert mailbox.once() == 0
    [req] = mailbox.requests()
    mailbox.deliver(
        message(form.format(n=req["number"]), sender="Alice <asmith@example.com>", body="Again.\n"),
    )
    assert mailbox.once() == 0
    [req] = mailbox.requests()
    [activity] = req["activities"]
    assert activity["author"] == "Alice"
    assert activity["email"] == "asmith@example.com"
    assert "Again." in activity["body"]
    assert activity["date"].startswith("2026-11-27T09:12:44")


def test_reference_to_other_team_or_unknown_request_creates_incident(
    tmp_path: Path, mailbox: Mailbox, new_mailbox: Callable[..., Mailbox]
) -> None:
    # A request of team 2 (Facilities), made through a second mailbox of that team.
    fac = new_mailbox(tmp_path / "fac.xml", team="Facilities", incidentGroup="Building Services")
    fac.deliver(message("Leaking tap"))
    assert fac.once() == 0
    [fac_req] = mailbox.requests()
    mailbox.deliver(message(f"RE: [Incident] #{fac_req['number']} Leaking tap"))
    mailbox.deliver(message("RE: [Incident] #99999 Unknown"))
    assert mailbox.once() == 0
    reqs = mailbox.requests()
    assert len(reqs) == 3
    assert reqs[0]["activities"] == []
    assert [r["team"] for r in reqs[1:]] == ["IT", "IT"]


@both
def test_reply_to_closed_request_reopens_it(mailbox: Mailbox) -> None:
    mailbox.deliver(message("Printer jams"))
    assert mailbox.once() == 0
    db = sqlite3.connect(mailbox.data / "mailintegration.sqlite3")
    db.execute("UPDATE requests SET status = 'closed'")
    db.commit()
    db.close()
    mailbox.deliver(message("RE: [Incident] #1 Printer jams"))
    assert mailbox.once() == 0
    [req] = mailbox.requests()
    assert req["status"] == "reopened"
    assert any("Reopened by a reply from john.doe@example.com" in h["text"] for h in req["history"])


def test_attachments_minus_ignored_ones_with_exact_bytes(mailbox: Mailbox) -> None:
    mailbox.configure(
        ignoredAttachments="IMAGE001.png, logo.gif", includeRawMessageAsAttachment="TRUE"
    )
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40
    raw = message(
        "Report attached",
        attachments=(
            ("report.pdf", "application/pdf", pdf),
            ("image001.png", "image/png", b"\x89PNG\r\n\x1a\nsig"),
            ("logo.gif", "image/gif", b"GIF89a"),
        ),
    )
    mailbox.deliver(raw)
    assert mailbox.once() == 0
    [req] = mailbox.requests()
    names = sorted(a["name"] for a in req["attachments"])
    assert names == ["Report attached.eml", "report.pdf"]
    by_name = {a["name"]: a for a in req["attachments"]}
    assert attachment_bytes(mailbox.data, by_name["report.pdf"]["sha256"]) == pdf
    assert attachment_bytes(mailbox.data, by_name["Report attached.eml"]["sha256"]) == raw


@both
def test_running_twice_creates_nothing_new(mailbox: Mailbox) -> None:
    for i in range(3):
        mailbox.deliver(message(f"Issue {i}"))
    assert mailbox.once() == 0
    assert mailbox.once() == 0
    mailbox.assert_exactly_once()


def test_crash_after_commit_before_quit_then_rerun_processes_each_once(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(4):
        mailbox.deliver(message(f"Crash case {i}"))

    def crash(self: Pop3Gateway) -> None:
        raise RuntimeError("simulated crash between commit and QUIT")

    with monkeypatch.context() as m:
        m.setattr(Pop3Gateway, "quit", crash)
        assert mailbox.once() != 0
    # Committed, but the deletions were never confirmed by QUIT: the mail is still there.
    mail = [r for r in mailbox.requests() if r["kind"] == "mail"]
    assert len(mail) == 4
    assert mailbox.left() == 4
    assert mailbox.once() == 0
    mailbox.assert_exactly_once(outages=True)
    # The crash was reported as an outage, closed by the run that worked.
    assert [r["status"] for r in mailbox.requests() if r["kind"] == "outage"] == ["processed"]


def test_failed_commit_deletes_nothing(mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(3):
        mailbox.deliver(message(f"Commit fails {i}"))
    real_commit = SqliteTransaction.commit
    calls = {"n": 0}

    async def failing_commit(self: SqliteTransaction) -> None:
        calls["n"] += 1
        # The first transaction answers the directory check; fail the ones after it.
        if calls["n"] > 2:
            raise sqlite3.OperationalError("disk I/O error")
        await real_commit(self)

    with monkeypatch.context() as m:
        m.setattr(SqliteTransaction, "commit", failing_commit)
        assert mailbox.once() != 0
    assert mailbox.left() == 3
    assert mailbox.ledger() == []
    assert mailbox.requests() == []
    assert mailbox.once() == 0
    mailbox.assert_exactly_once()


def test_pop3s_with_ca_file_works(mailbox: Mailbox, dovecot: Any) -> None:
    mailbox.configure(
        port=dovecot.pop3s_port,
        use_ssl=True,
        host="localhost",
        server_extra=f"    <caFile>{dovecot.ca_file}</caFile>\n",
    )
    mailbox.deliver(message("Over TLS"))
    assert mailbox.once() == 0
    assert [r["subject"] for r in mailbox.requests()] == ["Over TLS"]
    mailbox.assert_exactly_once()


def test_untrusted_certificate_is_refused(mailbox: Mailbox, dovecot: Any) -> None:
    mailbox.configure(port=dovecot.pop3s_port, use_ssl=True, host="localhost")
    mailbox.deliver(message("Never fetched"))
    assert mailbox.once() == 1
    assert mailbox.left() == 1
    assert [r["kind"] for r in mailbox.requests()] == ["outage"]
    code, out = cli("check", "--config", mailbox.config)
    assert code == 1
    assert "FAILED (tls)" in out and "not trusted" in out


def test_original_command_line_end_to_end(
    tmp_path: Path, mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILINTEGRATION_DATA_DIR", str(mailbox.data))
    logs = tmp_path / "log folder"
    logs.mkdir()
    spaced = tmp_path / "config folder" / "email integration.xml"
    spaced.parent.mkdir()
    spaced.write_bytes(mailbox.config.read_bytes())
    mailbox.deliver(message("Original CLI"))
    argv = [
        "/login:" + LOGIN,
        "/Password:" + LOGIN_PASSWORD,
        "/TEAM:1",
        *f"/ConfigFilePath:{spaced}".split(" "),
        *f"/LogFilePath:{logs / 'MailIntegration.log'}".split(" "),
        "/Debug",
    ]
    code, _ = cli(*argv)
    assert code == 0
    [req] = mailbox.requests()
    assert req["subject"] == "Original CLI" and req["created_by"] == LOGIN
    log_text = (logs / "MailIntegration.log").read_text()
    assert "created" in log_text
    assert LOGIN_PASSWORD not in log_text and mailbox.password not in log_text
    assert len(list(logs.glob("RawMessage-*.eml"))) == 1


def test_original_command_line_errors_are_clear(tmp_path: Path, capsys: Any) -> None:
    code, _ = cli(
        "/Login:system",
        "/Password:x",
        "/ConfigFilePath:/nope.xml",
        f"/LogFilePath:{tmp_path / 'missing' / 'x.log'}",
    )
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_wrong_engine_login_is_refused(mailbox: Mailbox, capsys: Any) -> None:
    mailbox.deliver(message("Never"))
    code, _ = cli(
        "once",
        "--config",
        mailbox.config,
        "--data-dir",
        mailbox.data,
        "--login",
        LOGIN,
        "--password",
        "wrong",
    )
    assert code == 2
    assert "login 'system' failed" in capsys.readouterr().err
    assert mailbox.left() == 1


def test_check_reports_count_without_fetching(mailbox: Mailbox) -> None:
    mailbox.deliver(message("One"))
    mailbox.deliver(message("Two"))
    code, out = cli("check", "--config", mailbox.config)
    assert code == 0
    assert "OK: connected" in out and "2 message(s)" in out
    assert mailbox.left() == 2


def test_requests_json_has_documented_fields(mailbox: Mailbox) -> None:
    import json

    mailbox.deliver(message("Json", attachments=(("a.txt", "text/plain", b"x"),)))
    assert mailbox.once() == 0
    code, out = cli("requests", "show", "1", "--json", "--data-dir", mailbox.data)
    assert code == 0
    doc = json.loads(out)
    for key in (
        "number",
        "team",
        "type",
        "status",
        "subject",
        "description",
        "requester",
        "user",
        "site",
        "group",
        "assignee",
        "source",
        "created_by",
        "activities",
        "attachments",
    ):
        assert key in doc
    assert doc["attachments"][0].keys() >= {"name", "size", "sha256"}
    code, out = cli("requests", "list", "--json", "--data-dir", mailbox.data)
    assert [r["number"] for r in json.loads(out)] == [1]


def test_directory_reimport_updates_without_duplicates(tmp_path: Path, data: Path) -> None:
    import_directory(data, tmp_path)
    db = sqlite3.connect(data / "mailintegration.sqlite3")
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == 5
    assert db.execute("SELECT count(*) FROM teams").fetchone()[0] == 2
    db.close()


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--parse-processes", "-1", "must be 0 or more, not -1"),
        ("--max-sessions", "0", "must be 1 or more, not 0"),
        ("--queue-size", "many", "'many' is not a whole number"),
    ],
)
def test_counts_on_the_command_line_are_checked(
    tmp_path: Path, capsys: Any, flag: str, value: str, says: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli("once", "--config", tmp_path / "m.xml", flag, value)
    assert exited.value.code == 2
    assert f"argument {flag}: {says}" in capsys.readouterr().err
