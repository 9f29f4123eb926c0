"""What a bounce says: the status, the recipients that failed and the Message-ID of the
message that bounced. Read from the bytes after the bounce's own header block: a
``message/delivery-status`` part (RFC 3464: ``Final-Recipient``, ``Status``), the original
message or its headers (``text/rfc822-headers``, ``message/rfc822``), or the text of a plain
bounce (Postfix's ``<addr>: ... said: 550 5.1.1 ...``, Exim's and Exchange's address lines
with an enhanced status code, the quoted original headers).

Pure and bounded: at most :data:`MAX_SCAN` bytes are read and :data:`MAX_RECIPIENTS`
recipients kept; every value is checked (an address or msg-id shape, ASCII) before it is
returned, since it is received text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

MAX_SCAN: Final = 262_144
MAX_RECIPIENTS: Final = 20

_ADDRESS = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-]{1,64}@[A-Za-z0-9.\-]{1,253}"
_BODY_START = re.compile(rb"\r?\n\r?\n")
_FINAL = re.compile(
    rb"^(?:Final|Original)-Recipient:\s*rfc822\s*;\s*<?(" + _ADDRESS + rb")>?", re.I | re.M
)
_STATUS = re.compile(rb"^Status:\s*([245]\.\d{1,3}\.\d{1,3})\b", re.I | re.M)
_ACTION = re.compile(rb"^Action:\s*(failed|delayed|delivered|relayed|expanded)\b", re.I | re.M)
_DIAGNOSTIC = re.compile(rb"^Diagnostic-Code:\s*([^\r\n]{1,300})", re.I | re.M)
_ORIGINAL_ID = re.compile(rb"^Message-ID:\s*<([^<>\s]{1,250}@[^<>\s]{1,250})>", re.I | re.M)
# A line of a plain bounce naming an address and an enhanced status code, either way round.
_PLAIN_LINE = re.compile(
    rb"^[^\r\n]{0,200}?<?(" + _ADDRESS + rb")>?[^\r\n]{0,400}?\b([245]\.\d{1,3}\.\d{1,3})\b",
    re.M,
)
_PLAIN_CODE = re.compile(rb"\b(5\d\d)[ -]([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass(frozen=True)
class Bounce:
    """``status``: the enhanced status code (``5.1.1``), or None if none was found;
    ``recipients``: the addresses that failed (lower-case); ``original_message_id``: the
    Message-ID of the message that bounced, without angle brackets."""

    status: str | None
    recipients: tuple[str, ...]
    original_message_id: str | None
    diagnostic: str | None = None

    @property
    def permanent(self) -> bool:
        """A permanent failure (5.x.x): the address will not take mail."""
        return self.status is not None and self.status.startswith("5.")


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")


def _report_status(body: bytes) -> str | None:
    """The Status of an RFC 3464 report; a delivered/relayed/expanded action is no failure."""
    status_m = _STATUS.search(body)
    status = _text(status_m.group(1)) if status_m else None
    action = _ACTION.search(body)
    if action is not None and action.group(1).lower() in (b"delivered", b"relayed", b"expanded"):
        status = status if status and not status.startswith("5.") else "2.0.0"
    return status


def _plain(body: bytes, status: str | None) -> tuple[dict[str, None], str | None]:
    """A plain bounce's recipients (lines with an address and a status code) and status."""
    recipients: dict[str, None] = {}
    for m in _PLAIN_LINE.finditer(body):
        recipients[_text(m.group(1)).lower().rstrip(".")] = None
        status = status or _text(m.group(2))
        if len(recipients) >= MAX_RECIPIENTS:
            break
    if status is None and (code := _PLAIN_CODE.search(body)) is not None:
        status = _text(code.group(2))
    return recipients, status


def read(raw: bytes) -> Bounce:
    """What the bounce ``raw`` says (see the module's docstring)."""
    head_end = _BODY_START.search(raw, 0, MAX_SCAN)
    body = raw[head_end.end() : MAX_SCAN] if head_end else b""
    recipients: dict[str, None] = {}
    for m in _FINAL.finditer(body):
        recipients[_text(m.group(1)).lower().rstrip(".")] = None
    status: str | None = _report_status(body)
    diagnostic_m = _DIAGNOSTIC.search(body)
    diagnostic = _text(diagnostic_m.group(1)).strip() if diagnostic_m else None
    if not recipients:
        recipients, status = _plain(body, status)
    elif status is None:
        status = _plain(body, status)[1]
    ids = _ORIGINAL_ID.findall(body)
    original = _text(ids[0]) if ids else None
    return Bounce(
        status=status,
        recipients=tuple(list(recipients)[:MAX_RECIPIENTS]),
        original_message_id=original,
        diagnostic=diagnostic,
    )
