"""The gateway interface: what a mailbox session asks of a mail server, and in what words.

See the package's docstring (:mod:`engine.gateways`) for how a session uses it and how IMAP
and SASL fit in without changing the session. This module holds only the vocabulary and the
bounds every gateway keeps; it imports no protocol library.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from engine.config import ServerConfig
from engine.errors import ConnectError, FetchError, FetchTimeout, ProtocolError, TLSError

# The longest line a gateway reads. Real mail (8-bit HTML) has lines far over the 2,048 bytes
# poplib allows; getmail6 raises its limit the same way. A longer status line is a protocol
# error; a longer message line cuts that message off (it stays on the server), not the session.
MAX_LINE = 1024 * 1024
# The header of a message over maxMessageBytes, read alone for its failure event, and the
# header of a known message, read to compare its Message-ID with the ledger's.
HEADER_BYTES = 256 * 1024
# The session deadline when not configured: a base for connecting, logging in and listing,
# plus the bytes to fetch at the minimum rate, at most an hour (see session_seconds).
SESSION_BASE_SECONDS = 60.0
SESSION_MAX_SECONDS = 3600.0


@dataclass(frozen=True)
class Listed:
    """One message a server lists. ``number`` is the gateway's handle for it in this session
    (POP3: its message number); ``uidl`` its ledger key (POP3: engine.keys.uidl_key of its
    UIDL; None when the server has no stable id, and the ledger then keys it by content);
    ``size`` the size the server announces, which may lie (see :func:`read_cap`)."""

    number: int
    uidl: str | None
    size: int


@dataclass(frozen=True)
class Request:
    """One message to read: all of it, or only its header (``headers_only``). At most
    ``cap`` bytes of the answer are kept; the rest is read and dropped, to stay in step."""

    number: int
    cap: int
    headers_only: bool = False


@dataclass(frozen=True)
class Answer:
    """A message as read: ``data`` is all of it, or, when ``cut`` says why not (``"size"``:
    over the cap, ``"line"``: a line over :data:`MAX_LINE`), its first bytes up to that limit.
    ``octets`` counts every byte of it, kept or not: its real size once read to its end.
    ``arrived``: when the server says the message reached it (IMAP: its INTERNALDATE), as
    the server says it (hostile input: the store bounds it); None when it does not say."""

    data: bytes
    octets: int
    cut: str | None = None
    arrived: datetime | None = None


def session_seconds(server: ServerConfig, nbytes: int) -> float:
    """The time a whole session may take: ``sessionTimeoutSeconds``, else a base plus
    ``nbytes`` at ``minimumBytesPerSecond``, at most an hour."""
    if server.session_timeout is not None:
        return server.session_timeout
    return min(SESSION_MAX_SECONDS, SESSION_BASE_SECONDS + nbytes / server.min_rate)


def read_cap(list_size: int, max_bytes: int) -> int:
    """The most bytes of a message kept while reading it: ``maxMessageBytes``, and twice
    the size the server listed plus 1 MiB. An honest LIST size is exact (RFC 1939); some
    servers count the stored form (LF line ends: at most half the CRLF size) or round, and
    the margin never cuts those. A LIST that lies (10 bytes for 20 MB) is bounded by it."""
    return max(0, min(max_bytes, 2 * list_size + 1024 * 1024))


def network_error(
    exc: BaseException, server: ServerConfig, deadline: float, seconds: float, during: str
) -> FetchError | None:
    """The engine's error for what ssl or socket raised ``during`` a command (``login``:
    before the session is open) of a session with ``server``; None for anything else.
    ``deadline`` and ``seconds`` tell a session past its deadline from a silent server."""
    where = f"{server.host}:{server.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TLSError(f"the certificate of {where} is not trusted: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        return TLSError(f"TLS with {where} failed: {exc.reason or exc}")
    if isinstance(exc, TimeoutError | socket.timeout):
        if time.monotonic() >= deadline:  # waited only up to the deadline
            return FetchTimeout(
                f"the session with {where} went over its deadline of {seconds:.0f} s ({during})"
            )
        return FetchTimeout(f"{where} did not answer within {server.timeout:g} s ({during})")
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"cannot resolve {server.host}: {exc.strerror}")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(f"{where} refused the connection")
    if isinstance(exc, OSError):
        if during == "login":  # before the session is open: it could not connect
            return ConnectError(f"cannot connect to {where}: {exc.strerror or exc}")
        return ProtocolError(f"the connection to {where} was lost ({during}): {exc}")
    return None


class Gateway(Protocol):
    """One session with one mailbox's server. Every method but :meth:`interrupt` blocks and
    runs in a worker thread, one call at a time; each is bounded by the socket timeout and
    by the session's deadline (:attr:`deadline`), checked before every read. Every error is
    an :class:`engine.errors.FetchError` (its ``cause`` names the outage).

    Call :meth:`open` first, and always end with :meth:`quit` or :meth:`abort`."""

    @property
    def pipelining(self) -> bool:
        """Whether a window of messages may be asked for in one exchange (known after open)."""
        ...

    @property
    def top(self) -> bool | None:
        """Whether a message's header can be read alone (``Request.headers_only``); None when
        nobody knows (a POP3 server without CAPA): then it is never asked for."""
        ...

    @property
    def deadline(self) -> float:
        """When the whole session must be over (``time.monotonic()``)."""
        ...

    @property
    def seconds(self) -> float:
        """The session's time limit, as it stands."""
        ...

    @property
    def mid_exchange(self) -> bool:
        """Messages asked for whose answers are not read yet: nothing else (a disposal, the
        end of the session) may be said until :meth:`fetch_many` has read them."""
        ...

    def extend(self, nbytes: int) -> None:
        """Set the deadline for a session that fetches ``nbytes`` (see session_seconds)."""

    def open(self) -> None:
        """Connect, start TLS, authenticate, learn the server's capabilities."""

    def listing(self) -> list[Listed]:
        """The messages waiting, oldest first, each with its ledger key and size."""

    def fetch_many(self, requests: Sequence[Request], grant: float) -> list[Answer]:
        """Read a window of messages, in order, each bounded by its request's cap; fewer
        than asked once the answers hold more than ``grant`` bytes (the rest come first in
        the next call: see :attr:`mid_exchange`). Reading never marks a message read.

        A failure in a message already cut off sets ``unfinished`` on the error raised:
        ``(request, answer)``, what was kept of it (see engine.errors.FetchError)."""

    def dispose(self, numbers: Sequence[int], failed: Collection[int] = ()) -> None:
        """The messages of ``numbers`` are answered for good (their outcome is committed):
        take them off the mailbox as the gateway's disposal says (POP3: DELE, which takes
        effect only at :meth:`quit`). ``failed`` names those that became failure events."""

    def quit(self) -> None:
        """End the session, confirming the disposals; the connection is closed either way."""

    def abort(self) -> None:
        """End the session undoing the disposals where the protocol can (best effort);
        never raises, and takes no time past the deadline."""

    def interrupt(self) -> None:
        """From another thread: make a call blocked on the server return at once. The
        session is unusable afterwards and disposes of nothing."""

    def close(self) -> None:
        """Drop the connection without ending the session: nothing is disposed of."""
