"""The MIME structure: the pre-scan and its limits, the MIME tree, and large bodies elided.

* Limits are checked on the raw bytes *before* the stdlib parser sees them
  (:func:`prescan`). The ``email`` feed parser recurses once per MIME level (2,000 nested
  multiparts raise ``RecursionError``), takes seconds for 100,000 parts, and its parameter
  splitter is quadratic in the number of quoted semicolons. A linear scan of the header blocks
  and boundary lines catches all of that in microseconds; MIME source pasted into a body is
  text to it, as to the parser.
* The tree is the feed parser's compat32 ``Message`` tree (see :mod:`engine.parse.headers` for
  why compat32). Fast path: :func:`_split_mime` builds that very tree by slicing the text where
  the shape allows it, and leaves every other shape to the feed parser; a property test holds
  the two equal.
* Memory stays within a few times the message: large leaf bodies are taken from the raw bytes
  instead of the parser's lines (:func:`elide_large_bodies`); a property test holds a parse
  with them elided equal to one without. The parser sees a placeholder for each, and the
  :class:`MimeTree` that :func:`read_mime` returns carries the placeholders' spans with the
  tree: whatever reads a body gets that object as an argument.
"""

from __future__ import annotations

import email
import email.utils
import itertools
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Final, NamedTuple

from engine.errors import LimitExceeded, ParseError
from engine.parse.charsets import refused_label, to_bytes
from engine.parse.headers import Param, parse_params, unfold
from engine.parse.limits import ParseLimits


# Before MimeTree, which names it: mypyc resolves a class annotation of a NamedTuple at
# import, and a later class is not made yet (engine.native).
@dataclass
class Scan:
    """What the pre-scan learned about the MIME structure."""

    # boundary -> [(offset of the "--" of its delimiter line, is the close delimiter)]
    delimiters: dict[str, list[tuple[int, bool]]]
    # boundary -> how many Content-Type fields declare it (spans are trusted only if one)
    declared: dict[str, int]
    bare_cr: bool  # some lines end with a CR alone


class MimeTree(NamedTuple):
    """The MIME tree of one message and what reading its bodies needs; one parse call owns it.

    ``root`` is the compat32 tree the parser built, in which each large leaf body may be a
    placeholder (see :func:`elide_large_bodies`): ``elided`` maps each placeholder to the span
    of ``raw`` it stands for. The tree and its bodies are read only through this object,
    passed as an argument, so that every function reading a body is a pure function of its
    arguments: no context variable or global hands the raw bytes over. (A NamedTuple: one is
    made per message, at a third of a frozen dataclass's cost.)
    """

    raw: bytes  # the message as received
    root: Message
    scan: Scan  # the pre-scan's delimiter offsets, for the exact bytes of attached messages
    root_body: int  # where the top-level body starts
    elided: Mapping[str, tuple[int, int]]  # placeholder -> (start, end) in raw

    def elided_span(self, payload: str) -> tuple[int, int] | None:
        """The span of ``raw`` that a leaf's payload stands for, or None if it is its own."""
        return self.elided.get(payload) if self.elided else None

    def octets(self, payload: str) -> bytes:
        """The raw octets of a leaf's payload, the elided body it stands for included."""
        span = self.elided_span(payload)
        return to_bytes(payload) if span is None else self.raw[span[0] : span[1]]


def read_mime(raw: bytes, limits: ParseLimits) -> MimeTree:
    """The MIME tree of ``raw``, its limits checked on the raw bytes first.

    Raises :class:`LimitExceeded` for a header block over ``max_header_bytes`` and for what
    :func:`prescan` refuses. In a message over 2 MiB, leaf bodies of 256 KiB or more are
    replaced by placeholders before the parser sees them (:func:`elide_large_bodies`); the
    placeholders are trusted only if the parser made each the whole payload of a part of a
    multipart, or of the message (:func:`elision_holds`), else the message is parsed again
    whole. Readers find each placeholder's span in the tree's ``elided``.
    """
    root_body = header_end(raw, limits.max_header_bytes)
    if root_body is None or root_body > limits.max_header_bytes + 4:
        size = "more than " + str(limits.max_header_bytes) if root_body is None else str(root_body)
        raise LimitExceeded(
            f"the header block is {size} bytes; the limit (max_header_bytes) is "
            f"{limits.max_header_bytes}"
        )
    scan = prescan(raw, limits)
    source, spans = elide_large_bodies(raw, scan, root_body)
    # The pre-scan knows already whether the raw bytes have bare CRs (searching for one
    # again cost 3 % of a parse); a copy with placeholders is searched afresh.
    root = mime_tree(source, scan.bare_cr if source is raw else None)
    del source
    if spans and not elision_holds(root, spans):
        spans = {}
        root = mime_tree(raw, scan.bare_cr)
    return MimeTree(raw, root, scan, root_body, spans)


