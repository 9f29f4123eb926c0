"""Loop safety: is a message automatic (an auto-reply, a list, a bounce), and why.

The rules of RFC 3834 and of the peers (Auto-Submitted other than ``no``, X-Autoreply,
X-Auto-Response-Suppress, Precedence, List-Id/List-Unsubscribe, a null sender, a system
sender such as mailer-daemon), and delivery status notifications as bounces.

Bounces come in two shapes. An RFC 3464 report (``multipart/report``, a
``message/delivery-status`` part) says what it is. A plain-text one (qmail, old Exim and
Exchange, many appliances) does not, and is recognised as RT and Zammad do: by the subject
lines of Postfix, Exchange, Exim, qmail, Gmail and sendmail, or by a mailer-daemon or
postmaster sender, or a null return path, together with evidence in the message (a failure
phrase, an enhanced status code, a returned message, X-Failed-Recipients). Of either shape,
:func:`bounce_details` reads what a request needs to thread it: the status code, the failed
recipients and the Message-ID of the message that bounced.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, NamedTuple

from engine.parse.charsets import decode_8bit
from engine.parse.headers import (
    decode_words,
    first_field,
    msgid,
    one_line,
    param_text,
    parse_params,
)

_SYSTEM_LOCAL_PARTS: Final = frozenset(
    {"mailer-daemon", "postmaster", "noreply", "no-reply", "do-not-reply", "donotreply"}
)
_COMMENT_RE: Final = re.compile(r"\([^()]*\)")


def _token(value: str) -> str:
    return one_line(_COMMENT_RE.sub("", decode_8bit(value)).split(";", 1)[0]).lower()


def _reason_text(value: str) -> str:
    """A header value fit for a short reason string: decoded, one line, 40 characters."""
    return one_line(decode_8bit(value))[:40]


class BounceEvidence(NamedTuple):
    """What the walk over the parts found that speaks for a bounce (see parts.Collector)."""

    dsn: bool = False  # a message/delivery-status part
    returned: bool = False  # a message/rfc822 or text/rfc822-headers part
    # Final-Recipient (else Original-Recipient) and Status of each DSN recipient block.
    recipients: tuple[tuple[str, str], ...] = ()
    original_id: str | None = None  # Message-ID of the returned message or headers


class BounceInfo(NamedTuple):
    """What a bounce says: ``status`` (the first enhanced status code, "5.1.1"; a 5 is a
    permanent failure, a 4 a delay), the failed ``recipients`` (lower-cased) and the
    ``message_id`` (without brackets) of the message that bounced."""

    status: str | None
    recipients: tuple[str, ...]
    message_id: str | None


NO_BOUNCE: Final = BounceInfo(None, (), None)


class Verdict(NamedTuple):
    """Whether a message is automatic, why (for people), and whether it is a bounce."""

    auto_submitted: bool
    reason: str | None
    is_bounce: bool


_HUMAN: Final = Verdict(False, None, False)


def loop_verdict(
    headers: dict[str, list[str]],
    has_dsn_part: bool,
    senders: Iterable[str],
    body: str = "",
    evidence: BounceEvidence | None = None,
) -> Verdict:
    """The loop-safety verdict on a message: the first rule that holds decides.

    ``headers`` are the message's header fields (see :func:`~engine.parse.headers.header_map`),
    ``has_dsn_part`` says a part is a ``message/delivery-status``, ``senders`` are the
    addresses of From and Return-Path, ``body`` the body text and ``evidence`` what the parts
    say about a bounce. Reports come first (a delivery status notification is a bounce), then
    plain-text bounces, then the headers that mark automatic mail, then the sender.
    """
    top_type, top_params = parse_params(first_field(headers, "content-type") or "")
    report_type = (param_text(top_params.get("report-type")) or "").strip().lower()
    if has_dsn_part or (top_type == "multipart/report" and report_type == "delivery-status"):
        return Verdict(True, "delivery status notification", True)
    if top_type == "multipart/report":
        return Verdict(True, f"report: {_reason_text(report_type) or 'unknown'}", False)
    senders = list(senders)
    return (
        _plain_bounce(headers, senders, body, evidence or BounceEvidence())
        or _automatic_header(headers)
        or _automatic_sender(headers, senders)
        or _HUMAN
    )


# The subject lines of plain-text bounces, at the start of the subject (a person forwarding
# one writes "Fwd:" before it): Postfix, Exchange/Outlook, Exim, qmail, Gmail, sendmail,
# Lotus Domino and the usual appliances.
_BOUNCE_SUBJECT_RE: Final = re.compile(
    r"(?:undelivered mail returned to sender"
    r"|delayed mail \(still being retried\)"
    r"|undeliverable(?::| mail\b| message\b)"
    r"|mail delivery failed"
    r"|failure notice$"
    r"|delivery status notification \((?:failure|delay)\)"
    r"|returned mail:"
    r"|delivery failure:"
    r"|delivery notification: delivery has failed"
    r"|non[- ]?delivery (?:report|notification)"
    r"|message (?:could not be|not) delivered"
    r"|mail system error - returned mail"
    r"|warning: could not send message)",
    re.I,
)
# Phrases of the failure notices themselves (first lines of the body).
_FAILURE_PHRASE_RE: Final = re.compile(
    r"could(?: not|n't) be delivered|was(?: not|n't) delivered|delivery (?:has )?failed"
    r"|delivery to the following recipients? failed|permanent(?:ly)? (?:error|fatal|failure)"
    r"|unable to deliver|address not found|user unknown|mailbox unavailable|no such user"
    r"|i'm afraid i wasn't able to deliver|this is the mail system at host"
    r"|message delivery failed|undeliverable|returned to sender|failed permanently"
    r"|this message was created automatically by mail delivery software"
    r"|delivery is delayed|delivery has been delayed|could not deliver",
    re.I,
)
_STATUS_RE: Final = re.compile(r"(?<![\w.])([245]\.\d{1,3}\.\d{1,3})(?![\d]|\.\d)")
_BOUNCE_SENDERS: Final = frozenset({"mailer-daemon", "mailer_daemon", "mail-daemon", "postmaster"})
# How much of a body the bounce heuristics read: the notice is at the top.
_BOUNCE_TEXT: Final = 16 * 1024


def _plain_bounce(
    headers: dict[str, list[str]], senders: list[str], body: str, evidence: BounceEvidence
) -> Verdict | None:
    """A bounce that is not an RFC 3464 report, or None.

    A bounce's subject line alone is not enough: a person writes "Undeliverable packages"
    or "Mail delivery failed to the CEO" to a service desk too, and that is a request. It
    needs a machine sender (mailer-daemon, postmaster, a null return path, Auto-Submitted)
    or hard evidence (a returned message, X-Failed-Recipients, an enhanced status code). A
    machine sender without such a subject needs the evidence or a failure phrase.
    """
    subject = one_line(decode_words((first_field(headers, "subject") or "")[:1024]))
    subject_hit = _BOUNCE_SUBJECT_RE.match(subject) is not None
    machine = _machine_sender(headers, senders)
    if not subject_hit and machine is None:
        return None
    text = body[:_BOUNCE_TEXT]
    hard = evidence.returned or "x-failed-recipients" in headers or bool(_status_in(text))
    if subject_hit and (machine or hard or _auto_submitted(headers)):
        return Verdict(True, f"bounce: {subject[:40]}", True)
    if machine and (hard or _FAILURE_PHRASE_RE.search(text) is not None):
        return Verdict(True, f"bounce: {machine}", True)
    return None


def _machine_sender(headers: dict[str, list[str]], senders: list[str]) -> str | None:
    """ "system sender mailer-daemon" (or postmaster), "null sender" (Return-Path: <>), or
    None for any other sender."""
    system = next((s for s in map(_local_part, senders) if s in _BOUNCE_SENDERS), None)
    if system is not None:
        return f"system sender {system}"
    return_path = first_field(headers, "return-path")
    return "null sender" if return_path is not None and return_path.strip() in ("<>", "") else None


def _auto_submitted(headers: dict[str, list[str]]) -> bool:
    auto = first_field(headers, "auto-submitted")
    return auto is not None and _token(auto) != "no"


def _local_part(address: str) -> str:
    return address.rpartition("@")[0].lower() if "@" in address else address.lower()


def _status_in(text: str) -> str | None:
    """The first enhanced status code of a failure (4.x.x or 5.x.x) in ``text``."""
    for m in _STATUS_RE.finditer(text):
        if m.group(1)[0] in "45":
            return m.group(1)
    return None


# Where the notice ends and the copy of the returned message starts.
_COPY_START_RE: Final = re.compile(
    r"^[ \t>]*(?:(?:received|return-path|message-id|dkim-signature|x-[\w-]+)[ \t]*:"
    r"|-+ ?(?:this is a copy|below this line|original message|the original message))",
    re.I | re.M,
)
_ADDRESS: Final = r"[^\s<>()\[\]@:;,\"']{1,64}@[a-z0-9][a-z0-9.-]{0,253}[a-z0-9]"
_RECIPIENT_RES: Final = (
    # Postfix, qmail: "<user@example.com>: host ... said: 550 ..."
    re.compile(rf"^[ \t]*<({_ADDRESS})>[ \t]*:", re.I | re.M),
    # Exim, Exchange, Gmail (old): the address alone on its line.
    re.compile(
        rf"^[ \t]*(?:mailto:)?<?({_ADDRESS})>?[ \t]*(?:\([^)\n]{{0,300}}\)|<mailto:[^>\n]*>)?"
        r"[ \t]*$",
        re.I | re.M,
    ),
    # Gmail, Exchange Online: "wasn't delivered to user@example.com because ..."
    re.compile(rf"deliver(?:ed|y)? to <?({_ADDRESS})>?", re.I),
)
_ORIGINAL_ID_RE: Final = re.compile(
    r"^[ \t>]*message-id[ \t]*:[ \t]*(<[^<>\s]{1,998}>)", re.I | re.M
)
_MAX_BOUNCE_RECIPIENTS: Final = 20


def bounce_details(
    headers: dict[str, list[str]], body: str, evidence: BounceEvidence, senders: Iterable[str]
) -> BounceInfo:
    """What a bounce (RFC 3464 or plain text) says: status, failed recipients, original id.

    The DSN's own fields win; then X-Failed-Recipients; then the notice's text, read up to
    where the copy of the returned message starts (its own addresses are not recipients).
    """
    text = body[:_BOUNCE_TEXT]
    cut = _COPY_START_RE.search(text)
    notice = text[: cut.start()] if cut is not None else text
    recipients = _Recipients({a.lower() for a in senders})
    status = _declared_recipients(headers, evidence, recipients)
    if not recipients.found:
        for pattern in _RECIPIENT_RES:
            for m in pattern.finditer(notice):
                recipients.add(m.group(1))
    status = status or _status_in(notice) or _status_in(text)
    message_id = evidence.original_id
    if message_id is None:
        found_id = _ORIGINAL_ID_RE.search(text if cut is None else text[cut.start() :])
        message_id = msgid(found_id.group(1)) if found_id is not None else None
    return BounceInfo(status, tuple(recipients.found), message_id)


def _declared_recipients(
    headers: dict[str, list[str]], evidence: BounceEvidence, recipients: _Recipients
) -> str | None:
    """Add the recipients a DSN or X-Failed-Recipients names; the DSN's first status."""
    status = None
    for recipient, code in evidence.recipients:
        recipients.add(recipient.rpartition(";")[2])
        if status is None and _STATUS_RE.fullmatch(code.strip()):
            status = code.strip()
    for value in headers.get("x-failed-recipients", [])[:_MAX_BOUNCE_RECIPIENTS]:
        for address in decode_8bit(value).split(","):
            recipients.add(address.strip().strip("<>"))
    return status


