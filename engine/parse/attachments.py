"""Attachments: safe file names and types, attached messages as their exact bytes, and the
files inside a TNEF winmail.dat.

* A name comes from the sender and is hostile: :func:`safe_filename` keeps only what is safe
  to create as a file on POSIX and Windows.
* An attached message (``message/*``) is kept as the exact bytes it had in the message,
  found from the pre-scan's delimiter offsets; only where those are ambiguous is it rebuilt
  from the tree, header lines as they were.
* tnefparse trusts the counts in its data; :func:`_tnef_safe` follows the structure first and
  refuses what tnefparse could not read in time linear in its size.
"""

from __future__ import annotations

import mimetypes
import quopri
import re
import unicodedata
from email.message import Message
from typing import Final, NamedTuple

from engine.model import Attachment
from engine.parse.charsets import decode_undeclared, to_bytes
from engine.parse.headers import parse_params, part_header
from engine.parse.mime import (
    HEADER_END_RE,
    LINE_END_RE,
    MimeTree,
    Scan,
    raw_payload,
    scan_boundary,
)
from engine.parse.transfer import b64_decode

_RESERVED_NAMES: Final = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{device}{n}" for device in ("COM", "LPT") for n in "123456789¹²³"}
)
_SEPARATORS_RE: Final = re.compile(r"[/\\]")
_MAX_NAME_INPUT: Final = 4096
# Characters that Windows refuses in a name (the separators are handled before).
_WINDOWS_ILLEGAL_RE: Final = re.compile(r'[<>:"|?*]')
_MAX_NAME_BYTES: Final = 150
_MAX_EXT_CHARS: Final = 16


def _strip_name_junk(name: str) -> str:
    """Replace characters that are never part of a sane file name by "_".

    Control characters (NUL included), Unicode format characters (bidi overrides such as
    U+202E disguise "exe" as "txt"), line/paragraph separators and lone surrogates (not
    encodable to UTF-8) all go.
    """
    return "".join(
        "_" if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") else ch for ch in name
    )