# A blank line; bare CR line ends ("\r\r") count too, as they do for the feed parser, and
# after "\r\r" an LF belongs to the empty line (a bare CR, then a CRLF).
HEADER_END_RE: Final = re.compile(rb"\r?\n\r?\n|\r\r\n?")
# A line the feed parser would not take as a header line ends the header block too.
_NOT_HEADER_LINE_RE: Final = re.compile(rb"^(?!From |[\x21-\x39\x3b-\x7e]*:|[ \t])", re.M)
# One pass finds every Content-Type field (with its continuation lines) and every line that
# starts with "--" (a candidate boundary delimiter), in order. The pattern starts with a
# literal newline rather than "^" so that the regex engine can skip ahead to line ends; the
# first line is matched separately. Where a bare CR ends lines too, as for the feed parser,
# _SCAN_CR_RE starts at either (three times slower): after the CR of a CRLF it finds an LF,
# not a field, and goes on from there.
_SCAN_BODY: Final = rb"(?:content-type[ \t]*:([^\r\n]*(?:(?:\r\n?|\n)[ \t][^\r\n]*)*)|--([^\r\n]*))"
_SCAN_RE: Final = re.compile(rb"\n" + _SCAN_BODY, re.I)
_SCAN_CR_RE: Final = re.compile(rb"[\r\n]" + _SCAN_BODY, re.I)
_SCAN_FIRST_RE: Final = re.compile(_SCAN_BODY, re.I)
_BARE_CR_RE: Final = re.compile(rb"\r(?!\n)")
LINE_END_RE: Final = re.compile(rb"\r\n?|\n")


def header_end(raw: bytes, limit: int) -> int | None:
    """Offset of the body (after the blank line), or None if the header block is too big."""
    if raw.startswith((b"\n", b"\r\n")):
        return raw.index(b"\n") + 1
    if raw.startswith(b"\r"):
        return 1
    window = limit + 4
    end = _blank_line_end(raw, 0, window)
    if end is not None:
        return end
    if len(raw) <= limit:
        return len(raw)
    # Only whole lines inside the window count: a line cut by the window looks like a
    # non-header line to the regex.
    cut = raw.rfind(b"\n", 0, window)
    m = _NOT_HEADER_LINE_RE.search(raw, 0, cut) if cut > 0 else None
    if m is not None:
        return m.start()
    return None


_LF_BLANK_LINE_RE: Final = re.compile(rb"\n\r?\n")


_FIELD_LINE_RE: Final = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_WANTED_FIELD_RE: Final = re.compile(rb"(?:from|subject)[ \t]*:", re.I)


def mend_header_block(raw: bytes, limit: int) -> tuple[bytes, int] | None:
    """``raw`` with each stray line of its header block made a continuation line, and how
    many were; None if there is nothing to mend.

    Some senders continue a long header field on lines that are not indented. The parser
    (ours as the stdlib's) ends the header block at the first such line, and the well-formed
    ``From:`` and ``Subject:`` fields after it become body text. When a ``From:`` or
    ``Subject:`` field follows a stray line inside the header block (up to the first blank
    line, within ``limit`` bytes), every stray line before the last field gets one leading
    space: it then continues the field above it, and the fields after it are read. A message
    whose first line is not a field is never mended (it is not mail, or has no header).
    """
    end = _blank_line_end(raw, 0, limit)
    block = raw[: end if end is not None else min(len(raw), limit)]
    lines = block.splitlines(keepends=True)
    if not lines or not (_FIELD_LINE_RE.match(lines[0]) or lines[0].startswith(b"From ")):
        return None
    last_wanted = max(
        (i for i, line in enumerate(lines) if _WANTED_FIELD_RE.match(line)), default=-1
    )
    mend = [i for i in range(1, max(last_wanted, 1)) if _stray(lines[i])]
    if not mend or len(block) + len(mend) > limit:
        return None
    for i in mend:
        lines[i] = b" " + lines[i]
    return b"".join(lines) + raw[len(block) :], len(mend)


