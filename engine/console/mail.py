"""What the console shows of a failed message itself: a few of its header fields, decoded,
from the stored ``.eml`` (whose sender name and subject the failure event's text does not
carry whole). Bounded: only the head is read, at most :data:`MAX_HEAD` bytes of it, and each
value is cut to :data:`MAX_VALUE` characters. The page escapes them (hostile text)."""

from __future__ import annotations

from email import message_from_bytes
from email.policy import compat32

from engine.parse.headers import decode_words, one_line

MAX_HEAD = 64 * 1024
MAX_VALUE = 1000
SHOWN = ("From", "To", "Cc", "Subject", "Date", "Message-ID")


def head_fields(raw: bytes) -> list[tuple[str, str]]:
    """(name, decoded one-line value) of the :data:`SHOWN` fields the message has."""
    head = raw[:MAX_HEAD]
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = head.find(sep)
        if end != -1:
            head = head[: end + len(sep)]
            break
    # compat32: the raw values, decoded by the engine's own tolerant decoder below.
    msg = message_from_bytes(head, policy=compat32)
    out = []
    for name in SHOWN:
        value = msg.get(name)
        if value is not None:
            out.append((name, one_line(decode_words(str(value)))[:MAX_VALUE]))
    return out
