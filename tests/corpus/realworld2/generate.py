"""Write the realworld2 corpus (issue 20): messages shaped like the mail that real clients and
MTAs send, each with an expected-result sidecar (NAME.json beside NAME.eml).

Run from the repository root: ``python tests/corpus/realworld2/generate.py``. The output is
deterministic and committed; tests/test_realworld2.py replays every message through ``ingest``.

A sidecar holds: ``class`` (what the message exercises), ``subject``, ``sender``,
``body_contains`` (texts the body must hold, in order), ``attachments`` (names, in order),
``verdict`` (``request``, ``bounce``, ``auto`` or ``failure``) and, for bounces,
``bounce_status``, ``bounce_recipients`` and ``bounce_message_id``.
"""

from __future__ import annotations

import base64
import json
import quopri
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
DESK = "servicedesk@example.com"
CASES: list[tuple[str, bytes, dict[str, Any]]] = []
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def b64(data: bytes) -> str:
    return base64.encodebytes(data).decode("ascii").replace("\n", "\r\n")


def word(text: str, charset: str = "utf-8", codec: str | None = None) -> str:
    return f"=?{charset}?B?{base64.b64encode(text.encode(codec or charset)).decode()}?="


def headers(
    n: int, subject: str, sender: str, extra: str = "", date_day: int = 1, to: str = DESK
) -> str:
    return (
        f"Received: from mx.example.net (mx.example.net [198.51.100.{n % 250}])\r\n"
        f"\tby mx1.example.com (Postfix) with ESMTPS id RW2{n:04d}\r\n"
        f"\tfor <{DESK}>; Mon, {date_day:02d} Dec 2026 09:{n % 60:02d}:11 +0100\r\n"
        f"Message-ID: <rw2-{n:04d}@corpus.example.net>\r\n"
        f"Date: Mon, {date_day:02d} Dec 2026 09:{n % 60:02d}:07 +0100\r\n"
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n{extra}"
    )


def part(ctype: str, body: bytes, extra: str = "", cte: str = "") -> bytes:
    head = f"Content-Type: {ctype}\r\n{extra}"
    if cte:
        head += f"Content-Transfer-Encoding: {cte}\r\n"
    return head.encode() + b"\r\n" + body


def text_part(text: str, charset: str = "utf-8", codec: str | None = None) -> bytes:
    data = text.replace("\n", "\r\n").encode(codec or charset)
    if data.isascii():
        return part(f"text/plain; charset={charset}", data, cte="7bit")
    if charset.lower().startswith("iso-2022"):
        return part(f"text/plain; charset={charset}", data, cte="7bit")
    return part(f"text/plain; charset={charset}", b64(data).encode(), cte="base64")


def html_part(html: str) -> bytes:
    return part(
        "text/html; charset=utf-8", quopri.encodestring(html.encode()), cte="quoted-printable"
    )


def file_part(
    ctype: str, name: str, data: bytes, disposition: str = "attachment", cid: str = ""
) -> bytes:
    extra = f'Content-Disposition: {disposition}; filename="{name}"\r\n'
    if cid:
        extra += f"Content-ID: <{cid}>\r\n"
    return part(f'{ctype}; name="{name}"', b64(data).encode(), extra, cte="base64")


