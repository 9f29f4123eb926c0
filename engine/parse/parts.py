"""The walk over the MIME tree: what each part becomes (the body, the HTML, an attachment).

The first text/plain part is the body and the first text/html part the HTML; other versions
of the same text in an alternative are dropped unless every version would be, other parts
are attachments. The walk is iterative: the tree can be as deep as the limits allow.
"""

from __future__ import annotations

import re
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
        self.tnef_body = ""
        self.attachments = AttachmentList()
        self.bounce = False
        self.parts = 0
        self.notes: list[str] = []  # what the walk left out of the model (see ParsedMessage)
        # Alternatives whose text is kept as a file (see alternatives): one version kept yet?
        self.secondary: dict[int, bool] = {}

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
            self.leaf(part, ctype, parent_type, parent_boundary, index, depth == 1, group)

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
        children: list[_Visit] = [
            (child, depth + 1, ctype, boundary, i, part)
            for i, child in enumerate(payload)
            if isinstance(child, Message)
        ]
        if ctype == "multipart/alternative":
            self.alternatives(part, [child for child, *_ in children])
        return children

    def alternatives(self, part: Message, children: list[Message]) -> None:
        """Note an alternative whose text versions would all be dropped as body and HTML are
        taken already (a second alternative in a mixed part): one of them is kept as a file."""
        html_child = any(c.get_content_type() == "text/html" for c in children)
        if self.body is not None and (self.html is not None or not html_child):
            self.secondary[id(part)] = False

    def leaf(
        self,
        part: Message,
        ctype: str,
        parent_type: str | None,
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
        name = _file_name(ct_params, cd_params)
        if ctype.startswith("message/"):
            if ctype == "message/delivery-status":
                self.bounce = True
            self.message_part(part, ctype, name, parent_boundary, index, is_root)
            return
        if ctype.startswith("multipart/"):
            ctype = "text/plain"  # a multipart without a usable boundary: its body is text
        cte = fields.get("content-transfer-encoding")
        as_file = disposition == "attachment" or name is not None
        is_text = ctype in ("text/plain", "text/html")
        if is_text and not as_file and self._text(part, ctype, ct_params, cte, parent_type, group):
            return
        data = payload_bytes(part, cte, self.tree)
        if ctype == "application/ms-tnef" or (name or "").strip().lower() == "winmail.dat":
            if self._tnef(data, name):
                return
            name = name or "winmail.dat"
        content_id = msgid(fields.get("content-id"))
        inline = content_id is not None and disposition != "attachment"
        self.attachments.add(name, ctype, data, content_id=content_id, inline=inline)

    def _text(
        self,
        part: Message,
        ctype: str,
        params: Mapping[str, Param],
        cte: str | None,
        parent_type: str | None,
        group: int | None,
    ) -> bool:
        """A text/plain or text/html part that is not a file by its headers: True if it is
        taken as the body or the HTML, or dropped as another version of them; False if it is
        to be kept as a file."""
        if group in self.secondary:
            if self.secondary[group]:
                return True  # another version of the same text is kept
            self.secondary[group] = True
            return False
        if ctype == "text/plain":
            if self.body is None:
                self.body = text_of(part, params, cte, self.tree)
                return True
        elif self.html is None:
            self.html = text_of(part, params, cte, self.tree, html=True)
            return True
        return parent_type == "multipart/alternative"

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
        self.attachments.add(name, ctype, data, force_ext=force_ext)

    def body_and_html(self) -> tuple[str, str | None]:
        """The body text and the sanitized HTML, once the walk is done.

        HTML-only mail, or an alternative whose text/plain part is left empty, takes its text
        from the HTML: rendered from the sanitized HTML, so that no script, style or
        javascript: URL shows up in it, or read without a tree from HTML too large to
        sanitize (which is attached instead, and a note says so).
        """
        body = self.body
        markup, self.html = self.html, None
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


def _file_name(ct_params: Mapping[str, Param], cd_params: Mapping[str, Param]) -> str | None:
    """The file name a part declares: Content-Disposition's, else Content-Type's."""
    name = param_text(cd_params.get("filename"), encoded_words=True)
    if name is None:
        name = param_text(ct_params.get("name"), encoded_words=True)
    return name


def _subject_of(part: Message) -> str | None:
    """The subject of the message attached as ``part``, decoded to one line, or None."""
    payload = raw_payload(part)
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        subject = part_header(payload[0], "subject")
        if subject is not None:
            # Only as much as a file name can hold is worth decoding.
            return one_line(decode_words(subject[:1024])) or None
    return None
