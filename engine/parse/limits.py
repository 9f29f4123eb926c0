"""What one message may cost to parse: :class:`ParseLimits`.

A limit refuses a message only where reading it would cost out of proportion. Where real mail
can pass a limit (thousands of addresses, HTML too large or too deep to sanitize, a
winmail.dat holding more files than allowed), the message is read up to there, nothing of it
is lost (the rest stays in the raw message or is attached whole), and
``ParsedMessage.notes`` says what was left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class ParseLimits:
    """Bounds on what one message may cost to parse; over most of them it is refused whole.

    ``max_bytes`` is the size of the raw message, ``max_depth`` the MIME nesting (multiparts
    and ``message/*`` parts), ``max_parts`` the number of MIME parts and ``max_header_bytes``
    the size of the top-level header block (room for a To of 10,000 named addresses).
    ``max_header_params`` bounds the parameters of one Content-Type field (the stdlib
    splitter is quadratic in them). These refuse nothing:
    ``max_addresses``, the addresses read from one address header (the message gets a note
    about the rest), ``max_html_render_bytes``, the HTML that is rendered to text with full
    layout (a larger HTML-only body is flattened with a faster, plainer method), and
    ``max_html_sanitize_bytes`` and ``max_html_depth``, the size and the nesting of block
    elements of the HTML that is sanitized and kept as the message's HTML (the sanitizer's
    tree takes ~25 times the markup, and time quadratic in that nesting): a larger or deeper
    HTML body is attached as a file, its text read without building a tree.
    """

    max_bytes: int = 26_214_400
    max_depth: int = 50
    max_parts: int = 500
    max_header_bytes: int = 1024 * 1024
    max_addresses: int = 1000
    max_header_params: int = 100
    max_html_depth: int = 1000
    max_html_render_bytes: int = 1024 * 1024
    max_html_sanitize_bytes: int = 2 * 1024 * 1024


DEFAULT_LIMITS: Final = ParseLimits()