def _stray(line: bytes) -> bool:
    """A line of a header block that is neither a field nor a continuation (nor blank)."""
    return bool(line.strip()) and line[:1] not in b" \t" and not _FIELD_LINE_RE.match(line)


def _blank_line_end(data: bytes, start: int, end: int) -> int | None:
    """``HEADER_END_RE.search(data, start, end).end()``, None if it finds nothing.

    That regular expression starts with an optional character, so its engine tries it at
    every offset of the header block; this one starts with a line end, and the "\r\r" that
    bare CR line ends make is looked for only before the line break found.
    """
    m = _LF_BLANK_LINE_RE.search(data, start, end)
    if m is None:
        cr_cr = data.find(b"\r\r", start, end)
    else:
        first = m.start()
        if first > start and data[first - 1] == 0x0D:
            first -= 1  # the match starts at the CR of a CRLF
        # "\r\r" wins only where it starts before that line break.
        cr_cr = data.find(b"\r\r", start, first + 1)
    if cr_cr < 0:
        return None if m is None else m.end()
    return cr_cr + (3 if data.startswith(b"\n", cr_cr + 2) and cr_cr + 3 <= end else 2)


def prescan(raw: bytes, limits: ParseLimits) -> Scan:
    """Check size-like limits on the raw bytes, before the stdlib parser ever sees them.

    Nesting is followed with a stack: a multipart Content-Type pushes its boundary, a
    ``message/*`` one pushes a level without a boundary, a delimiter line of a boundary on the
    stack pops what was opened inside it. Only the first Content-Type field of a header block
    counts, as for the parser: the message's own, a part's (after a delimiter line) and an
    attached message's (after its part's header block). One pasted into body text (a
    forwarded message shown as text, a text/rfc822-headers part) is text to the parser and
    nests nothing. A header block ends at its blank line; one without a blank line in
    ``max_header_bytes`` reaches as far as the next block, which can only make the check
    stricter than the parser.
    """
    state = _Prescan(raw, limits)
    first = _SCAN_FIRST_RE.match(raw)
    bare_cr = b"\r" in raw and _BARE_CR_RE.search(raw) is not None
    lines = (_SCAN_CR_RE if bare_cr else _SCAN_RE).finditer(raw)
    for m in itertools.chain([first] if first is not None else [], lines):
        field = m.group(1)
        if field is not None:
            state.content_type(field, m.start(1))
        elif state.stack:
            line = m.group(2).decode("ascii", "surrogateescape").rstrip(" \t")
            state.dash_line(line, m.start(2) - 2, m.end(2))
    return Scan(state.delimiters, state.declared, bare_cr)


