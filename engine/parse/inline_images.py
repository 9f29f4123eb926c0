"""Where each inline image sat (issue 20): an HTML body's ``<img src="cid:…">`` becomes the
text ``[image: ALT (cid:ID)]`` before the body is rendered as text, so the description says
where each picture was; the image itself is kept as an attachment with that Content-ID
(engine.parse.parts), which a reader matches by it.

Bounded: a tag of at most 2,000 characters is looked at; the marker's text is escaped (it
goes back into markup that is rendered next), its parts cut to 100 characters.
"""

from __future__ import annotations

import html
import re
from typing import Final

_IMG: Final = re.compile(r"<img\b[^<>]{0,2000}>", re.I)
_SRC: Final = re.compile(
    r"""\bsrc\s*=\s*(?:"\s*cid:([^"]{1,300})"|'\s*cid:([^']{1,300})'|cid:([^\s>]{1,300}))""", re.I
)
_ALT: Final = re.compile(r"""\balt\s*=\s*(?:"([^"]{0,300})"|'([^']{0,300})')""", re.I)


def _marker(tag: re.Match[str]) -> str:
    src = _SRC.search(tag.group(0))
    if src is None:
        return tag.group(0)
    cid = html.unescape(next(g for g in src.groups() if g is not None)).strip()
    alt_m = _ALT.search(tag.group(0))
    alt = html.unescape(next((g for g in alt_m.groups() if g is not None), "")) if alt_m else ""
    alt = " ".join(alt.split())[:100]
    text = f"[image: {alt} (cid:{cid[:100]})]" if alt else f"[image: cid:{cid[:100]}]"
    return f"<span>{html.escape(text)}</span>"


def mark(markup: str) -> str:
    """``markup`` with each ``cid:`` image replaced by its marker."""
    if "cid:" not in markup and "CID:" not in markup.upper():
        return markup
    return _IMG.sub(_marker, markup)
