"""Who a forwarded message came from first (issue 20): the sender named by the forwarded
block of an agent's "Fwd:", so that the customer, not the agent, is the requester.

A message is a forward when its subject starts with a forward prefix (``Fwd:``, ``Fw:``,
``TR:``, ``WG:``, ``RV:``, ``VS:``, ``Doorst:``, ``ENC:``; never ``AW:``, German for a reply) or its
body opens a block that only forwards write ("---------- Forwarded message ---------",
"Begin forwarded message:", "Weitergeleitete Nachricht", "Message transféré"). The original
sender is then, first match wins:

1. the ``From`` of a forwarded message attached whole (``message/rfc822``);
2. the first ``From:`` (``De :``, ``Von:``, ``Van:``, ``Da:``) line of the first forwarded
   or quoted block in the body: the Gmail and Apple Mail forward blocks, Outlook's
   "-----Original Message-----" separator, or Outlook's bare "From: … Sent: …" header block.

Pure and bounded (the first :data:`MAX_SCAN` characters of the body, the first 64 KiB of an
attached message); the address is checked for shape and returned lower-case.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable
from typing import Final

from engine.model import Attachment

MAX_SCAN: Final = 65_536

_FORWARD_SUBJECT = re.compile(
    r"^\s*(?:\[[^\]]{0,40}\]\s*)?(?:fwd?|tr|wg|rv|vs|doorst|enc)\s*(?:\[\d+\])?\s*:", re.I
)
_FORWARD_BLOCK = re.compile(
    r"^[\s>]*(?:-{2,}\s*(?:Forwarded message|Mensaje reenviado|Message transféré|"
    r"Weitergeleitete Nachricht|Doorgestuurd bericht|Messaggio inoltrato)\s*-{2,}|"
    r"Begin forwarded message:|Anfang der weitergeleiteten Nachricht:|"
    r"Début du message réexpédié :?)",
    re.I | re.M,
)
_ORIGINAL_BLOCK = re.compile(
    r"^[\s>]*-{2,}\s*(?:Original Message|Message d'origine|Ursprüngliche Nachricht|"
    r"Mensaje original|Oorspronkelijk bericht)\s*-{2,}",
    re.I | re.M,
)
_FROM_LINE = re.compile(r"^[\s>*]*(?:From|De|Von|Van|Da)\s*:\s*\**\s*([^\r\n]{1,400})", re.I | re.M)
_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-]{1,64}@[A-Za-z0-9.\-]{1,253}\.[A-Za-z]{2,63}"
)
_BRACKETED = re.compile(r"[<\[]\s*(?:mailto:)?([^<>\[\]\s]{3,320})\s*[>\]]")


def is_forward(subject: str, body: str) -> bool:
    """Whether the message forwards another (its subject's prefix, or a forward block)."""
    return bool(_FORWARD_SUBJECT.match(subject)) or bool(_FORWARD_BLOCK.search(body[:MAX_SCAN]))


def _address(text: str) -> tuple[str, str] | None:
    """(display name, address) from a ``From:`` line's value, or None."""
    bracketed = _BRACKETED.search(text)
    candidate = bracketed.group(1) if bracketed else text
    m = _ADDRESS.search(candidate)
    if m is None:
        return None
    name = text[: bracketed.start()] if bracketed else ""
    name = " ".join(name.replace('"', " ").replace("*", " ").split())[:200]
    return name, m.group(0).lower()


def _attached(attachments: Iterable[Attachment]) -> tuple[str, str] | None:
    for a in attachments:
        if a.content_type != "message/rfc822":
            continue
        head = a.data[:MAX_SCAN].split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
        m = re.search(
            rb"^From:[ \t]*([^\r\n]{1,400}(?:\r?\n[ \t][^\r\n]{1,400}){0,3})", head, re.I | re.M
        )
        if m is None:
            continue
        value = m.group(1).decode("utf-8", "replace").replace("\r", "").replace("\n", "")
        name, addr = email.utils.parseaddr(value)
        if _ADDRESS.fullmatch(addr or ""):
            return " ".join(name.split())[:200], addr.lower()
    return None


def original_sender(
    subject: str, body: str, attachments: Iterable[Attachment]
) -> tuple[str, str] | None:
    """(name, address) of the forwarded message's sender, or None: not a forward, or no
    sender found in it."""
    text = body[:MAX_SCAN]
    if not is_forward(subject, text):
        return None
    found = _attached(attachments)
    if found is not None:
        return found
    starts = [m.end() for m in (_FORWARD_BLOCK.search(text), _ORIGINAL_BLOCK.search(text)) if m]
    start = min(starts) if starts else 0
    for m in _FROM_LINE.finditer(text, start):
        sender = _address(m.group(1))
        if sender is not None:
            return sender
    return None
