"""Deterministic corpora of service-desk mail for the benchmarks, in two mixes.

``bench`` (the first one written): plain text, HTML only, text+HTML alternatives, multipart
with attachments from 1 KB to 200 KB, non-ASCII headers (RFC 2047, UTF-8 and ISO-8859-1),
and replies carrying a request number (``RE: [Incident] #N ...``); about 10 KiB per message
on average.

``realistic`` (issue 18), the same average size but shaped like a real helpdesk's inbox:
about 35 % of messages carry attachments, 2 to 6 files from 1 KB to 2 MB, nearly all distinct
(phone mail interleaving text with photos and PDFs, HTML with ``cid:`` inline images and the
company logo every signature carries, forwards carrying a message/rfc822), 30 % are replies
threading onto requests created earlier in the same corpus, 10 % are auto-replies and DSNs.

The same seed always gives the same bytes.

Every template carries a placeholder Message-ID that :func:`stamp` replaces at delivery time,
so each delivered message has a Message-ID of its own even when a corpus is delivered again.
"""

from __future__ import annotations

import base64
import binascii
import random
from dataclasses import dataclass
from email.policy import SMTP
from email.utils import formataddr

MID_PLACEHOLDER = b"<bench-mid-placeholder@bench.invalid>"

# Senders the demo directory (tests/support.DIRECTORY) knows, and some it does not (those fall
# back to incidentFallbackUserLogon).
KNOWN_SENDERS = [
    ("John Doe", "john.doe@example.com"),
    ("Alice Smith", "asmith@example.com"),
    ("On-call tech", "oncall@example.com"),
]
UNKNOWN_SENDERS = [
    ("Hélène Tremblay", "helene.tremblay@client.example"),
    ("Jürgen Müller", "j.mueller@lieferant.example"),
    ("Zoë Ångström", "zoe@partner.example"),
    ("Bob Martin", "bob.martin@client.example"),
    ("李小龙", "li@partner.example"),
    ("François Côté", "fcote@client.example"),
]


def _vocabulary(text: str) -> list[str]:
    return text.split()


_ASCII_SUBJECTS = [
    "Printer on floor 3 is jammed again",
    "Cannot connect to VPN from home",
    "Outlook keeps asking for my password",
    "New laptop for the intern starting Monday",
    "Shared drive S: is not mapped",
    "Request: access to the finance folder",
    "Monitor flickers after the update",
    "Phone extension 4411 has no dial tone",
    "Teams meeting room display is black",
    "Password reset for the kiosk account",
]
_NON_ASCII_SUBJECTS = [
    "Problème d'impression au 3e étage",
    "Écran noir après la mise à jour",
    "Überprüfung des Zugangs für Jürgen",
    "Accès refusé au dossier « Comptabilité »",
    "Café machine en panne — salle 204",
    "Señal Wi-Fi débil en la oficina",
    "打印机卡纸了 (printer jam)",
    "Ошибка входа в систему",
    "Réinitialisation du mot de passe — urgent ✔",
]
_WORDS = _vocabulary(
    "the printer server network laptop account password login screen update error message "
    "please urgent again since yesterday morning office floor meeting room access folder "
    "drive shared ticket request help thanks regards cannot does not work when after before "
    "with without restart reboot cable wireless badge door phone extension email calendar "
    "invitation license software install version window button click report attached see "
    "below above issue problem customer colleague manager approval budget deadline"
)
_WORDS_FR = _vocabulary(
    "imprimante réseau écran mot de passe accès dossier problème réunion étage après "
    "depuis hier matin merci cordialement urgent toujours encore logiciel mise à jour "
    "pièce jointe voir ci-dessous collègue approbation échéance"
)

_HTML_HEAD = (
    '<!DOCTYPE html><html><head><meta charset="utf-8"><style>p{margin:0}'
    ".sig{color:#888}</style></head><body>"
)


@dataclass(frozen=True)
class Template:
    """One message with a placeholder Message-ID; ``kind`` names its shape for the report."""

    kind: str
    raw: bytes


def stamp(template: Template, message_id: str) -> bytes:
    """The template's bytes with its own Message-ID (``message_id`` without angle brackets)."""
    return template.raw.replace(MID_PLACEHOLDER, f"<{message_id}>".encode("ascii"), 1)