class _Recipients:
    """The failed recipients of a bounce, in order, lower-cased, without repeats, without
    the bounce's own senders or system addresses, and at most _MAX_BOUNCE_RECIPIENTS."""

    def __init__(self, own: set[str]) -> None:
        self.own = own
        self.found: list[str] = []

    def add(self, address: str) -> None:
        address = address.strip().strip(".").lower()
        if (
            "@" in address
            and address not in self.own
            and address not in self.found
            and len(self.found) < _MAX_BOUNCE_RECIPIENTS
            and _local_part(address) not in _BOUNCE_SENDERS
        ):
            self.found.append(address)


def _automatic_header(headers: dict[str, list[str]]) -> Verdict | None:
    """Auto-Submitted other than "no" (RFC 3834), X-Autoreply and the like, then bulk, junk
    and list mail (Precedence, List-Id, List-Unsubscribe)."""
    auto = first_field(headers, "auto-submitted")
    if auto is not None and _token(auto) != "no":
        return Verdict(True, f"Auto-Submitted: {_reason_text(_token(auto))}", False)
    for name in ("x-autoreply", "x-autorespond"):
        if name in headers:
            return Verdict(True, f"{name.title()} header", False)
    suppress = first_field(headers, "x-auto-response-suppress")
    if suppress is not None:
        tokens = {t.strip().lower() for t in decode_8bit(suppress).split(",")}
        if tokens & {"all", "autoreply", "oof"}:
            return Verdict(True, "X-Auto-Response-Suppress: " + _reason_text(suppress), False)
    precedence = first_field(headers, "precedence")
    if precedence is not None and _token(precedence) in ("bulk", "junk", "list", "auto_reply"):
        return Verdict(True, f"Precedence: {_reason_text(_token(precedence))}", False)
    for name, label in (("list-id", "List-Id"), ("list-unsubscribe", "List-Unsubscribe")):
        if name in headers:
            return Verdict(True, f"mailing list ({label})", False)
    return None


def _automatic_sender(headers: dict[str, list[str]], senders: Iterable[str]) -> Verdict | None:
    """A null sender (``Return-Path: <>``, an empty From) or a system one (mailer-daemon)."""
    return_path = first_field(headers, "return-path")
    from_value = first_field(headers, "from")
    if (return_path is not None and return_path.strip() == "<>") or (
        from_value is None or from_value.strip() in ("", "<>")
    ):
        return Verdict(True, "null sender", False)
    for address in senders:
        local = address.rpartition("@")[0].lower() if "@" in address else address.lower()
        if local in _SYSTEM_LOCAL_PARTS:
            return Verdict(True, f"system sender {local}", False)
    return None
