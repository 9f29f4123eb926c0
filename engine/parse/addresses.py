"""Address headers: (display name, address) pairs, read as strict ``getaddresses`` reads them.

* Addresses are split on the *raw* header before display names are decoded, with the strict
  rules of the CVE-2023-27043 fix (emulated where Python lacks them): an encoded word cannot
  smuggle a ``<victim@example.org>`` into the parse, and any doubt yields no address.
* A header listing thousands of addresses is read up to ``max_addresses`` (and 256 KiB), with
  a note: the rest costs time without telling the processors anything more.
* Fast path: :func:`_simple_addresses` reads the common shapes of an address list without the
  stdlib's character-by-character parser, and gives what ``getaddresses`` gives (a property
  test holds the two equal); any other shape goes to ``getaddresses``.
"""

from __future__ import annotations

import email.utils
import inspect
import re
from collections.abc import Callable, Iterator
from typing import Final

from engine.parse.charsets import decode_8bit
from engine.parse.headers import decode_words, one_line, unfold
from engine.parse.limits import ParseLimits

_getaddresses: Callable[..., list[tuple[str, str]]] = email.utils.getaddresses
_HAS_STRICT: Final = "strict" in inspect.signature(email.utils.getaddresses).parameters
_QUOTED_RE: Final = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_ADDR_SPECIALS_RE: Final = re.compile(r'\\.|[()"]', re.S)
_MAX_COMMENT_DEPTH: Final = 16
_BAD_ADDR_RE: Final = re.compile(r'[\s\x00-\x1f\x7f<>(),;:"\\\[\]]')


def _balanced(value: str) -> bool:
    """Quotes closed, parentheses balanced and shallow (the stdlib recurses on comments)."""
    depth = 0
    quoted = False
    for m in _ADDR_SPECIALS_RE.finditer(value):
        token = m.group(0)
        if token[0] == "\\":
            continue
        if token == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif token == "(":
            depth += 1
            if depth > _MAX_COMMENT_DEPTH:
                return False
        else:
            depth -= 1
            if depth < 0:
                return False
    return depth == 0 and not quoted


def _address_count(value: str) -> int:
    """Upper bound of the addresses in an address header: its unquoted commas plus one."""
    if '"' not in value:
        return value.count(",") + 1
    return _QUOTED_RE.sub("", value).count(",") + 1


# The common shapes of an address list, "Name <local@domain>", '"Last, First" <a@b>' and a
# bare "local@domain", whose parse by getaddresses is known without running its parser (a
# character-by-character loop in Python). Words and address parts are kept to characters that
# the stdlib parser takes as they are: no comments, escapes, groups, routes or literals.
_ATEXT: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]++"
_ADDR_SPEC: Final = rf"{_ATEXT}(?:\.{_ATEXT})*+@{_ATEXT}(?:\.{_ATEXT})*+"
_PHRASE_WORD: Final = r'(?:[^\x00-\x20\x7f()<>@,:;"\[\]\\]++|"[^"\\\x00-\x1f\x7f]*+")'
_SIMPLE_ADDRESS_RE: Final = re.compile(
    rf"[ \t]*+(?:({_PHRASE_WORD}(?:[ \t]++{_PHRASE_WORD})*+)?[ \t]*+<({_ADDR_SPEC})>"
    rf"|({_ADDR_SPEC}))[ \t]*+"
)
_QUOTED_WORD_RE: Final = re.compile(r'"([^"]*)"|([^ \t"]+)')


def _simple_addresses(value: str) -> list[tuple[str, str]] | None:
    """What ``getaddresses([value])`` returns, if ``value`` has only the common shapes."""
    pairs: list[tuple[str, str]] = []
    pos = 0
    while (m := _SIMPLE_ADDRESS_RE.match(value, pos)) is not None:
        phrase, routed, bare = m.groups()
        if bare is not None:
            pairs.append(("", bare))
        else:
            # The stdlib joins the phrase's words, unquoted, with single spaces.
            words = _QUOTED_WORD_RE.findall(phrase or "")
            pairs.append((" ".join(quoted or atom for quoted, atom in words), routed))
        pos = m.end()
        if pos == len(value):
            return pairs
        if value[pos] != ",":
            return None
        pos += 1
    return None