def _sentence(rng: random.Random, french: bool) -> str:
    words = _WORDS_FR if french else _WORDS
    n = rng.randint(6, 16)
    text = " ".join(rng.choice(words) for _ in range(n))
    return text[0].upper() + text[1:] + "."


def _paragraphs(rng: random.Random, size: int, french: bool) -> list[str]:
    out: list[str] = []
    total = 0
    while total < size:
        para = " ".join(_sentence(rng, french) for _ in range(rng.randint(2, 6)))
        out.append(para)
        total += len(para) + 2
    return out


def _wrap(text: str, width: int = 72) -> str:
    lines: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return "\n".join(lines)


def _text_body(rng: random.Random, size: int, french: bool, name: str) -> str:
    paras = _paragraphs(rng, size, french)
    return "Hello,\n\n" + "\n\n".join(_wrap(p) for p in paras) + f"\n\n-- \n{name}\n"


def _html_body(rng: random.Random, size: int, french: bool, name: str) -> str:
    paras = _paragraphs(rng, size, french)
    items = "".join(
        f"<p>{p}</p>\n" if rng.random() < 0.8 else f"<ul><li>{p}</li></ul>\n" for p in paras
    )
    return f'{_HTML_HEAD}\n<p>Hello,</p>\n{items}<p class="sig">{name}</p></body></html>\n'


def _attachment_size(rng: random.Random) -> int:
    # Log-uniform from 1 KB to 200 KB: many small files, a few large ones.
    return int(1024 * 200 ** rng.random())


def _attachment(rng: random.Random, index: int) -> tuple[str, str, str, bytes]:
    size = _attachment_size(rng)
    kind = rng.choice(("pdf", "png", "csv", "docx"))
    if kind == "csv":
        rows = ["date,host,status,latency_ms"]
        total = len(rows[0])
        while total < size:
            rows.append(
                f"2026-11-{rng.randint(1, 28):02d},srv{rng.randint(1, 99):02d},"
                f"{rng.choice(('ok', 'warn', 'fail'))},{rng.randint(1, 5000)}"
            )
            total += len(rows[-1]) + 1
        return (f"report-{index}.csv", "text", "csv", "\n".join(rows).encode())
    data = rng.randbytes(size)
    if kind == "pdf":
        return (f"scan-{index}.pdf", "application", "pdf", b"%PDF-1.4\n" + data)
    if kind == "png":
        return (f"screenshot-{index}.png", "image", "png", b"\x89PNG\r\n\x1a\n" + data)
    subtype = "vnd.openxmlformats-officedocument.wordprocessingml.document"
    return (f"Procédure-{index}.docx", "application", subtype, b"PK\x03\x04" + data)


def _latin1_subject(subject: str) -> str | None:
    """An RFC 2047 B-encoded ISO-8859-1 subject, when the text fits that charset."""
    try:
        data = subject.encode("iso-8859-1")
    except UnicodeEncodeError:
        return None
    return "=?ISO-8859-1?B?" + base64.b64encode(data).decode("ascii") + "?="


def _fold(name: str, value: str) -> bytes:
    """A header line, RFC 2047-encoded and folded when needed, with CRLF."""
    folded: str = SMTP.header_factory(name, value).fold(policy=SMTP)
    return folded.encode("ascii")


def _text_part(rng: random.Random, text: str, subtype: str) -> bytes:
    """Part headers and body of a text part: 7bit, 8bit or quoted-printable, CRLF lines."""
    data = text.encode("utf-8")
    if data.isascii():
        cte, payload = "7bit", data
    elif rng.random() < 0.5:
        cte, payload = "8bit", data
    else:
        cte, payload = "quoted-printable", binascii.b2a_qp(data)
    payload = payload.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    head = (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    ).encode("ascii")
    return head + payload


def _attachment_part(filename: str, maintype: str, subtype: str, data: bytes) -> bytes:
    disposition = _fold("Content-Disposition", f'attachment; filename="{filename}"')
    head = (
        (f"Content-Type: {maintype}/{subtype}\r\nContent-Transfer-Encoding: base64\r\n").encode(
            "ascii"
        )
        + disposition
        + b"\r\n"
    )
    return head + base64.encodebytes(data).replace(b"\n", b"\r\n")


