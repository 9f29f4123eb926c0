"""The flood fingerprint of a message (engine.processors.intake): a digest of what it says.

Computed by the parse stage, which runs beside the writer (in a parsing process or thread),
and carried on :attr:`~engine.model.ParsedMessage.fingerprint`: folding and hashing the first
8 KiB of every body was the largest single cost of the single writer's own Python (py-spy,
realistic mix: 2.9 % of every busy sample, a third of Writer.apply's), and the writer's
event loop is the one serial stage of the pipeline.

The fingerprint is stored and compared across messages: its value for a text never changes.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

# Reply and forward prefixes, in the languages mail clients write them in.
_PREFIX: Final = re.compile(r"^\s*(?:(?:re|fwd?|aw|wg|tr|rv|sv|vs)\s*(?:\[\d+\])?\s*:\s*)+", re.I)
BODY_CHARS: Final = 8192
"""How much of the body the fingerprint reads: enough to tell texts apart, bounded."""


def fingerprint(subject: str, body: str) -> str:
    """A digest of what a message says (its subject without reply prefixes, and the first
    :data:`BODY_CHARS` of its body, white space and case folded): the same text from many
    senders gives the same fingerprint."""
    subject = _PREFIX.sub("", subject)
    text = f"{subject}\n{body[:BODY_CHARS]}"
    folded = folded_ascii(text) if text.isascii() else folded_text(text)
    return hashlib.sha256(folded).hexdigest()


def folded_text(text: str) -> bytes:
    """What the fingerprint hashes of ``text``: case folded, every run of white space one
    space, none at either end, UTF-8 (a lone surrogate as "?"). The definition."""
    return " ".join(text.casefold().split()).encode("utf-8", "replace")


# ASCII white space as str.split() knows it (\x1c-\x1f too, which bytes.split() does not)
# becomes a space, and upper case lower case, in one bytes.translate.
_ASCII_FOLD: Final = bytes.maketrans(
    b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1fABCDEFGHIJKLMNOPQRSTUVWXYZ",
    b"         abcdefghijklmnopqrstuvwxyz",
)


def folded_ascii(text: str) -> bytes:
    """:func:`folded_text` of an ASCII ``text``, 13 % fewer instructions per fingerprint
    (callgrind, both corpus mixes): casefold() of ASCII is lower(), and instead of a list of
    every word (split) joined again, one translate and a replace of double spaces (once per
    doubling of the longest run; prose has runs of two). Held equal to folded_text by
    tests/test_parse_stage.py."""
    data = text.encode("ascii").translate(_ASCII_FOLD)
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data.strip(b" ")