def multipart(subtype: str, boundary: str, *parts: bytes, extra: str = "") -> bytes:
    b = boundary.encode()
    body = b"".join(b"--" + b + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + b + b"--\r\n"
    return f'Content-Type: multipart/{subtype}; boundary="{boundary}"{extra}\r\n'.encode(), body


def message(head: str, entity: bytes | tuple[bytes, bytes]) -> bytes:
    if isinstance(entity, tuple):
        ctype, body = entity
        return head.encode() + ctype + b"\r\n" + body
    return head.encode() + entity


def add(name: str, raw: bytes, **expected: Any) -> None:
    expected.setdefault("attachments", [])
    expected.setdefault("verdict", "request")
    CASES.append((name, raw, expected))


# -- phone mail: text, image, text, pdf, text ---------------------------------------------------

PHONES = [
    ("iPhone", "Sent from my iPhone"),
    ("Android", "Sent from my Samsung Galaxy smartphone."),
    ("iPad", "Sent from my iPad"),
    ("Outlook for iOS", "Get Outlook for iOS"),
]
ISSUES = [
    ("Printer on floor 3", "The printer shows this error:", "and then prints this page:"),
    ("Badge reader broken", "The badge reader at door B:", "The log it printed:"),
    ("Projector in room 12", "The projector shows only this:", "Here is the room booking:"),
    ("Laptop screen cracked", "My screen looks like this:", "Repair quote from the shop:"),
    ("Coffee machine leaking", "Water everywhere, see photo:", "Manual page attached:"),
]
n = 0
for issue, first, second in ISSUES:
    for _phone, signature in PHONES:
        n += 1
        photo, scan = f"IMG_{1000 + n}.jpg", f"scan-{n}.pdf"
        entity = multipart(
            "mixed",
            f"Apple-Mail-{n}",
            text_part(first),
            file_part("image/jpeg", photo, b"\xff\xd8\xff\xe0JFIF" + bytes([n]), "inline"),
            text_part(second),
            file_part("application/pdf", scan, PDF, "inline"),
            text_part(f"Thanks\n\n{signature}"),
        )
        sender = f"Employee {n} <employee{n}@example.com>"
        add(
            f"phone-{n:02d}",
            message(headers(n, issue, sender), entity),
            cls="phone",
            subject=issue,
            sender=f"employee{n}@example.com",
            body_contains=[
                first,
                f"[attachment: {photo}]",
                second,
                f"[attachment: {scan}]",
                signature,
            ],
            attachments=[photo, scan],
        )

# -- Apple Mail: alternatives around an image ----------------------------------------------------

for k in range(10):
    n += 1
    before, after = f"Here is the screenshot number {k}:", f"It happens every morning ({k})."
    alternative = (
        'Content-Type: multipart/alternative; boundary="{0}"\r\n\r\n--{0}\r\n'
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n{1}\r\n--{0}\r\n"
        "Content-Type: text/html; charset=us-ascii\r\n\r\n"
        "<html><body><div>{1}</div></body></html>\r\n--{0}--"
    )
    image = f"Screen Shot 2026-12-0{1 + k % 9} at 09.1{k}.png"
    entity = multipart(
        "mixed",
        f"Apple-Mail=_{n}",
        alternative.format(f"Apple-Mail=_a{n}", before).encode(),
        file_part("image/png", image, PNG, "inline"),
        alternative.format(f"Apple-Mail=_b{n}", after).encode(),
    )
    add(
        f"applemail-interleaved-{k:02d}",
        message(headers(n, f"Error at login {k}", f"Jane Roe <jane.roe{k}@example.com>"), entity),
        cls="phone",
        subject=f"Error at login {k}",
        sender=f"jane.roe{k}@example.com",
        body_contains=[before, f"[attachment: {image}]", after],
        attachments=[image],
    )

# -- forwards: Outlook, Apple Mail, attached message ---------------------------------------------

for k in range(15):
    n += 1
    customer = f"customer{k}@client{k}.example.org"
    body = (
        f"Please look at this one.\n\nAgent {k}\n\n"
        "-----Original Message-----\n"
        f"From: Customer {k} <{customer}>\n"
        f"Sent: Friday, November 27, 2026 10:{k:02d} AM\n"
        "To: Agent <agent@example.com>\n"
        f"Subject: VPN drops every {k + 2} minutes\n\n"
        f"Hello, the VPN drops every {k + 2} minutes since Monday.\n"
    )
    add(
        f"outlook-forward-{k:02d}",
        message(
            headers(n, f"FW: VPN drops every {k + 2} minutes", f"Agent {k} <agent{k}@example.com>"),
            text_part(body),
        ),
        cls="outlook-forward",
        subject=f"FW: VPN drops every {k + 2} minutes",
        sender=f"agent{k}@example.com",
        body_contains=[
            "Please look at this one.",
            "-----Original Message-----",
            f"From: Customer {k} <{customer}>",
            "the VPN drops",
        ],
    )
for k in range(10):
    n += 1
    body = (
        f"FYI\n\nBegin forwarded message:\n\n"
        f"From: Max Mustermann <max{k}@kunde.example.de>\n"
        f"Subject: Drucker druckt nicht ({k})\n"
        f"Date: 27. November 2026 um 10:{k:02d}:00 MEZ\n"
        f"To: Support <support@example.com>\n\n"
        f"Grüße, der Drucker im Büro {k} druckt nicht mehr.\n"
    )
    add(
        f"applemail-forward-{k:02d}",
        message(
            headers(
                n, f"Fwd: Drucker druckt nicht ({k})", f"Agent Apple <apple.agent{k}@example.com>"
            ),
            text_part(body),
        ),
        cls="applemail-forward",
        subject=f"Fwd: Drucker druckt nicht ({k})",
        sender=f"apple.agent{k}@example.com",
        body_contains=["Begin forwarded message:", f"max{k}@kunde.example.de", f"Büro {k}"],
    )
for k in range(5):
    n += 1
    inner = (
        f"From: Client {k} <client{k}@example.org>\r\nTo: agent@example.com\r\n"
        f"Subject: Invoice {k} missing\r\nMessage-ID: <inner-{k}@example.org>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nWhere is my invoice?\r\n"
    ).encode()
    entity = multipart(
        "mixed",
        f"fw-{n}",
        text_part("Forwarding as attachment."),
        part("message/rfc822", inner, "Content-Disposition: attachment\r\n"),
    )
    add(
        f"forward-attached-{k:02d}",
        message(headers(n, f"FW: Invoice {k} missing", f"Agent <agent.fw{k}@example.com>"), entity),
        cls="outlook-forward",
        subject=f"FW: Invoice {k} missing",
        sender=f"agent.fw{k}@example.com",
        body_contains=["Forwarding as attachment."],
        attachments=[f"Invoice {k} missing.eml"],
    )


# -- bounces: Postfix, Exchange, Exim, qmail, Gmail ---------------------------------------------


def original(k: int, to: str) -> str:
    return (
        f"Return-Path: <{DESK}>\r\nMessage-ID: <reply-{k}@mail.example.com>\r\n"
        f"From: Service Desk <{DESK}>\r\nTo: <{to}>\r\nSubject: [#{100 + k}] Your request\r\n"
    )


def report(
    n: int, subject: str, sender: str, notice: str, recipient: str, status: str, k: int, mta: str
) -> bytes:
    dsn = (
        f"Reporting-MTA: dns; {mta}\r\nArrival-Date: Mon, 1 Dec 2026 09:00:00 +0100\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nOriginal-Recipient: rfc822;{recipient}\r\n"
        f"Action: failed\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} <{recipient}>: Recipient address rejected\r\n"
    ).encode()
    entity = multipart(
        "report",
        f"dsn-{n}",
        text_part(notice),
        part("message/delivery-status", dsn),
        part("text/rfc822-headers", original(k, recipient).encode()),
        extra="; report-type=delivery-status",
    )
    return message(headers(n, subject, sender, "Auto-Submitted: auto-replied\r\n"), entity)


for k in range(10):
    n += 1
    rcpt = f"gone{k}@partner{k}.example.net"
    status = "5.1.1" if k % 3 else "4.4.1"
    notice = (
        "This is the mail system at host mx1.example.com.\n\n"
        "I'm sorry to have to inform you that your message could not\n"
        "be delivered to one or more recipients.\n\n"
        f"<{rcpt}>: host mx.partner{k}.example.net[203.0.113.{k}] said: 550 {status}\n"
        "    User unknown (in reply to RCPT TO command)\n"
    )
    add(
        f"dsn-postfix-{k:02d}",
        report(
            n,
            "Undelivered Mail Returned to Sender",
            "MAILER-DAEMON@mx1.example.com (Mail Delivery System)",
            notice,
            rcpt,
            status,
            k,
            "mx1.example.com",
        ),
        cls="dsn-postfix",
        subject="Undelivered Mail Returned to Sender",
        sender="MAILER-DAEMON@mx1.example.com",
        body_contains=["could not"],
        attachments=["attachment-1.txt", "attachment-2.txt"],
        verdict="bounce",
        bounce_status=status,
        bounce_recipients=[rcpt],
        bounce_message_id=f"reply-{k}@mail.example.com",
    )
for k in range(10):
    n += 1
    rcpt = f"left.company{k}@contoso{k}.example.com"
    if k % 2:
        notice = (
            f"Your message to {rcpt} couldn't be delivered.\n\n"
            f"{rcpt.split('@')[0]} wasn't found at contoso{k}.example.com.\n\n"
            "Remote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound; "
            "Recipient not found by SMTP address lookup'\n"
        )
        raw = report(
            n,
            f"Undeliverable: [#{100 + k}] Your request",
            f"Microsoft Outlook <MicrosoftExchange329e71ec88ae{k}@contoso{k}.example.com>",
            notice,
            rcpt,
            "5.1.10",
            k,
            f"contoso{k}.example.com",
        )
        att = ["attachment-1.txt", "attachment-2.txt"]
        mid = f"reply-{k}@mail.example.com"
    else:
        notice = (
            "Delivery has failed to these recipients or groups:\n\n"
            f"{rcpt} ({rcpt})\n"
            "The e-mail address you entered couldn't be found.\n\n"
            "Diagnostic information for administrators:\n\n"
            f"Generating server: mail.contoso{k}.example.com\n\n"
            f"{rcpt}\n#550 5.1.1 RESOLVER.ADR.RecipientNotFound; not found ##\n\n"
            "Original message headers:\n\n"
            f"Message-ID: <reply-{k}@mail.example.com>\nSubject: [#{100 + k}] Your request\n"
        )
        raw = message(
            headers(
                n, f"Undeliverable: [#{100 + k}] Your request", f"postmaster@contoso{k}.example.com"
            ),
            text_part(notice),
        )
        att = []
        mid = f"reply-{k}@mail.example.com"
    add(
        f"bounce-exchange-{k:02d}",
        raw,
        cls="dsn-exchange",
        subject=f"Undeliverable: [#{100 + k}] Your request",
        sender=raw.split(b"From: ")[1].split(b"\r\n")[0].decode().split("<")[-1].rstrip(">"),
        body_contains=[rcpt],
        attachments=att,
        verdict="bounce",
        bounce_status="5.1.10" if k % 2 else "5.1.1",
        bounce_recipients=[rcpt],
        bounce_message_id=mid,
    )
for k in range(10):
    n += 1
    rcpt = f"nobody{k}@example.org"
    notice = (
        "This message was created automatically by mail delivery software.\n\n"
        "A message that you sent could not be delivered to one or more of its\n"
        "recipients. This is a permanent error. The following address(es) failed:\n\n"
        f"  {rcpt}\n"
        f"    host mx.example.org [192.0.2.{k}]\n"
        f"    SMTP error from remote mail server after RCPT TO:<{rcpt}>:\n"
        "    550 5.1.1 No such user here\n\n"
        "------ This is a copy of the message, including all the headers. ------\n\n"
        + original(k, rcpt).replace("\r\n", "\n")
        + "\nHello, your request was received.\n"
    )
    add(
        f"bounce-exim-{k:02d}",
        message(
            headers(
                n,
                "Mail delivery failed: returning message to sender",
                "Mail Delivery System <Mailer-Daemon@mail.example.com>",
                f"X-Failed-Recipients: {rcpt}\r\nAuto-Submitted: auto-replied\r\n",
            ),
            text_part(notice, "us-ascii"),
        ),
        cls="dsn-exim",
        subject="Mail delivery failed: returning message to sender",
        sender="Mailer-Daemon@mail.example.com",
        body_contains=["permanent error", rcpt],
        verdict="bounce",
        bounce_status="5.1.1",
        bounce_recipients=[rcpt],
        bounce_message_id=f"reply-{k}@mail.example.com",
    )
for k in range(8):
    n += 1
    rcpt = f"olduser{k}@qmail{k}.example.net"
    notice = (
        f"Hi. This is the qmail-send program at mail{k}.example.net.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
        f"<{rcpt}>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n"
        "--- Below this line is a copy of the message.\n\n"
        + original(k, rcpt).replace("\r\n", "\n")
        + "\nHello.\n"
    )
    add(
        f"bounce-qmail-{k:02d}",
        message(
            headers(
                n, "failure notice", f"MAILER-DAEMON@mail{k}.example.net", "Return-Path: <>\r\n"
            ),
            text_part(notice, "us-ascii"),
        ),
        cls="dsn-qmail",
        subject="failure notice",
        sender=f"MAILER-DAEMON@mail{k}.example.net",
        body_contains=["qmail-send", rcpt],
        verdict="bounce",
        bounce_status="5.1.1",
        bounce_recipients=[rcpt],
        bounce_message_id=f"reply-{k}@mail.example.com",
    )
for k in range(8):
    n += 1
    rcpt = f"typo{k}@gmial.example.com"
    notice = (
        "** Address not found **\n\n"
        f"Your message wasn't delivered to {rcpt} because the address couldn't be found, "
        "or is unable to receive mail.\n\n"
        "The response from the remote server was:\n"
        f"550 5.1.1 The email account that you tried to reach does not exist. {k}\n\n"
        "----- Original message -----\n\n"
        f"Message-ID: <reply-{k}@mail.example.com>\nSubject: [#{100 + k}] Your request\n"
    )
    add(
        f"bounce-gmail-{k:02d}",
        message(
            headers(
                n,
                "Delivery Status Notification (Failure)",
                "Mail Delivery Subsystem <mailer-daemon@googlemail.com>",
                f"X-Failed-Recipients: {rcpt}\r\nAuto-Submitted: auto-replied\r\n",
            ),
            text_part(notice),
        ),
        cls="dsn-gmail",
        subject="Delivery Status Notification (Failure)",
        sender="mailer-daemon@googlemail.com",
        body_contains=["Address not found", rcpt],
        verdict="bounce",
        bounce_status="5.1.1",
        bounce_recipients=[rcpt],
        bounce_message_id=f"reply-{k}@mail.example.com",
    )

# -- Japanese, Chinese, Russian, Hebrew ------------------------------------------------------

LANGUAGES = {
    "japanese": [
        (
            "会議室のプロジェクターが故障しました",
            "お疲れ様です。会議室①のプロジェクターが映りません。よろしくお願いいたします。",
            "見積書.pdf",
        ),
        (
            "パスワードの再設定",
            "パスワードを忘れてしまいました。再設定をお願いします。㈱サンプル",
            "手順書.docx",
        ),
        (
            "プリンター故障",
            "三階のプリンターが紙詰まりを起こしています。②番トレイです。",
            "写真.jpg",
        ),
    ],
    "chinese": [
        ("打印机无法使用", "你好，三楼的打印机无法打印，请尽快处理。谢谢！", "报告书.doc"),
        ("邮箱密码重置", "您好，我忘记了邮箱密码，请帮我重置。", "截图.png"),
        ("网络连接问题", "会议室的网络一直断开，影响开会。", "日志.txt"),
    ],
    "russian": [
        (
            "Не работает принтер",
            "Здравствуйте! Принтер на третьем этаже не печатает. Спасибо.",
            "Отчёт.pdf",
        ),
        ("Сброс пароля", "Добрый день, прошу сбросить пароль от почты.", "Скриншот.png"),
        ("Проблема с VPN", "VPN отключается каждые пять минут.", "Журнал.txt"),
    ],
    "hebrew": [
        ("המדפסת לא עובדת", "שלום, המדפסת בקומה השלישית לא מדפיסה. תודה רבה.", "דוח.pdf"),
        ("איפוס סיסמה", "שכחתי את הסיסמה לדואר, אנא אפסו אותה.", "צילום.png"),
        ("בעיית רשת", "הרשת בחדר הישיבות מתנתקת כל הזמן.", "יומן.txt"),
    ],
}
CHARSETS = {
    "japanese": [
        ("iso-2022-jp", "iso2022_jp"),
        ("shift_jis", "cp932"),
        ("utf-8", "utf-8"),
        ("ISO-2022-JP", "cp50221"),
        ("x-sjis", "cp932"),
    ],
    "chinese": [
        ("gb2312", "gb2312"),
        ("gbk", "gbk"),
        ("chinese", "gb2312"),
        ("utf-8", "utf-8"),
        ("GB18030", "gb18030"),
    ],
    "russian": [
        ("koi8-r", "koi8_r"),
        ("windows-1251", "cp1251"),
        ("utf-8", "utf-8"),
        ("x-cp1251", "cp1251"),
    ],
    "hebrew": [
        ("windows-1255", "cp1255"),
        ("iso-8859-8-i", "iso8859_8"),
        ("utf-8", "utf-8"),
        ("logical", "iso8859_8"),
    ],
}


def cp50221(text: str) -> bytes:
    """ISO-2022-JP as Outlook writes it: NEC row 13 characters (①, ㈱) as JIS pairs."""
    out = b""
    for ch in text:
        try:
            out += ch.encode("iso2022_jp")
        except UnicodeEncodeError:
            sjis = ch.encode("cp932")
            lead, trail = sjis[0], sjis[1]
            row = (lead - (0x70 if lead < 0xA0 else 0xB0)) * 2 - 1
            if trail >= 0x9F:
                row, col = row + 1, trail - 0x7E
            else:
                col = trail - (0x20 if trail > 0x7F else 0x1F)
            out += b"\x1b$B" + bytes((row, col)) + b"\x1b(B"
    return out


for language, samples in LANGUAGES.items():
    count = 0
    for subject, body, filename in samples:
        for charset, codec in CHARSETS[language]:
            n += 1
            count += 1
            if codec in ("cp50221", "iso2022_jp"):
                data = cp50221(body)
                subj = f"=?{charset}?B?{base64.b64encode(cp50221(subject)).decode()}?="
                text = part(f"text/plain; charset={charset}", data + b"\r\n", cte="7bit")
            else:
                subj = word(subject, charset, codec)
                text = text_part(body, charset, codec)
            # Every third message names its file in raw 8-bit octets of the message's charset
            # (undeclared), the others in RFC 2231 or an encoded word.
            name_codec = {"iso2022_jp": "cp932", "cp50221": "cp932"}.get(codec, codec)
            file_data = f"{filename} content".encode()
            if count % 3 == 0 and name_codec != "utf-8":
                disposition = (
                    b'Content-Disposition: attachment; filename="'
                    + filename.encode(name_codec)
                    + b'"\r\n'
                )
                attachment = (
                    b"Content-Type: application/octet-stream\r\n"
                    + disposition
                    + b"Content-Transfer-Encoding: base64\r\n\r\n"
                    + b64(file_data).encode()
                )
            elif count % 3 == 1:
                quoted = "".join(f"%{b:02X}" for b in filename.encode("utf-8"))
                attachment = part(
                    "application/octet-stream",
                    b64(file_data).encode(),
                    f"Content-Disposition: attachment; filename*=utf-8''{quoted}\r\n",
                    cte="base64",
                )
            else:
                attachment = part(
                    f'application/octet-stream; name="{word(filename)}"',
                    b64(file_data).encode(),
                    f'Content-Disposition: attachment; filename="{word(filename)}"\r\n',
                    cte="base64",
                )
            entity = multipart("mixed", f"lang-{n}", text, attachment)
            sender_name = word(f"{language} user", "utf-8")
            add(
                f"{language}-{count:02d}-{charset.lower()}",
                message(headers(n, subj, f"{sender_name} <{language}{count}@example.com>"), entity),
                cls=language,
                subject=subject,
                sender=f"{language}{count}@example.com",
                body_contains=[body],
                attachments=[filename],
            )

# -- cid images in HTML ----------------------------------------------------------------------

for k in range(10):
    n += 1
    html = (
        f'<html><body><p>The dashboard {k} shows red:</p><img src="cid:chart{k}@example.com">'
        "<p>Please check.</p></body></html>"
    )
    related = multipart(
        "related",
        f"rel-{n}",
        html_part(html),
        file_part("image/png", f"chart{k}.png", PNG, "inline", cid=f"chart{k}@example.com"),
    )
    entity = (
        related
        if k % 2
        else multipart(
            "alternative",
            f"alt-{n}",
            text_part(f"The dashboard {k} shows red:\n\nPlease check."),
            related[0] + b"\r\n" + related[1],
        )
    )
    add(
        f"cid-image-{k:02d}",
        message(headers(n, f"Dashboard {k} red", f"Ops {k} <ops{k}@example.com>"), entity),
        cls="cid-image",
        subject=f"Dashboard {k} red",
        sender=f"ops{k}@example.com",
        body_contains=[f"The dashboard {k} shows red:", "Please check."],
        attachments=[f"chart{k}.png"],
    )

# -- the only text part inline with a name; empty text parts; broken headers; RFC 2231 -----------

for k in range(3):
    n += 1
    head = headers(n, f"Body as a file {k}", f"Scanner {k} <scanner{k}@example.com>")
    head += (
        f'Content-Type: text/plain; charset=utf-8; name="body{k}.txt"\r\n'
        f'Content-Disposition: inline; filename="body{k}.txt"\r\n'
    )
    add(
        f"inline-named-text-{k}",
        (head + "\r\n" + f"Scan {k} finished with errors.\r\n").encode(),
        cls="inline-named-text",
        subject=f"Body as a file {k}",
        sender=f"scanner{k}@example.com",
        body_contains=[f"Scan {k} finished with errors."],
    )
for k in range(3):
    n += 1
    entity = multipart(
        "mixed",
        f"empty-{n}",
        text_part(f"Only this text counts {k}."),
        part("text/plain; charset=us-ascii", b""),
        file_part("application/pdf", f"form{k}.pdf", PDF),
        part("text/plain; charset=us-ascii", b"\r\n"),
    )
    add(
        f"empty-text-parts-{k}",
        message(headers(n, f"Empty parts {k}", f"Mobile {k} <mobile{k}@example.com>"), entity),
        cls="empty-text-parts",
        subject=f"Empty parts {k}",
        sender=f"mobile{k}@example.com",
        body_contains=[f"Only this text counts {k}."],
        attachments=[f"form{k}.pdf"],
    )
for k in range(3):
    n += 1
    raw = (
        f"Received: from legacy{k}.example.com by mx1.example.com;"
        " Mon, 1 Dec 2026 09:00:00 +0100\r\n"
        f"X-Legacy-Routing: route={k};\r\nhop=b;\r\nhop=c\r\n"
        f"From: Legacy App {k} <legacy{k}@example.com>\r\nSubject: Nightly job {k} failed\r\n"
        f"Message-ID: <legacy-{k}@example.com>\r\nDate: Mon, 1 Dec 2026 09:00:00 +0100\r\n"
        "\r\nThe nightly job failed with code 3.\r\n"
    ).encode()
    add(
        f"unindented-continuation-{k}",
        raw,
        cls="broken-headers",
        subject=f"Nightly job {k} failed",
        sender=f"legacy{k}@example.com",
        body_contains=["The nightly job failed with code 3."],
    )
for k, label in enumerate(
    ["ansi-x3.4-1968", "ANSI_X3.4-1968", "us-ascii", "unicode-1-1-utf-8", "latin1"]
):
    n += 1
    body = multipart(
        "mixed",
        f"b2231-{k}",
        text_part(f"Boundary label {label}."),
        file_part("application/pdf", "a.pdf", PDF),
    )[1]
    head = headers(n, f"RFC 2231 boundary {k}", f"Lib {k} <lib{k}@example.com>")
    head += f"Content-Type: multipart/mixed; boundary*={label}''b2231-{k}\r\n"
    add(
        f"rfc2231-boundary-{k}",
        head.encode() + b"\r\n" + body,
        cls="rfc2231-labels",
        subject=f"RFC 2231 boundary {k}",
        sender=f"lib{k}@example.com",
        body_contains=[f"Boundary label {label}."],
        attachments=["a.pdf"],
    )

# -- not mail at all ----------------------------------------------------------------------

add("not-mail-empty", b"", cls="not-mail", verdict="failure")
add("not-mail-pdf", PDF, cls="not-mail", verdict="failure")
add("not-mail-png", PNG, cls="not-mail", verdict="failure")


def main() -> None:
    for old in HERE.glob("*.eml"):
        old.unlink()
    for old in HERE.glob("*.json"):
        old.unlink()
    for name, raw, expected in CASES:
        (HERE / f"{name}.eml").write_bytes(raw)
        (HERE / f"{name}.json").write_text(
            json.dumps(expected, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
        )
    counts: dict[str, int] = {}
    for _, _, expected in CASES:
        counts[expected["cls"]] = counts.get(expected["cls"], 0) + 1
    print(len(CASES), "messages:", json.dumps(counts))


if __name__ == "__main__":
    main()