def _multipart(rng: random.Random, subtype: str, parts: list[bytes]) -> tuple[bytes, bytes]:
    """(Content-Type header line, body) of a multipart with a deterministic boundary."""
    boundary = f"----=_Part_{rng.getrandbits(64):016x}"
    body = b"This is a multi-part message in MIME format.\r\n"
    for part in parts:
        body += f"\r\n--{boundary}\r\n".encode("ascii") + part
    body += f"\r\n--{boundary}--\r\n".encode("ascii")
    ctype = f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n'.encode("ascii")
    return ctype, body


def make_message(rng: random.Random, index: int, *, big_bytes: int = 0) -> Template:
    """One message of the mix; ``big_bytes`` > 0 makes one with an attachment that large."""
    roll = rng.random()
    if big_bytes:
        kind = "big"
    elif roll < 0.40:
        kind = "plain"
    elif roll < 0.62:
        kind = "html"
    elif roll < 0.72:
        kind = "alternative"
    elif roll < 0.82:
        kind = "attachments"
    else:
        kind = "reply"
    non_ascii = rng.random() < 0.3
    french = non_ascii and rng.random() < 0.7
    name, addr = rng.choice(KNOWN_SENDERS if rng.random() < 0.6 else UNKNOWN_SENDERS)
    subject = rng.choice(_NON_ASCII_SUBJECTS if non_ascii else _ASCII_SUBJECTS)
    if kind == "reply":
        # Numbers of requests an earlier message of the same mailbox has probably created.
        number = rng.randint(1, max(1, index // 2))
        subject = f"RE: [Incident] #{number} {subject}"
    latin1 = _latin1_subject(subject) if non_ascii and rng.random() < 0.35 else None

    head = formataddr((name, addr), charset="utf-8")
    lines = [
        b"From: " + head.encode("ascii") + b"\r\n",
        b"To: Service Desk <support@example.com>\r\n",
    ]
    if rng.random() < 0.2:
        lines.append(b"Cc: " + formataddr(("Équipe TI", "it-team@example.com")).encode() + b"\r\n")
    lines.append(f"Subject: {latin1}\r\n".encode("ascii") if latin1 else _fold("Subject", subject))
    day = rng.randint(1, 28)
    weekday = ("Mon", "Tue", "Wed", "Thu", "Fri")[day % 5]
    clock = f"{rng.randint(7, 18):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
    lines.append(f"Date: {weekday}, {day:02d} Nov 2026 {clock} -0500\r\n".encode("ascii"))
    lines.append(b"Message-ID: " + MID_PLACEHOLDER + b"\r\n")
    if kind == "reply":
        lines.append(f"In-Reply-To: <reply-{index}@crm.example>\r\n".encode("ascii"))
        lines.append(
            f"References: <thread-{index}@crm.example> <reply-{index}@crm.example>\r\n".encode(
                "ascii"
            )
        )
    mailer = rng.choice(("Microsoft Outlook 16.0", "Thunderbird 128.3", "Apple Mail"))
    lines.append(f"X-Mailer: {mailer}\r\nMIME-Version: 1.0\r\n".encode("ascii"))

    text_size = rng.randint(600, 5000)
    if kind in ("plain", "reply"):
        body = _text_body(rng, text_size, french, name)
        if kind == "reply":
            quoted = "\n".join("> " + line for line in _text_body(rng, 800, french, "").split("\n"))
            body += f"\nOn Nov 26, 2026, Service Desk wrote:\n{quoted}\n"
        content = _text_part(rng, body, "plain")
    elif kind == "html":
        content = _text_part(rng, _html_body(rng, rng.randint(1500, 9000), french, name), "html")
    elif kind == "alternative":
        ctype, body_bytes = _multipart(
            rng,
            "alternative",
            [
                _text_part(rng, _text_body(rng, text_size, french, name), "plain"),
                _text_part(rng, _html_body(rng, text_size, french, name), "html"),
            ],
        )
        content = ctype + b"\r\n" + body_bytes
    else:
        parts = [_text_part(rng, _text_body(rng, text_size, french, name), "plain")]
        if big_bytes:
            parts.append(
                _attachment_part(
                    f"dump-{index}.bin", "application", "octet-stream", rng.randbytes(big_bytes)
                )
            )
        else:
            for n in range(1 if rng.random() < 0.75 else 2):
                parts.append(_attachment_part(*_attachment(rng, n + 1)))
        ctype, body_bytes = _multipart(rng, "mixed", parts)
        content = ctype + b"\r\n" + body_bytes
    return Template(kind, b"".join(lines) + content)


MIXES = ("bench", "realistic")


def make_corpus(
    count: int, *, seed: int = 20261127, big: int = 0, big_bytes: int = 0, mix: str = "bench"
) -> list[Template]:
    """``count`` messages of ``mix``; ``big`` of them (spread evenly) carry a ``big_bytes``
    attachment."""
    rng = random.Random(seed)
    big_at = {round((k + 0.5) * count / big) for k in range(big)} if big else set()
    if mix == "realistic":
        state = _Thread()
        return [
            make_realistic_message(rng, i, state, big_bytes=big_bytes if i in big_at else 0)
            for i in range(count)
        ]
    if mix != "bench":
        raise ValueError(f"unknown mix {mix!r} (one of {', '.join(MIXES)})")
    return [make_message(rng, i, big_bytes=big_bytes if i in big_at else 0) for i in range(count)]


# --------------------------------------------------------------------------- the realistic mix

# Three logos shared by every signature of their sender's company: the same bytes again and
# again, as in a real inbox (content-addressed storage keeps one copy of each).
_LOGOS = [random.Random(f"logo-{k}").randbytes(2048 + 1500 * k) for k in range(3)]


@dataclass
class _Thread:
    """What the corpus has made so far: replies thread onto requests made earlier."""

    creating: int = 0  # messages so far that create a request (their number, in order)


def _realistic_size(rng: random.Random) -> int:
    """1 KB to 2 MB, heavily skewed to small files, as in a real inbox: mostly screenshots,
    photos and scans of a few KB, some tens of KB, one file in a thousand a large PDF of
    hundreds of KB to 2 MB. That keeps the corpus's mean message near 10 KiB."""
    roll = rng.random()
    low, high = (1, 4) if roll < 0.9 else (4, 32) if roll < 0.999 else (256, 2048)
    return int(1024 * low * (high / low) ** rng.random())


def _realistic_file(rng: random.Random, index: int) -> tuple[str, str, str, bytes]:
    size = _realistic_size(rng)
    kind = rng.choices(("jpg", "pdf", "png", "docx", "xlsx", "csv"), (4, 3, 3, 2, 1, 1))[0]
    data = rng.randbytes(size)
    if kind == "csv":
        return _attachment(rng, index)
    if kind == "jpg":
        return (f"IMG_{4000 + index}.jpg", "image", "jpeg", b"\xff\xd8\xff\xe0" + data)
    if kind == "pdf":
        return (f"scan-{index}.pdf", "application", "pdf", b"%PDF-1.7\n" + data)
    if kind == "png":
        return (f"image{index:03d}.png", "image", "png", b"\x89PNG\r\n\x1a\n" + data)
    if kind == "xlsx":
        subtype = "vnd.openxmlformats-officedocument.spreadsheetml.sheet"
        return (f"Inventaire-{index}.xlsx", "application", subtype, b"PK\x03\x04" + data)
    subtype = "vnd.openxmlformats-officedocument.wordprocessingml.document"
    return (f"Procédure-{index}.docx", "application", subtype, b"PK\x03\x04" + data)


def _inline_image(cid: str, data: bytes, name: str) -> bytes:
    head = (
        f'Content-Type: image/png; name="{name}"\r\nContent-Transfer-Encoding: base64\r\n'
        f'Content-ID: <{cid}>\r\nContent-Disposition: inline; filename="{name}"\r\n\r\n'
    ).encode("ascii")
    return head + base64.encodebytes(data).replace(b"\n", b"\r\n")


def _nested(ctype: bytes, body: bytes) -> bytes:
    return ctype + b"\r\n" + body


def _phone_parts(rng: random.Random, name: str, french: bool) -> list[bytes]:
    """Phone and Apple Mail: text, photo, text, PDF, text: inline text between the files."""
    parts = [_text_part(rng, _text_body(rng, rng.randint(200, 1500), french, name), "plain")]
    for n in range(rng.randint(2, 4)):
        parts.append(_attachment_part(*_realistic_file(rng, n + 1)))
        parts.append(_text_part(rng, _sentence(rng, french) + "\n", "plain"))
    return parts


def _related_parts(rng: random.Random, name: str, french: bool) -> list[bytes]:
    """Outlook HTML with inline images (``cid:``): the company logo and screenshots, then
    files attached beside it."""
    size = rng.randint(800, 4000)
    logo = rng.randrange(len(_LOGOS))
    shots = rng.randint(0, 2)
    imgs = "".join(f'<p><img src="cid:shot{k}@mail"></p>' for k in range(shots))
    html = _html_body(rng, size, french, name).replace(
        '<p class="sig">', f'{imgs}<p class="sig"><img src="cid:logo{logo}@mail"> '
    )
    related = [
        _text_part(rng, html, "html"),
        _inline_image(f"logo{logo}@mail", _LOGOS[logo], "logo.png"),
    ]
    related += [
        _inline_image(f"shot{k}@mail", rng.randbytes(_realistic_size(rng)), f"image{k:03d}.png")
        for k in range(shots)
    ]
    alternative = _nested(
        *_multipart(
            rng,
            "alternative",
            [
                _text_part(rng, _text_body(rng, size, french, name), "plain"),
                _nested(*_multipart(rng, "related", related)),
            ],
        )
    )
    parts = [alternative]
    for n in range(rng.randint(max(0, 2 - 1 - shots), 3)):
        parts.append(_attachment_part(*_realistic_file(rng, n + 1)))
    return parts


def _forward_parts(rng: random.Random, name: str, french: bool) -> list[bytes]:
    """A forward as an attachment (message/rfc822), itself carrying a file."""
    inner_head = (
        "From: Customer <customer@client.example>\r\nTo: agent@example.com\r\n"
        f"Subject: {rng.choice(_ASCII_SUBJECTS)}\r\nDate: Tue, 24 Nov 2026 09:12:00 -0500\r\n"
        f"Message-ID: <fwd-{rng.getrandbits(48):012x}@client.example>\r\nMIME-Version: 1.0\r\n"
    ).encode("ascii")
    inner = inner_head + _nested(
        *_multipart(
            rng,
            "mixed",
            [
                _text_part(
                    rng, _text_body(rng, rng.randint(300, 2000), french, "Customer"), "plain"
                ),
                _attachment_part(*_realistic_file(rng, 1)),
            ],
        )
    )
    rfc822 = (
        b"Content-Type: message/rfc822\r\n"
        b'Content-Disposition: attachment; filename="forward.eml"\r\n\r\n' + inner
    )
    return [
        _text_part(rng, "FYI, see the customer's mail below.\n\n-- \n" + name + "\n", "plain"),
        rfc822,
        _attachment_part(*_realistic_file(rng, 2)),
    ]


def _auto_reply(rng: random.Random, index: int) -> tuple[list[bytes], bytes]:
    """(headers, content) of an out-of-office reply or a DSN, 50/50."""
    if rng.random() < 0.5:
        name, addr = rng.choice(KNOWN_SENDERS + UNKNOWN_SENDERS)
        headers = [
            b"From: " + formataddr((name, addr), charset="utf-8").encode("ascii") + b"\r\n",
            _fold("Subject", "Automatic reply: " + rng.choice(_ASCII_SUBJECTS)),
            b"Auto-Submitted: auto-replied\r\nX-Auto-Response-Suppress: All\r\n",
        ]
        away = "I am out of the office until Monday and will have limited access to mail.\n"
        return headers, _text_part(rng, away, "plain")
    headers = [
        b"From: Mail Delivery System <MAILER-DAEMON@mx.example.com>\r\n",
        b"Subject: Undelivered Mail Returned to Sender\r\nAuto-Submitted: auto-replied\r\n",
    ]
    recipient = f"gone{index}@client.example"
    status = (
        "Content-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.com\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n"
    ).encode("ascii")
    original = (
        "Content-Type: text/rfc822-headers\r\n\r\n"
        f"From: Service Desk <support@example.com>\r\nTo: {recipient}\r\n"
        f"Subject: [Incident] #{index} received\r\nMessage-ID: <reply-{index}@example.com>\r\n"
    ).encode("ascii")
    notice = _text_part(
        rng,
        f"I'm sorry to have to inform you that your message to {recipient} could not be "
        "delivered.\n",
        "plain",
    )
    ctype, body = _multipart(rng, "report", [notice, status, original])
    ctype = ctype.replace(b"multipart/report;", b"multipart/report; report-type=delivery-status;")
    return headers, _nested(ctype, body)


def make_realistic_message(
    rng: random.Random, index: int, state: _Thread, *, big_bytes: int = 0
) -> Template:
    """One message of the realistic mix (see the module's docstring)."""
    roll = rng.random()
    if big_bytes:
        kind = "big"
    elif roll < 0.35:
        kind = rng.choices(("phone", "related", "forward"), (4, 5, 1))[0]
    elif roll < 0.65 and state.creating:
        kind = "reply"
    elif roll < 0.75:
        kind = "auto"
    else:
        kind = rng.choice(("plain", "html", "alternative"))
    non_ascii = rng.random() < 0.3
    french = non_ascii and rng.random() < 0.7
    name, addr = rng.choice(KNOWN_SENDERS if rng.random() < 0.6 else UNKNOWN_SENDERS)
    subject = rng.choice(_NON_ASCII_SUBJECTS if non_ascii else _ASCII_SUBJECTS)
    if kind == "auto":
        lines, content = _auto_reply(rng, index)
    else:
        if kind == "reply":
            # A request this corpus made earlier: in one mailbox, the Nth creating message
            # makes request N.
            subject = f"RE: [Incident] #{rng.randint(1, state.creating)} {subject}"
        elif kind == "forward":
            subject = "Fwd: " + subject
        else:
            state.creating += 1
        lines = [
            b"From: " + formataddr((name, addr), charset="utf-8").encode("ascii") + b"\r\n",
            _fold("Subject", subject),
        ]
        text_size = rng.randint(400, 2500)
        if kind == "reply":
            body = _text_body(rng, text_size, french, name)
            quoted = "\n".join("> " + line for line in _text_body(rng, 800, french, "").split("\n"))
            body += f"\nOn Nov 26, 2026, Service Desk wrote:\n{quoted}\n"
            if rng.random() < 0.05:  # "here is the screenshot you asked for"
                parts = [_text_part(rng, body, "plain"), _attachment_part(*_realistic_file(rng, 1))]
                content = _nested(*_multipart(rng, "mixed", parts))
            else:
                content = _text_part(rng, body, "plain")
        elif kind == "plain":
            content = _text_part(rng, _text_body(rng, text_size, french, name), "plain")
        elif kind == "html":
            content = _text_part(rng, _html_body(rng, text_size, french, name), "html")
        elif kind == "alternative":
            alt = [
                _text_part(rng, _text_body(rng, text_size, french, name), "plain"),
                _text_part(rng, _html_body(rng, text_size, french, name), "html"),
            ]
            content = _nested(*_multipart(rng, "alternative", alt))
        elif kind == "big":
            parts = [
                _text_part(rng, _text_body(rng, text_size, french, name), "plain"),
                _attachment_part(
                    f"dump-{index}.bin", "application", "octet-stream", rng.randbytes(big_bytes)
                ),
            ]
            content = _nested(*_multipart(rng, "mixed", parts))
        else:
            make = {"phone": _phone_parts, "related": _related_parts, "forward": _forward_parts}
            content = _nested(*_multipart(rng, "mixed", make[kind](rng, name, french)))
    day = rng.randint(1, 28)
    clock = f"{rng.randint(7, 18):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
    weekday = ("Mon", "Tue", "Wed", "Thu", "Fri")[day % 5]
    lines += [
        b"To: Service Desk <support@example.com>\r\n",
        f"Date: {weekday}, {day:02d} Nov 2026 {clock} -0500\r\n".encode("ascii"),
        b"Message-ID: " + MID_PLACEHOLDER + b"\r\n",
        b"MIME-Version: 1.0\r\n",
    ]
    return Template(kind, b"".join(lines) + content)


def describe(corpus: list[Template]) -> str:
    """``n messages, mean X KiB, kinds...`` for the report."""
    total = sum(len(t.raw) for t in corpus)
    kinds: dict[str, int] = {}
    for t in corpus:
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
    mix = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    return f"{len(corpus)} messages, mean {total / max(1, len(corpus)) / 1024:.1f} KiB ({mix})"
