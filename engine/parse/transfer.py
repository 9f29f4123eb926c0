"""Content-Transfer-Encodings undone: one base64 decoder for every path, and uudecoding.

Base64 has one decoder, :func:`b64_decode`, for bodies (parsed or taken from the raw bytes),
encoded words and attached messages alike: it reads joined padded blobs whole where binascii
and the stdlib stop at the first padding. :func:`uu_decode` gives the stdlib's uudecoding
without its list of every line (a fast path: a property test holds the two equal).
Quoted-printable is the stdlib's (``quopri``/``binascii.a2b_qp``).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from typing import Final

_B64_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# Everything but the alphabet and "=": removed before the general decoding.
_B64_NOISE: Final = bytes(sorted(set(range(256)) - set(_B64_ALPHABET + b"=")))
_B64_DATA_RE: Final = re.compile(rb"[A-Za-z0-9+/]")
_B64_PADDING_RE: Final = re.compile(rb"=+")
# Each run of padding costs a step of Python: past this many, the rest of a body is decoded
# as one blob (no real part joins that many files; a text mislabelled base64 may hold as many
# "=" as it likes).
_B64_MAX_PADDING_RUNS: Final = 100_000


def b64_decode(data: bytes, start: int = 0, end: int | None = None) -> bytes:
    """The octets of the base64 text ``data[start:end]``: the one decoder of every path.

    Characters outside the alphabet (line ends, spaces, junk) are skipped. Padding that
    completes a quantum ends a blob, and decoding goes on with the next one: two encoded files
    joined in one part (some scanners append one) both come out whole, where
    ``binascii.a2b_base64`` and the stdlib's ``get_payload(decode=True)`` stop at the first
    padding and drop the rest. Padding that cannot end a blob (after 0 or 1 characters of a
    quantum) is ignored; a blob's unpadded last quantum is decoded as if padded, and a lone last
    character, which holds no whole octet, is dropped. It never fails.
    """
    stop = len(data) if end is None else end
    first_pad = data.find(b"=", start, stop)
    if first_pad < 0 or _B64_DATA_RE.search(data, first_pad, stop) is None:
        # One blob, padded at most at its end: binascii decodes it in place, without a copy
        # of the text, and gives what _b64_blobs gives whenever it succeeds.
        try:
            return binascii.a2b_base64(memoryview(data)[start:stop])
        except binascii.Error:
            pass  # an unpadded or cut last quantum
    return _b64_blobs(data[start:stop].translate(None, _B64_NOISE))


def _b64_blobs(text: bytes) -> bytes:
    """Decode ``text`` (alphabet and "=" only) blob by blob, as :func:`b64_decode` says."""
    view = memoryview(text)
    out: list[bytes] = []
    blob: list[memoryview] = []
    count = 0  # characters of the alphabet in the current blob
    pos = 0
    for runs, m in enumerate(_B64_PADDING_RE.finditer(text)):
        if runs == _B64_MAX_PADDING_RUNS:
            view = memoryview(text[pos:].replace(b"=", b""))
            pos = 0
            break
        blob.append(view[pos : m.start()])
        count += m.start() - pos
        pos = m.end()
        if count % 4 >= 2:
            _b64_blob(blob, count, out)
            blob, count = [], 0
    blob.append(view[pos:])
    _b64_blob(blob, count + len(view) - pos, out)
    return b"".join(out)


def _b64_blob(pieces: list[memoryview], count: int, out: list[bytes]) -> None:
    """Append the octets of one blob (its alphabet characters, in ``pieces``) to ``out``."""
    text: memoryview | bytes = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    whole = count - count % 4
    out.append(binascii.a2b_base64(text[:whole]))
    tail = bytes(text[whole:count])
    if len(tail) >= 2:
        out.append(binascii.a2b_base64(tail + b"=" * (4 - len(tail))))


UU_ENCODINGS: Final = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})


# Lines are split a chunk at a time: splitting 20 MB of uuencoded text at once makes a list of
# 330,000 lines (about twice the text, and as much again for the decoded lines).
_LINES_CHUNK: Final = 1 << 20
_LINE_END_RE: Final = re.compile(rb"\r\n?|\n")


def uu_decode(data: bytes, chunk: int = _LINES_CHUNK) -> bytes:
    """``email.message._decode_uu(data)``, lean: the same octets, or the same ValueError."""
    lines = _lines(data, chunk)
    for line in lines:
        if line.startswith(b"begin "):
            mode = line.removeprefix(b"begin ").partition(b" ")[0]
            try:
                int(mode, base=8)
            except ValueError:
                continue
            break
    else:
        raise ValueError("`begin` line not found")
    runs: list[bytes] = []
    decoded: list[bytes] = []
    for line in lines:
        if not line:
            raise ValueError("Truncated input")
        if line.strip(b" \t\r\n\f") == b"end":
            break
        try:
            decoded.append(binascii.a2b_uu(line))
        except binascii.Error:
            # The stdlib's workaround for broken uuencoders (by Fredrik Lundh).
            decoded.append(binascii.a2b_uu(line[: (((line[0] - 32) & 63) * 4 + 5) // 3]))
        if len(decoded) >= 4096:
            runs.append(b"".join(decoded))
            decoded.clear()
    runs.append(b"".join(decoded))
    return b"".join(runs)


def _lines(data: bytes, chunk: int) -> Iterator[bytes]:
    """``data.splitlines()``, split ``chunk`` bytes (and up to a line end) at a time."""
    pos = 0
    while pos < len(data):
        end = _LINE_END_RE.search(data, pos + chunk) if pos + chunk < len(data) else None
        stop = len(data) if end is None else end.end()
        yield from data[pos:stop].splitlines()
        pos = stop
