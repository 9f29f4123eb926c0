"""Mailbox files: loading, validation, error messages, hostile input and redaction."""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lxml import etree
from support import EVENT, GATEWAY, INCIDENT, mailbox_text

from engine.config import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_SUBJECT_PATTERN,
    MAX_COPY_BYTES,
    SCHEMA_PATH,
    MailboxConfig,
    load_mailbox,
    mailbox_copy,
    redact_config,
    secret_values,
)
from engine.errors import ConfigError

CONFIGS = Path(__file__).parent / "configs"
CANARY = "Canary-PW-8c1f"

MAILKIT = "Octopus.MailIntegration.Gateways.MailKitMailboxGateway, Octopus.MailIntegration"

EXAMPLE = (CONFIGS / "incident-example.xml").read_text(encoding="utf-8")


def mailbox(
    *,
    processor: str = INCIDENT,
    gateway: str = GATEWAY,
    server: str = "",
    password: str = f"<password>{CANARY}</password>",
    extra: str = "",
) -> str:
    """A small valid file: the shared template with only what the schema requires, so each
    test's own XML lands on a known line (the root is line 2, server line 4, ``password``
    line 8, ``server`` line 9, ``extra`` line 11)."""
    return mailbox_text(
        host="pop.example.com",
        port=None,
        use_ssl=None,
        user="support@example.com",
        password=None,
        timeout=None,
        processor=processor,
        gateway=gateway,
        server_extra=f"    {password}\n    {server}\n",
        root_extra=f"  {extra}\n",
        defaults=False,
    )


def write(tmp_path: Path, text: str | bytes, name: str = "support.xml") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def load_error(tmp_path: Path, text: str | bytes) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_mailbox(path)
    return info.value


def assert_no_canary(err: ConfigError) -> None:
    for part in (str(err), err.reason, err.file or "", err.element or ""):
        assert CANARY not in part
        assert "8c1f" not in part


# ------------------------------------------------------------------------------- loading


