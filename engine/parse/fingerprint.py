"""The flood fingerprint of a message (engine.processors.intake): a digest of what it says.

Computed by the parse stage, which runs beside the writer (in a parsing process or thread),
and carried on :attr:`~engine.model.ParsedMessage.fingerprint`: folding and hashing the first
8 KiB of every body was the largest single cost of the single writer's own Python (py-spy,
realistic mix: 2.9 % of every busy sample, a third of Writer.apply's), and the writer's
event loop is the one serial stage of the pipeline.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

# Reply and forward prefixes, in the languages mail clients write them in.
_PREFIX: Final = re.compile(r"^\s*(?:(?:re|fwd?|aw|wg|tr|rv|sv|vs)\s*(?:\[\d+\])?\s*:\s*)+", re.I)
BODY_CHARS: Final = 8192
"""How much of the body the fingerprint reads: enough to tell texts apart, bounded."""


def fingerprint(subject: str, body: str) -> str:
    """A digest of what a message says (its subject without reply prefixes, and the first
    :data:`BODY_CHARS` of its body, white space and case folded): the same text from many
    senders gives the same fingerprint."""
    subject = _PREFIX.sub("", subject)
    text = " ".join(f"{subject}\n{body[:BODY_CHARS]}".casefold().split())
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()