class _Prescan:
    """What the pre-scan knows at a point of the raw bytes, read in order (see prescan)."""

    def __init__(self, data: bytes, limits: ParseLimits) -> None:
        self.data = data
        self.limits = limits
        self.stack: list[str | None] = []  # the open containers: a boundary, None for message/*
        self.delimiters: dict[str, list[tuple[int, bool]]] = {}
        self.declared: dict[str, int] = {}
        self.digests: set[str] = set()  # boundaries of multipart/digest: parts are messages
        self.parts = 0
        # The header block whose first Content-Type field is still to come, as [start, end).
        self.block_end = _BlockEnds(data, limits.max_header_bytes)
        self.block = (0, self.block_end(0))
        self.typed = False  # the block's Content-Type field was read
        self.attached = False  # the block's type is message/*: an attached message's block follows

    def content_type(self, field: bytes, at: int) -> None:
        """A Content-Type field at offset ``at``: only the first of a header block nests."""
        if self.attached and at >= self.block[1]:
            self._new_block(self.block[1])
        if not self.block[0] <= at < self.block[1]:
            return  # body text
        semicolons = field.count(b";")
        if semicolons > self.limits.max_header_params:
            raise LimitExceeded(
                f"a Content-Type field has {semicolons} parameters; the limit "
                f"(max_header_params) is {self.limits.max_header_params}"
            )
        if self.typed:
            return  # the parser reads the first Content-Type field of a block
        self.typed = True
        ctype, params = parse_params(unfold(field.decode("ascii", "surrogateescape")))
        if ctype.startswith("multipart/"):
            boundary = scan_boundary(params.get("boundary"))
            if boundary is None:
                return
            self.declared[boundary] = self.declared.get(boundary, 0) + 1
            if ctype == "multipart/digest":
                self.digests.add(boundary)
            self._push(boundary)
        elif ctype.startswith("message/"):
            self._push(None)
            self.attached = True

    def dash_line(self, line: str, start: int, end: int) -> None:
        """A line that starts with "--" at ``start`` (its text ``line`` ends at ``end``): a
        delimiter of the innermost open multipart with that boundary, or text."""
        for index in range(len(self.stack) - 1, -1, -1):
            boundary = self.stack[index]
            if boundary is None:
                continue
            if line == boundary:
                self._delimiter(index, boundary, start, end)
                return
            if line == boundary + "--":
                del self.stack[index:]
                self.delimiters.setdefault(boundary, []).append((start, True))
                self.block = (0, 0)  # an epilogue follows: text
                self.typed = self.attached = False
                return

    def _delimiter(self, index: int, boundary: str, start: int, end: int) -> None:
        """A delimiter line: a part of the multipart at ``stack[index]`` starts."""
        del self.stack[index + 1 :]
        self.parts += 1
        if self.parts > self.limits.max_parts:
            raise LimitExceeded(
                f"the message has at least {self.parts} MIME parts; the limit (max_parts) "
                f"is {self.limits.max_parts}"
            )
        self.delimiters.setdefault(boundary, []).append((start, False))
        # The part's header block starts on the next line.
        self._new_block(end + (2 if self.data.startswith(b"\r\n", end) else 1))
        if boundary in self.digests:
            # A message unless its header block says otherwise (and even then: one level too
            # many is only stricter), with a header block of its own next.
            self._push(None)
            self.attached = True

    def _new_block(self, start: int) -> None:
        self.block = (start, self.block_end(start))
        self.typed = self.attached = False

    def _push(self, boundary: str | None) -> None:
        self.stack.append(boundary)
        # The top-level entity is level 1; each container adds one.
        if len(self.stack) > self.limits.max_depth:
            raise LimitExceeded(
                f"MIME nesting reaches at least {len(self.stack)} levels; the limit "
                f"(max_depth) is {self.limits.max_depth}"
            )


class _BlockEnds:
    """Where each header block ends: after its blank line, or, without one in ``window``
    bytes, at the end of the data (an over-long block is header all along).

    Blocks are asked for in order, and no byte is searched twice: a part without a blank line
    would otherwise cost ``window`` bytes of search, 500 parts of them 128 MB.
    """

    def __init__(self, data: bytes, window: int) -> None:
        self.data = data
        self.window = window
        self.searched = (0, 0)  # no blank line starts in there, but the one that ends at found
        self.found: int | None = None

    def __call__(self, start: int) -> int:
        data = self.data
        if data.startswith((b"\n", b"\r"), start):
            return start  # no header fields at all
        low, high = self.searched
        # A blank line is at most 4 bytes ("\r\n\r\n"): a block starting before it ends there.
        if self.found is not None and low <= start < self.found - 4:
            return self.found
        resume = max(start, high - 3) if low <= start <= high else start
        limit = start + self.window
        self.found = _blank_line_end(data, resume, limit)
        low = low if low <= start <= high else start
        self.searched = (low, limit if self.found is None else self.found)
        return len(data) if self.found is None else self.found


def scan_boundary(param: Param | None) -> str | None:
    """The boundary the stdlib will use, as ``Message.get_boundary`` computes it.

    An RFC 2231 boundary (``boundary*=us-ascii''...``) is accepted under any charset label our
    resolver accepts or Python does not know (``ANSI_X3.4-1968`` is US-ASCII's IANA name), as
    long as the stdlib reads it as the same text we do; a label naming a codec we refuse
    (``utf-7``, ``zlib_codec``) fails the message, since the stdlib would run that codec.
    """
    if param is None:
        return None
    if param.data is None:
        return param.text.rstrip()
    text = param.data.decode("latin-1")
    if param.charset and not _stdlib_reads_boundary_as(param.charset, text):
        raise ParseError(
            f"the boundary parameter declares the charset {param.charset[:40]!r}, which "
            "does not read it as ASCII; only ASCII boundaries are accepted"
        )
    return text.rstrip()


def _stdlib_reads_boundary_as(charset: str, text: str) -> bool:
    """True if the label is one we accept (or Python does not know) and the stdlib's
    ``collapse_rfc2231_value`` reads the boundary as ``text``."""
    if refused_label(charset):
        return False
    try:
        return email.utils.collapse_rfc2231_value((charset, "", text)) == text
    except Exception:  # the stdlib would fail on it as well: refuse the message
        return False