def _truncate_utf8(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")


def safe_filename(name: str | None, fallback: str) -> str:
    """A name safe to create as a file on POSIX and Windows, derived from a sender's ``name``.

    Only the last path component is kept (``/`` and ``\\`` both separate), so ``..``
    components and drive letters cannot lead anywhere; control, format and Windows-illegal
    characters become ``_``; leading dots and spaces and trailing dots and spaces are removed;
    reserved Windows device names (``CON``, ``NUL``, ``COM1``..., with or without extension)
    get a ``_`` prefix; the result is at most 150 UTF-8 bytes, keeping the extension. When
    nothing usable is left, ``fallback`` (sanitized the same way) is returned, and
    ``"attachment"`` if even that is empty.
    """
    for candidate in (name, fallback):
        if not candidate:
            continue
        cleaned = _clean_name(candidate)
        if cleaned:
            return cleaned
    return "attachment"


def _clean_name(name: str) -> str:
    if len(name) > _MAX_NAME_INPUT:
        # Keep the head and the tail: the tail holds the last path component and extension.
        name = name[: _MAX_NAME_INPUT // 2] + name[-256:]
    text = unicodedata.normalize("NFC", name)
    text = _strip_name_junk(text)
    text = _SEPARATORS_RE.split(text)[-1]
    text = _WINDOWS_ILLEGAL_RE.sub("_", text)
    text = text.strip(" .")
    if not text.strip("_ "):
        return ""
    stem, dot, ext = text.rpartition(".")
    if not dot or not stem or len(ext) > _MAX_EXT_CHARS or " " in ext:
        stem, ext = text, ""
    if ext:
        ext = "." + ext
    if stem.split(".", 1)[0].rstrip(" ").upper() in _RESERVED_NAMES:
        stem = "_" + stem
    room = _MAX_NAME_BYTES - len(ext.encode("utf-8"))
    stem = _truncate_utf8(stem, room).rstrip(" .")
    if not stem:
        return ""
    return stem + ext


_PREFERRED_EXTENSIONS: Final = {
    "application/octet-stream": ".bin",
    "application/ms-tnef": ".dat",
    "application/pdf": ".pdf",
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "text/rfc822-headers": ".txt",
    "message/rfc822": ".eml",
    "message/global": ".eml",
    "message/delivery-status": ".txt",
    "message/disposition-notification": ".txt",
}


def _invert(types_map: dict[str, str]) -> dict[str, str]:
    inverted: dict[str, str] = {}
    for extension, content_type in types_map.items():
        inverted.setdefault(content_type, extension)
    return inverted


# mimetypes' built-in tables, read once: guess_type()/guess_extension() would load the
# system's mime.types files on first use, and this module does no I/O.
_TYPES_BY_EXTENSION: Final = dict(mimetypes.types_map)
_EXTENSIONS_BY_TYPE: Final = _invert(_TYPES_BY_EXTENSION)


def type_for(name: str | None) -> str:
    """The content type a file name's extension suggests (mimetypes' built-in table)."""
    if name and "." in name:
        return _TYPES_BY_EXTENSION.get(
            "." + name.rpartition(".")[2].lower(), "application/octet-stream"
        )
    return "application/octet-stream"


def _extension_for(content_type: str) -> str:
    return _PREFERRED_EXTENSIONS.get(content_type) or _EXTENSIONS_BY_TYPE.get(content_type, ".bin")


class AttachmentList:
    """The attachments of one message in order, each under a safe name no other one has."""

    def __init__(self) -> None:
        self.items: list[Attachment] = []
        self.seen_names: set[str] = set()
        self.next_copy: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(
        self,
        name: str | None,
        content_type: str,
        data: bytes,
        *,
        content_id: str | None = None,
        inline: bool = False,
        force_ext: str | None = None,
    ) -> Attachment:
        """Attach ``data`` under ``name`` made safe and unique (``attachment-N.ext`` if none)."""
        number = len(self.items) + 1
        fallback = f"attachment-{number}{_extension_for(content_type)}"
        safe = safe_filename(name, fallback)
        if force_ext and not safe.lower().endswith(force_ext):
            safe = safe_filename(safe + force_ext, fallback)
        attachment = Attachment(
            name=self._unique(safe),
            content_type=content_type,
            data=data,
            inline=inline,
            content_id=content_id,
        )
        self.items.append(attachment)
        return attachment

    def pop(self, index: int) -> Attachment:
        """Take the attachment at ``index`` out again (its name becomes free)."""
        attachment = self.items.pop(index)
        self.seen_names.discard(attachment.name.lower())
        return attachment

    def _unique(self, name: str) -> str:
        """``name``, or ``name (2)``... if an earlier attachment has it (in any case).

        Case-insensitive because Windows and macOS file systems are: two attachments must
        never be saved over each other.
        """
        key = name.lower()
        if key not in self.seen_names:
            self.seen_names.add(key)
            return name
        stem, dot, ext = name.rpartition(".")
        if not dot or not stem:
            stem, ext = name, ""
        suffix = "." + ext if ext else ""
        # Counting on from the last copy keeps 500 attachments of one name linear; the stem
        # is shortened first so that the 150-byte cap never cuts the " (k)" marker off.
        k = self.next_copy.get(key, 2)
        for _ in range(len(self.seen_names) + 1):
            marker = f" ({k}){suffix}"
            room = _MAX_NAME_BYTES - len(marker.encode("utf-8"))
            candidate = safe_filename(_truncate_utf8(stem, room).rstrip(" .") + marker, name)
            k += 1
            if candidate.lower() not in self.seen_names:
                break
        self.next_copy[key] = k
        self.seen_names.add(candidate.lower())
        return candidate


def _span_body(raw: bytes, start: int, end: int) -> bytes:
    """Body of the entity raw[start:end]: what follows its header block."""
    if raw.startswith(b"\r\n", start):
        return raw[start + 2 : end]
    if raw.startswith((b"\n", b"\r"), start):
        return raw[start + 1 : end]
    m = HEADER_END_RE.search(raw, start, end)
    return raw[m.end() : end] if m is not None else b""


def attached_message_bytes(
    part: Message, tree: MimeTree, parent_boundary: str | None, index: int, is_root: bool
) -> bytes:
    """The bytes of an attached message (a ``message/*`` part), transfer encoding undone.

    They are the exact bytes it had in the message where the pre-scan's offsets find them
    (``part`` is the ``index``-th child of the multipart with ``parent_boundary``, or the
    message itself), else rebuilt from the tree.
    """
    raw = tree.raw
    exact = _exact_message_bytes(
        raw, tree.scan, parent_boundary, index, tree.root_body if is_root else None
    )
    if exact is None or not _looks_like(exact, part):
        exact = _serialize(part, b"\r\n" if b"\r\n" in raw[:4096] else b"\n", tree)
    cte = (part_header(part, "content-transfer-encoding") or "").strip().lower()
    # message/* may only be 7bit/8bit/binary, but some mailers base64 it anyway.
    if cte == "base64":
        return b64_decode(exact)
    if cte == "quoted-printable":
        return quopri.decodestring(exact)
    return exact


def _exact_message_bytes(
    raw: bytes, scan: Scan, parent_boundary: str | None, index: int, root_body: int | None
) -> bytes | None:
    """The bytes of the ``index``-th child of the multipart with ``parent_boundary``.

    For the top-level entity (``root_body`` given) it is everything after the header block.
    Found from the delimiter offsets of the pre-scan, and trusted only when the boundary is
    declared once (two multiparts sharing a boundary make the offsets ambiguous).
    """
    if root_body is not None:
        return raw[root_body:]
    if parent_boundary is None or scan.declared.get(parent_boundary) != 1:
        return None
    marks = scan.delimiters.get(parent_boundary, [])
    opens = [i for i, (_, close) in enumerate(marks) if not close]
    if index >= len(opens):
        return None
    here = opens[index]
    line_end = LINE_END_RE.search(raw, marks[here][0])
    if line_end is None:
        return None
    start = line_end.end()
    if here + 1 < len(marks):
        end = marks[here + 1][0]
        # The line break before a delimiter belongs to the delimiter (RFC 2046 5.1.1).
        if raw[end - 2 : end] == b"\r\n":
            end -= 2
        elif raw[end - 1 : end] in (b"\n", b"\r"):
            end -= 1
    else:
        end = len(raw)
    return _span_body(raw, start, max(start, end))


def _rebuild(entity: Message, linesep: bytes, tree: MimeTree) -> bytes:
    """Bytes of a parsed entity rebuilt from its raw header lines and payloads.

    Used when the exact span of an attached message is unknown. Unlike ``as_bytes()`` it
    never refolds or re-encodes a header (compat32 folding is slow on long headers and
    rewrites them), so the result differs from the original only in line ends.
    """
    out = [
        to_bytes(name)
        + b": "
        + to_bytes(value).replace(b"\r\n", b"\n").replace(b"\n", linesep)
        + linesep
        for name, value in entity.raw_items()
    ]
    out.append(linesep)
    payload = raw_payload(entity)
    if isinstance(payload, str):
        out.append(tree.octets(payload))
    elif isinstance(payload, list):
        children = [c for c in payload if isinstance(c, Message)]
        if entity.get_content_maintype() == "multipart":
            _, params = parse_params(part_header(entity, "content-type") or "")
            boundary = to_bytes(scan_boundary(params.get("boundary")) or "")
            if entity.preamble:
                out += [to_bytes(entity.preamble), linesep]
            for child in children:
                out += [b"--", boundary, linesep, _rebuild(child, linesep, tree), linesep]
            out += [b"--", boundary, b"--", linesep]
            if entity.epilogue:
                out.append(to_bytes(entity.epilogue))
        else:
            out.append(linesep.join(_rebuild(child, linesep, tree) for child in children))
    return b"".join(out)


def _serialize(part: Message, linesep: bytes, tree: MimeTree) -> bytes:
    """Fallback bytes of a message/* part when its exact span is unknown."""
    payload = raw_payload(part)
    if not isinstance(payload, list):
        return tree.octets(payload) if isinstance(payload, str) else b""
    return linesep.join(_rebuild(sub, linesep, tree) for sub in payload if isinstance(sub, Message))


def _looks_like(data: bytes, part: Message) -> bool:
    """Sanity check of a span: it starts with the first header of the parsed message."""
    payload = raw_payload(part)
    if not isinstance(payload, list) or not payload or not isinstance(payload[0], Message):
        return True
    keys = payload[0].keys()
    if not keys:
        return True
    head = data.lstrip()[: len(keys[0]) + 1].decode("ascii", "replace").lower()
    return head == keys[0].lower() + ":"


_TNEF_SIGNATURE: Final = 0x223E9F78
_IMESSAGE_SIG: Final = b"\x07\x03\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46"
_TNEF_MAX_OBJECTS: Final = 4096
_TNEF_MAX_PROPERTIES: Final = 100_000
_TNEF_MAX_DEPTH: Final = 2
_FIXED_MAPI_SIZES: Final = {
    0x0001: 0,
    0x0002: 2,
    0x000B: 2,
    0x0003: 4,
    0x0004: 4,
    0x000A: 4,
    0x0005: 8,
    0x0006: 8,
    0x0007: 8,
    0x0014: 8,
    0x0040: 8,
    0x0048: 16,
}
_VARIABLE_MAPI_TYPES: Final = frozenset({0x0000, 0x000D, 0x001E, 0x001F, 0x0102})


_STOPPED: Final = -1


class _TnefBudget:
    """Counts what tnefparse will do, so that hostile input is refused before it runs."""

    def __init__(self) -> None:
        self.properties = 0


def _u16(data: bytes, offset: int) -> int | None:
    return int.from_bytes(data[offset : offset + 2], "little") if offset + 2 <= len(data) else None


def _u32(data: bytes, offset: int) -> int | None:
    return int.from_bytes(data[offset : offset + 4], "little") if offset + 4 <= len(data) else None


def _mapi_walk(data: bytes, offset: int, depth: int, budget: _TnefBudget) -> int | None:
    """Walk a MAPI property list as tnefparse's ``decode_mapi`` will.

    Returns the offset after the list, ``_STOPPED`` where ``decode_mapi`` stops on an error of
    its own (harmless: it catches it), or None if the list is unsafe. tnefparse trusts the
    counts in the data: a property count of 4 billion past the end of the buffer spins (and
    logs) 4 billion times. We accept only counts the remaining bytes can hold, charge every
    value to the budget, and refuse anything we cannot follow exactly.
    """
    walk = _MapiWalk(data, offset, depth, budget)
    try:
        walk.properties()
    except _MapiStops:
        return _STOPPED
    except _MapiUnsafe:
        return None
    return walk.offset


class _MapiStops(Exception):
    """``decode_mapi`` stops here on an error of its own, and catches it."""


class _MapiUnsafe(Exception):
    """``decode_mapi`` would spin, recurse or allocate out of proportion here: refuse."""


class _MapiWalk:
    """A cursor over a MAPI property list, moved as ``decode_mapi`` moves through it."""

    def __init__(self, data: bytes, offset: int, depth: int, budget: _TnefBudget) -> None:
        self.data = data
        self.offset = offset
        self.depth = depth
        self.budget = budget

    def properties(self) -> None:
        """The property count, then each property."""
        count = _u32(self.data, self.offset)
        if count is None:
            raise _MapiUnsafe
        self.offset += 4
        self._room_for(count, 4)
        for _ in range(count):
            self._property()

    def _property(self) -> None:
        """One property: its type and id, its name if it is named, then its values."""
        self._charge(1)
        attr_type = _u16(self.data, self.offset)
        attr_name = _u16(self.data, self.offset + 2)
        if attr_type is None or attr_name is None:
            # decode_mapi spins through the remaining count past the end: refuse.
            raise _MapiUnsafe
        self.offset += 4
        if attr_name >= 0x8000:
            self._skip_name()
        values: int | None = None
        if attr_type & 0x1000:
            attr_type ^= 0x1000
            values = self._read_u32()
            self.offset += 4
            self._charge(values)
            self._room_for(values, 2)
        for _ in range(values or 1):
            self._value(attr_type, attr_name, values)
        if (values or 1) % 2 and attr_type in (0x0002, 0x000B):
            self.offset += 2

    def _skip_name(self) -> None:
        """A named property's name: a GUID and a kind, then a number or a padded string."""
        kind = self._read_u32(16)
        self.offset += 20
        if kind == 0:
            self.offset += 4
        else:
            length = self._read_u32()
            self.offset += 4 + length + (-length % 4)

    def _value(self, attr_type: int, attr_name: int, values: int | None) -> None:
        """One value of a property (a variable-size one may hold several items)."""
        if attr_type in _FIXED_MAPI_SIZES:
            self.offset += _FIXED_MAPI_SIZES[attr_type]
            return
        if attr_type not in _VARIABLE_MAPI_TYPES:
            raise _MapiStops  # decode_mapi raises ValueError on the type and stops
        items = 1
        if not values:
            items = self._read_u32()
            self.offset += 4
            self._charge(items)
            self._room_for(items, 4)
        chunks: list[bytes] = []
        for _ in range(items):
            length = self._read_u32()
            self.offset += 4
            padded = length + (-length % 4)
            if attr_name == 0x3701:
                chunks.append(self.data[self.offset : self.offset + padded].rstrip(b"\x00"))
            self.offset += padded
        if chunks:
            self._embedded(b"".join(chunks))

    def _embedded(self, item: bytes) -> None:
        """An attached Outlook item: tnefparse decodes it as a nested TNEF."""
        if item.startswith(_IMESSAGE_SIG) and not _tnef_safe(
            item[len(_IMESSAGE_SIG) :], self.depth + 1, self.budget
        ):
            raise _MapiUnsafe

    def _read_u32(self, ahead: int = 0) -> int:
        value = _u32(self.data, self.offset + ahead)
        if value is None:
            raise _MapiStops  # decode_mapi reads past the end of its data and stops
        return value

    def _charge(self, count: int) -> None:
        self.budget.properties += count
        if self.budget.properties > _TNEF_MAX_PROPERTIES:
            raise _MapiUnsafe

    def _room_for(self, count: int, size: int) -> None:
        """Refuse a count of ``size``-byte items that the remaining bytes cannot hold."""
        if count > (len(self.data) - self.offset) // size + 1:
            raise _MapiUnsafe


def _tnef_safe(data: bytes, depth: int, budget: _TnefBudget) -> bool:
    """True if tnefparse can decode ``data`` in time linear in its size."""
    n = len(data)
    if depth > _TNEF_MAX_DEPTH or _u32(data, 0) != _TNEF_SIGNATURE:
        return False
    offset = 6
    objects = 0
    copied = 0
    while offset + 12 < n:
        objects += 1
        # tnefparse slices the rest of the buffer for every object: bound that copying.
        copied += n - offset
        if objects > _TNEF_MAX_OBJECTS or copied > 64 * n + (16 << 20):
            return False
        name = _u16(data, offset + 1)
        size = _u32(data, offset + 5)
        if name is None or size is None:
            return False
        length = min(n - offset, size + 11)
        body = data[offset + 9 : offset + length - 2]
        if name in (0x9003, 0x9005):
            if _mapi_walk(body, 0, depth, budget) is None:
                return False
        elif name == 0x9004 and not _recipient_rows_safe(body, depth, budget):
            return False
        offset += length
    return True


def _recipient_rows_safe(body: bytes, depth: int, budget: _TnefBudget) -> bool:
    """Recipient rows: each row continues where the previous one ended, so every row must be
    followed exactly."""
    rows = _u32(body, 0)
    if rows is None or rows > len(body) // 4:
        return False
    position = 4
    for _ in range(rows):
        after = _mapi_walk(body, position, depth, budget)
        if after is None or after == _STOPPED:
            return False
        position = after
    return True


class TnefContent(NamedTuple):
    """What a winmail.dat yields: its files, its plain text body, and whether that is all."""

    files: list[tuple[str | None, bytes]]
    body: str
    complete: bool  # no file over the budget or without data, no RTF or HTML body


def tnef_files(data: bytes, max_files: int) -> TnefContent:
    """The files inside a winmail.dat and its body text; no files when it cannot be read.

    When it holds more than that (files past ``max_files``, an RTF or HTML body, which are
    not rendered here), it is not complete: the caller keeps winmail.dat itself as well.
    """
    if not _tnef_safe(data, 0, _TnefBudget()):
        return TnefContent([], "", False)
    from tnefparse.tnef import TNEF  # type: ignore[import-untyped, unused-ignore]

    try:
        tnef = TNEF(data, do_checksum=False)
        files: list[tuple[str | None, bytes]] = []
        complete = len(tnef.attachments) <= max_files and not (tnef.htmlbody or tnef._rtfbody)
        for item in tnef.attachments[:max_files]:
            content = item.data
            if not isinstance(content, bytes):
                complete = False
                continue
            try:
                title = item.long_filename()
            except Exception:  # undecodable name: the file is still worth keeping
                title = None
            if isinstance(title, bytes):
                title = decode_undeclared(title)
            files.append((title if isinstance(title, str) else None, content))
        body = tnef.body
        if isinstance(body, bytes):
            body = decode_undeclared(body)
        return TnefContent(files, body if isinstance(body, str) else "", complete)
    except Exception:  # any failure inside tnefparse: keep winmail.dat itself
        return TnefContent([], "", False)
