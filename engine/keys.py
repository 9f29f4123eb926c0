"""What the ledger keys a message by: an account, and a key unique within it.

Received text is hostile, so every key is made here, on purpose, and no two messages can
share one:

- A server's UIDL is kept as the exact bytes it sent (RFC 1939: 1 to 70 characters from
  0x21 to 0x7E). Such a UIDL is its own key, as it always was, unless it starts with a
  prefix the engine reserves; any other byte string (spaces, 8-bit bytes, a reserved
  prefix, empty) becomes ``x-uidl:`` and the hex of its bytes. :func:`uidl_key` is
  injective, and its keys never equal a key the engine mints itself.
- An IMAP message is ``x-imap:`` + its folder + ``:`` + UIDVALIDITY + ``:`` + UID
  (:func:`imap_key`). UIDVALIDITY and UID are decimal numbers, so the key splits from the
  right without doubt whatever the folder holds; the folder is ``=`` and its name when that
  is printable ASCII, else ``#`` and the hex of its UTF-8 bytes (one spelling per name).
- The engine mints the other keys: ``x-sha256:`` (a server without UIDL: the content's
  hash), ``sha256:`` (``ingest``: the file's hash) and ``x-reused:`` (a new message under a
  UIDL the ledger already holds for another one).
- The account is ``accountId`` when the configuration gives one, else the user and the
  server's host name normalized (:func:`normalize_host`), without the port: ``127.0.0.1``,
  ``localhost`` and ``LOCALHOST`` on 110 or 995 are one mailbox, and must not duplicate.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Final

UIDL_PREFIX: Final = "x-uidl:"
CONTENT_PREFIX: Final = "x-sha256:"
INGEST_PREFIX: Final = "sha256:"
REUSED_PREFIX: Final = "x-reused:"
IMAP_PREFIX: Final = "x-imap:"

# Every prefix of a key the engine makes itself: a server's UIDL starting with one of them
# is escaped, so it can never collide with an engine-made key. Compared without regard to
# case, so that no collation or case-folding elsewhere can bring two keys together.
RESERVED_PREFIXES: Final = (
    UIDL_PREFIX,
    CONTENT_PREFIX,
    INGEST_PREFIX,
    REUSED_PREFIX,
    IMAP_PREFIX,
)


def uidl_key(uidl: bytes) -> str:
    """The ledger key of a UIDL exactly as the server sent it (without ``N SP`` and CRLF)."""
    if uidl and all(0x21 <= b <= 0x7E for b in uidl):
        text = uidl.decode("ascii")
        if not text.lower().startswith(RESERVED_PREFIXES):
            return text
    return UIDL_PREFIX + uidl.hex()


def imap_key(folder: str, uidvalidity: int, uid: int) -> str:
    """The ledger key of an IMAP message: its folder, the folder's UIDVALIDITY, its UID."""
    if folder and all(0x20 <= ord(c) <= 0x7E for c in folder):
        name = "=" + folder
    else:
        name = "#" + folder.encode("utf-8", "surrogateescape").hex()
    return f"{IMAP_PREFIX}{name}:{int(uidvalidity)}:{int(uid)}"


def imap_key_parts(key: str) -> tuple[str, int, int] | None:
    """``(folder, UIDVALIDITY, UID)`` of a key :func:`imap_key` made; None for another key.
    The folder comes back in its key spelling (``=name`` or ``#hex``), enough to compare."""
    if not key.startswith(IMAP_PREFIX):
        return None
    name, _, rest = key[len(IMAP_PREFIX) :].rpartition(":")
    folder, _, validity = name.rpartition(":")
    if not (folder and validity.isdigit() and rest.isdigit()):
        return None
    return folder, int(validity), int(rest)


def content_key(sha256: str) -> str:
    """A message of a server without UIDL, keyed by its content's hash."""
    return CONTENT_PREFIX + sha256


def ingest_key(sha256: str, retry: int = 0) -> str:
    """A message file given to ``ingest``, keyed by its content's hash; ``retry`` N > 0 is
    the Nth try of a file whose earlier ingests all failed (the console's replay: a failed
    replay must not make the next one, once the cause is fixed, a duplicate)."""
    return INGEST_PREFIX + sha256 + (f":retry-{retry}" if retry else "")


def ingest_keys_like(sha256: str) -> tuple[str, str]:
    """The first ingest key of ``sha256`` and a LIKE pattern of its retries' keys (a hash is
    hex: nothing in it is special to LIKE)."""
    return INGEST_PREFIX + sha256, INGEST_PREFIX + sha256 + ":retry-%"


def reused_key(key: str, sha256: str) -> str:
    """A new message that the server listed under a UIDL the ledger holds for another."""
    return f"{REUSED_PREFIX}{key}:{sha256}"


def account_key(user_name: str, host: str, account_id: str | None = None) -> str:
    """The account the ledger's keys are unique within (see the module's docstring)."""
    if account_id:
        return account_id
    return f"{user_name}@{normalize_host(host)}"


def normalize_host(host: str) -> str:
    """One spelling per server name: lowercase, no trailing dot, IDNA (``xn--``), IP
    literals in canonical form, and every loopback spelling (``localhost``, its
    subdomains, 127.0.0.0/8, ``::1``) as ``localhost``."""
    name = host.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    ip = _ip_literal(name)
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return "localhost" if ip.is_loopback else ip.compressed
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return "localhost"
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name  # not a valid IDNA name: connecting fails anyway; keep it as written


def _ip_literal(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``name`` as an IP address, in any spelling the resolver accepts for one (also the
    shorthand IPv4 forms ``127.1`` and ``0x7f000001`` that inet_aton reads)."""
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    if name and name[0].isdigit() and all(c in "0123456789abcdefx." for c in name):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            return None
    return None
