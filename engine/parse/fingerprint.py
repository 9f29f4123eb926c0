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
    folded = folded_ascii(text) if text.isascii() else folded_unicode(text)
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
    every word (split) joined again, one translate and the runs of spaces made single
    (:func:`_single_spaced`). Held equal to folded_text by tests/test_parse_stage.py."""
    return _single_spaced(text.encode("ascii").translate(_ASCII_FOLD))


def _single_spaced(data: bytes) -> bytes:
    """``data`` with every run of spaces one space, none at either end.

    A split at the double spaces and a join halve every run at once: replace() cost twice
    as much per pass (a count, then the copy), and a search for what is left a third pass.
    Whether a double space is left is known from the pieces: only after a piece that is
    empty or starts with a space (a run of three or more); a piece never ends with a space,
    the split taking the leftmost match."""
    while True:
        pieces = data.split(b"  ")
        data = b" ".join(pieces)
        if not any(not piece or piece[0] == 0x20 for piece in pieces[1:]):
            return data.strip(b" ")


# White space as str.split() knows it beyond ASCII (str.isspace()), and each code point's UTF-8.
_SPACES: Final = (
    "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_UTF8_SPACE_RE: Final = re.compile(b"|".join(re.escape(c.encode("utf-8")) for c in _SPACES))
# The bytes that start the UTF-8 of one of them: a text without any has none of them.
_UTF8_SPACE_LEADS: Final = tuple(sorted({bytes(c.encode("utf-8")[:1]) for c in _SPACES}))
# ASCII white space (as in _ASCII_FOLD) becomes a space.
_ASCII_SPACE: Final = bytes.maketrans(b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f", b"         ")
# Latin-1 casefolded and its white space (\x85 and \xa0 too) a space, in one bytes.translate:
# every Latin-1 character but two folds to one Latin-1 character ("\xb5" and "\xdf" do not).
_LATIN1_UNFOLDED: Final = (b"\xb5", b"\xdf")
_LATIN1_FOLD: Final = bytes(
    0x20 if chr(c).isspace() else ord(chr(c).casefold()) if c not in (0xB5, 0xDF) else c
    for c in range(256)
)


def folded_unicode(text: str) -> bytes:
    """:func:`folded_text` of any ``text``, without its list of every word (str.split) joined
    again: half its CPU time on the non-ASCII texts of the bench mix (half of them), and
    6 % of the instructions of the whole parse of that mix (bench.parse_cost).

    Latin-1 text (French, German, Spanish...) is folded in its Latin-1 octets by one
    bytes.translate and made UTF-8 after; other text is casefolded, made UTF-8 (a lone
    surrogate "?", as folded_text makes it) and its non-ASCII white space found by a regular
    expression on the UTF-8, only if a byte that starts one is there. Held equal to
    folded_text for every code point and on any text by tests/test_parse_stage.py."""
    try:
        latin1 = text.encode("latin-1")
    except UnicodeEncodeError:
        pass
    else:
        if _LATIN1_UNFOLDED[0] not in latin1 and _LATIN1_UNFOLDED[1] not in latin1:
            return _single_spaced(latin1.translate(_LATIN1_FOLD)).decode("latin-1").encode()
    data = text.casefold().encode("utf-8", "replace")
    if any(lead in data for lead in _UTF8_SPACE_LEADS):
        data = _UTF8_SPACE_RE.sub(b" ", data)
    return _single_spaced(data.translate(_ASCII_SPACE))