# The stdlib feed parser reads every line of a message through a stack of end-of-part predicates
# (a 100 KB attachment is some 1,800 lines of base64) and compiles a regular expression for every
# boundary it meets: a third of the cost of a parse, before the fast paths. _split_mime builds the
# very same compat32 Message tree by slicing the text, looking only at header lines and at lines
# that start with a boundary. It takes the stdlib's own decisions (content types, boundaries,
# header field splitting) from the Message objects it builds, follows the feed parser's rules for
# preambles, epilogues and the line break before a delimiter, and gives up on every shape whose
# handling there is irregular (envelope "From " lines, a continuation line first or a field
# without a name, a multipart without its first delimiter, repeated delimiter lines, an empty last
# part, message/delivery-status, bare CR line ends): the feed parser then parses the message, so
# the fast path only has to be exact on what it accepts.

# What the feed parser takes for a header line (its headerRE), and one header field with its
# continuation lines as its _parse_headers reads it (without the irregular cases).
_FEED_HEADER_LINE_RE: Final = re.compile(r"From |[\041-\071\073-\176]*:|[\t ]")
_FIELD_RE: Final = re.compile(r"([\041-\071\073-\176]+):[ \t]*([^\n]*\n?(?:[\t ][^\n]*\n?)*)")
# The rest of a delimiter line after "--" + boundary (the feed parser's boundaryre).
_DELIMITER_TAIL_RE: Final = re.compile(r"(--)?[ \t]*(?:\r\n|\r|\n)?$")
# Deeper trees are left to the feed parser (the pre-scan bounds the depth anyway).
_SPLIT_MAX_DEPTH: Final = 64


class _Irregular(Exception):
    """The message has a shape the fast path does not handle: the feed parser must parse it."""


def _split_mime(source: bytes) -> Message | None:
    """``email.message_from_bytes(source)`` for the usual shapes of mail, else None.

    ``source`` must not contain bare CR line ends (the feed parser breaks lines there too).
    """
    text = source.decode("ascii", "surrogateescape")
    try:
        return _split_entity(text, 0, len(text), False, False, 0)
    except _Irregular:
        return None


