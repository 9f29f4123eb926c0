"""Automatic replies: built so nothing from the incoming message can inject a header, sent
with a null envelope sender (RFC 5321) and marked ``Auto-Submitted: auto-replied`` (RFC 3834).

Every header of a reply is written here, from values made safe here: the stdlib's header
policy never sees received text. Setting ``msg["Subject"] = text`` makes it parse ``text``
and decode any RFC 2047 encoded word in it, so a subject that was encoded twice, or a
Message-ID holding ``=?utf-8?q?=0D=0ABcc:...?=``, became a raw CR/LF in the reply on CPython
without the CVE-2024-6923 fix (3.11.7 here): a Bcc header and a second, HTML body, sent from
the desk's own address. So:

- the recipient is re-validated as a bare addr-spec (ASCII local part, IDNA domain);
- the Message-ID we answer goes into In-Reply-To / References only if it has the strict
  msg-id syntax (no ``=?``, no control, no space, bounded), and is left out otherwise;
- the subject, already decoded once by the parser, is stripped of every unprintable
  character and encoded by us (RFC 2047, base64) whenever it is not plain printable ASCII
  free of ``=?``; the receiving reader then decodes exactly once and shows our text.

Only the body part (one text/plain part whose parameters are ours) is left to the stdlib.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import functools
import re
import smtplib
import socket
import threading
from dataclasses import dataclass
from email.message import MIMEPart
from email.policy import SMTP
from typing import TYPE_CHECKING

import idna

from engine.config import MailboxConfig, ReplyTemplate, SmtpConfig
from engine.errors import OAuthError
from engine.oauth import sasl
from engine.tls import client_context

if TYPE_CHECKING:
    from engine.oauth.broker import AccessToken, TokenBroker

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

# The headers of every reply, in order; In-Reply-To and References only for a valid msg-id.
HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "Auto-Submitted",
    LOOP_HEADER,
    "X-Auto-Response-Suppress",
    "Precedence",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
)

_SUBJECT_CHARS = 500  # of text; a longer subject is noise, and it is quoted in the body too
_MAX_MSGID = 250  # RFC 5322 puts no bound on it; real ones are under 100 characters
_WORD_BYTES = 36  # UTF-8 bytes per encoded word: "Subject: " + 60 characters < 76

# RFC 5322 atext: what a dot-atom (a local part, a msg-id half) is made of.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
# A quoted local part: printable ASCII, quotes and backslashes only escaped (RFC 5322 3.2.4).
_QUOTED = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*)"')
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# id-left "@" id-right, each atext and dots (real ids break the dot-atom rules on dots), or a
# domain literal on the right; no "=?" (checked apart): RFC 2047 words are never in a msg-id.
_MSGID = re.compile(rf"[{_ATEXT}.]+@(?:[{_ATEXT}.]+|\[[\x21-\x5a\x5e-\x7e]*\])")


def one_line(value: str, limit: int = 200) -> str:
    """Received text made fit for one header line: every character Python does not call
    printable (controls, CR, LF, U+2028, NEL, bidi overrides, odd spaces) becomes a space,
    runs of spaces one, at most ``limit`` characters."""
    cleaned = "".join(c if c.isprintable() else " " for c in value)
    return " ".join(cleaned.split())[:limit]


def _fill(template: str, values: dict[str, str]) -> str:
    # Plain replacement, not str.format: a template must not reach into attributes.
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def _ascii_domain(domain: str) -> str:
    """The domain in lower-case ASCII (IDNA for a Unicode one); ValueError if it is no host."""
    domain = domain.removesuffix(".")
    try:
        ascii_domain = idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise ValueError("the sender address has an invalid domain") from exc
    labels = ascii_domain.lower().split(".")
    if len(ascii_domain) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("the sender address has an invalid domain")
    return ".".join(labels)


def _local_part(local: str) -> tuple[str, str]:
    """(the local part as written for SMTP, its unquoted text). ValueError if unusable."""
    quoted = _QUOTED.fullmatch(local)
    if quoted is not None:
        text = re.sub(r"\\(.)", r"\1", quoted.group(1))
        # "john"@x is john@x: written without quotes whenever it needs none.
        written = text if _DOT_ATOM.fullmatch(text) else local
    elif _DOT_ATOM.fullmatch(local):
        text = written = local
    else:
        raise ValueError("the sender address cannot receive a reply")
    if "=?" in text or not 0 < len(written) <= 64:
        # An encoded word is never part of an address (RFC 2047 section 5).
        raise ValueError("the sender address cannot receive a reply")
    return written, text


@dataclass(frozen=True)
class Recipient:
    """A validated reply address, and how the rate limits count it."""

    address: str  # the addr-spec we send to (RCPT TO and To)
    key: str  # lower-case, no +tag, unquoted, IDNA domain: victim+1@X and victim@x are one
    domain: str  # the IDNA domain, lower-case


def recipient(value: str) -> Recipient:
    """Re-validate the sender address a reply goes to. Raises ValueError when unusable."""
    local, at, domain = value.strip().rpartition("@")
    if not at or not local or not domain:
        raise ValueError("the sender address cannot receive a reply")
    written, text = _local_part(local)
    ascii_domain = _ascii_domain(domain)
    address = f"{written}@{ascii_domain}"
    if len(address) > 254:
        raise ValueError("the sender address cannot receive a reply")
    base = text.lower()
    tagless = base.split("+", 1)[0] or base
    return Recipient(address=address, key=f"{tagless}@{ascii_domain}", domain=ascii_domain)


def safe_msgid(value: str | None) -> str | None:
    """``value`` if it is a msg-id we may write into a header as ``<value>``, else None."""
    if not value or len(value) > _MAX_MSGID or "=?" in value:
        return None
    return value if _MSGID.fullmatch(value) else None


def header_text(name: str, text: str) -> str:
    """A header line's value for ``text`` (already one line): as it is when it is printable
    ASCII without ``=?`` and short, otherwise RFC 2047 base64 words in UTF-8 on folded lines.
    Either way a reader decodes it to exactly ``text``, and no library decodes it first."""
    if text.isascii() and text.isprintable() and "=?" not in text and len(name) + len(text) < 76:
        return text
    words: list[str] = []
    chunk = b""
    for char in text:
        encoded = char.encode("utf-8")
        if len(chunk) + len(encoded) > _WORD_BYTES:
            words.append(chunk.decode("utf-8"))
            chunk = b""
        chunk += encoded
    if chunk or not words:
        words.append(chunk.decode("utf-8"))
    return "\r\n ".join(
        "=?utf-8?b?" + base64.b64encode(w.encode("utf-8")).decode("ascii") + "?=" for w in words
    )


def reply_domain(mailbox: MailboxConfig) -> str:
    """The domain of our replies' Message-IDs: the sender's, so they are recognisably ours."""
    sender = email.utils.parseaddr(mailbox.smtp.sender if mailbox.smtp else "")[1]
    domain = sender.rpartition("@")[2]
    try:
        return _ascii_domain(domain) if domain else "mailintegration.invalid"
    except ValueError:
        return "mailintegration.invalid"


def _from_header(sender: str) -> str:
    """Our From (configured, not received, but written with the same care)."""
    name, addr = email.utils.parseaddr(sender)
    checked = recipient(addr).address
    name = one_line(name, 100)
    if not name:
        return checked
    if name.isascii() and not any(c in name for c in '()<>[]:;@\\,."'):
        return f"{name} <{checked}>"
    return f"{header_text('From', name)} <{checked}>"


@dataclass(frozen=True)
class Reply:
    """A reply ready to send: the message bytes and where they go."""

    to: Recipient
    message_id: str  # without angle brackets
    subject: str  # as its reader will see it
    data: bytes


def _line(name: str, value: str) -> bytes:
    # The last guard: whatever built ``value``, a header line holds printable ASCII only.
    for part in value.split("\r\n "):
        if not (part.isascii() and part.isprintable()):
            raise AssertionError(f"unsafe {name} header value")  # a bug, never received text
    return f"{name}: {value}\r\n".encode("ascii")


def build_reply(
    *,
    mailbox: MailboxConfig,
    recipient_address: str,
    sender_name: str,
    subject: str,
    in_reply_to: str | None,
) -> Reply:
    """The automatic reply to a refused message. Raises ValueError for an unusable recipient."""
    assert mailbox.smtp is not None
    to = recipient(recipient_address)
    template = mailbox.reply_template or DEFAULT_TEMPLATE
    values = {
        "subject": one_line(subject, _SUBJECT_CHARS) or "(no subject)",
        "sender": one_line(sender_name) or to.address,
        "mailbox": one_line(mailbox.name),
    }
    visible = one_line(_fill(template.subject, values), _SUBJECT_CHARS + 200)
    message_id = email.utils.make_msgid("mailintegration", domain=reply_domain(mailbox))[1:-1]
    ref = safe_msgid(in_reply_to)
    head = [
        _line("From", _from_header(mailbox.smtp.sender)),
        _line("To", to.address),
        _line("Subject", header_text("Subject", visible)),
        _line("Date", email.utils.formatdate(usegmt=True)),
        _line("Message-ID", f"<{message_id}>"),
    ]
    if ref is not None:
        head += [_line("In-Reply-To", f"<{ref}>"), _line("References", f"<{ref}>")]
    account = "".join(c if c.isascii() and c.isprintable() else "?" for c in mailbox.account)
    head += [
        _line("Auto-Submitted", "auto-replied"),
        _line(LOOP_HEADER, f"mailintegration; {account}"),
        _line("X-Auto-Response-Suppress", "All"),
        _line("Precedence", "auto_reply"),
        _line("MIME-Version", "1.0"),
    ]
    # The body part: text/plain, quoted-printable, parameters ours. Received text in the
    # body is text in one part; it cannot open another part or end the headers.
    part = MIMEPart(policy=SMTP)
    part.set_content(_fill(template.body, values), cte="quoted-printable")
    return Reply(to=to, message_id=message_id, subject=visible, data=b"".join(head) + bytes(part))


@functools.cache
def _ehlo_name() -> str:
    """Our name in EHLO, as smtplib finds it (socket.getfqdn(), else our address). That asks
    the resolver for a reverse lookup, which a host with a silent DNS answers only after the
    resolver's time-out: asked once per process (in a send's worker thread), not per send."""
    return smtplib.SMTP().local_hostname


class Delivery:
    """One send of one reply with ``MAIL FROM:<>``, in a worker thread (:meth:`run`), that the
    event loop can cut short (:meth:`abort`) when its overall deadline passes.

    smtplib's timeout bounds each socket operation, not the whole dialogue: a server that
    answers one byte a second never trips it. Shutting the socket down from the event loop
    ends the blocked call in the thread at once.
    """

    def __init__(
        self, smtp: SmtpConfig, recipient: str, data: bytes, tokens: TokenBroker | None = None
    ) -> None:
        self.smtp = smtp
        # OAuth2 access tokens (smtp.oauth2), from the engine's broker.
        self.tokens = tokens
        self.recipient = recipient
        self.data = data
        self._lock = threading.Lock()
        self._client: smtplib.SMTP | None = None
        self._aborted = False

    def run(self) -> None:
        """Send. Blocking: call it from a worker thread. Raises what smtplib raises, and
        :class:`~engine.errors.TLSError` for a ``caFile`` that cannot be loaded."""
        smtp = self.smtp
        context = None
        if smtp.use_ssl or smtp.starttls:
            context = client_context(smtp.ca_file, smtp.tls_verify)
        client: smtplib.SMTP
        name = _ehlo_name()
        if smtp.use_ssl:
            client = smtplib.SMTP_SSL(local_hostname=name, timeout=smtp.timeout, context=context)
        else:
            client = smtplib.SMTP(local_hostname=name, timeout=smtp.timeout)
        with self._lock:
            if self._aborted:
                raise TimeoutError("the send was aborted before it connected")
            self._client = client
        # smtplib takes the name TLS verifies from its constructor's host only, which would
        # also connect outside the abortable section: set it, or STARTTLS and SMTPS fail
        # with "check_hostname requires server_hostname" whenever the certificate is checked.
        client._host = smtp.host  # type: ignore[attr-defined]
        try:
            client.connect(smtp.host, smtp.port)
            if self._aborted:  # the deadline passed while connecting: the socket was not set
                raise TimeoutError("the send was aborted while connecting")
            if smtp.starttls:
                client.starttls(context=context)
            if smtp.oauth2 is not None:
                self._oauth_login(client)
            elif smtp.user_name and smtp.password:
                client.login(smtp.user_name, smtp.password)
            client.sendmail("", [self.recipient], self.data)
            # The server has the message: a failed goodbye must not make us send it twice.
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()
        finally:
            client.close()

    def _oauth_login(self, client: smtplib.SMTP) -> None:
        """SASL OAUTHBEARER / XOAUTH2, whichever EHLO's AUTH line offers (engine.oauth.sasl),
        through the broker's sign_in (a refused stored token is replaced, tried once more)."""
        smtp = self.smtp
        assert smtp.oauth2 is not None and smtp.oauth_account is not None
        if self.tokens is None:
            raise OAuthError("token-endpoint", "internal error: no token broker for OAuth2")
        client.ehlo_or_helo_if_needed()
        mechanism = sasl.choose(client.esmtp_features.get("auth", "").split())
        if mechanism is None:
            raise smtplib.SMTPNotSupportedError(
                "the SMTP server offers neither OAUTHBEARER nor XOAUTH2 (EHLO's AUTH)"
            )
        user = smtp.user_name or ""

        def exchange(token: AccessToken) -> None:
            auth = sasl.SaslClient(mechanism, user, token.value, smtp.host, smtp.port)
            try:
                client.auth(mechanism, auth, initial_response_ok=True)
            except smtplib.SMTPAuthenticationError:
                raise auth.refused(token.expires_at, token.scopes) from None

        self.tokens.sign_in(smtp.oauth_account, smtp.oauth2, mechanism, exchange)

    def abort(self) -> None:
        """Unblock :meth:`run` from another thread: it then raises (OSError or a timeout)."""
        with self._lock:
            self._aborted = True
            sock = self._client.sock if self._client is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed, or never connected
                sock.shutdown(socket.SHUT_RDWR)
