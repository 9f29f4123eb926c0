"""Bodies: payloads decoded to octets, text parts to text, and HTML sanitized and rendered.

* A payload is never read through ``get_payload()`` (it decodes 8-bit text with whatever
  charset the part declares): :func:`payload_bytes` undoes the transfer encoding of the raw
  octets, or of the span of the raw bytes an elided body stands for.
* HTML kept as the message's HTML is sanitized by nh3 (ammonia); the body's text is rendered
  from the sanitized HTML, so that no script, style or ``javascript:`` URL shows up in it.
  HTML too large or too deep to sanitize is read without a tree.
* Fast paths, each beside what it replaces: :class:`_TextCanvas` renders HTML to the text
  inscriptis gives, for the markup nh3 lets through (tables and odd markup go to inscriptis);
  :func:`html_text_lean` gives nh3's flattening of HTML too large to sanitize without building
  any tree (its docstring says where the two differ). Property tests hold each equal to the
  library.
"""

from __future__ import annotations

import binascii
import functools
import html as html_lib
import quopri
import re
from collections.abc import Iterator, Mapping
from email.message import Message
from typing import Any, Final, NamedTuple, cast

import nh3
from lxml import etree

from engine.parse import inline_images
from engine.parse.charsets import decode_text, to_bytes
from engine.parse.headers import Param
from engine.parse.limits import ParseLimits
from engine.parse.mime import MimeTree, raw_payload
from engine.parse.transfer import UU_ENCODINGS, b64_decode, uu_decode


def payload_bytes(part: Message, cte_field: str | None, tree: MimeTree) -> bytes:
    """The decoded octets of a leaf part (base64, quoted-printable, uuencode or as is).

    ``cte_field`` is the part's raw Content-Transfer-Encoding value (None if absent). Base64
    always goes through :func:`b64_decode`, and a body that :func:`elide_large_bodies` took
    out of the parser's sight is decoded straight from the raw bytes: both give what the
    small path gives for the same part.
    """
    payload = raw_payload(part)
    if not isinstance(payload, str):
        return b""
    cte = (cte_field or "").strip().lower()
    span = tree.elided_span(payload)
    if span is not None:
        raw, (start, end) = tree.raw, span
        if cte == "base64":
            return b64_decode(raw, start, end)
        if cte == "quoted-printable":
            return binascii.a2b_qp(memoryview(raw)[start:end])  # what quopri.decodestring runs
        data = raw[start:end]
    else:
        data = to_bytes(payload)
    if cte == "base64":
        return b64_decode(data)
    if cte == "quoted-printable":
        # The stdlib compares the header without stripping it: "quoted-printable " came
        # back undecoded.
        return quopri.decodestring(data)
    # The stdlib's get_payload(decode=True) for the rest: uuencode where the header says so
    # unstripped, else the octets as they are.
    if str(part.get("content-transfer-encoding", "")).lower() in UU_ENCODINGS:
        try:
            return uu_decode(data)
        except ValueError:
            return data
    return data


def _part_charset(params: Mapping[str, Param]) -> str | None:
    charset = params.get("charset")
    if charset is None:
        return None
    return charset.text if charset.data is None else charset.data.decode("latin-1")


# format=flowed text is undone a chunk of whole lines at a time: splitting a 20 MB body of short
# lines at once makes millions of small strings (about ten times the text).
_UNFLOW_CHUNK: Final = 1 << 20


def _unflow(text: str, delsp: bool, chunk: int = _UNFLOW_CHUNK) -> str:
    """Undo RFC 3676 format=flowed soft line breaks (lines ending in a space are joined).

    ``chunk`` only sets how much text is split into lines at once; the result is the same
    for any value.
    """
    pieces: list[str] = []
    pending: tuple[str, int] | None = None
    for lines in _chunks_of_lines(text, chunk):
        out, pending = _unflow_lines(lines, pending, delsp)
        if out:
            pieces.append("\n".join(out))
    if pending is not None:
        current, depth = pending
        pieces.append(">" * depth + (" " if depth else "") + current)
    return "\n".join(pieces)


def _chunks_of_lines(text: str, chunk: int) -> Iterator[list[str]]:
    """``text.split("\n")``, split ``chunk`` characters (and up to a line end) at a time."""
    pos = 0
    while True:
        cut = text.find("\n", pos + chunk) if pos + chunk < len(text) else -1
        yield (text[pos:] if cut < 0 else text[pos:cut]).split("\n")
        if cut < 0:
            return
        pos = cut + 1