def _strip_eol(text: str) -> str:
    """``text`` without its final line break: RFC 2046 gives it to the next delimiter."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith(("\r", "\n")) else text


class _Entity(Message):
    """A Message the fast path built, whose content type is read once, when its header is
    complete: the split and the walk asked for it again, each time a scan of its fields with
    a lower() per field (7 % of the parse of the realistic mix in cProfile). Nothing changes
    a part's header once it is split; tests/parse/test_mime.py holds the kept type to the
    stdlib's for the feed parser's tree."""

    content_type = ""

    def get_content_type(self) -> str:
        return self.content_type or super().get_content_type()


def _split_entity(
    text: str, start: int, end: int, in_digest: bool, last_in_part: bool, depth: int
) -> Message:
    """The entity at ``text[start:end]``, as the feed parser builds it.

    ``last_in_part`` says that the entity ends a part of a multipart, and that what the feed
    parser created last in it loses the line break before the next delimiter.
    """
    if depth > _SPLIT_MAX_DEPTH:
        raise _Irregular
    msg = _Entity()
    if in_digest:
        msg.set_default_type("message/rfc822")
    body = _split_headers(msg, text, start, end)
    ctype = msg.content_type = Message.get_content_type(msg)
    maintype = ctype.split("/")[0]
    if ctype == "message/delivery-status":
        _split_delivery_status(msg, text, body, end)
    elif maintype == "message":
        msg.attach(_split_entity(text, body, end, False, last_in_part, depth + 1))
    elif maintype == "multipart":
        _split_multipart(msg, text, body, end, depth)
        if last_in_part:
            epilogue = msg.epilogue
            msg.epilogue = None if not epilogue else _strip_eol(epilogue)
    else:
        payload = text[body:end]
        msg.set_payload(_strip_eol(payload) if last_in_part else payload)
    return msg


def _read_fields(msg: Message, text: str, start: int, end: int) -> int:
    """Add the header fields from ``text[start:end]`` to ``msg``; the offset after them."""
    pos = start
    while (m := _FIELD_RE.match(text, pos, end)) is not None:
        # What compat32's header_source_parse makes of the field's lines.
        msg.set_raw(m.group(1), m.group(2).rstrip("\r\n"))
        pos = m.end()
    return pos


def _split_headers(msg: Message, text: str, start: int, end: int) -> int:
    """Add the header fields at ``text[start:end]`` to ``msg``; the offset of the body."""
    pos = _read_fields(msg, text, start, end)
    if pos >= end:
        return end
    if text[pos] in "\r\n":
        newline = text.find("\n", pos, end)
        if newline < 0:
            raise _Irregular  # a bare CR
        return newline + 1  # after the blank line that ends the header block
    if _FEED_HEADER_LINE_RE.match(text, pos, end):
        raise _Irregular  # an envelope "From " line, a field without a name, a continuation
    # Any other line ends the header block and is the first line of the body.
    return pos


def _split_delivery_status(msg: Message, text: str, start: int, end: int) -> None:
    """The body of a message/delivery-status at ``text[start:end]``, as the feed parser
    reads it: each block of fields (up to a blank line) becomes a Message of headers alone.

    Every DSN took the feed parser whole (6 % of the realistic mix, 12 % of its parse time).
    A line that is neither a field nor blank would start a body in its block: irregular.
    """
    pos = start
    while True:
        block = Message()
        msg.attach(block)
        pos = _read_fields(block, text, pos, end)
        block.set_payload("")
        if pos >= end:
            return
        # The feed parser stops a block at a blank line, reads it, then reads one more line:
        # none left ends the body; any other (a blank line too) starts the next block.
        if text.startswith("\n", pos):
            pos += 1
        elif text.startswith("\r\n", pos):
            pos += 2
        else:
            raise _Irregular
        if pos >= end:
            return


def _split_multipart(msg: Message, text: str, start: int, end: int, depth: int) -> None:
    """Preamble, parts and epilogue of the multipart ``msg`` whose body is text[start:end]."""
    boundary = msg.get_boundary()
    if boundary is None or "\n" in boundary or "\r" in boundary:
        raise _Irregular
    delimiters = _delimiter_lines(text, "--" + boundary, start, end)
    if not delimiters or delimiters[0][2]:
        raise _Irregular
    if delimiters[0][0] > start:
        msg.preamble = _strip_eol(text[start : delimiters[0][0]])
    in_digest = msg.get_content_type() == "multipart/digest"
    for index, (_, line_end, close) in enumerate(delimiters):
        if close:
            msg.epilogue = text[line_end:end]
            return
        part_end = delimiters[index + 1][0] if index + 1 < len(delimiters) else end
        if part_end == line_end:
            raise _Irregular  # repeated delimiter lines, or nothing after the last one
        msg.attach(_split_entity(text, line_end, part_end, in_digest, True, depth + 1))


def _delimiter_lines(
    text: str, separator: str, start: int, end: int
) -> list[tuple[int, int, bool]]:
    """(line start, line end, is the close delimiter) of each delimiter line in the range."""
    found: list[tuple[int, int, bool]] = []
    needle = "\n" + separator
    if text.startswith(separator, start, end):
        at = start
    else:
        hit = text.find(needle, start, end)
        at = hit + 1 if hit >= 0 else -1
    while at >= 0:
        newline = text.find("\n", at, end)
        line_end = end if newline < 0 else newline + 1
        m = _DELIMITER_TAIL_RE.match(text, at + len(separator), line_end)
        if m is not None:
            found.append((at, line_end, m.group(1) is not None))
        hit = text.find(needle, line_end - 1, end)
        at = hit + 1 if hit >= 0 else -1
    return found


def mime_tree(source: bytes, bare_cr: bool | None = None) -> Message:
    """The compat32 Message tree of ``source`` (see engine.parse.headers for why compat32).

    ``bare_cr``: whether some CR of ``source`` is not followed by an LF, if known."""
    if bare_cr is None:
        bare_cr = b"\r" in source and _BARE_CR_RE.search(source) is not None
    # The fast path leaves bare CR line ends to the feed parser.
    tree = None if bare_cr else _split_mime(source)
    return tree if tree is not None else email.message_from_bytes(source)


def raw_payload(part: Message) -> object:
    """A part's payload as parsed: text (8-bit octets surrogate-escaped), a list of parts or None.

    Never ``get_payload()``: on 8-bit text it decodes with whatever charset the part
    declares (``utf-7``, ``unicode_escape``...), and the octets are then lost.
    """
    return getattr(part, "_payload", None)


# Large leaf bodies are taken straight from the raw bytes instead of going through the stdlib
# parser, which holds a 20 MB body as text lines, joined text and decoded bytes at once (about
# 8 times the message at its peak). The parser sees a short placeholder instead of each such
# body, and the MimeTree maps each placeholder to the span of the raw bytes it stands for. A
# placeholder is trusted only where the parser made it the whole payload of a part of a
# multipart (or of the whole message): anything else and the message is parsed again without
# elision.
_ELIDE_FROM: Final = 2 * 1024 * 1024
_ELIDE_PART: Final = 256 * 1024
_CT_CONTAINER_RE: Final = re.compile(
    rb"(?:\A|[\r\n])content-type[ \t]*:\s*(?:multipart|message)/", re.I
)


def elide_large_bodies(
    raw: bytes, scan: Scan, root_body: int
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """``raw`` with every large leaf body replaced by a placeholder; the spans by placeholder."""
    if len(raw) <= _ELIDE_FROM:
        return raw, {}
    candidates = _leaf_spans(raw, scan)
    if not candidates and not _CT_CONTAINER_RE.search(raw, 0, root_body):
        candidates = [(root_body, len(raw))]  # a single-part message
    # A body holding a line that starts like a delimiter of any multipart would end a part
    # where the parser reads the raw bytes: never hide such a line from it.
    boundaries = [b.encode("utf-8", "surrogateescape") for b in scan.declared]
    line_start = b"[\r\n]" if scan.bare_cr else b"\n"
    guard = re.compile(line_start + b"--(?:" + b"|".join(map(re.escape, boundaries)) + b")")
    nonce = secrets.token_hex(8)
    pieces: list[bytes] = []
    spans: dict[str, tuple[int, int]] = {}
    last = 0
    for start, end in candidates:
        if end - start < _ELIDE_PART or (boundaries and guard.search(raw, start - 1, end)):
            continue
        marker = f"mailintegration-elided-{nonce}-{len(spans)}"
        spans[marker] = (start, end)
        pieces += [raw[last:start], marker.encode("ascii")]
        last = end
    if not spans:
        return raw, {}
    pieces.append(raw[last:])
    return b"".join(pieces), spans


def _leaf_spans(raw: bytes, scan: Scan) -> list[tuple[int, int]]:
    """(start, end) of the body of every part between two delimiters that may be a leaf."""
    # Boundaries declared twice (an attached message reusing the outer one) are followed too:
    # a span the parser reads otherwise fails elision_holds.
    delimiters = sorted(
        (offset, close) for found in scan.delimiters.values() for offset, close in found
    )
    spans: list[tuple[int, int]] = []
    for (start, close), (end, _) in itertools.pairwise(delimiters):
        if close:
            continue  # an epilogue, not a part
        line_end = LINE_END_RE.search(raw, start, end)
        if line_end is None or raw.startswith((b"\n", b"\r"), line_end.end()):
            continue  # no header block
        head_start = line_end.end()
        body_start = _blank_line_end(raw, head_start, end)
        if body_start is None:
            continue
        # The line end before the next delimiter belongs to that delimiter (RFC 2046).
        body_end = end - 2 if raw[end - 2 : end] == b"\r\n" else end - 1
        if body_end - body_start < _ELIDE_PART:
            continue
        head_end = len(raw[head_start:body_start].rstrip(b"\r\n")) + head_start
        if _CT_CONTAINER_RE.search(raw, head_start - 1, head_end):
            continue
        if _NOT_HEADER_LINE_RE.search(raw, head_start, head_end):
            continue  # the parser's header block ends before the blank line
        spans.append((body_start, body_end))
    return spans


def elision_holds(tree: Message, spans: Mapping[str, tuple[int, int]]) -> bool:
    """True if each placeholder is the whole payload of the message or of a multipart's part."""
    if not isinstance(raw_payload(tree), list):
        return len(spans) == 1 and raw_payload(tree) in spans
    found = 0
    stack = [tree]
    while stack:
        part = stack.pop()
        in_multipart = part.get_content_maintype() == "multipart"
        payload = raw_payload(part)
        for child in payload if isinstance(payload, list) else ():
            if not isinstance(child, Message):
                continue
            child_payload = raw_payload(child)
            if isinstance(child_payload, list):
                stack.append(child)
            elif in_multipart and isinstance(child_payload, str) and child_payload in spans:
                found += 1
    return found == len(spans)
