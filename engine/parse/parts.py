"""The walk over the MIME tree: what each part becomes (the body, the HTML, an attachment).

Every inline text/plain part belongs to the body, in order: phones and Apple Mail interleave
text with images and PDFs (text, image, text, pdf, text), and the body marks where each
attachment sat between two texts (``[attachment: scan.pdf]``). Every inline text/html part
belongs to the HTML the same way. In an alternative only the first version of each kind
counts. A text part that is a file by its headers stays a file, except the only text part of
a message that has no other (``Content-Disposition: inline`` with a file name): that is the
body. Empty text parts without a name are dropped, never kept as 0-byte files. The walk is
iterative: the tree can be as deep as the limits allow.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from email.message import Message
from typing import Final

from engine.errors import LimitExceeded
from engine.parse.attachments import AttachmentList, attached_message_bytes, tnef_files, type_for
from engine.parse.bodies import (
    clean_body,
    html_text_lean,
    payload_bytes,
    render_html,
    sanitize_html,
    text_of,
    unsanitizable,
)
from engine.parse.charsets import decode_8bit_name, decode_text, to_bytes
from engine.parse.headers import (
    Param,
    decode_words,
    msgid,
    one_line,
    param_text,
    parse_params,
    part_fields,
    part_header,
)
from engine.parse.limits import ParseLimits
from engine.parse.mime import MimeTree, raw_payload, scan_boundary
from engine.parse.verdicts import BounceEvidence

# At most this many attachments are marked in the body between two of its texts.
_MAX_MARKS: Final = 1000
_HEADERS_ID_RE: Final = re.compile(rb"^message-id[ \t]*:[ \t]*(<[^<>\s]{1,998}>)", re.I | re.M)
_MAX_HEADERS_READ: Final = 64 * 1024
_MAX_DSN_RECIPIENTS: Final = 100
_EW_CHARSET_RE: Final = re.compile(r"=\?([^?*\s]{1,40})(?:\*[^?]*)?\?[bBqQ]\?")
_CONTENT_TYPE_RE: Final = re.compile(r"[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,128}")

# A part still to visit: the part, its depth (the message is 1), its parent's content type
# and boundary, its index among its parent's parts, and its parent.
_Visit = tuple[Message, int, str | None, str | None, int, Message | None]


class Collector:
    """Accumulates body, html and attachments while walking the tree."""

    def __init__(self, tree: MimeTree, limits: ParseLimits) -> None:
        self.tree = tree
        self.limits = limits
        self.body: str | None = None
        self.html: str | None = None
        # Text after the first part of the body, and HTML after the first part of the HTML,
        # in order (the body's pieces with the markers of the attachments between them).
        self.more_body: list[str] = []
        self.more_html: list[str] = []
        # Names of the attachments met since the last text of the body: marked in the body
        # if more text follows them.
        self.marks: list[str] = []
        # Alternatives (by id) in which a text/plain, a text/html version was taken.
        self.taken: set[tuple[int, str]] = set()
        self._declared: tuple[str, ...] | None = None
        # The first text part that is a file by its name but inline: the body if no other.
        self.inline_file: tuple[int, str, str] | None = None
        self.tnef_body = ""
        self.attachments = AttachmentList()
        self.bounce = False
        # What the parts say about a bounce (see verdicts.BounceEvidence).
        self.returned = False
        self.dsn_recipients: list[tuple[str, str]] = []
        self.original_id: str | None = None
        self.parts = 0
        self.notes: list[str] = []  # what the walk left out of the model (see ParsedMessage)

    def walk(self, root: Message) -> None:
        """Visit every part in document order: multiparts open, the others are leaves."""
        # Iterative: the stdlib tree can be as deep as the limits allow and we never want
        # Python recursion here.
        stack: list[_Visit] = [(root, 1, None, None, 0, None)]
        while stack:
            part, depth, parent_type, parent_boundary, index, parent = stack.pop()
            # Counted like the pre-scan counts delimiters: every part but the root.
            self.parts += depth > 1
            if self.parts > self.limits.max_parts or depth > self.limits.max_depth + 1:
                self._over_limits(depth)
            ctype = part.get_content_type()
            if not _CONTENT_TYPE_RE.fullmatch(ctype):
                # 8-bit or spaced garbage: never let it into a stored content type.
                ctype = "application/octet-stream"
            if ctype.startswith("multipart/") and part.is_multipart():
                stack.extend(reversed(self._children(part, ctype, depth)))
                continue
            group = id(parent) if parent_type == "multipart/alternative" else None
            self.leaf(part, ctype, parent_boundary, index, depth == 1, group)

    def _over_limits(self, depth: int) -> None:
        """Refuse a tree with more parts or levels than the pre-scan let through."""
        if self.parts > self.limits.max_parts:
            raise LimitExceeded(
                f"the message has more than {self.limits.max_parts} MIME parts; the limit "
                f"(max_parts) is {self.limits.max_parts}"
            )
        raise LimitExceeded(
            f"MIME nesting is deeper than {depth - 1} levels; the limit (max_depth) is "
            f"{self.limits.max_depth}"
        )

    def _children(self, part: Message, ctype: str, depth: int) -> list[_Visit]:
        """The parts of the multipart ``part``, to visit in order."""
        payload = raw_payload(part)
        if not isinstance(payload, list):
            return []
        _, params = parse_params(part_header(part, "content-type") or "")
        boundary = scan_boundary(params.get("boundary"))
        return [
            (child, depth + 1, ctype, boundary, i, part)
            for i, child in enumerate(payload)
            if isinstance(child, Message)
        ]

    def leaf(
        self,
        part: Message,
        ctype: str,
        parent_boundary: str | None,
        index: int,
        is_root: bool,
        group: int | None = None,
    ) -> None:
        """A part that is not a multipart: the body, the HTML, or an attachment.

        ``group`` identifies the alternative it is a version in, if any.
        """
        fields = part_fields(part)
        _, ct_params = parse_params(fields.get("content-type", ""))
        disposition, cd_params = parse_params(fields.get("content-disposition", ""))
        name = self._file_name(ct_params, cd_params)
        if ctype.startswith("message/"):
            self._bounce_evidence(part, ctype, b"")
            self.message_part(part, ctype, name, parent_boundary, index, is_root)
            return
        if ctype.startswith("multipart/"):
            ctype = "text/plain"  # a multipart without a usable boundary: its body is text
        cte = fields.get("content-transfer-encoding")
        as_file = disposition == "attachment" or name is not None
        is_text = ctype in ("text/plain", "text/html")
        if is_text and not as_file:
            self._text(part, ctype, ct_params, cte, group)
            return
        data = payload_bytes(part, cte, self.tree)
        self._bounce_evidence(part, ctype, data)
        if ctype == "application/ms-tnef" or (name or "").strip().lower() == "winmail.dat":
            if self._tnef(data, name):
                return
            name = name or "winmail.dat"
        self._attach(fields, ctype, name, (disposition, ct_params), data)

    def _attach(
        self,
        fields: dict[str, str],
        ctype: str,
        name: str | None,
        declared: tuple[str, Mapping[str, Param]],
        data: bytes,
    ) -> None:
        """Keep a leaf as an attachment (inline if it has a Content-ID and is not an
        attachment by its disposition), marked in the body if text follows it. ``declared``
        is its disposition and its Content-Type parameters. An empty text part is dropped;
        a text part inline with a name is remembered (the body if there is no other)."""
        disposition, ct_params = declared
        if ctype.startswith("text/") and name is None and not data.strip():
            return  # an empty text part is nothing: no 0-byte attachment-N.txt
        content_id = msgid(fields.get("content-id"))
        inline = content_id is not None and disposition != "attachment"
        added = self.attachments.add(name, ctype, data, content_id=content_id, inline=inline)
        self._mark(added.name)
        is_text = ctype in ("text/plain", "text/html")
        if is_text and disposition == "inline" and self.inline_file is None:
            charset = param_text(ct_params.get("charset"))
            self.inline_file = (len(self.attachments) - 1, ctype, charset or "")

    def _bounce_evidence(self, part: Message, ctype: str, data: bytes) -> None:
        """Note what a part says about a bounce: a delivery-status report, the returned
        message or its headers (the first one: its Message-ID is the one that bounced)."""
        if ctype == "message/delivery-status":
            self.bounce = True
            self._delivery_status(part)
        elif self.returned:
            return
        elif ctype in ("message/rfc822", "message/global"):
            self.returned = True
            self.original_id = _message_id_of(part)
        elif ctype == "text/rfc822-headers":
            self.returned = True
            m = _HEADERS_ID_RE.search(data[:_MAX_HEADERS_READ])
            self.original_id = msgid(m.group(1).decode("ascii", "replace")) if m else None

    def _file_name(
        self, ct_params: Mapping[str, Param], cd_params: Mapping[str, Param]
    ) -> str | None:
        """The file name a part declares: Content-Disposition's, else Content-Type's.

        A name in raw 8-bit octets without a charset is read as the message's declared
        charsets suggest (see :func:`~engine.parse.charsets.decode_8bit_name`)."""
        param = cd_params.get("filename")
        if param is None:
            param = ct_params.get("name")
        if param is None:
            return None
        if param.data is not None and not param.charset:
            octets: bytes | None = param.data
        elif param.data is None and not param.text.isascii() and "=?" not in param.text:
            octets = to_bytes(param.text)
        else:
            octets = None
        if octets is not None and not octets.isascii():
            return decode_8bit_name(octets, self.declared_charsets())
        return param_text(param, encoded_words=True)

    def declared_charsets(self) -> tuple[str, ...]:
        """The charsets the message declares (text parts, encoded words of the top-level
        Subject, From and To), the most used first; found once, when first needed."""
        if self._declared is None:
            counts: Counter[str] = Counter()
            for name in ("subject", "from", "to"):
                value = part_header(self.tree.root, name) or ""
                counts.update(m.lower() for m in _EW_CHARSET_RE.findall(value[:4096]))
            stack = [self.tree.root]
            seen = 0
            while stack and seen <= self.limits.max_parts:
                part = stack.pop()
                seen += 1
                _, params = parse_params(part_header(part, "content-type") or "")
                charset = param_text(params.get("charset"))
                if charset:
                    counts[charset.strip().lower()] += 1
                payload = raw_payload(part)
                if isinstance(payload, list):
                    stack.extend(p for p in payload if isinstance(p, Message))
            self._declared = tuple(label for label, _ in counts.most_common(8))
        return self._declared

    def _delivery_status(self, part: Message) -> None:
        """Each recipient block of a message/delivery-status part: (recipient, status)."""
        payload = raw_payload(part)
        if not isinstance(payload, list):
            return
        for block in payload[1 : 1 + _MAX_DSN_RECIPIENTS]:  # the first is per-message
            if not isinstance(block, Message):
                continue
            fields = part_fields(block)
            recipient = fields.get("final-recipient") or fields.get("original-recipient")
            if recipient:
                status = fields.get("status", "")
                self.dsn_recipients.append((one_line(recipient)[:400], one_line(status)[:40]))

    def evidence(self) -> BounceEvidence:
        """What the walk found that speaks for a bounce."""
        return BounceEvidence(
            dsn=self.bounce,
            returned=self.returned,
            recipients=tuple(self.dsn_recipients),
            original_id=self.original_id,
        )

    def _mark(self, name: str) -> None:
        """Remember an attachment that sits after some text of the body."""
        if self.body is not None and len(self.marks) < _MAX_MARKS:
            self.marks.append(name)

    def _text(
        self,
        part: Message,
        ctype: str,
        params: Mapping[str, Param],
        cte: str | None,
        group: int | None,
    ) -> None:
        """A text/plain or text/html part that is not a file by its headers: the body or the
        HTML, or more of them; dropped if another version of the same alternative was taken,
        or if it is empty."""
        html = ctype == "text/html"
        if group is not None:
            if (group, ctype) in self.taken:
                return
            self.taken.add((group, ctype))
        text = text_of(part, params, cte, self.tree, html=html)
        if html:
            if self.html is None:
                self.html = text
            elif text.strip():
                self.more_html.append(text)
        elif self.body is None:
            if text.strip():
                self.body = text
        elif text.strip():
            self.more_body.extend(f"[attachment: {name}]" for name in self.marks)
            self.marks.clear()
            self.more_body.append(text)

    def _tnef(self, data: bytes, name: str | None) -> bool:
        """Attach the files inside a winmail.dat; True if they stand for it whole."""
        budget = max(0, self.limits.max_parts - len(self.attachments))
        tnef = tnef_files(data, budget)
        for file_name, content in tnef.files:
            self.attachments.add(file_name, type_for(file_name), content)
        self.tnef_body = self.tnef_body or tnef.body
        if tnef.files and not tnef.complete:
            # Files past the budget, or a rich text body: winmail.dat keeps them all.
            self.notes.append(
                f"{len(tnef.files)} files were taken out of {name or 'winmail.dat'}, which "
                "holds more (more files than max_parts allows, or a formatted body): it is "
                "attached as well."
            )
        return bool(tnef.files) and tnef.complete

    def message_part(
        self,
        part: Message,
        ctype: str,
        name: str | None,
        parent_boundary: str | None,
        index: int,
        is_root: bool,
    ) -> None:
        """An attached message: attached whole, named after its subject if nothing else."""
        data = attached_message_bytes(part, self.tree, parent_boundary, index, is_root)
        force_ext = ".eml" if ctype in ("message/rfc822", "message/global") else None
        if name is None and force_ext:
            name = _subject_of(part)
        self._mark(self.attachments.add(name, ctype, data, force_ext=force_ext).name)

    def body_and_html(self) -> tuple[str, str | None]:
        """The body text and the sanitized HTML, once the walk is done.

        HTML-only mail, or an alternative whose text/plain part is left empty, takes its text
        from the HTML: rendered from the sanitized HTML, so that no script, style or
        javascript: URL shows up in it, or read without a tree from HTML too large to
        sanitize (which is attached instead, and a note says so).
        """
        body = self._body_text()
        markup = self._html_markup()
        self.html = None
        sanitized: str | None = None
        needs_text = body is None or not body.strip()
        why = unsanitizable(markup, self.limits) if markup is not None else None
        if markup is not None and why is not None:
            self.notes.append(self._attach_html(markup, why, needs_text))
            if needs_text:
                body = html_text_lean(markup)
        elif markup is not None:
            sanitized = sanitize_html(markup)
            if needs_text:
                body = render_html(sanitized, self.limits)
        del markup
        body = body or ""
        if not body.strip() and self.tnef_body:
            body = clean_body(self.tnef_body)
        return body, sanitized

    def _body_text(self) -> str | None:
        """The body's pieces joined; the only inline text file if there is no other text."""
        if self.body is None and self.html is None and self.inline_file is not None:
            index, ctype, charset = self.inline_file
            taken = self.attachments.pop(index)
            text = clean_body(decode_text(taken.data, charset or None))
            if ctype == "text/html":
                self.html = text
                return None
            return text
        if not self.more_body or self.body is None:
            return self.body
        *pieces, last = (self.body, *self.more_body)
        return "".join(piece.rstrip("\n") + "\n\n" for piece in pieces) + last.lstrip("\n")

    def _html_markup(self) -> str | None:
        """The HTML's pieces joined."""
        if not self.more_html or self.html is None:
            return self.html
        return "\n".join((self.html, *self.more_html))

    def _attach_html(self, markup: str, why: str, text_from_it: bool) -> str:
        """Keep HTML that cannot be sanitized as an attachment; the note that says so.

        Such an HTML body is not shown, but nothing of it is lost. It is attached in UTF-8
        (the text it was decoded to) with a byte order mark, which browsers take as its
        charset when the file is opened.
        """
        name = self.attachments.add("message.html", "text/html", markup.encode("utf-8-sig")).name
        text = " and the text above is taken from it" if text_from_it else ""
        return (
            f"The HTML version of this message {why}: it is attached as {name} instead of "
            f"being shown{text}."
        )


def _message_id_of(part: Message) -> str | None:
    """The Message-ID of the message attached as ``part``, or None."""
    payload = raw_payload(part)
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return msgid(part_header(payload[0], "message-id"))
    return None


def _subject_of(part: Message) -> str | None:
    """The subject of the message attached as ``part``, decoded to one line, or None."""
    payload = raw_payload(part)
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        subject = part_header(payload[0], "subject")
        if subject is not None:
            # Only as much as a file name can hold is worth decoding.
            return one_line(decode_words(subject[:1024])) or None
    return None
