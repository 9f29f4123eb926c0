"""Property: whatever text a received message carries in its subject, sender name and
Message-ID, the automatic reply has exactly our headers, one text/plain part, and a subject
that a reader decodes to that text made one line (issue 12, item 4). Run on the interpreter
CI uses (3.11.7 here, without the CVE-2024-6923 fix)."""

from __future__ import annotations

import email
import email.message
from email.policy import default as default_policy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import mailbox_xml

from engine import reply
from engine.config import MailboxConfig, load_mailbox

# Pieces an attacker strings together: encoded words (once or twice), CR/LF, controls,
# header names, MIME boundaries, separators Python's splitlines() honours, bidi overrides.
PIECES = st.sampled_from(
    [
        "=?utf-8?q?x=0D=0ABcc:=20victim@evil.example?=",
        "=?utf-8?b?DQpCY2M6IHZpY3RpbUBldmlsLmV4YW1wbGUNCg0KPGh0bWw+?=",
        "=?utf-8?q?=3D=3Futf-8=3Fq=3F=3D0D=3D0ABcc=3A_x=40y=3F=3D?=",
        "\r\n",
        "\n",
        "\r",
        "\r\nBcc: victim@evil.example\r\n\r\n<html>body</html>",
        "\x00",
        "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029",
        "\u202e",
        "--boundary\r\nContent-Type: text/html\r\n\r\n",
        "Subject: ",
        " ",
        "é",
        "\U0001f4a5",
        "a" * 80,
    ]
)
TEXT = st.lists(st.one_of(PIECES, st.text(max_size=20)), max_size=8).map("".join)
EXPECTED = sorted(
    [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "Auto-Submitted",
        "X-Loop",
        "X-Auto-Response-Suppress",
        "Precedence",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
    ]
)


@pytest.fixture(scope="module")
def mailbox(tmp_path_factory: pytest.TempPathFactory) -> MailboxConfig:
    path = mailbox_xml(
        tmp_path_factory.mktemp("reply") / "desk.xml",
        port=110,
        user="desk",
        password="pop-secret",
        createNewRequests="false",
        smtp="<serverName>127.0.0.1</serverName>"
        "<from>Service D\u00e9sk (IT) &lt;desk@example.com&gt;</from>",
        replyTemplate="<subject>Re: {subject} [{sender}]</subject>"
        "<body>Dear {sender}, about {subject}: no.</body>",
    )
    return load_mailbox(Path(path))


def _parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=default_policy)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


@settings(max_examples=400, deadline=None)
@given(subject=TEXT, name=TEXT, message_id=TEXT)
def test_any_received_text_gives_exactly_our_headers_and_one_part(
    mailbox: MailboxConfig, subject: str, name: str, message_id: str
) -> None:
    out = reply.build_reply(
        mailbox=mailbox,
        recipient_address="john.doe@example.com",
        sender_name=name,
        subject=subject,
        in_reply_to=message_id,
    )
    head, _, _ = out.data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        assert line.isascii() and b"\r" not in line and b"\n" not in line
        assert len(line) <= 998
    msg = _parse(out.data)
    threaded = reply.safe_msgid(message_id) is not None
    expected = sorted([*EXPECTED, *(["In-Reply-To", "References"] if threaded else [])])
    assert sorted(msg.keys()) == expected
    assert not msg.is_multipart() and msg.get_content_type() == "text/plain"
    assert msg["To"] == "john.doe@example.com"
    # The reader sees our text: the received text flattened, never decoded a second time.
    flat_subject = reply.one_line(subject, 500) or "(no subject)"
    flat_name = reply.one_line(name) or "john.doe@example.com"
    assert msg["Subject"] == reply.one_line(f"Re: {flat_subject} [{flat_name}]", 700)
    assert msg["Subject"] == out.subject
    body = msg.get_content().replace("\r\n", "\n")
    assert body == f"Dear {flat_name}, about {flat_subject}: no.\n"


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        ("abc.123@example.com", True),
        ("1234.5678@[192.168.0.1]", True),
        ("=?utf-8?q?x=0D=0A?=@example.com", False),
        ("a@b=?x?=", False),
        ("a b@example.com", False),
        ("a@example.com\r\nBcc: x@y", False),
        ("a\x00@example.com", False),
        ("no-at-sign", False),
        ("a@b@c", False),
        ("x" * 246 + "@b.example", False),
        ("<a@b>", False),
        ("", False),
    ],
)
def test_a_message_id_is_threaded_only_with_the_strict_syntax(value: str, safe: bool) -> None:
    assert (reply.safe_msgid(value) == value) is safe
    assert safe or reply.safe_msgid(value) is None


@pytest.mark.parametrize(
    ("address", "key", "sent_to"),
    [
        ("Victim+1@Example.COM", "victim@example.com", "Victim+1@example.com"),
        ('"victim+2"@example.com', "victim@example.com", "victim+2@example.com"),
        ('"VICTIM"@example.com.', "victim@example.com", "VICTIM@example.com"),
        ('"vic tim"@example.com', "vic tim@example.com", '"vic tim"@example.com'),
        ("victim@ex\u00e4mple.com", "victim@xn--exmple-cua.com", "victim@xn--exmple-cua.com"),
        ("victim@EX\u00c4MPLE.com", "victim@xn--exmple-cua.com", "victim@xn--exmple-cua.com"),
        ("+tag@example.com", "+tag@example.com", "+tag@example.com"),
    ],
)
def test_rate_limit_key_ignores_case_tags_quotes_and_the_domain_s_spelling(
    address: str, key: str, sent_to: str
) -> None:
    to = reply.recipient(address)
    assert (to.key, to.address) == (key, sent_to)


@pytest.mark.parametrize(
    "address",
    [
        "=?utf-8?q?victim=0D=0A?=@example.com",
        "v\u00efctim@example.com",  # SMTPUTF8 local part: we do not send those
        "victim@exa mple.com",
        "victim@[127.0.0.1]",
        "victim@-bad-.example",
        '"a\rb"@example.com',
        "victim",
        "@example.com",
        "x" * 65 + "@example.com",
    ],
)
def test_an_address_that_is_not_a_plain_addr_spec_gets_no_reply(address: str) -> None:
    with pytest.raises(ValueError):
        reply.recipient(address)