def _split_addresses(value: str) -> list[tuple[str, str]]:
    """``getaddresses`` in strict mode (CVE-2023-27043), emulated where Python lacks it.

    Any doubt yields no address at all rather than a wrong one: a field whose parse does not
    produce exactly one address per unquoted comma, or that holds a "[" outside a domain
    literal, was misread and is dropped whole, as the patched stdlib does.
    """
    simple = _simple_addresses(value)
    if simple is not None:
        return simple
    if not _balanced(value):
        return []
    try:
        if _HAS_STRICT:
            pairs = _getaddresses([value], strict=True)
        else:
            pairs = _getaddresses([value])
            if len(pairs) != _address_count(value):
                return []
            pairs = [("", "") if "[" in addr else (name, addr) for name, addr in pairs]
    except (RecursionError, IndexError, ValueError, TypeError):
        return []
    return pairs


# What separates addresses, and what may hide a comma: quoted strings, comments, route
# addresses and domain literals.
_ADDR_LIST_TOKENS_RE: Final = re.compile(r'\\.|[()"<>\[\],]', re.S)
# The text of an address header that is read: the parsers of odd shapes (quotes, comments)
# take a second per MiB of hostile text, and 256 KiB hold several thousand real addresses.
_MAX_ADDRESS_TEXT: Final = 256 * 1024


def _cut_addresses(value: str, keep: int) -> tuple[str, int, int]:
    """``value`` up to the end of its ``keep``-th address or of its last address within
    _MAX_ADDRESS_TEXT characters; with the count of addresses kept and of those that follow.

    Only commas outside quoted strings, comments, angle brackets and domain literals separate
    addresses; both counts are upper bounds, as _address_count's. An address that runs past
    the text limit is not kept at all: cut, it could read as another address.
    """
    if value.count(",") < keep and len(value) <= _MAX_ADDRESS_TEXT:
        return value, value.count(",") + 1, 0
    commas = cut = 0  # cut: the end of the last whole address seen
    for at in _separating_commas(value):
        commas, cut = commas + 1, at
        if commas == keep:
            break
    else:
        if len(value) <= _MAX_ADDRESS_TEXT:
            return value, commas + 1, 0
    if commas == 0:
        return "", 0, _address_count(value)
    return value[:cut], commas, _address_count(value[cut + 1 :])


def _separating_commas(value: str) -> Iterator[int]:
    """The offset of each comma that separates two addresses in the first _MAX_ADDRESS_TEXT
    characters of ``value``: one outside quoted strings, comments, angle brackets and domain
    literals."""
    depth = 0
    quoted = routed = literal = False
    for m in _ADDR_LIST_TOKENS_RE.finditer(value, 0, _MAX_ADDRESS_TEXT):
        token = m.group(0)
        if token[0] == "\\":
            continue
        if quoted:
            quoted = token != '"'
        elif token == '"':
            quoted = True
        elif token == "(":
            depth += 1
        elif depth:
            depth -= token == ")"
        elif literal:
            literal = token != "]"
        elif token == "[":
            literal = True
        elif routed:
            routed = token != ">"
        elif token == "<":
            routed = True
        elif token == ",":
            yield m.start()


def read_addresses(
    values: list[str] | None, limits: ParseLimits, field: str, notes: list[str]
) -> list[tuple[str, str]] | None:
    """(display name, address) pairs of an address header; None if the header is absent.

    Addresses are split on the raw header and only then are display names decoded, so that
    an encoded word cannot smuggle a "<victim@example.org>" into the parse. A header listing
    more than ``max_addresses`` (or more than 256 KiB of them) is read up to there, and a note
    says so: real mail goes out to thousands at times, and the rest costs time without telling
    the processors anything more.
    """
    if not values:
        return None
    raw, kept, more = _cut_addresses(", ".join(unfold(v) for v in values), limits.max_addresses)
    if more:
        notes.append(
            f"The {field} header lists up to {kept + more} addresses; only the first {kept} "
            f"were read (max_addresses is {limits.max_addresses}, and at most "
            f"{_MAX_ADDRESS_TEXT // 1024} KiB of a header are read)."
        )
    result: list[tuple[str, str]] = []
    for name, addr in _split_addresses(raw) if raw else ():
        address = decode_8bit(addr).strip()
        if not address or _BAD_ADDR_RE.search(address) or address.count("@") > 1:
            continue
        result.append((one_line(decode_words(name)), address))
    return result
