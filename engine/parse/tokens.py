"""Reference tokens (issue 20): ``[ref:MI-12345-1a2b3c4d]`` in the body of a reply names
request 12345, so that a reply whose client dropped the subject's tag and the References
header still threads onto its request (as FreeScout, osTicket and Zendesk do).

The eight hex digits are the start of an HMAC-SHA256 of the number under the store's
reference key (migration 7 makes it, one per store): a guessed or mistyped number alone
never threads, and a token made for one request never names another. The format is the
mailbox's ``mailHandling/referenceToken``, ``{number}`` and ``{hmac}`` its placeholders;
the desk's own outgoing replies carry it in their footer (``requests show`` prints it).

Pure and bounded: the first :data:`MAX_SCAN` characters of a body, at most
:data:`MAX_CANDIDATES` tokens checked.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from typing import Final

DEFAULT_FORMAT: Final = "[ref:MI-{number}-{hmac}]"
MAX_SCAN: Final = 262_144
MAX_CANDIDATES: Final = 20


def signature(number: int, key: str) -> str:
    """The eight hex digits of request ``number``'s token."""
    return hmac.new(key.encode(), str(number).encode(), hashlib.sha256).hexdigest()[:8]


def token(number: int, key: str, fmt: str = DEFAULT_FORMAT) -> str:
    """Request ``number``'s token in format ``fmt``."""
    return fmt.replace("{number}", str(number)).replace("{hmac}", signature(number, key))


@functools.lru_cache(maxsize=64)
def _pattern(fmt: str) -> re.Pattern[str]:
    parts = re.split(r"(\{number\}|\{hmac\})", fmt)
    out = []
    for part in parts:
        if part == "{number}":
            out.append(r"(?P<number>[0-9]{1,18})")
        elif part == "{hmac}":
            out.append(r"(?P<hmac>[0-9a-fA-F]{8})")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


def valid_format(fmt: str) -> bool:
    """Whether ``fmt`` has both placeholders, each once, and some text of its own."""
    return fmt.count("{number}") == 1 and fmt.count("{hmac}") == 1 and len(fmt) > 14


def find(body: str, key: str, fmt: str = DEFAULT_FORMAT) -> int | None:
    """The request number of the first valid token in ``body``, or None."""
    for i, m in enumerate(_pattern(fmt).finditer(body[:MAX_SCAN])):
        if i >= MAX_CANDIDATES:
            break
        number = int(m.group("number"))
        if hmac.compare_digest(m.group("hmac").lower(), signature(number, key)):
            return number
    return None