def test_documentation_example_loads_with_every_field(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    cfg = load_mailbox(path)
    assert cfg.name == "support"
    assert cfg.path == path
    assert cfg.processor == "incident"
    assert cfg.server.gateway == "pop3"
    assert cfg.server.host == "pop.example.com"
    assert cfg.server.port == 995
    assert cfg.server.use_ssl is True
    assert cfg.server.starttls is False
    assert cfg.server.user_name == "support@example.com"
    assert cfg.server.password == "secret"
    assert cfg.server.tls_verify is True
    assert cfg.server.ca_file is None
    assert cfg.server.timeout == 30.0
    assert cfg.fallback_site == "Montréal"
    assert cfg.fallback_user == "unknown.user"
    assert cfg.group == "Service Desk"
    assert cfg.source == "Email"
    assert cfg.ignored_attachments == ("image001.png", "logo.gif")
    assert cfg.create_new_requests is True
    assert cfg.include_raw_message is False
    assert cfg.subject_pattern is DEFAULT_SUBJECT_PATTERN
    assert cfg.team is None
    assert cfg.assignee is None
    assert cfg.smtp is None
    assert cfg.reply_template is None
    assert cfg.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES == 26_214_400
    assert cfg.poll_interval is None
    # The account the ledger keys messages by: no port (a change of port must not duplicate).
    assert cfg.account == "support@example.com@pop.example.com"
    assert cfg.server.account_id is None
    assert (cfg.server.session_timeout, cfg.server.min_rate) == (None, 32768)
    assert "secret" not in repr(cfg)


def test_name_and_default_team_arguments(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    cfg = load_mailbox(path, default_team="Helpdesk", name="custom")
    assert (cfg.name, cfg.team) == ("custom", "Helpdesk")
    with_team = EXAMPLE.replace("</mailIntegration>", "<team>IT</team></mailIntegration>")
    assert load_mailbox(write(tmp_path, with_team), default_team="Helpdesk").team == "IT"


def test_utf8_accents_bom_and_named_entities(tmp_path: Path) -> None:
    text = EXAMPLE.replace(
        "<incidentGroup>Service Desk</incidentGroup>",
        "<incidentGroup>Équipe de soutien &ccedil;a &amp; l&agrave;</incidentGroup>",
    ).replace(
        "<incidentSource>Email</incidentSource>", "<incidentSource>Courriel 📧</incidentSource>"
    )
    cfg = load_mailbox(write(tmp_path, b"\xef\xbb\xbf" + text.encode("utf-8")))
    assert cfg.fallback_site == "Montréal"
    assert cfg.group == "Équipe de soutien ça & là"
    assert cfg.source == "Courriel 📧"


def test_utf16_and_declared_latin1_files(tmp_path: Path) -> None:
    utf16 = EXAMPLE.replace('encoding="utf-8"', 'encoding="utf-16"')
    cfg = load_mailbox(write(tmp_path, b"\xff\xfe" + utf16.encode("utf-16-le"), "a.xml"))
    assert cfg.fallback_site == "Montréal"
    latin1 = EXAMPLE.replace('encoding="utf-8"', 'encoding="ISO-8859-1"').replace(
        "Service Desk", "Équipe"
    )
    assert load_mailbox(write(tmp_path, latin1.encode("latin-1"), "b.xml")).group == "Équipe"


def test_encoding_that_could_hide_markup_is_refused(tmp_path: Path) -> None:
    text = EXAMPLE.replace('encoding="utf-8"', 'encoding="UTF-7"')
    err = load_error(tmp_path, text)
    assert "UTF-7" in err.reason and "not supported" in err.reason


def test_element_names_are_case_insensitive(tmp_path: Path) -> None:
    text = (
        EXAMPLE.replace("serverName>", "ServerName>")
        .replace("useSsl>", "UseSSL>")
        .replace("<mailIntegration>", "<MailIntegration>")
        .replace("</mailIntegration>", "</MailIntegration>")
        .replace("incidentGroup>", "IncidentGroup>")
    )
    cfg = load_mailbox(write(tmp_path, text))
    assert cfg.server.host == "pop.example.com"
    assert cfg.server.use_ssl is True
    assert cfg.group == "Service Desk"


@pytest.mark.parametrize(
    "gateway",
    [
        GATEWAY,
        MAILKIT,
        "Octopus.MailIntegration.Gateways.SidePopMailboxGateway",
        "MailKitMailboxGateway",
        "pop3",
        "POP3",
    ],
)
def test_pop3_gateways(tmp_path: Path, gateway: str) -> None:
    assert load_mailbox(write(tmp_path, mailbox(gateway=gateway))).server.gateway == "pop3"


def test_default_ports_and_tls_options(tmp_path: Path) -> None:
    assert load_mailbox(write(tmp_path, mailbox())).server.port == 110
    ssl = load_mailbox(write(tmp_path, mailbox(server="<useSsl>1</useSsl>")))
    assert (ssl.server.port, ssl.server.use_ssl) == (995, True)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = load_mailbox(
        write(
            tmp_path,
            mailbox(
                server="<startTls>true</startTls><caFile>ca.pem</caFile>"
                "<tlsVerify>0</tlsVerify><timeoutSeconds>5</timeoutSeconds><port>1110</port>"
            ),
        )
    )
    assert cfg.server.starttls is True
    assert cfg.server.ca_file == ca.resolve()
    assert cfg.server.tls_verify is False
    assert cfg.server.timeout == 5.0
    assert cfg.server.port == 1110


def test_ssl_and_starttls_are_exclusive(tmp_path: Path) -> None:
    err = load_error(tmp_path, mailbox(server="<useSsl>true</useSsl><startTls>true</startTls>"))
    assert "useSsl and startTls" in err.reason
    assert err.line == 9 and err.element == "server/startTls"


def test_missing_ca_file(tmp_path: Path) -> None:
    err = load_error(tmp_path, mailbox(server="<caFile>missing.pem</caFile>"))
    assert "missing.pem" in err.reason and err.element == "server/caFile"


def test_event_mailbox(tmp_path: Path) -> None:
    extra = (
        "<group>Infrastructure</group><assignee>jdoe</assignee><incidentGroup>SD</incidentGroup>"
    )
    cfg = load_mailbox(write(tmp_path, mailbox(processor=EVENT, extra=extra)))
    assert cfg.processor == "event"
    assert cfg.group == "Infrastructure"
    assert cfg.assignee == "jdoe"
    # Each kind falls back to the other kind's group element.
    only_incident_group = "<incidentGroup>SD</incidentGroup>"
    cfg = load_mailbox(write(tmp_path, mailbox(processor=EVENT, extra=only_incident_group)))
    assert cfg.group == "SD"
    both = load_mailbox(write(tmp_path, mailbox(extra=extra)))
    assert both.group == "SD"
    only_group = load_mailbox(write(tmp_path, mailbox(extra="<group>Infra</group>")))
    assert only_group.group == "Infra"


def test_empty_optional_elements_mean_not_given(tmp_path: Path) -> None:
    extra = "<incidentGroup/><incidentFallbackSiteName>  </incidentFallbackSiteName>"
    extra += "<ignoredAttachments> , ,</ignoredAttachments>"
    cfg = load_mailbox(write(tmp_path, mailbox(extra=extra)))
    assert cfg.group is None and cfg.fallback_site is None
    assert cfg.ignored_attachments == ()


def test_sample_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONITORING_POP3_PASSWORD", "pop-secret")
    monkeypatch.setenv("MONITORING_SMTP_PASSWORD", "smtp-secret")
    cfg = load_mailbox(CONFIGS / "event-full.xml")
    assert cfg.processor == "event"
    assert cfg.server.starttls and cfg.server.port == 110 and cfg.server.timeout == 60.0
    assert cfg.team == "IT" and cfg.group == "Infrastructure" and cfg.assignee == "jdoe"
    assert cfg.ignored_attachments == ("*.vcf", "winmail.dat")
    assert (cfg.max_message_bytes, cfg.poll_interval) == (10_485_760, 120.0)
    assert cfg.smtp is not None
    assert (cfg.smtp.host, cfg.smtp.port, cfg.smtp.starttls) == ("smtp.example.com", 587, True)
    assert cfg.smtp.sender == "Service Desk <monitoring@example.com>"
    assert cfg.reply_template is not None
    assert cfg.reply_template.subject == "RE: {subject}"
    assert (
        cfg.reply_template.body == "Hello {sender},\n\nYour message reached the {mailbox} mailbox."
    )
    assert secret_values(cfg) == ("pop-secret", "smtp-secret")
    assert load_mailbox(CONFIGS / "incident-example.xml").processor == "incident"


def test_every_schema_element_is_documented() -> None:
    xs = "{http://www.w3.org/2001/XMLSchema}"
    schema = etree.parse(str(SCHEMA_PATH))
    elements = list(schema.iter(f"{xs}element"))
    assert len(elements) > 30
    for el in elements:
        doc = el.find(f"{xs}annotation/{xs}documentation")
        assert doc is not None and (doc.text or "").strip(), el.get("name")


# ------------------------------------------------------------------------------- processors


def test_service_request_processor_is_read_under_both_names(tmp_path: Path) -> None:
    for sr in (
        "Octopus.MailIntegration.Processors.EndUserNewSRMailMessageProcessor, "
        "Octopus.MailIntegration",
        "ESI.Octopus.MailIntegration.EndUserNewSRMailMessageProcessor",
    ):
        cfg = load_mailbox(write(tmp_path, mailbox(processor=sr)))
        assert cfg.processor == "service-request"
        assert cfg.processing.service_requests.token == "CreateSR"


def test_unknown_processor_lists_valid_values(tmp_path: Path) -> None:
    err = load_error(tmp_path, mailbox(processor="Acme.Processors.FaxProcessor, Acme"))
    assert "EndUserIncidentMailMessageProcessor" in err.reason
    assert "EventMailMessageProcessor" in err.reason


def test_unknown_gateways_list_the_valid_values(tmp_path: Path) -> None:
    other = load_error(tmp_path, mailbox(gateway="Acme.ExchangeGateway"))
    assert "SidePopMailboxGateway" in other.reason and "pop3" in other.reason
    assert "ImapMailboxGateway" in other.reason and "imap" in other.reason
    assert other.line == 5


IMAP = "Octopus.MailIntegration.Gateways.ImapMailboxGateway, Octopus.MailIntegration"


@pytest.mark.parametrize(
    ("gateway", "server"),
    [
        (IMAP, ""),
        ("imap", ""),
        ("Octopus.MailIntegration.Gateways.MailKitImapMailboxGateway", ""),
        (IMAP, "<protocol>IMAP</protocol>"),
    ],
)
def test_imap_is_chosen_by_gateway_type_name_or_protocol(
    tmp_path: Path, gateway: str, server: str
) -> None:
    cfg = load_mailbox(write(tmp_path, mailbox(gateway=gateway, server=server)))
    assert cfg.server.gateway == "imap"
    assert cfg.server.port == 143 and cfg.server.folders == ("INBOX",)
    assert cfg.server.after_processing == "delete" and cfg.server.idle


def test_protocol_alone_chooses_the_gateway_and_imaps_defaults_to_993(tmp_path: Path) -> None:
    text = mailbox(server="<protocol>imap</protocol><useSsl>true</useSsl>").replace(
        f"    <gatewayTypeName>{GATEWAY}</gatewayTypeName>\n", ""
    )
    cfg = load_mailbox(write(tmp_path, text))
    assert cfg.server.gateway == "imap" and cfg.server.port == 993
    neither = load_error(tmp_path, text.replace("<protocol>imap</protocol>", ""))
    assert "gatewayTypeName" in neither.reason and "protocol" in neither.reason


def test_protocol_and_gateway_type_name_must_agree(tmp_path: Path) -> None:
    err = load_error(tmp_path, mailbox(server="<protocol>imap</protocol>"))
    assert "imap" in err.reason and "pop3" in err.reason and err.element == "server/protocol"


def test_imap_settings_are_read_and_copied(tmp_path: Path) -> None:
    server = (
        "<folders><folder>INBOX</folder><folder>Support Desk</folder></folders>"
        "<afterProcessing>Move</afterProcessing><moveToFolder>Archive</moveToFolder>"
        "<failedFolder>Failed</failedFolder><idle>false</idle>"
        "<idleRenewSeconds>60</idleRenewSeconds><idleKeepAliveSeconds>5</idleKeepAliveSeconds>"
    )
    cfg = load_mailbox(write(tmp_path, mailbox(gateway="imap", server=server)))
    s = cfg.server
    assert s.folders == ("INBOX", "Support Desk") and s.after_processing == "move"
    assert (s.move_folder, s.failed_folder, s.idle) == ("Archive", "Failed", False)
    assert (s.idle_renew, s.idle_keepalive) == (60.0, 5.0)
    again = load_mailbox(write(tmp_path, mailbox_copy(cfg), "copy.xml"))
    assert again.server == dataclasses.replace(s, password=again.server.password)


@pytest.mark.parametrize(
    ("gateway", "server", "words"),
    [
        (GATEWAY, "<afterProcessing>keep</afterProcessing>", "POP3 can only delete"),
        (GATEWAY, "<folders><folder>X</folder></folders>", "IMAP only"),
        ("imap", "<afterProcessing>move</afterProcessing>", "needs a <moveToFolder>"),
        ("imap", "<moveToFolder>A</moveToFolder>", "only read with move"),
        ("imap", "<folders><folder>A</folder><folder>A</folder></folders>", "twice"),
        (
            "imap",
            "<afterProcessing>move</afterProcessing><moveToFolder>INBOX</moveToFolder>",
            "must not be folders the mailbox reads",
        ),
        ("imap", "<idleRenewSeconds>1800</idleRenewSeconds>", "idleRenewSeconds"),
    ],
)
def test_imap_settings_are_checked(tmp_path: Path, gateway: str, server: str, words: str) -> None:
    err = load_error(tmp_path, mailbox(gateway=gateway, server=server))
    assert words in str(err)


# ------------------------------------------------------------------------------- subjects


@pytest.mark.parametrize(
    ("subject", "kind", "team", "number"),
    [
        ("RE: [Incident] #1234 Printer", "Incident", None, "1234"),
        ("RE: [Incident] IT #1234 Printer", "Incident", "IT", "1234"),
        ("TR: [Incident] OCTOPUS_PROD 1234 - Printer", "Incident", "OCTOPUS_PROD", "1234"),
        ("AW: FW: [Event] #77 disk", "Event", None, "77"),
        ("[Incident] #5", "Incident", None, "5"),
        (
            "RE: [EXT] [Service Request] HELPDESK #98765 - laptop",
            "Service Request",
            "HELPDESK",
            "98765",
        ),
    ],
)
def test_default_subject_pattern(subject: str, kind: str, team: str | None, number: str) -> None:
    found = DEFAULT_SUBJECT_PATTERN.search(subject)
    assert found is not None
    assert (found["type"], found["team"], found["number"]) == (kind, team, number)


@pytest.mark.parametrize(
    "subject", ["Printer broken", "[Incident] no number", "RE: [Incident] #12abc", "Incident 1234"]
)
def test_default_subject_pattern_negative(subject: str) -> None:
    assert DEFAULT_SUBJECT_PATTERN.search(subject) is None


def test_custom_subject_pattern(tmp_path: Path) -> None:
    extra = r"<subjectPattern> Ticket-(?P&lt;number&gt;\d+) </subjectPattern>"
    cfg = load_mailbox(write(tmp_path, mailbox(extra=extra)))
    found = cfg.subject_pattern.search("Re: Ticket-42 done")
    assert found is not None and found["number"] == "42"


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"Ticket-(\d+)", 'group named "number"'),
        (r"Ticket-(?P&lt;number&gt;\d+", "regular expression"),
    ],
)
def test_bad_subject_pattern(tmp_path: Path, pattern: str, expected: str) -> None:
    err = load_error(tmp_path, mailbox(extra=f"<subjectPattern>{pattern}</subjectPattern>"))
    assert expected in err.reason
    assert err.line == 11 and err.element == "subjectPattern"
    assert "line 11" in str(err)


