"""The walk over the MIME tree: what each part becomes (the body, the HTML, an attachment).

The first text/plain part is the body and the first text/html part the HTML; other versions
of the same text in an alternative are dropped unless every version would be, other parts
are attachments. The walk is iterative: the tree can be as deep as the limits allow.
"""

from __future__ import annotations

import quopri
import re
from email.message import Message
from typing import Final

from engine.errors import LimitExceeded
from engine.model import Attachment
from engine.parse.attachments import (
    MAX_NAME_BYTES,
    exact_message_bytes,
    extension_for,
    looks_like,
    safe_filename,
    serialize,
    tnef_files,
    truncate_utf8,
    type_for,
)
from engine.parse.bodies import payload_bytes, text_of
from engine.parse.headers import (
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
from engine.parse.transfer import b64_decode

_CONTENT_TYPE_RE: Final = re.compile(r"[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,128}")


class Collector:
    """Accumulates body, html and attachments while walking the tree."""

    def __init__(self, tree: MimeTree, limits: ParseLimits) -> None:
        self.tree = tree
        self.limits = limits
        self.body: str | None = None
        self.html: str | None = None
        self.tnef_body = ""
        self.attachments: list[Attachment] = []
        self.seen_names: set[str] = set()
        self.next_copy: dict[str, int] = {}
        self.bounce = False
        self.parts = 0
        self.notes: list[str] = []  # what the walk left out of the model (see ParsedMessage)
        # Alternatives whose text is kept as a file (see alternatives): one version kept yet?
        self.secondary: dict[int, bool] = {}

    def add(
        self,
        name: str | None,
        content_type: str,
        data: bytes,
        *,
        content_id: str | None = None,
        inline: bool = False,
        force_ext: str | None = None,
    ) -> None:
        number = len(self.attachments) + 1
        fallback = f"attachment-{number}{extension_for(content_type)}"
        safe = safe_filename(name, fallback)
        if force_ext and not safe.lower().endswith(force_ext):
            safe = safe_filename(safe + force_ext, fallback)
        self.attachments.append(
            Attachment(
                name=self._unique(safe),
                content_type=content_type,
                data=data,
                inline=inline,
                content_id=content_id,
            )
        )

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
            room = MAX_NAME_BYTES - len(marker.encode("utf-8"))
            candidate = safe_filename(truncate_utf8(stem, room).rstrip(" .") + marker, name)
            k += 1
            if candidate.lower() not in self.seen_names:
                break
        self.next_copy[key] = k
        self.seen_names.add(candidate.lower())
        return candidate

    def walk(self, root: Message) -> None:
        # Iterative, in document order: the stdlib tree can be as deep as the limits allow
        # and we never want Python recursion here.
        stack: list[tuple[Message, int, str | None, str | None, int, Message | None]] = [
            (root, 1, None, None, 0, None)
        ]
        while stack:
            part, depth, parent_type, parent_boundary, index, parent = stack.pop()
            # Counted like the pre-scan counts delimiters: every part but the root.
            self.parts += depth > 1
            if self.parts > self.limits.max_parts:
                raise LimitExceeded(
                    f"the message has more than {self.limits.max_parts} MIME parts; the limit "
                    f"(max_parts) is {self.limits.max_parts}"
                )
            if depth > self.limits.max_depth + 1:
                raise LimitExceeded(
                    f"MIME nesting is deeper than {depth - 1} levels; the limit (max_depth) is "
                    f"{self.limits.max_depth}"
                )
            ctype = part.get_content_type()
            if not _CONTENT_TYPE_RE.fullmatch(ctype):
                # 8-bit or spaced garbage: never let it into a stored content type.
                ctype = "application/octet-stream"
            if ctype.startswith("multipart/") and part.is_multipart():
                payload = raw_payload(part)
                if isinstance(payload, list):
                    _, params = parse_params(part_header(part, "content-type") or "")
                    boundary = scan_boundary(params.get("boundary"))
                    children = [
                        (child, depth + 1, ctype, boundary, i, part)
                        for i, child in enumerate(payload)
                        if isinstance(child, Message)
                    ]
                    if ctype == "multipart/alternative":
                        self.alternatives(part, [child for child, *_ in children])
                    stack.extend(reversed(children))
                continue
            group = id(parent) if parent_type == "multipart/alternative" else None
            self.leaf(part, ctype, parent_type, parent_boundary, index, depth == 1, group)

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
        fields = part_fields(part)
        _, ct_params = parse_params(fields.get("content-type", ""))
        disposition, cd_params = parse_params(fields.get("content-disposition", ""))
        name = param_text(cd_params.get("filename"), encoded_words=True)
        if name is None:
            name = param_text(ct_params.get("name"), encoded_words=True)
        content_id = msgid(fields.get("content-id"))
        cte = fields.get("content-transfer-encoding")
        as_file = disposition == "attachment" or name is not None
        maintype = ctype.split("/", 1)[0]

        if maintype == "message":
            if ctype == "message/delivery-status":
                self.bounce = True
            self.message_part(part, ctype, name, parent_boundary, index, is_root)
            return
        if ctype.startswith("multipart/"):
            ctype = "text/plain"  # a multipart without a usable boundary: its body is text
        if group in self.secondary and ctype in ("text/plain", "text/html") and not as_file:
            if self.secondary[group]:
                return  # another version of the same text is kept
            self.secondary[group] = True
            as_file = True
        if ctype == "text/plain" and not as_file:
            if self.body is None:
                self.body = text_of(part, ct_params, cte, self.tree)
                return
            if parent_type == "multipart/alternative":
                return
        if ctype == "text/html" and not as_file:
            if self.html is None:
                self.html = text_of(part, ct_params, cte, self.tree, html=True)
                return
            if parent_type == "multipart/alternative":
                return
        data = payload_bytes(part, cte, self.tree)
        if ctype == "application/ms-tnef" or (name or "").strip().lower() == "winmail.dat":
            budget = max(0, self.limits.max_parts - len(self.attachments))
            tnef = tnef_files(data, budget)
            for file_name, content in tnef.files:
                self.add(file_name, type_for(file_name), content)
            self.tnef_body = self.tnef_body or tnef.body
            if tnef.files and tnef.complete:
                return
            if tnef.files:
                # Files past the budget, or a rich text body: winmail.dat keeps them all.
                self.notes.append(
                    f"{len(tnef.files)} files were taken out of {name or 'winmail.dat'}, which "
                    "holds more (more files than max_parts allows, or a formatted body): it is "
                    "attached as well."
                )
            name = name or "winmail.dat"
        inline = content_id is not None and disposition != "attachment"
        self.add(name, ctype, data, content_id=content_id, inline=inline)

    def message_part(
        self,
        part: Message,
        ctype: str,
        name: str | None,
        parent_boundary: str | None,
        index: int,
        is_root: bool,
    ) -> None:
        exact = exact_message_bytes(
            self.tree.raw,
            self.tree.scan,
            parent_boundary,
            index,
            self.tree.root_body if is_root else None,
        )
        if exact is None or not looks_like(exact, part):
            exact = serialize(
                part, b"\r\n" if b"\r\n" in self.tree.raw[:4096] else b"\n", self.tree
            )
        cte = (part_header(part, "content-transfer-encoding") or "").strip().lower()
        # message/* may only be 7bit/8bit/binary, but some mailers base64 it anyway.
        if cte == "base64":
            exact = b64_decode(exact)
        elif cte == "quoted-printable":
            exact = quopri.decodestring(exact)
        force_ext = ".eml" if ctype in ("message/rfc822", "message/global") else None
        if name is None and force_ext:
            payload = raw_payload(part)
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                subject = part_header(payload[0], "subject")
                if subject is not None:
                    # Only as much as a file name can hold is worth decoding.
                    name = one_line(decode_words(subject[:1024])) or None
        self.add(name, ctype, exact, force_ext=force_ext)


def attach_unsanitized_html(collector: Collector, markup: str, why: str, text_from_it: bool) -> str:
    """Keep HTML that cannot be sanitized as an attachment; the note that says so.

    Such an HTML body is not shown, but nothing of it is lost. It is attached in UTF-8 (the
    text it was decoded to) with a byte order mark, which browsers take as its charset when
    the file is opened.
    """
    collector.add("message.html", "text/html", markup.encode("utf-8-sig"))
    name = collector.attachments[-1].name
    text = " and the text above is taken from it" if text_from_it else ""
    return (
        f"The HTML version of this message {why}: it is attached as {name} instead of being "
        f"shown{text}."
    )