def _unflow_lines(
    lines: list[str], pending: tuple[str, int] | None, delsp: bool
) -> tuple[list[str], tuple[str, int] | None]:
    """The unflowed lines that ``lines`` complete, after the ``pending`` flowed line and its
    quote depth (None if there is none); and the flowed line they leave pending."""
    out: list[str] = []
    current, current_depth = pending if pending is not None else (None, 0)
    for line in lines:
        depth = len(line) - len(line.lstrip(">"))
        content = line[depth:]
        if content.startswith(" "):
            content = content[1:]  # space-stuffing
        flowed = content.endswith(" ") and content != "-- "
        if current is not None and depth == current_depth:
            current += content
        else:
            if current is not None:
                out.append(">" * current_depth + (" " if current_depth else "") + current)
            current, current_depth = content, depth
        if flowed:
            if delsp:
                current = current[:-1]
        else:
            out.append(">" * current_depth + (" " if current_depth else "") + current)
            current = None
    return out, None if current is None else (current, current_depth)


# In multi-line bodies only the controls that are never text are removed.
_BODY_CTRL_RE: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BODY_CTRL_BYTES: Final = bytes([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_CLEAN_CHUNK: Final = 1 << 16  # characters of a non-ASCII body searched for controls at once


def clean_body(text: str) -> str:
    """Body text with LF line ends and without the controls that are never text."""
    if "\r" in text:
        # Each CR, alone or before an LF, is one line end; str.replace makes no list of pieces
        # (the regular expression \r\n? made one per line: ten times a body of short lines).
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        # Deleting the controls from the octets and comparing lengths is 5 times cheaper
        # than searching the text for one (the regular expression tests a character class
        # at every character: 19 us of a 1.7 KiB body), and gives the cleaned text at once.
        data = text.encode("ascii")
        kept = data.translate(None, _BODY_CTRL_BYTES)
        return text if len(kept) == len(data) else kept.decode("ascii")
    # The same for other text, on its UTF-8, where a control is a byte of its own and no
    # other character's bytes are below 0x80 (a lone surrogate too, with surrogatepass):
    # half the cost of the regular expression's search (9 us of a 4 KiB body). A chunk at a
    # time: two copies of a 20 MB body in UTF-8 are more memory than a parse may take.
    for start in range(0, len(text), _CLEAN_CHUNK):
        data = text[start : start + _CLEAN_CHUNK].encode("utf-8", "surrogatepass")
        if len(data.translate(None, _BODY_CTRL_BYTES)) != len(data):
            return _BODY_CTRL_RE.sub("", text)
    return text


def text_of(
    part: Message,
    params: Mapping[str, Param],
    cte_field: str | None,
    tree: MimeTree,
    *,
    html: bool = False,
) -> str:
    """The text of a text part: decoded, cleaned, and format=flowed undone (not for HTML)."""
    data = payload_bytes(part, cte_field, tree)
    charset = _part_charset(params)
    if charset is None and html:
        m = _META_CHARSET_RE.search(data[:4096])
        if m is not None:
            charset = m.group(1).decode("ascii")
    text = decode_text(data, charset)
    del data  # a large body is held as octets and as text, never longer than needed
    text = clean_body(text)
    if not html:
        flowed = params.get("format")
        if flowed is not None and flowed.text.strip().lower() == "flowed":
            delsp = params.get("delsp")
            text = _unflow(text, delsp is not None and delsp.text.strip().lower() == "yes")
    return text


_URL_SCHEMES: Final = frozenset(nh3.ALLOWED_URL_SCHEMES | {"cid"})
# Block elements whose start tag makes html5ever scan the stack of open elements: nesting
# them n deep costs O(n^2) in the sanitizer (100,000 nested <div> take 25 s).
_HTML_BLOCK_TAG_RE: Final = re.compile(
    r"<(/?)(?:address|article|aside|blockquote|center|details|dialog|dir|div|dl|fieldset|"
    r"figcaption|figure|footer|form|h[1-6]|header|hgroup|listing|main|menu|nav|ol|pre|"
    r"search|section|summary|ul)(?=[\s/>])",
    re.I,
)
_META_CHARSET_RE: Final = re.compile(
    rb"<meta[^>]{0,200}?charset\s*=\s*[\"']?([A-Za-z0-9_.:-]{1,40})", re.I
)
# Three line ends or more. Written so, not as \n{3,}, the pattern starts with a literal that
# the regex engine looks for before trying it: \n{3,} was tried at every character (25 us of
# CPU per rendered HTML body, 2 % of the parse of the bench mix, for the same matches).
_BLANK_LINES_RE: Final = re.compile(r"\n\n\n+")


def unsanitizable(markup: str, limits: ParseLimits) -> str | None:
    """Why the sanitizer must not read ``markup`` (its tree takes ~25 times the markup, and
    it is quadratic in the nesting of block elements), or None."""
    if len(markup) > limits.max_html_sanitize_bytes:
        return (
            f"is {len(markup)} characters, over max_html_sanitize_bytes "
            f"({limits.max_html_sanitize_bytes})"
        )
    if markup.count("<") <= limits.max_html_depth:
        return None  # every level takes a start tag: too few tags to nest that deep
    depth = 0
    for m in _HTML_BLOCK_TAG_RE.finditer(markup):
        if m.group(1):
            depth = max(0, depth - 1)
        else:
            depth += 1
            if depth > limits.max_html_depth:
                return f"nests block elements deeper than max_html_depth ({limits.max_html_depth})"
    return None


def sanitize_html(markup: str) -> str:
    """The HTML with scripts, styles, event handlers and unsafe URLs removed (nh3/ammonia)."""
    return nh3.clean(markup, url_schemes=set(_URL_SCHEMES))


def _flatten_html(markup: str) -> str:
    """Plain text of HTML with no layout: the fast fallback for huge or unrenderable HTML."""
    text = html_lib.unescape(nh3.clean(markup, tags=set()))
    return _BLANK_LINES_RE.sub("\n\n", text).strip()


# HTML over max_html_sanitize_bytes never reaches nh3, whose tree takes ~25 times the markup
# (a 20 MB HTML body took 460 MiB to sanitize and as much again to flatten): its text is read
# by html_text_lean instead, which gives nh3's flattening without building any tree. The
# tokens it tells apart, as html5ever's tokenizer does: comments (and the bogus ones a "<!",
# "<?" or "</" that opens no tag makes), end tags and start tags (a quoted attribute value
# may hold a ">"); a "<" that opens none of these is text.
_HTML_ATTRIBUTES: Final = r"""(?:[^>"']++|"[^"]*+"|'[^']*+')*+(?:>|\Z)"""
_HTML_NOT_TAGS: Final = (
    r"<!---?>|<!--.*?(?:--!?>|\Z)|<[!?][^>]*+(?:>|\Z)|</>|</(?=[^A-Za-z>])[^>]*+(?:>|\Z)"
)
_HTML_TOKEN_RE: Final = re.compile(
    rf"{_HTML_NOT_TAGS}|</[A-Za-z][^>]*+(?:>|\Z)|<([A-Za-z][^\s/>]*+){_HTML_ATTRIBUTES}", re.S
)
# Elements whose content the tokenizer reads as text up to their end tag: raw text, text with
# character references (title, textarea), or dropped whole by nh3 (script and style).
_RAW_TEXT_ELEMENTS: Final = frozenset({"xmp", "iframe", "noembed", "noframes", "noscript"})
_ESCAPABLE_TEXT_ELEMENTS: Final = frozenset({"title", "textarea"})
_DROPPED_ELEMENTS: Final = frozenset({"script", "style"})
_TEXT_ELEMENTS: Final = _RAW_TEXT_ELEMENTS | _ESCAPABLE_TEXT_ELEMENTS | _DROPPED_ELEMENTS
# The tree builder drops a line end right after these start tags.
_LEADING_NEWLINE_ELEMENTS: Final = frozenset({"pre", "textarea", "listing"})
# The common case in one regular expression, with no step of Python per tag: every token
# becomes a NUL (which ends a character reference just as the end of a text node does, and
# never occurs in a cleaned body), script and style go with their content, and the line end
# after <pre>, <listing> and <textarea> with their start tag.
_HTML_MARKUP: Final = "|".join(
    [
        _HTML_NOT_TAGS,
        r"</[A-Za-z][^>]*+(?:>|\Z)",
        *(
            # (No group and back reference: with them, Python 3.11's sre gets a group's
            # span wrong inside the repetition of _HTML_RUN_RE, and raises SystemError.)
            rf"<{name}(?=[\s/>]){_HTML_ATTRIBUTES}.*?(?:</{name}(?=[\s/>])[^>]*+(?:>|\Z)|\Z)"
            for name in ("script", "style")
        ),
        rf"<(?:pre|listing|textarea)(?=[\s/>]){_HTML_ATTRIBUTES}\n?",
        rf"<[A-Za-z][^\s/>]*+{_HTML_ATTRIBUTES}",
    ]
)
_HTML_MARKUP_RE: Final = re.compile(_HTML_MARKUP, re.S | re.I)
# re.sub makes a list of every piece before joining them (ten times 20 MB of short pieces):
# the document is read in runs of whole tokens and texts instead, each replaced on its own.
_HTML_RUN_RE: Final = re.compile(rf"(?:[^<]++|{_HTML_MARKUP}|<){{1,4096}}", re.S | re.I)
# What that expression does not read as the tokenizer does: raw text elements (their content
# is neither markup nor character references), and title or textarea content holding a "<".
_HTML_RAW_TEXT_RE: Final = re.compile(
    r"<(?:xmp|iframe|noembed|noframes|noscript|plaintext)(?=[\s/>])", re.I
)
_HTML_ESCAPABLE_TEXT_RE: Final = re.compile(r"<(title|textarea)(?=[\s/>])", re.I)


@functools.lru_cache(maxsize=16)
def _end_tag_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"</{name}(?=[\s/>])[^>]*+(?:>|\Z)", re.I)


def html_text_lean(markup: str) -> str:
    """``_flatten_html(markup)`` (nh3's text of ``markup``) without building a tree.

    A property test holds the two equal on ordinary markup. They differ where html5ever's
    tree builder moves text (text straight inside a <table> goes before it), where nh3 drops
    text that this keeps (inside <svg>, <math> and <template>), and where the tokenizer reads
    odd markup its own way ("<a b"c>").
    """
    if _html_markup_strippable(markup):
        text = _html_text_stripped(markup)
    else:
        text = _html_text_tokens(markup)
    text = _BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()


def _html_markup_strippable(markup: str) -> bool:
    """True if _html_text_stripped reads ``markup`` as the tokenizer does."""
    if _HTML_RAW_TEXT_RE.search(markup):
        return False
    for m in _HTML_ESCAPABLE_TEXT_RE.finditer(markup):
        end = _end_tag_re(m.group(1).lower()).search(markup, m.end())
        if markup.find("<", m.end(), len(markup) if end is None else end.start()) >= 0:
            return False
    return True


def _html_text_stripped(markup: str) -> str:
    """The text of ``markup`` with every token removed at once (see _HTML_MARKUP_RE).

    A run ends before a "<": a character reference never spans two of them.
    """
    out = _Pieces()
    for run in _HTML_RUN_RE.finditer(markup):
        text = _HTML_MARKUP_RE.sub("\x00", run.group())
        out.append(html_lib.unescape(text).replace("\x00", ""))
    return out.join()


# A step of Python per tag costs ~5 us: past this many tags the rest of a document is read
# by _html_text_stripped, which may read raw text elements as markup (their text is in the
# HTML attached whole, see parts.Collector._attach_html).
_HTML_TOKENS_READ: Final = 200_000


def _html_text_tokens(markup: str) -> str:
    """The text of ``markup``, token by token: any markup, a step of Python per tag."""
    out = _Pieces()
    pos = 0
    for _ in range(_HTML_TOKENS_READ):
        m = _HTML_TOKEN_RE.search(markup, pos)
        if m is None:
            break
        if m.start() > pos:
            out.append(html_lib.unescape(markup[pos : m.start()]))
        pos = m.end()
        name = (m.group(1) or "").lower()
        if name in _LEADING_NEWLINE_ELEMENTS and markup.startswith("\n", pos):
            pos += 1
        if name == "plaintext":
            out.append(markup[pos:])
            pos = len(markup)
            break
        if name in _TEXT_ELEMENTS:
            end = _end_tag_re(name).search(markup, pos)
            stop = len(markup) if end is None else end.start()
            if name in _RAW_TEXT_ELEMENTS:
                out.append(markup[pos:stop])
            elif name in _ESCAPABLE_TEXT_ELEMENTS:
                out.append(html_lib.unescape(markup[pos:stop]))
            pos = len(markup) if end is None else end.end()
    else:
        out.append(_html_text_stripped(markup[pos:]))
        return out.join()
    out.append(html_lib.unescape(markup[pos:]))
    return out.join()


class _Pieces:
    """Strings to join, held in joined runs: a list of a million short pieces (the text
    between the tags of 20 MB of HTML) takes ten times their text."""

    _RUN: Final = 4096

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.pieces: list[str] = []

    def append(self, piece: str) -> None:
        self.pieces.append(piece)
        if len(self.pieces) >= self._RUN:
            self.runs.append("".join(self.pieces))
            self.pieces.clear()

    def join(self) -> str:
        self.runs.append("".join(self.pieces))
        self.pieces.clear()
        text = "".join(self.runs)
        self.runs.clear()
        return text


def render_html(markup: str, limits: ParseLimits) -> str:
    """Readable text of an HTML body: paragraphs, lists, links as "[text](url)", inline
    images as "[image: …]" (engine.parse.inline_images)."""
    markup = inline_images.mark(markup)
    if len(markup) <= limits.max_html_render_bytes:
        try:
            text = _html_text(markup)
        except Exception:  # inscriptis/lxml failing on odd markup: use the plain flattening
            text = ""
        text = "\n".join(line.rstrip() for line in text.splitlines())
        text = _BLANK_LINES_RE.sub("\n\n", text).strip()
        if text:
            return text
    # Too big for the layout engine, or lxml gave up (it drops documents nested too deep).
    return _flatten_html(markup)


def _html_text(markup: str) -> str:
    """inscriptis' text of ``markup`` (``get_text`` showing links), computed fast if possible."""
    if "<table" not in markup:  # tables are for inscriptis: spare the walk that would stop
        try:
            return _TextCanvas().render(markup)
        except Exception:  # _Unrenderable, or anything odd: inscriptis decides, as ever
            pass
    # Imported on first use, like tnefparse: only tables and odd markup need it, and every
    # start (the parsing processes' too) would pay ~9 ms for it.
    from inscriptis import get_text  # type: ignore[import-untyped, unused-ignore]
    from inscriptis.model.config import ParserConfig  # type: ignore[import-untyped, unused-ignore]

    return str(get_text(markup, ParserConfig(display_links=True)))


# The layout inscriptis gives each element in its default ("relaxed") CSS profile: block,
# margin before, margin after, left padding, pre-formatted, text prefix and suffix, and
# whether a blank prefix/suffix is dropped inside pre-formatted text. Other tags are inline.
class _Layout(NamedTuple):
    block: bool = False
    margin_before: int = 0
    margin_after: int = 0
    padding: int = 0
    pre: bool = False
    prefix: str = ""
    suffix: str = ""
    limit_affixes: bool = False


_PARAGRAPH: Final = _Layout(True, 1, 1)
_PLAIN_BLOCK: Final = _Layout(True)
_LAYOUTS: Final[dict[str, _Layout]] = {
    **dict.fromkeys(("p", "figure", "h1", "h2", "h3", "h4", "h5", "h6"), _PARAGRAPH),
    **dict.fromkeys(("ul", "ol"), _Layout(True, padding=4)),
    **dict.fromkeys(
        ("li", "address", "article", "aside", "footer", "header", "hgroup", "layer", "main"),
        _PLAIN_BLOCK,
    ),
    **dict.fromkeys(("nav", "figcaption", "blockquote"), _PLAIN_BLOCK),
    "div": _Layout(True, padding=2),
    **dict.fromkeys(("pre", "xmp", "listing", "plaintext"), _Layout(True, pre=True)),
    "q": _Layout(prefix='"', suffix='"'),
    "span": _Layout(prefix=" ", suffix=" ", limit_affixes=True),
}
_INLINE: Final = _Layout()
_UL_BULLETS: Final = ("* ", "+ ", "o ", "- ")
# Elements that inscriptis lays out with machinery this renderer does not reproduce (tables)
# or hides (display: none); nh3 never lets the hidden ones through, tables it does.
_RENDER_ELSEWHERE: Final = frozenset(
    {"table", "tr", "td", "th", "head", "link", "meta", "script", "title", "style"}
)
_RENDER_MAX_DEPTH: Final = 200
# Parsers lock themselves while parsing, so threads can share this one as they share
# lxml.html's own parser (which this is, minus its element classes).
_HTML_PARSER: Final = etree.HTMLParser()


class _Unrenderable(Exception):
    """Markup that _TextCanvas leaves to inscriptis itself."""


class _Box:
    """One open element: its layout and what inscriptis derives for it from its parent."""

    __slots__ = ("block", "bullet", "layout", "pre", "prefix", "previous_margin_after", "suffix")

    def __init__(self, layout: _Layout, parent: _Box | None, bullet: str = "") -> None:
        self.layout = layout
        self.block = layout.block
        self.pre = layout.pre
        self.prefix = layout.prefix
        self.suffix = layout.suffix
        self.bullet = bullet
        self.previous_margin_after = 0
        if parent is not None:
            if layout.limit_affixes and parent.pre:
                if self.prefix.isspace():
                    self.prefix = ""
                if self.suffix.isspace():
                    self.suffix = ""
            if layout.block and parent.block:
                self.previous_margin_after = parent.layout.margin_after


# Every inline element without a prefix or suffix behaves the same whatever its parent.
_PLAIN_INLINE_BOX: Final = _Box(_INLINE, None)


class _TextCanvas:
    """inscriptis' rendering of HTML to text (``get_text`` with ``display_links``), lean.

    The same algorithm as inscriptis' Canvas, Block and Prefix (margins between blocks,
    indentation, list bullets, white-space collapsing, links as "[text](url)"), with its
    layout fixed to the default CSS profile instead of computed per element, for the markup
    nh3 lets through. It raises _Unrenderable for what it does not reproduce: tables, style
    attributes, hidden elements, very deep trees. inscriptis spends most of its time copying
    per-element style objects and collapsing white space one character at a time.
    """

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.margin = 1000
        # The current block (line) being written.
        self.content = ""
        self.collapsable = True
        # The prefix shared by all blocks: indentation and bullets.
        self.consumed = False
        self.padding = 0
        self.paddings: list[int] = []
        self.bullets: list[str] = []
        # Document state.
        self.list_counters: list[str | int] = []
        self.link_target = ""

    # Prefix -------------------------------------------------------------------------------

    def _pop_bullet(self) -> str:
        for index in range(len(self.bullets) - 1, -1, -1):
            bullet = self.bullets[index]
            if bullet:
                self.bullets[index] = ""
                return bullet
        return ""

    def _first_prefix(self) -> str:
        if self.consumed:
            return ""
        self.consumed = True
        bullet = self._pop_bullet()
        return " " * (self.padding - len(bullet)) + bullet

    def _unconsumed_bullet(self) -> str:
        if self.consumed:
            return ""
        bullet = self._pop_bullet()
        if not bullet:
            return ""
        return " " * (self.padding - self.paddings[-1] - len(bullet)) + bullet

    # Block --------------------------------------------------------------------------------

    def _merge(self, text: str, pre: bool) -> None:
        if pre:
            text = self._first_prefix() + text.replace("\n", "\n" + " " * self.padding)
            self.content += html_lib.unescape(text)
            self.collapsable = False
            return
        # Every run of white space becomes one space, and none follows a collapsable one.
        if text.isprintable() and "  " not in text:
            # The only white space is single spaces (all others are unprintable).
            if self.collapsable and text.startswith(" "):
                text = text[1:]
                if not text:
                    return
            self.collapsable = text.endswith(" ")
        elif words := text.split():
            first_is_space, last_is_space = text[0].isspace(), text[-1].isspace()
            text = " ".join(words)
            if first_is_space and not self.collapsable:
                text = " " + text
            if last_is_space:
                text += " "
            self.collapsable = last_is_space
        elif self.collapsable:
            return
        else:
            text = " "
            self.collapsable = True
        if not self.content:
            text = self._first_prefix() + text
        self.content += html_lib.unescape(text)

    def _new_block(self) -> None:
        self.consumed = False
        self.content = ""
        self.collapsable = True

    # Canvas -------------------------------------------------------------------------------

    def _flush_inline(self) -> bool:
        # inscriptis reads the block's text twice here, and each read drops one trailing
        # space when the block ends in collapsable white space.
        content = self.content
        if self.collapsable and content.endswith(" "):
            content = content[:-1]
        if not content:
            self.content = content
            return False
        if self.collapsable and content.endswith(" "):
            content = content[:-1]
        self.blocks.append(content)
        self._new_block()
        self.margin = 0
        return True

    def _write_unconsumed_bullet(self) -> None:
        bullet = self._unconsumed_bullet()
        if bullet:
            self.blocks.append(bullet)
            self._new_block()
            self.margin = 0

    def _open_block(self, box: _Box) -> None:
        if not self._flush_inline() and box.bullet:
            self._write_unconsumed_bullet()
        padding = box.layout.padding
        self.padding += padding
        self.paddings.append(padding)
        self.bullets.append(box.bullet)
        required = max(box.previous_margin_after, box.layout.margin_before)
        if required > self.margin:
            self.blocks.append("\n" * (required - self.margin - 1))
            self.margin = required

    def _close_block(self, box: _Box) -> None:
        if not self._flush_inline() and box.bullet:
            self._write_unconsumed_bullet()
        if self.paddings:
            self.padding -= self.paddings.pop()
            del self.bullets[-1]
        margin_after = box.layout.margin_after
        if margin_after > self.margin:
            self.blocks.append("\n" * (margin_after - self.margin - 1))
            self.margin = margin_after

    def _write_newline(self) -> None:
        if not self._flush_inline():
            self.blocks.append("")
            self._new_block()

    # Tree walk ----------------------------------------------------------------------------

    def render(self, markup: str) -> str:
        """The text of ``markup``; raises _Unrenderable where inscriptis must decide."""
        content = markup.strip()
        if not content:
            return ""
        if content.startswith("<?xml "):
            raise _Unrenderable  # inscriptis strips the declaration first
        # lxml.html's document_fromstring, minus its Python element classes (a third of
        # the parse time), which this walk does not need.
        root = etree.fromstring(content, _HTML_PARSER)
        if root is None:
            raise _Unrenderable  # inscriptis parses such a document again as <pre>
        self._element(root, _Box(_INLINE, None), 0)  # inscriptis' <body> style, above <html>
        self._flush_inline()
        return "\n".join(self.blocks)

    def _element(self, element: etree._Element, parent: _Box, depth: int) -> None:
        """Render ``element``: its start, its text and children, its end, then its tail."""
        # lxml's stubs say str, but a comment's or a processing instruction's tag is the
        # factory that makes one. Read through Any: compiled (engine.native), the stub's type
        # would be checked, and refuse it.
        tag: object = cast(Any, element).tag
        if not isinstance(tag, str):
            self._not_element(tag, element, parent)
            return
        if (
            depth > _RENDER_MAX_DEPTH
            or tag in _RENDER_ELSEWHERE
            or element.get("style") is not None
        ):
            raise _Unrenderable
        box = self._start(element, tag, parent)
        text = element.text
        if text:
            self._merge(box.prefix + text + box.suffix, box.pre)
        for child in element:
            self._element(child, box, depth + 1)
        # The end (inline here: every element of a document comes this way).
        if tag == "a":
            if self.link_target:
                self._merge(f"]({self.link_target})", False)
        elif tag == "ul" or tag == "ol":
            self.list_counters.pop()
        if box.block:
            self._close_block(box)
        tail = element.tail
        if tail:
            self._merge(parent.prefix + tail + parent.suffix, parent.pre)

    def _not_element(self, tag: object, node: etree._Element, parent: _Box) -> None:
        """A comment or processing instruction (``tag`` is a factory): only a comment's tail
        is text."""
        if tag is etree.Comment and node.tail:
            self._merge(node.tail, parent.pre)

    def _start(self, element: etree._Element, tag: str, parent: _Box) -> _Box:
        """What an element's start does (a link's "[", a line break, a list's counter, a
        block's margin); the element's box."""
        if tag == "li":
            box = self._list_item(element, parent)
        else:
            layout = _LAYOUTS.get(tag)
            box = _PLAIN_INLINE_BOX if layout is None else _Box(layout, parent)
        if tag == "a":
            self.link_target = element.get("href", "")
            if self.link_target:
                self._merge("[", False)
        elif tag == "br":
            self._write_newline()
        elif tag == "ul":
            self.list_counters.append(_UL_BULLETS[len(self.list_counters) % len(_UL_BULLETS)])
        elif tag == "ol":
            self.list_counters.append(1)
        if box.block:
            self._open_block(box)
        return box

    def _list_item(self, element: etree._Element, parent: _Box) -> _Box:
        """The box of an <li>: a block whose bullet is its list's next number or sign."""
        if element.get("value") is not None:
            raise _Unrenderable
        counter = self.list_counters[-1] if self.list_counters else "* "
        if isinstance(counter, int):
            self.list_counters[-1] = counter + 1
            return _Box(_PLAIN_BLOCK, parent, f"{counter}. ")
        return _Box(_PLAIN_BLOCK, parent, counter)