# ------------------------------------------------------------------------------- secrets


def test_password_file(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pop3").write_text("s3cret \n\n")
    cfg = load_mailbox(
        write(tmp_path, mailbox(password="<passwordFile>secrets/pop3</passwordFile>"))
    )
    # One trailing newline only is dropped; the rest belongs to the password.
    assert cfg.server.password == "s3cret \n"


def test_unreadable_password_file_names_path_not_content(tmp_path: Path) -> None:
    err = load_error(tmp_path, mailbox(password="<passwordFile>/nonexistent/pw</passwordFile>"))
    assert "/nonexistent/pw" in err.reason
    assert err.element == "server/passwordFile" and err.line == 8
    folder = tmp_path / "dir"
    folder.mkdir()
    err = load_error(tmp_path, mailbox(password=f"<passwordFile>{folder}</passwordFile>"))
    assert str(folder) in err.reason


def test_password_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPPORT_POP3_PW", CANARY)
    path = write(tmp_path, mailbox(password="<passwordEnv>SUPPORT_POP3_PW</passwordEnv>"))
    cfg = load_mailbox(path)
    assert cfg.server.password == CANARY
    assert secret_values(cfg) == (CANARY,)
    monkeypatch.delenv("SUPPORT_POP3_PW")
    with pytest.raises(ConfigError) as info:
        load_mailbox(path)
    assert "SUPPORT_POP3_PW" in info.value.reason and "not set" in info.value.reason


def test_exactly_one_password_source(tmp_path: Path) -> None:
    none = load_error(tmp_path, mailbox(password=""))
    assert "<passwordFile>" in none.reason and none.element == "server"
    two = load_error(tmp_path, mailbox(server="<passwordEnv>X</passwordEnv>"))
    assert "only one" in two.reason and two.element == "server/passwordEnv"
    assert_no_canary(two)


def test_smtp_defaults_and_rules(tmp_path: Path) -> None:
    smtp = "<smtp><serverName>smtp.example.com</serverName><from>sd@example.com</from>{}</smtp>"
    cfg = load_mailbox(write(tmp_path, mailbox(extra=smtp.format(""))))
    assert cfg.smtp is not None
    assert (cfg.smtp.port, cfg.smtp.user_name, cfg.smtp.password) == (25, None, None)
    cfg = load_mailbox(write(tmp_path, mailbox(extra=smtp.format("<useSsl>true</useSsl>"))))
    assert cfg.smtp is not None and cfg.smtp.port == 465
    auth = "<userName>sd</userName><password>smtp-pw</password>"
    cfg = load_mailbox(write(tmp_path, mailbox(extra=smtp.format(auth))))
    assert secret_values(cfg) == (CANARY, "smtp-pw")
    err = load_error(tmp_path, mailbox(extra=smtp.format("<userName>sd</userName>")))
    assert "<userName> needs" in err.reason
    err = load_error(tmp_path, mailbox(extra=smtp.format("<password>smtp-pw</password>")))
    assert "<userName>" in err.reason and "smtp-pw" not in str(err)
    err = load_error(
        tmp_path, mailbox(extra=smtp.format("").replace("<from>sd@example.com</from>", ""))
    )
    assert "<from>" in err.reason and err.element == "smtp"


def test_reply_template_placeholders(tmp_path: Path) -> None:
    smtp = "<smtp><serverName>smtp.example.com</serverName><from>sd@example.com</from></smtp>"
    template = "<replyTemplate><subject>{}</subject><body>Hi</body></replyTemplate>"
    err = load_error(tmp_path, mailbox(extra=smtp + template.format("RE: {subjet}")))
    assert "{subjet}" in err.reason and "{subject}" in err.reason
    err = load_error(tmp_path, mailbox(extra=template.format("x")))
    assert "<smtp>" in err.reason


# ------------------------------------------------------------------------------- errors


def test_mismatched_tag_gives_lxml_line(tmp_path: Path) -> None:
    text = EXAMPLE.replace(
        "<serverName>pop.example.com</serverName>", "<serverName>pop.example.com</server>"
    )
    err = load_error(tmp_path, text)
    assert err.line == 7
    assert "not well-formed" in err.reason and "mismatch" in err.reason
    assert "line 7" in str(err) and str(tmp_path / "support.xml") in str(err)


def test_unknown_element_lists_valid_names(tmp_path: Path) -> None:
    err = load_error(tmp_path, mailbox(server="<hostName>x</hostName>"))
    assert err.line == 9
    assert "<hostName>" in err.reason
    assert (
        "serverName" in err.reason
        and "passwordFile" in err.reason
        and "timeoutSeconds" in err.reason
    )
    assert err.element == "server/hostName"
    root_level = load_error(tmp_path, mailbox(extra="<incidentGroupe>SD</incidentGroupe>"))
    assert root_level.line == 11 and "incidentGroup" in root_level.reason


def test_namespaced_element_is_unknown(tmp_path: Path) -> None:
    err = load_error(tmp_path, mailbox(extra='<x:team xmlns:x="urn:x">IT</x:team>'))
    assert "<x:team>" in err.reason and err.line == 11


def test_bad_boolean(tmp_path: Path) -> None:
    err = load_error(tmp_path, mailbox(server="<useSsl>yes</useSsl>"))
    assert "true or false" in err.reason and "'yes'" in err.reason
    assert err.line == 9 and err.element == "server/useSsl"


@pytest.mark.parametrize("value", ["70000", "0", "abc", "-1"])
def test_port_out_of_range(tmp_path: Path, value: str) -> None:
    err = load_error(tmp_path, mailbox(server=f"<port>{value}</port>"))
    assert "from 1 to 65535" in err.reason
    assert err.line == 9 and err.element == "server/port"


def test_other_ranges(tmp_path: Path) -> None:
    err = load_error(tmp_path, mailbox(server="<timeoutSeconds>7200</timeoutSeconds>"))
    assert "from 1 to 3600" in err.reason
    err = load_error(tmp_path, mailbox(extra="<maxMessageBytes>10</maxMessageBytes>"))
    assert "from 1024 to" in err.reason


def test_account_id_and_session_deadline(tmp_path: Path) -> None:
    server = (
        "<AccountId> support desk </AccountId><sessionTimeoutSeconds>900</sessionTimeoutSeconds>"
        "<minimumBytesPerSecond>1000</minimumBytesPerSecond>"
    )
    cfg = load_mailbox(write(tmp_path, mailbox(server=server)))
    assert cfg.account == cfg.server.account_id == "support desk"
    assert (cfg.server.session_timeout, cfg.server.min_rate) == (900.0, 1000)
    spelled = mailbox().replace("pop.example.com", "POP.Example.com.")
    assert load_mailbox(write(tmp_path, spelled)).account == "support@example.com@pop.example.com"
    err = load_error(tmp_path, mailbox(server="<sessionTimeoutSeconds>0</sessionTimeoutSeconds>"))
    assert "from 1 to 86400" in err.reason and err.element == "server/sessionTimeoutSeconds"
    err = load_error(tmp_path, mailbox(server="<minimumBytesPerSecond>x</minimumBytesPerSecond>"))
    assert err.element == "server/minimumBytesPerSecond"


def test_missing_server_name(tmp_path: Path) -> None:
    text = mailbox().replace("    <serverName>pop.example.com</serverName>\n", "")
    err = load_error(tmp_path, text)
    assert "<serverName>" in err.reason and "missing" in err.reason
    assert err.element == "server" and err.line == 4


def test_empty_required_element(tmp_path: Path) -> None:
    err = load_error(tmp_path, mailbox().replace("pop.example.com", ""))
    assert "empty" in err.reason and err.element == "server/serverName"


def test_wrong_root_and_attributes(tmp_path: Path) -> None:
    err = load_error(tmp_path, "<config/>")
    assert "<mailIntegration>" in err.reason
    err = load_error(tmp_path, mailbox().replace("<server>", '<server version="2">'))
    assert "version" in err.reason and err.line == 4


def test_undefined_entity(tmp_path: Path) -> None:
    err = load_error(tmp_path, mailbox(extra="<team>&nosuchentity;</team>"))
    assert err.line == 11 and "nosuchentity" in err.reason


def test_text_between_elements(tmp_path: Path) -> None:
    err = load_error(tmp_path, mailbox(server="stray text"))
    assert "text is not allowed" in err.reason and err.element == "server"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_mailbox(tmp_path / "absent.xml")
    assert "absent.xml" in str(info.value)


# ------------------------------------------------------------------------------- no secret leaks


@pytest.mark.parametrize(
    "text",
    [
        # The password element itself is wrong: duplicated, mis-closed, broken entity, with
        # elements inside, given twice by different means, unclosed.
        mailbox(server=f"<password>{CANARY}</password>"),
        mailbox(server=f"<Password>{CANARY}x</Password>"),
        mailbox(password=f"<password>{CANARY}</pasword>"),
        mailbox(password=f"<password>{CANARY}&bogus;</password>"),
        mailbox(password=f"<password>&{CANARY};</password>"),
        mailbox(password=f"<password>{CANARY}<b/></password>"),
        mailbox(password=f"<password>{CANARY}"),
        mailbox(password=f"<password>{CANARY}</password><passwordEnv>X</passwordEnv>"),
        mailbox(password=f"<password><![CDATA[{CANARY}]]></password><password>x</password>"),
        mailbox(password=f'<password value="{CANARY}">{CANARY}</password>'),
        mailbox(password=f"<password>{CANARY}</password>", server="<port>x</port>"),
        # The password reused in another element that is wrong.
        mailbox(server=f"<useSsl>{CANARY}</useSsl>"),
        mailbox(server=f"<{CANARY}/>"),
        mailbox(gateway=CANARY),
        mailbox(processor=CANARY),
        mailbox(extra=f"<subjectPattern>{CANARY}(</subjectPattern>"),
        mailbox(
            extra=f"<smtp><serverName>s</serverName><from>a@b</from><password>{CANARY}</password></smtp>"
        ),
        mailbox(extra=f"<smtp><serverName>s</serverName><password>{CANARY}</password></smtp>"),
        # Escaped forms of the password are hidden as well.
        mailbox(password="<password>Canary-PW-&#56;c1f</password>", server="<port>x</port>"),
        mailbox(
            password="<password>Canary-PW-8c1f</password>",
            server="<useSsl>Canary-PW-&#56;c1f</useSsl>",
        ),
    ],
)
def test_password_never_in_error_messages(tmp_path: Path, text: str) -> None:
    assert_no_canary(load_error(tmp_path, text))


def test_password_from_file_or_env_never_in_error_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PW", CANARY)
    err = load_error(
        tmp_path,
        mailbox(password="<passwordEnv>PW</passwordEnv>", extra=f"<team>{CANARY}</team><x/>"),
    )
    assert_no_canary(err)


# ------------------------------------------------------------------------------- hostile files


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
  <!ENTITY lol "lol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<mailIntegration><team>&lol9;</team></mailIntegration>
"""


def test_billion_laughs_refused(tmp_path: Path) -> None:
    err = load_error(tmp_path, BILLION_LAUGHS)
    assert "DOCTYPE" in err.reason and err.line == 2


def test_xxe_refused_without_reading_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "target.txt"
    target.write_text("TOP-SECRET-CONTENT")
    opened: list[str] = []
    real_open = Path.open

    def spy(self: Path, *args: object, **kwargs: object) -> object:
        opened.append(str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", spy)
    for url in ("file:///etc/passwd", target.as_uri()):
        text = EXAMPLE.replace(
            "<mailIntegration>",
            f'<!DOCTYPE mailIntegration [<!ENTITY x SYSTEM "{url}">]>\n<mailIntegration>',
        ).replace("<incidentSource>Email", "<incidentSource>&x;")
        err = load_error(tmp_path, text)
        assert "DOCTYPE" in err.reason and "TOP-SECRET" not in str(err) and "root:" not in str(err)
    assert all(p.endswith("support.xml") for p in opened)


def test_parameter_entity_and_lowercase_doctype_refused(tmp_path: Path) -> None:
    text = '<!DOCTYPE m [<!ENTITY % p SYSTEM "http://example.invalid/x.dtd"> %p;]><m/>'
    assert "DOCTYPE" in load_error(tmp_path, text).reason
    assert "DOCTYPE" in load_error(tmp_path, "<!doctype m><m/>").reason


@pytest.mark.parametrize(
    "attribute",
    [
        'xsi:schemaLocation="urn:x http://evil.example/x.xsd"',
        'xsi:noNamespaceSchemaLocation="http://evil.example/x.xsd"',
    ],
)
def test_schema_location_hints_refused(tmp_path: Path, attribute: str) -> None:
    xsi = 'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
    text = EXAMPLE.replace("<mailIntegration>", f"<mailIntegration {xsi} {attribute}>")
    err = load_error(tmp_path, text)
    assert "xsi:" in err.reason and "own schema" in err.reason
    assert err.line == 3 and err.element == "mailIntegration"


@pytest.mark.parametrize(
    ("attribute", "element"),
    [('xsi:type="xs:anyType"', "server/port"), ('xsi:nil="true"', "server/port")],
)
def test_other_xsi_attributes_refused(tmp_path: Path, attribute: str, element: str) -> None:
    ns = 'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
    ns += ' xmlns:xs="http://www.w3.org/2001/XMLSchema"'
    text = mailbox(server=f"<port {ns} {attribute}>abc</port>")
    err = load_error(tmp_path, text)
    assert "xsi:" in err.reason and err.element == element and err.line == 9


def test_utf16_declaration_without_bom(tmp_path: Path) -> None:
    text = EXAMPLE.replace('encoding="utf-8"', 'encoding="UTF-16"')
    assert "UTF-16" in load_error(tmp_path, text).reason


def test_oversized_file_refused(tmp_path: Path) -> None:
    text = EXAMPLE.replace("</mailIntegration>", "<!--" + "x" * 2_000_000 + "--></mailIntegration>")
    assert "bytes" in load_error(tmp_path, text).reason


# ------------------------------------------------------------------------------- redaction


def test_redact_valid_file_keeps_everything_else() -> None:
    original = (
        '<?xml version="1.0" encoding="utf-8"?>\r\n'
        "<mailIntegration>\r\n"
        "  <server><Password>p&amp;ss wörd</Password><passwordFile>/run/secrets/pw</passwordFile>"
        "</server>\r\n"
        "  <smtp><x:password xmlns:x='urn:x'>smtp-pw</x:password>"
        "<passwordEnv>SMTP_PW</passwordEnv></smtp>\r\n"
        "  <password/><password></password>\r\n"
        "</mailIntegration>\r\n"
    ).encode()
    expected = original.replace("p&amp;ss wörd".encode(), b"********").replace(
        b">smtp-pw<", b">********<"
    )
    assert redact_config(original) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            f"<password>{CANARY}\n<userName>u</userName>",
            "<password>********\n<userName>u</userName>",
        ),
        (f"<PASSWORD>{CANARY}", "<PASSWORD>********"),
        # A misspelled closing tag is itself secret-like, so the mask stops right there.
        (f"<password>{CANARY}</passwrd>", "<password>********</passwrd>"),
        (f"<password>{CANARY}<</password>", "<password>********</password>"),
        (f"<password>\n  {CANARY}\n</password>", "<password>********</password>"),
        (f"<password><![CDATA[\n{CANARY}<\n]]></password>", "<password>********</password>"),
        (f'<server password="{CANARY}" user="u">', '<server password="********" user="u">'),
        (f"<server Password = '{CANARY}'>", "<server Password = '********'>"),
        (f'<server password="{CANARY}\n<x>', '<server password="********\n<x>'),
        (f"<server password={CANARY} user=u>", "<server password=******** user=u>"),
        (f"<password {CANARY}\n<x/>", "<password********\n<x/>"),
        (
            "<passwordFile>/run/secrets/pw</passwordFile>",
            "<passwordFile>/run/secrets/pw</passwordFile>",
        ),
        ("<passwordEnv>PW</passwordEnv>", "<passwordEnv>PW</passwordEnv>"),
        ('<server passwordFile="f">', '<server passwordFile="f">'),
    ],
)
def test_redact_malformed(line: str, expected: str) -> None:
    redacted = redact_config(line.encode())
    assert redacted == expected.encode()
    assert CANARY.encode() not in redacted


def test_redact_utf16() -> None:
    text = f"<mailIntegration><password>{CANARY}</password></mailIntegration>"
    redacted = redact_config(b"\xff\xfe" + text.encode("utf-16-le"))
    assert redacted == b"\xff\xfe" + text.replace(CANARY, "********").encode("utf-16-le")


def test_redact_example_file() -> None:
    redacted = redact_config((CONFIGS / "incident-example.xml").read_bytes()).decode()
    assert "<password>********</password>" in redacted
    assert "secret" not in redacted
    assert re.sub(r"<password>.*</password>", "", redacted) == re.sub(
        r"<password>.*</password>", "", EXAMPLE
    )


def test_secret_values_skips_empty(tmp_path: Path) -> None:
    cfg = load_mailbox(write(tmp_path, EXAMPLE))
    assert secret_values(cfg) == ("secret",)


@pytest.mark.parametrize(
    "element", ["pasword", "passwd", "Pwd", "smtpPassword", "secret", "apiToken"]
)
def test_redact_masks_misspelled_and_other_secret_like_elements(element: str) -> None:
    data = f"<server><{element}>{CANARY}</{element}><passwordEnv>PW_VAR</passwordEnv></server>"
    redacted = redact_config(data.encode())
    assert CANARY.encode() not in redacted
    assert b"<passwordEnv>PW_VAR</passwordEnv>" in redacted


def test_redact_cdata_holding_a_closing_tag_masks_the_whole_value() -> None:
    data = (
        "<mailIntegration><server>\n"
        f"  <password><![CDATA[{CANARY[:6]}</password>{CANARY[6:]}]]></password>\n"
        "  <userName>u</userName>\n"
        "</server></mailIntegration>\n"
    )
    redacted = redact_config(data.encode()).decode()
    assert "<password>********</password>" in redacted
    assert CANARY[6:] not in redacted and CANARY[:6] not in redacted
    assert "<userName>u</userName>" in redacted
    # A CDATA section left open hides the rest of the file: it may all be the secret.
    assert redact_config(f"<password><![CDATA[a\n{CANARY}".encode()) == b"<password>********"


# Secrets with the characters that break naive redaction: markup, entities, quotes, CDATA's
# terminator, the closing tag itself, white space and non-ASCII.
SECRETS = (
    st.lists(
        st.one_of(
            st.sampled_from([*"<>&\"'];/= \té", "</password>", "]]>", "&amp;", "-->"]),
            st.characters(min_codepoint=0x30, max_codepoint=0x7A),
        ),
        min_size=4,
        max_size=16,
    )
    .map("".join)
    .filter(lambda s: len(s.strip()) >= 4)
)


def _xml_escape(value: str, *, quote: bool = False) -> str:
    escaped = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return escaped.replace('"', "&quot;") if quote else escaped


@settings(max_examples=150, deadline=None)
@given(secret=SECRETS, cdata=st.booleans(), where=st.sets(st.integers(0, 3), min_size=1))
def test_redact_masks_every_occurrence_of_a_password(
    secret: str, cdata: bool, where: set[int]
) -> None:
    """Property: once a file's password is masked, it shows nowhere else in the file, in its
    own spelling or escaped: not in an attribute, another element or a comment."""
    cdata = cdata and "]]>" not in secret
    value = f"<![CDATA[{secret}]]>" if cdata else _xml_escape(secret)
    places = [
        f'  <server note="{_xml_escape(secret, quote=True)}"/>\n',
        f"  <userName>{_xml_escape(secret)}</userName>\n",
        f"  <!-- the password is {secret.replace('--', '- -')} -->\n",
        f"  <incidentSource>{secret}</incidentSource>\n",
    ]
    template = (
        "<mailIntegration>\n  <server>\n    <password>{value}</password>\n  </server>\n"
        + "".join(places[i] for i in sorted(where))
        + "</mailIntegration>\n"
    )
    redacted = redact_config(template.format(value=value).encode()).decode()
    baseline = template.format(value="").replace(secret, "")  # what is left around it
    for form in {secret, _xml_escape(secret), _xml_escape(secret, quote=True)}:
        if form.strip() and form not in baseline:
            assert form not in redacted, (form, redacted)
    assert "<password>********</password>" in redacted


# ------------------------------------------------------------------------------- the copy


def test_mailbox_copy_of_the_sample_files_loads_back_equal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MONITORING_POP3_PASSWORD", "pop-" + CANARY)
    monkeypatch.setenv("MONITORING_SMTP_PASSWORD", "smtp-" + CANARY)
    for sample in ("incident-example.xml", "event-full.xml"):
        cfg = load_mailbox(write(tmp_path, (CONFIGS / sample).read_bytes(), sample))
        copy = mailbox_copy(cfg)
        assert CANARY.encode() not in copy and b"secret" not in copy
        again = load_mailbox(write(tmp_path, copy, "copy.xml"))
        assert _but_secrets(again, cfg) == cfg
    example = mailbox_copy(load_mailbox(write(tmp_path, EXAMPLE)))
    assert b"<password>********</password>" in example
    env = mailbox_copy(load_mailbox(write(tmp_path, (CONFIGS / "event-full.xml").read_bytes())))
    assert b"<passwordEnv>MONITORING_POP3_PASSWORD</passwordEnv>" in env
    assert b"<passwordEnv>MONITORING_SMTP_PASSWORD</passwordEnv>" in env


def _but_secrets(loaded: MailboxConfig, original: MailboxConfig) -> MailboxConfig:
    """``loaded`` with the name, path and passwords of ``original`` (what a copy cannot
    give back), after checking that its written-in passwords came back masked."""
    server = loaded.server
    if original.server.password_file is None and original.server.password_env is None:
        assert server.password == "********"
    smtp = loaded.smtp
    if smtp is not None and original.smtp is not None:
        if smtp.password is not None and smtp.password_file is smtp.password_env is None:
            assert smtp.password == "********"
        smtp = dataclasses.replace(smtp, password=original.smtp.password)
    return dataclasses.replace(
        loaded,
        name=original.name,
        path=original.path,
        server=dataclasses.replace(server, password=original.server.password),
        smtp=smtp,
    )


TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co"))
    | st.sampled_from(" \t\n"),
    min_size=1,
    max_size=30,
).filter(lambda v: bool(v.split()) and "{" not in v and "}" not in v)
NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=12)
OPTIONAL = st.none() | TEXT


@st.composite
def mailbox_files(draw: st.DrawFn) -> tuple[str, dict[str, str]]:
    """A valid mailbox file using any of the elements, with values full of markup, and the
    files it names (relative path -> content)."""
    files: dict[str, str] = {}

    def el(name: str, value: object) -> str:
        if value is None:
            return ""
        text = value if isinstance(value, str) else str(value).lower()
        return f"<{name}>{_xml_escape(text)}</{name}>"

    def secret(prefix: str) -> str:
        kind = draw(st.sampled_from(["password", "passwordFile", "passwordEnv"]))
        if kind == "password":
            return el("password", draw(SECRETS))
        if kind == "passwordFile":
            name = f"{prefix}-{draw(NAME)}.pw"
            files[name] = draw(SECRETS)
            return el("passwordFile", name)
        return el("passwordEnv", f"COPY_TEST_{prefix.upper()}_PW")

    def tls() -> str:
        mode = draw(st.sampled_from([(None, None), (True, False), (False, True), (False, None)]))
        return el("useSsl", mode[0]) + el("startTls", mode[1])

    def ca(prefix: str) -> str:
        if not draw(st.booleans()):
            return ""
        files[f"{prefix}-ca.pem"] = "not parsed at load"
        return el("caFile", f"{prefix}-ca.pem")

    ints = st.none() | st.integers(1, 3600)
    server = (
        el("gatewayTypeName", draw(st.sampled_from(["pop3", GATEWAY, MAILKIT])))
        + el("serverName", draw(TEXT))
        + el("port", draw(st.none() | st.integers(1, 65535)))
        + tls()
        + el("userName", draw(TEXT))
        + secret("pop3")
        + ca("pop3")
        + el("tlsVerify", draw(st.none() | st.booleans()))
        + el("timeoutSeconds", draw(ints))
    )
    root = (
        el("messageProcessorTypeName", draw(st.sampled_from([INCIDENT, EVENT])))
        + f"<server>{server}</server>"
    )
    for name in (
        "team",
        "incidentFallbackSiteName",
        "incidentFallbackUserLogon",
        "incidentGroup",
        "group",
        "assignee",
        "incidentSource",
    ):
        root += el(name, draw(OPTIONAL))
    names = draw(st.lists(TEXT.filter(lambda v: "," not in v), max_size=3))
    root += el("ignoredAttachments", ", ".join(names) if names else None)
    root += el("createNewRequests", draw(st.none() | st.booleans()))
    root += el("includeRawMessageAsAttachment", draw(st.none() | st.booleans()))
    pattern = draw(st.none() | st.sampled_from([r"#(?P<number>\d+)", r"<&(?P<number>[0-9]+)>"]))
    root += el("subjectPattern", pattern)
    root += el("maxMessageBytes", draw(st.none() | st.integers(1024, 1 << 30)))
    root += el("maxAttachmentBytes", draw(st.none() | st.integers(1, 1 << 30)))
    root += el("maxAttachmentsBytes", draw(st.none() | st.integers(1, 1 << 30)))
    root += el("pollIntervalSeconds", draw(st.none() | st.integers(1, 86400)))
    if draw(st.booleans()):
        login = draw(st.booleans())
        root += (
            "<smtp>"
            + el("serverName", draw(TEXT))
            + el("port", draw(st.none() | st.integers(1, 65535)))
            + tls()
            + (el("userName", draw(TEXT)) + secret("smtp") if login else "")
            + el("from", draw(st.sampled_from(["sd@example.com", "Desk & Co <sd@example.com>"])))
            + ca("smtp")
            + el("tlsVerify", draw(st.none() | st.booleans()))
            + el("timeoutSeconds", draw(ints))
            + "</smtp>"
        )
        if draw(st.booleans()):
            lines = draw(st.lists(st.tuples(st.integers(0, 6), TEXT), min_size=1, max_size=4))
            body = "\n".join(" " * indent + text.replace("\n", " ") for indent, text in lines)
            root += (
                "<replyTemplate>"
                + el("subject", draw(TEXT) + " {subject}")
                + el("body", "\n" + body + "\n  {sender} & {mailbox}\n")
                + "</replyTemplate>"
            )
    return (
        f'<?xml version="1.0" encoding="utf-8"?>\n<mailIntegration>{root}</mailIntegration>\n',
        files,
    )


@settings(
    max_examples=120,
    deadline=None,
    # The environment variables are the same for every example: setting them once is right.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=mailbox_files())
# Found by the search: a user name with a comma was an own address read back as two.
@example(
    case=(
        '<?xml version="1.0" encoding="utf-8"?>\n<mailIntegration><messageProcessorTypeName>'
        "Octopus.MailIntegration.Processors.EndUserIncidentMailMessageProcessor, "
        "Octopus.MailIntegration</messageProcessorTypeName><server><gatewayTypeName>pop3"
        "</gatewayTypeName><serverName>0</serverName><userName>0@0,</userName><password>"
        "&lt;&lt;&lt;&lt;</password></server></mailIntegration>\n",
        {},
    )
)
def test_mailbox_copy_loads_back_to_the_same_model(
    case: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round trip: load(mailbox_copy(load(file))) equals load(file) but for the secrets,
    whatever the values hold (markup, entities, non-ASCII, white space)."""
    text, files = case
    monkeypatch.setenv("COPY_TEST_POP3_PW", "env-pop3-" + CANARY)
    monkeypatch.setenv("COPY_TEST_SMTP_PW", "env-smtp-" + CANARY)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, content in files.items():
            (folder / name).write_text(content, encoding="utf-8")
        cfg = load_mailbox(write(folder, text, "box.xml"))
        copy = mailbox_copy(cfg)
        for secret in secret_values(cfg):
            assert secret.encode() not in copy or secret.encode() in text.encode()
        again = load_mailbox(write(folder, copy, "copy.xml"))
    assert _but_secrets(again, cfg) == cfg


def test_mailbox_copy_keeps_the_session_settings_of_the_server(tmp_path: Path) -> None:
    """accountId (the ledger's name for the account), sessionTimeoutSeconds and
    minimumBytesPerSecond are in the copy: an outage event shows what the engine used."""
    server = (
        "<accountId>support-mailbox</accountId><sessionTimeoutSeconds>120</sessionTimeoutSeconds>"
        "<minimumBytesPerSecond>4096</minimumBytesPerSecond>"
    )
    cfg = load_mailbox(write(tmp_path, mailbox(server=server)))
    copy = mailbox_copy(cfg)
    assert b"<accountId>support-mailbox</accountId>" in copy
    again = load_mailbox(write(tmp_path, copy, "copy.xml"))
    assert _but_secrets(again, cfg) == cfg
    assert again.server.session_timeout == 120 and again.server.min_rate == 4096


def test_mailbox_copy_masks_a_password_repeated_in_other_values(tmp_path: Path) -> None:
    text = mailbox(extra=f"<incidentSource>{CANARY}</incidentSource><team>x{CANARY}y</team>")
    text = text.replace("support@example.com", CANARY)
    copy = mailbox_copy(load_mailbox(write(tmp_path, text))).decode()
    assert CANARY not in copy
    assert "<userName>********</userName>" in copy and "<team>x********y</team>" in copy


def test_mailbox_copy_is_bounded_whatever_the_file_held(tmp_path: Path) -> None:
    """A file just under the size limit, each value full of characters that grow when
    escaped: the copy stays under MAX_COPY_BYTES, says what it cut, and still loads."""
    values = {
        name: "&" * 52_000
        for name in ("team", "incidentFallbackSiteName", "incidentGroup", "incidentSource")
    }
    extra = "".join(f"<{k}>{v.replace('&', '&amp;')}</{k}>" for k, v in values.items())
    path = write(tmp_path, mailbox(extra=extra))
    assert 1_000_000 < path.stat().st_size < 1_048_576
    copy = mailbox_copy(load_mailbox(path))
    assert len(copy) <= MAX_COPY_BYTES
    assert b"more characters not shown" in copy
    again = load_mailbox(write(tmp_path, copy, "copy.xml"))
    assert again.team is not None and set(again.team) == {"&"} and len(again.team) < 1000


def test_a_config_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.xml"
    os.mkfifo(fifo)
    started = time.monotonic()
    err = load_error_at(fifo)
    assert "not a regular file" in err.reason
    assert time.monotonic() - started < 5
    assert "not a regular file" in load_error_at(Path("/dev/zero")).reason


def load_error_at(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_mailbox(path)
    return info.value


def test_a_password_file_that_is_not_a_regular_file_is_refused_without_waiting(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "pw.fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    err = load_error(tmp_path, mailbox(password=f"<passwordFile>{fifo}</passwordFile>"))
    assert time.monotonic() - started < 5
    assert "is not a regular file" in err.reason and err.element == "server/passwordFile"


def test_mailbox_copy_keeps_correlation_service_requests_rules_and_foreign_numbers(
    tmp_path: Path,
) -> None:
    """Issue 17's settings are in the copy an outage attaches, and load back the same (the
    rules' file and line are the copy's own)."""
    sr = "ESI.Octopus.MailIntegration.EndUserNewSRMailMessageProcessor"
    extra = (
        "<incidentPriority>Medium</incidentPriority><serviceRequestForm>General</serviceRequestForm>"
        "<newSRBodyEnclosingToken>##SR##</newSRBodyEnclosingToken>"
        "<headerPriorities><high>P1</high><low></low></headerPriorities>"
        "<correlation><flapping>activity</flapping><flappingMinutes>5</flappingMinutes>"
        "<recognisers><recogniser><name>ups</name><subject>^UPS (?P&lt;host&gt;\\S+)</subject>"
        "<problemStates>LOW, FAILED</problemStates></recogniser></recognisers></correlation>"
        "<rules><rule><name>spam</name><header>X-Spam-Flag: ^yes$</header><ignore>true</ignore>"
        "</rule><rule><subject>Outage</subject><caseSensitive>true</caseSensitive>"
        "<setGroup>Infra</setGroup><setType>event</setType><addTag>a, b</addTag><stop>1</stop>"
        "</rule></rules><foreignTicketNumbers><foreignTicketNumber><system>Jira</system>"
        "<pattern>\\b[A-Z]+-[0-9]+\\b</pattern></foreignTicketNumber></foreignTicketNumbers>"
    )
    cfg = load_mailbox(write(tmp_path, mailbox(processor=sr, extra=extra)))
    copy = mailbox_copy(cfg)
    again = load_mailbox(write(tmp_path, copy, "copy.xml"))
    assert again.processor == "service-request"

    def placeless(c: MailboxConfig) -> Any:
        rules = tuple(dataclasses.replace(r, file="", line=None) for r in c.processing.rules)
        return dataclasses.replace(c.processing, rules=rules)

    assert placeless(again) == placeless(cfg)
    assert again.processing.rules[1].conditions[0].pattern.flags & re.IGNORECASE == 0
    assert len(copy) <= MAX_COPY_BYTES


def test_mailbox_copy_with_huge_rules_stays_bounded(tmp_path: Path) -> None:
    rule = "<rule><subject>" + "x" * 4000 + "</subject><addTag>" + "t" * 4000 + "</addTag></rule>"
    cfg = load_mailbox(write(tmp_path, mailbox(extra="<rules>" + rule * 60 + "</rules>")))
    copy = mailbox_copy(cfg)
    assert len(copy) <= MAX_COPY_BYTES and b"too large to show" in copy
    load_mailbox(write(tmp_path, copy, "copy.xml"))


def test_the_characters_a_copy_replaces_are_those_outside_xml_s_char_production() -> None:
    """The outage copy replaces what XML 1.0 cannot hold. The class is written as the
    characters outside the Char production rather than as its negation (which re took ~7 ms
    to compile at every start): the two match the same characters, checked on every code
    point."""
    from engine.config import _NOT_XML

    negated = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
    every = "".join(map(chr, range(0x110000)))
    assert _NOT_XML.findall(every) == negated.findall(every)
