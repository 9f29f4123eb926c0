"""How a mailbox handles the people and the volume around a message (issue 20): its own
addresses, watchers from To/Cc, the flood limit, the policy for a message delivered to
several of our mailboxes, and the bounces it follows. Read from ``<mailHandling>`` of a
mailbox file already validated by the XSD (which documents each element and its default).

Kept apart from :mod:`engine.config` like :mod:`engine.config_rules`: :func:`build` is called
with the validated root element, :func:`copy` writes the element back for ``mailbox_copy``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from lxml import etree

Several = Literal["one-per-team", "one-overall"]
Forwards = Literal["agents", "anyone", "off"]

DEFAULT_FLOOD_MESSAGES: Final = 20
DEFAULT_FLOOD_MINUTES: Final = 10
_FORWARDS: Final[dict[str, Forwards]] = {"agents": "agents", "anyone": "anyone", "off": "off"}
_SEVERAL: Final[dict[str, Several]] = {"oneperteam": "one-per-team", "oneoverall": "one-overall"}


@dataclass(frozen=True)
class Handling:
    """``<mailHandling>``. ``own_addresses``: lower-case addresses that are this desk's own
    (never watchers), besides the mailbox's user name and smtp sender when they are
    addresses. ``flood_messages``: at most this many new requests from one sender (or one
    message fingerprint) per ``flood_minutes`` in this mailbox; 0 turns the limit off."""

    own_addresses: frozenset[str] = field(default_factory=frozenset)
    watchers: bool = True
    flood_messages: int = DEFAULT_FLOOD_MESSAGES
    flood_minutes: int = DEFAULT_FLOOD_MINUTES
    several_mailboxes: Several = "one-per-team"
    # Whose forwards make the forwarded message's sender the requester.
    forwards: Forwards = "agents"
    # The reference token's format (engine.parse.tokens); None: tokens are not looked for.
    reference_token: str | None = "[ref:MI-{number}-{hmac}]"
    # <ignoredAttachmentRules>: inline images (a signature's logo) under this many bytes,
    # and any attachment whose SHA-256 is listed, are not kept.
    ignored_images_below: int = 0
    ignored_sha256: frozenset[str] = field(default_factory=frozenset)


def _text(parent: etree._Element, name: str) -> str | None:
    el = parent.find(name)
    if el is None:
        return None
    return " ".join((el.text or "").split()) or None


# No comma either: <ownAddresses> is a comma-separated list, so an address with one (a user
# name "desk@example.com,", say) could not be written back as it was read.
_ADDRESS: Final = re.compile(r"[^@\s,]+@[^@\s,]+")


def addresses(text: str | None) -> frozenset[str]:
    """A comma- or space-separated list of addresses, lower-cased."""
    parts = (text or "").replace(",", " ").split()
    return frozenset(p.lower() for p in parts if _ADDRESS.fullmatch(p))


def build(root: etree._Element, implied: Iterable[str]) -> Handling:
    """The ``<mailHandling>`` settings of a validated mailbox root; ``implied``: the
    mailbox's own addresses the file already gives elsewhere (user name, smtp sender)."""
    own = frozenset(a.strip().lower() for a in implied if _ADDRESS.fullmatch(a.strip()))
    rules = root.find("ignoredAttachmentRules")
    below, hashes = 0, frozenset[str]()
    if rules is not None:
        below = int(_text(rules, "inlineImagesBelowBytes") or 0)
        listed = (_text(rules, "sha256") or "").replace(",", " ").split()
        hashes = frozenset(h.lower() for h in listed)
    el = root.find("mailHandling")
    if el is None:
        return Handling(own_addresses=own, ignored_images_below=below, ignored_sha256=hashes)
    flood, minutes = _text(el, "floodMessages"), _text(el, "floodMinutes")
    several = (_text(el, "severalMailboxes") or "onePerTeam").replace("-", "").lower()
    return Handling(
        own_addresses=own | addresses(_text(el, "ownAddresses")),
        watchers=(_text(el, "watchers") or "true").lower() in ("true", "1"),
        flood_messages=DEFAULT_FLOOD_MESSAGES if flood is None else int(flood),
        flood_minutes=DEFAULT_FLOOD_MINUTES if minutes is None else int(minutes),
        several_mailboxes=_SEVERAL.get(several, "one-per-team"),
        forwards=_FORWARDS.get((_text(el, "forwards") or "agents").lower(), "agents"),
        reference_token=_reference(el),
        ignored_images_below=below,
        ignored_sha256=hashes,
    )


def _reference(el: etree._Element) -> str | None:
    token = el.find("referenceToken")
    if token is None:
        return Handling.reference_token
    text = (token.text or "").strip()
    return text if text and text.lower() != "off" else None


def copy(
    add: Callable[[etree._Element, str, str | int | bool | None], None],
    root: etree._Element,
    h: Handling,
) -> None:
    """``h`` as a ``<mailHandling>`` element of ``root`` (every value, defaults included)."""
    el = etree.SubElement(root, "mailHandling")
    add(el, "ownAddresses", ", ".join(sorted(h.own_addresses)) or None)
    add(el, "watchers", h.watchers)
    add(el, "floodMessages", h.flood_messages)
    add(el, "floodMinutes", h.flood_minutes)
    add(
        el,
        "severalMailboxes",
        "oneOverall" if h.several_mailboxes == "one-overall" else "onePerTeam",
    )
