"""Gateways: the blocking clients that talk to a mailbox's server, behind one interface.

A mailbox session (:mod:`engine.session`) asks a :class:`Gateway` for seven things, each a
blocking call it runs in a worker thread (one at a time; only :meth:`~Gateway.interrupt`
comes from another thread):

``open``
    connect, TLS, authenticate, learn the capabilities (``pipelining``, ``top``);
``listing``
    the messages waiting, each a :class:`Listed` (the gateway's handle, its ledger key, its
    size as announced);
``fetch_many``
    a window of messages, each a :class:`Request` answered by an :class:`Answer`: pipelined
    where the server allows it, bounded while reading (a cap per message, :data:`MAX_LINE`
    per line, the session deadline before every read), fewer than asked once a byte
    ``grant`` is used up;
``dispose``
    the messages whose outcome is committed (POP3: DELE);
``quit`` / ``abort`` / ``close``
    end the session confirming, undoing, or simply dropping the disposals;
``interrupt``
    from another thread, make a blocked call return at once (cancellation, the deadline).

Which gateway serves a mailbox is the XML's ``gatewayTypeName``: the config reads it into a
kind (``ServerConfig.gateway``), and :data:`GATEWAYS`, the one place that maps a kind to its
class, makes the gateway (:func:`gateway_for`).

Two gateways implement it, and the interface carries both without a change to the session:

- **IMAP** (:mod:`engine.gateways.imap`). ``Listed.number`` is the gateway's own handle (an
  index it maps to folder and UID, so several folders are one listing), and ``Listed.uidl``
  the ledger key it makes (folder, UIDVALIDITY, UID, through :func:`engine.keys.imap_key`).
  ``fetch_many`` is one ``UID FETCH`` of ``BODY.PEEK[]`` per folder (``BODY.PEEK[HEADER]``
  for ``headers_only``), which marks nothing read; ``top`` and ``pipelining`` are always
  true. ``dispose`` applies the mailbox's ``afterProcessing`` (``\\Deleted`` + ``UID
  EXPUNGE``, MOVE, or a keyword that ``listing`` then skips) at once, and moves ``failed``
  ones to ``failedFolder``; ``quit`` is ``LOGOUT`` and ``abort`` drops the connection. A
  changed UIDVALIDITY gives new keys: the content-hash fallback is the writer's
  (``Writer._renumbered``), not the session's. IDLE is a wait between sessions, for the
  supervisor (:mod:`engine.push`), not a step of one.
- **SASL** (issue 14: XOAUTH2, OAUTHBEARER) happens inside ``open``, where CAPA (POP3), the
  CAPABILITY response (IMAP) or EHLO (SMTP) is read: the gateway picks the mechanism, its
  constructor takes the token source from the factory in :data:`GATEWAYS`, and a refused
  token is one more :class:`~engine.errors.FetchError` subclass (its ``cause``, e.g.
  ``oauth``, names the outage). The session only ever calls ``open``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.config import ServerConfig
from engine.gateways.base import (
    HEADER_BYTES,
    MAX_LINE,
    Answer,
    Gateway,
    Listed,
    Request,
    read_cap,
    session_seconds,
)
from engine.gateways.pop3 import Pop3Gateway

if TYPE_CHECKING:
    from engine.oauth.broker import TokenBroker

__all__ = [
    "GATEWAYS",
    "HEADER_BYTES",
    "MAX_LINE",
    "Answer",
    "Gateway",
    "Listed",
    "Request",
    "gateway_for",
    "read_cap",
    "session_seconds",
]


def _imap(server: ServerConfig, tokens: TokenBroker | None) -> Gateway:
    """An IMAP session; imaplib and the IMAP gateway are imported by the first one made, so a
    start that reads only POP3 mailboxes (a cron `once`) does not pay for them."""
    from engine.gateways.imap import ImapGateway

    return ImapGateway(server, tokens)


# The one place that maps a gateway kind (ServerConfig.gateway, read from gatewayTypeName)
# to what makes its sessions. A factory takes the server's settings and the token broker
# (None when the engine has none: then ``server.oauth2`` cannot be signed in with).
GATEWAYS: dict[str, Callable[[ServerConfig, TokenBroker | None], Gateway]] = {
    "pop3": Pop3Gateway,
    "imap": _imap,
}


def gateway_for(server: ServerConfig, tokens: TokenBroker | None = None) -> Gateway:
    """A new, unopened session with ``server``, by the gateway its config names; ``tokens``
    gives the access tokens of an OAuth2 sign-in (engine.oauth.broker)."""
    return GATEWAYS[server.gateway](server, tokens)
