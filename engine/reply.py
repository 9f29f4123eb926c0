"""Automatic replies: built so nothing from the incoming message can inject a header, sent
with a null envelope sender (RFC 5321) and marked ``Auto-Submitted: auto-replied`` (RFC 3834)."""

from __future__ import annotations

import email.utils
import logging
import smtplib
import ssl
from email.message import EmailMessage
from email.policy import SMTP

from engine.config import MailboxConfig, ReplyTemplate, SmtpConfig

log = logging.getLogger("engine.reply")

LOOP_HEADER = "X-Loop"
DEFAULT_TEMPLATE = ReplyTemplate(
    subject="Re: {subject}",
    body=(
        "Hello {sender},\n\n"
        "This mailbox ({mailbox}) does not accept new requests by e-mail, so your message "
        "was not registered.\nPlease contact the service desk through the portal or by "
        "phone.\n\nThis is an automatic reply; please do not answer it.\n"
    ),
)


def _one_line(value: str, limit: int = 200) -> str:
    """No CR, LF or other control character may travel from a received header into ours."""
    cleaned = "".join(" " if (ord(c) < 32 or ord(c) == 127) else c for c in value)
    return " ".join(cleaned.split())[:limit]


def _fill(template: str, values: dict[str, str]) -> str:
    # Plain replacement, not str.format: a template must not reach into attributes.
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def reply_domain(mailbox: MailboxConfig) -> str:
    """The domain of our replies' Message-IDs: the sender's, so they are recognisably ours."""
    sender = email.utils.parseaddr(mailbox.smtp.sender if mailbox.smtp else "")[1]
    return sender.rpartition("@")[2] or "mailintegration.invalid"


def build_reply(
    *,
    mailbox: MailboxConfig,
    recipient: str,
    sender_name: str,
    subject: str,
    in_reply_to: str | None,
) -> EmailMessage:
    """The automatic reply to a refused message. Raises ValueError for an unusable recipient."""
    assert mailbox.smtp is not None
    _, addr = email.utils.parseaddr(_one_line(recipient))
    if not addr or "@" not in addr or any(c in addr for c in " ,;<>\"'"):
        raise ValueError("the sender address cannot receive a reply")
    template = mailbox.reply_template or DEFAULT_TEMPLATE
    values = {
        "subject": _one_line(subject) or "(no subject)",
        "sender": _one_line(sender_name) or addr,
        "mailbox": mailbox.name,
    }
    msg = EmailMessage(policy=SMTP)
    msg["From"] = mailbox.smtp.sender
    msg["To"] = addr
    msg["Subject"] = _one_line(_fill(template.subject, values), 900)
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["Message-ID"] = email.utils.make_msgid("mailintegration", domain=reply_domain(mailbox))
    if in_reply_to:
        ref = "<" + _one_line(in_reply_to, 900).strip("<>") + ">"
        msg["In-Reply-To"] = ref
        msg["References"] = ref
    msg["Auto-Submitted"] = "auto-replied"
    msg[LOOP_HEADER] = f"mailintegration; {mailbox.account}"
    msg["X-Auto-Response-Suppress"] = "All"
    msg["Precedence"] = "auto_reply"
    msg.set_content(_fill(template.body, values))
    return msg


def send(smtp: SmtpConfig, recipient: str, message: bytes) -> None:
    """Send one reply with ``MAIL FROM:<>``. Blocking: call it from a worker thread."""
    context = None
    if smtp.use_ssl or smtp.starttls:
        context = ssl.create_default_context(cafile=str(smtp.ca_file) if smtp.ca_file else None)
        if not smtp.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    client: smtplib.SMTP
    if smtp.use_ssl:
        client = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout, context=context)
    else:
        client = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout)
    with client:
        if smtp.starttls:
            client.starttls(context=context)
        if smtp.user_name and smtp.password:
            client.login(smtp.user_name, smtp.password)
        client.sendmail("", [recipient], message)
