"""The POP3 gateway (:class:`Pop3Gateway`), on stdlib poplib. It runs only in worker threads.

A thread cannot be cancelled, so the socket timeout and the session's deadline are what
bound every call here. Every library exception is translated into :mod:`engine.errors` at
this boundary, in one place (:meth:`Pop3Gateway._mapped`). We never format the password into
a message, but a server may echo it in its ``-ERR``: the line it sent is scrubbed of every
configured secret before it is quoted or cut.

What the server sends is bounded while it is read, never after: a line (status lines under
:data:`MAX_LINE`, listing lines under :data:`LISTING_LINE`), a listing (:data:`MAX_LISTED`
messages), a message (its :class:`Request`'s cap, see :func:`read_cap`), a message line (a
longer one cuts that message off, not the session), and the whole session (its deadline,
checked before every read, see :func:`session_seconds`).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import poplib
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from engine.config import ServerConfig
from engine.errors import (
    AuthError,
    DuplicateUidlError,
    FetchError,
    FetchTimeout,
    MailboxLockedError,
    OAuthError,
    ProtocolError,
    ServerTempError,
    TLSError,
)
from engine.gateways.base import (
    MAX_LINE,
    Answer,
    Listed,
    Request,
    network_error,
    session_seconds,
)
from engine.keys import account_key, uidl_key
from engine.logs import scrub
from engine.oauth import sasl
from engine.tls import client_context

if TYPE_CHECKING:
    from engine.oauth.broker import AccessToken, TokenBroker

# The logger keeps the name it had before gateways were a package: operators filter on it.
log = logging.getLogger("engine.gateways.pop3")

# poplib's 2048-byte line limit rejects real mail. Status lines are read under MAX_LINE;
# message lines (read_answer) too, but there a longer line cuts that one message off.
setattr(poplib, "_MAXLINE", MAX_LINE)  # noqa: B010 - a private knob, no API

# A LIST, UIDL or CAPA line: RFC 1939 allows two numbers, or a number and 70 characters.
LISTING_LINE = 1024
# Messages one session takes from a listing. A larger mailbox (a backlog after a long
# outage) is taken 100,000 at a time, oldest first, rather than refused: each session
# deletes what it took, so the next one sees the rest. The lines past it are read and
# dropped, up to ten times as many; an endless listing is a protocol error.
MAX_LISTED = 100_000
# After a message is cut off, the rest of its answer is read and dropped to stay in step
# with the server, but never more than its cap again or 64 MiB, whichever is larger.
DISCARD_BYTES = 64 * 1024 * 1024

_CODE = re.compile(rb"\[([A-Z/-]+)\]")
_CHUNK = 65536


def command(request: Request) -> bytes:
    """The command that reads ``request``: RETR, or only its header with ``TOP n 0``."""
    verb = f"TOP {request.number} 0" if request.headers_only else f"RETR {request.number}"
    return verb.encode("ascii")


class Unfinished(Exception):
    """The session lost step in an answer that was already cut off: ``answer`` is what was
    kept of it. Raised from the cause (end of connection, timeout, too much to drop)."""

    def __init__(self, answer: Answer) -> None:
        super().__init__("unfinished answer")
        self.answer = answer


def _no_wait() -> None:
    return None


def read_answer(
    reader: Any,
    *,
    cap: int,
    max_line: int = MAX_LINE,
    discard: int = DISCARD_BYTES,
    wait: Callable[[], None] = _no_wait,
) -> Answer:
    """Read a multi-line answer from ``reader`` (a buffered reader) up to ``.CRLF``, in its
    buffered chunks (line by line, a 10 KiB message of ~150 lines took most of the session
    thread's time) and only up to the terminator: what follows is the next pipelined answer.
    A line is a run of bytes ending in LF, as for readline: a bare-LF ``.`` line is content.

    Bounded while reading, never after: past ``cap`` bytes, or at a line over ``max_line``
    bytes, LF included (exactly, wherever the chunks end), nothing more is kept; the rest is
    read and dropped up to the terminator, so the session stays in step, unless more than
    ``cap + discard`` bytes come. ``wait`` runs before every read (the session's deadline).
    """
    kept = bytearray()
    tail = b"\n"  # the stream so far ends a line: ".\r\n" at once is the empty answer
    octets = 0  # bytes of the answer before its terminator
    run = 0  # bytes of the line still open
    cut: str | None = None
    cut_at = 0  # octets kept when the answer was cut
    try:
        while True:
            wait()
            chunk = reader.peek(_CHUNK)
            if not chunk:
                raise ProtocolError("the connection closed in the middle of an answer")
            probe = tail + chunk
            at = probe.find(b"\n.\r\n")
            # Content bytes of this chunk, and the bytes to consume: all of them, or up to
            # and including the terminator. The terminator may begin in bytes already taken
            # as content (the ".", or ".\r", at the end of the previous chunk): then
            # ``take`` is negative and they are given back.
            take, used = (at + 1 - len(tail), at + 4 - len(tail)) if at >= 0 else (len(chunk),) * 2
            if take > 0:
                if cut is None:
                    part = chunk if take == len(chunk) else chunk[:take]
                    run, cut, cut_at = _keep(kept, part, run, octets, cap, max_line)
                octets += take
                if cut is not None and octets > cap + discard:
                    raise ProtocolError(
                        f"an answer goes on past {octets} bytes without its end; gave up"
                    )
            elif take < 0:
                octets += take
                cut = _give_back(kept, octets, cut, cut_at)
            reader.read(used)
            if at >= 0:
                break
            tail = probe[-3:]
    except BaseException as exc:
        if cut is None:
            raise
        raise Unfinished(Answer(_unstuff(kept), octets, cut)) from exc
    return Answer(_unstuff(kept), octets, cut)


def _keep(
    kept: bytearray, part: bytes, run: int, before: int, cap: int, max_line: int
) -> tuple[int, str | None, int]:
    """Add the content bytes ``part`` to ``kept``, up to the first limit they go over.
    Returns the length of the line left open, why the answer was cut (None: it was not)
    and, if it was, the octets kept: ``before`` the bytes of the answer before ``part``."""
    stop, why = _limit(part, run, before, cap, max_line)
    if why is not None:
        kept += part[:stop]
        return run, why, before + stop
    kept += part
    newline = part.rfind(b"\n")
    return (run + len(part) if newline < 0 else len(part) - newline - 1), None, 0


def _give_back(kept: bytearray, octets: int, cut: str | None, cut_at: int) -> str | None:
    """The terminator began in bytes already taken as content: keep only the ``octets``
    before it, and return why the answer is cut, if it still is (it is not when what went
    over a limit was the terminator itself)."""
    del kept[octets:]
    return None if cut is not None and cut_at >= octets else cut


def _limit(part: bytes, run: int, before: int, cap: int, max_line: int) -> tuple[int, str | None]:
    """Where in ``part`` the answer goes over a limit, and which: ``(len(part), None)`` if
    it does not. ``run`` is the length of the line still open before ``part``, ``before``
    the bytes of the answer before it."""
    stop, why = len(part), None
    if before + len(part) > cap:
        stop, why = cap - before, "size"
    # Lines: the one still open (it goes over once it has max_line bytes and no LF yet),
    # then, only if ``part`` is long enough to hold one, every line begun inside it.
    first = part.find(b"\n")
    if (first if first >= 0 else len(part)) + run >= max_line:
        return (min(stop, max_line - run), "line") if max_line - run <= stop else (stop, why)
    if first >= 0 and len(part) - first - 1 >= max_line:
        start = first + 1
        while start < stop:
            end = part.find(b"\n", start)
            if (end if end >= 0 else len(part)) - start >= max_line:
                if start + max_line <= stop:
                    return start + max_line, "line"
                break
            if end < 0:
                break
            start = end + 1
    return stop, why


def _unstuff(raw: bytearray) -> bytes:
    """The answer's content without dot-stuffing (a leading "." doubled on each line)."""
    if raw.startswith(b".."):
        del raw[0]
    data = bytes(raw)
    raw.clear()  # two copies of a 20 MB message at most, never three
    return data.replace(b"\n..", b"\n.") if b"\n.." in data else data


def read_line(reader: Any, limit: int, wait: Callable[[], None] = _no_wait) -> bytes:
    """One line, LF included (``b""`` at the end of the stream), checking ``wait`` before
    every read: poplib's readline waits for a whole line however slowly it comes."""
    line = b""
    while True:
        wait()
        chunk: bytes = reader.peek(limit + 1 - len(line))
        if not chunk:
            return line
        at = chunk.find(b"\n", 0, limit + 1 - len(line))
        got: bytes = reader.read(at + 1 if at >= 0 else min(len(chunk), limit + 1 - len(line)))
        line += got
        if len(line) > limit:
            raise ProtocolError(f"the server sent a line over {limit} bytes")
        if at >= 0:
            return line


def read_lines(
    reader: Any,
    *,
    keep: int,
    limit: int = LISTING_LINE,
    wait: Callable[[], None] = _no_wait,
) -> tuple[list[bytes], int]:
    """The lines of a short multi-line answer (LIST, UIDL, CAPA) without their line ends and
    dot-stuffing: the first ``keep`` of them, and how many there were. Lines past ``keep``
    are read and dropped, up to ten times as many; each is at most ``limit`` bytes."""
    lines: list[bytes] = []
    count = 0
    while True:
        line = read_line(reader, limit, wait)
        if not line:
            raise ProtocolError("the connection closed in the middle of a listing")
        if line == b".\r\n":
            return lines, count
        count += 1
        if count <= keep:
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            lines.append(line[1:] if line.startswith(b"..") else line)
        elif count > 10 * max(keep, 1):
            raise ProtocolError(f"a listing goes on past {count} lines without its end")


class _Bounded:
    """What poplib reads, bounded: every line in time (``wait``, the session deadline, runs
    before each read) and in length, and CAPA in its number of lines (poplib reads a
    multi-line answer whole, however long; ``stls()`` asks CAPA too)."""

    file: Any
    sock: Any
    wait: Callable[[Any], None]

    def _getline(self) -> tuple[bytes, int]:
        line = read_line(self.file, MAX_LINE, lambda: self.wait(self.sock))
        if not line:
            raise poplib.error_proto("-ERR EOF")
        if line[-2:] == b"\r\n":
            return line[:-2], len(line)
        if line[:1] == b"\r":
            return line[1:-1], len(line)
        return line[:-1], len(line)

    def capa(self) -> dict[str, list[str]]:
        conn: Any = self
        conn._putcmd("CAPA")
        conn._getresp()
        lines, _ = read_lines(self.file, keep=100, wait=lambda: self.wait(self.sock))
        caps: dict[str, list[str]] = {}
        for line in lines:
            words = line.decode("ascii", "replace").split()
            if words:
                caps[words[0].upper()] = words[1:]
        return caps


def _server_error(exc: poplib.error_proto, during: str) -> FetchError:
    """Classify a -ERR by its RFC 2449 / RFC 3206 response code."""
    text = exc.args[0] if exc.args else b""
    raw = text if isinstance(text, bytes) else str(text).encode()
    # Scrubbed before it is cut: a cut through an echoed password would leave a part of it
    # that no later scrub recognises.
    line = scrub(raw.decode("utf-8", "replace")).strip()[:300]
    m = _CODE.search(raw)
    code = m.group(1).decode() if m else ""
    if code == "IN-USE":
        return MailboxLockedError(f"the mailbox is locked by another session: {line}")
    if code in ("SYS/TEMP", "LOGIN-DELAY"):
        return ServerTempError(f"the server reported a temporary failure: {line}")
    if code == "SYS/PERM":
        return ProtocolError(f"the server reported a permanent failure: {line}")
    if during == "login":
        return AuthError(f"the server refused the login: {line}")
    return ProtocolError(f"the server answered {line!r} to {during}")


def _close_quietly(conn: poplib.POP3) -> None:
    # The socket only really closes once the file made from it is closed too.
    for name in ("file", "sock"):
        obj = getattr(conn, name, None)
        if obj is not None:
            with contextlib.suppress(OSError):
                obj.close()


class _POP3(_Bounded, poplib.POP3):
    """poplib leaks its socket when the greeting is -ERR; close it before raising."""

    def __init__(self, host: str, port: int, timeout: float, wait: Callable[[Any], None]) -> None:
        self.wait = wait  # before the greeting is read
        try:
            super().__init__(host, port, timeout=timeout)
        except BaseException:
            _close_quietly(self)
            raise


class _POP3_SSL(_Bounded, poplib.POP3_SSL):
    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        context: ssl.SSLContext,
        wait: Callable[[Any], None],
    ) -> None:
        self.wait = wait
        try:
            super().__init__(host, port, timeout=timeout, context=context)
        except BaseException:
            _close_quietly(self)
            raise


class Pop3Gateway:
    """One POP3 session: the POP3 implementation of :class:`engine.gateways.Gateway`. Use
    :meth:`open` first and always :meth:`quit` or :meth:`abort`.

    The whole session has a deadline (:func:`session_seconds`), checked before every read
    from the server, so a server trickling a byte a second is cut off too: per-read
    timeouts never fire on it.
    """

    def __init__(self, server: ServerConfig, tokens: TokenBroker | None = None) -> None:
        self.server = server
        # Where OAuth2 access tokens come from (server.oauth2); None: passwords only.
        self.tokens = tokens
        # The SASL mechanism an OAuth2 sign-in used (None: USER/PASS).
        self.mechanism: str | None = None
        self.conn: poplib.POP3 | None = None
        self._interrupted = False
        # Whether the server announced PIPELINING in CAPA (RFC 2449), learnt after login.
        self.pipelining = False
        # Whether it announced TOP (None: it has no CAPA, so nobody knows; RFC 1939 TOP is
        # optional but common).
        self.top: bool | None = None
        # The deadline runs from here: the caller bounds the session from the outside by it
        # too (a TLS handshake, for one, reads nothing through _wait).
        self.started = time.monotonic()
        self.deadline = math.inf
        self.extend(0)
        # Commands sent (pipelined) whose answers are not read yet, oldest first.
        self.outstanding: deque[Request] = deque()
        # An answer was left half-read: nothing more can be said to this server.
        self._lost = False
        # DELE was sent (even unanswered): QUIT's answer must be read (see quit).
        self._marked = False

    def _c(self) -> poplib.POP3:
        if self.conn is None:
            raise ProtocolError("the session is not open")
        return self.conn

    @property
    def seconds(self) -> float:
        """The session's time limit, as it stands."""
        return self.deadline - self.started

    @property
    def mid_exchange(self) -> bool:
        """RETRs sent (pipelined) whose answers are not read yet: see :meth:`fetch_many`."""
        return bool(self.outstanding)

    def extend(self, nbytes: int) -> None:
        """Set the deadline for a session that fetches ``nbytes`` (see session_seconds)."""
        self.deadline = self.started + session_seconds(self.server, nbytes)

    def _wait(self, sock: Any) -> None:
        """Before each read: past the deadline, give up; near it, wait no longer than it."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            self._lost = True
            raise FetchTimeout(
                f"the session with {self.server.host}:{self.server.port} went over its "
                f"deadline of {self.seconds:.0f} s (sessionTimeoutSeconds, or derived from "
                "the bytes to fetch at minimumBytesPerSecond)"
            )
        if left < self.server.timeout and sock is not None:
            sock.settimeout(left)

    def open(self) -> None:
        """Connect (POP3S, or STLS that fails closed), log in, read CAPA."""
        s = self.server
        if not s.tls_verify and (s.use_ssl or s.starttls):
            log.warning(
                "server=%s:%d TLS certificate verification is OFF (tlsVerify false)", s.host, s.port
            )
        try:
            with self._mapped("login"):
                self._connect()
                if self._interrupted:
                    # Cancelled while connecting (the caller abandoned this thread): close
                    # what was opened instead of logging in on a session nobody will use.
                    raise ProtocolError("the session was cancelled while connecting")
                self._login()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        s = self.server
        if s.use_ssl:
            context = client_context(s.ca_file, s.tls_verify)
            self.conn = _POP3_SSL(s.host, s.port, s.timeout, context, self._wait)
        else:
            self.conn = _POP3(s.host, s.port, s.timeout, self._wait)
            if s.starttls:
                self._starttls()

    def _starttls(self) -> None:
        conn = self._c()
        try:
            caps = conn.capa()
        except poplib.error_proto:
            caps = {}
        if "STLS" not in caps:
            # Fail closed: never fall back to sending the password in clear text.
            raise TLSError(
                "the server does not offer STLS; refusing to log in without TLS (startTls true)"
            )
        try:
            conn.stls(context=client_context(self.server.ca_file, self.server.tls_verify))
        except poplib.error_proto as exc:
            # Offered in CAPA, refused when asked: still a TLS problem, not the credentials.
            text = exc.args[0] if exc.args else b""
            line = (text if isinstance(text, bytes) else str(text).encode())[:300]
            raise TLSError(
                f"the server refused STLS ({line.decode('utf-8', 'replace').strip()}); "
                "refusing to log in without TLS (startTls true)"
            ) from None

    def _login(self) -> None:
        # A -ERR to USER or PASS is classified by _mapped (AuthError, or [IN-USE]...).
        conn = self._c()
        if self.server.oauth2 is not None:
            self._oauth_login(conn)
        else:
            conn.user(self.server.user_name)
            conn.pass_(self.server.password)
        try:
            caps = conn.capa()
        except poplib.error_proto:
            self.pipelining, self.top = False, None  # no CAPA: one command at a time
        else:
            self.pipelining, self.top = "PIPELINING" in caps, "TOP" in caps

    def _oauth_login(self, conn: poplib.POP3) -> None:
        """AUTH (RFC 5034) with the mechanism CAPA's SASL line offers, through the broker's
        sign_in (a stored token refused is replaced and tried once more; engine.oauth.sasl
        classifies a refusal)."""
        s = self.server
        assert s.oauth2 is not None
        if self.tokens is None:
            raise OAuthError("token-endpoint", "internal error: no token broker for OAuth2")
        try:
            offered = conn.capa().get("SASL", [])
        except poplib.error_proto:
            offered = []
        mechanism = sasl.choose(offered)
        if mechanism is None:
            raise AuthError(
                "the server offers neither OAUTHBEARER nor XOAUTH2 in CAPA "
                f"(SASL: {' '.join(offered)[:100] or 'none'})"
            )
        account = account_key(s.user_name, s.host, s.account_id)
        self.tokens.sign_in(
            account,
            s.oauth2,
            mechanism,
            lambda token: _authenticate(conn, mechanism, s, token),
        )
        self.mechanism = mechanism

    def _lines(self, keep: int) -> tuple[list[bytes], int]:
        conn: Any = self._c()
        return read_lines(conn.file, keep=keep, wait=lambda: self._wait(conn.sock))

    def listing(self) -> list[Listed]:
        """Every message with its size and UIDL key (``None`` when the server lacks UIDL);
        the first :data:`MAX_LISTED` of them when the server lists more."""
        conn: Any = self._c()
        with self._mapped("LIST", malformed=True):
            conn._putcmd("LIST")
            conn._getresp()
            lines, count = self._lines(MAX_LISTED)
            if count > len(lines):
                log.warning(
                    "server=%s lists %d messages: this session takes the first %d",
                    self.server.host,
                    count,
                    len(lines),
                )
            sizes = _sizes(lines)
            uidls = self._uidls(sizes)
        return [Listed(n, uidls.get(n), sizes[n]) for n in sorted(sizes)]

    def _uidls(self, sizes: dict[int, int]) -> dict[int, str]:
        """The UIDL keys of the listed messages: the exact bytes after "N SP" (never cut at
        a space nor decoded), made into keys by engine.keys.uidl_key."""
        conn: Any = self._c()
        conn._putcmd("UIDL")
        try:
            conn._getresp()
        except poplib.error_proto:
            log.warning("server=%s has no UIDL: keying messages by content", self.server.host)
            return {}
        lines, _ = self._lines(MAX_LISTED)
        seen: dict[bytes, int] = {}
        uidls: dict[int, str] = {}
        for line in lines:
            num_b, space, uid = line.partition(b" ")
            num = int(num_b)
            if not space:
                raise ValueError(f"UIDL line of message {num} has no UIDL")
            if num not in sizes:
                continue  # past the messages this session takes
            if uid in seen:
                raise DuplicateUidlError(
                    f"the server listed UIDL {uidl_key(uid)!r} for messages {seen[uid]} and {num}"
                )
            seen[uid] = num
            uidls[num] = uidl_key(uid)
        return uidls

    def fetch_many(self, requests: Sequence[Request], grant: float = math.inf) -> list[Answer]:
        """Several messages in one exchange: with PIPELINING (RFC 2449) every command goes
        out at once and the answers are read in order, so the round trips overlap.

        Each answer is bounded by its request's cap while it is read (:func:`read_answer`).
        Once the answers read hold more than ``grant`` bytes (a server whose LIST sizes are
        below the truth), the rest is left for the next call: their commands stay in
        :attr:`outstanding` and their answers on the wire, and a call must start with them.
        Nothing else may be sent meanwhile (an answer would be read as another's).
        """
        conn: Any = self._c()
        waiting = [r.number for r in self.outstanding][: len(requests)]
        if [r.number for r in requests[: len(waiting)]] != waiting:
            raise ProtocolError(f"internal error: answers to {waiting} are still to be read")
        out: list[Answer] = []
        held = 0
        # A failure names the command whose answer was being read: the len(out)-th.
        with self._mapped(lambda: command(requests[len(out)]).decode()):
            if self.pipelining and len(requests) > len(self.outstanding):
                new = requests[len(self.outstanding) :]
                conn._putline(b"\r\n".join(command(r) for r in new))
                self.outstanding.extend(new)
            for request in requests:
                if not self.outstanding:
                    conn._putline(command(request))
                    self.outstanding.append(request)
                self.outstanding.popleft()
                conn._getresp()
                out.append(self._read_answer(conn, request))
                held += len(out[-1].data)
                if held > grant and len(out) < len(requests):
                    break
        return out

    def _read_answer(self, conn: Any, request: Request) -> Answer:
        try:
            return read_answer(
                conn.file,
                cap=request.cap,
                discard=max(request.cap, DISCARD_BYTES),
                wait=lambda: self._wait(conn.sock),
            )
        except Unfinished as exc:
            # Lost step in a message already cut off: the error carries what was kept of
            # it, so the session can record it as left on the server (FetchError.unfinished).
            cause = exc.__cause__ or exc
            error = cause if isinstance(cause, FetchError) else self._library_error(cause, "RETR")
            if error is None:
                raise
            error.unfinished = (request, exc.answer)
            raise error from None
        except ProtocolError as exc:
            raise ProtocolError(f"{exc} ({command(request).decode()})") from None

    def dispose(self, numbers: Sequence[int], failed: Collection[int] = ()) -> None:
        """DELE them all (a failure event holds its message: nothing is lost with it). POP3
        has no other disposal; the server removes them only at a successful QUIT."""
        self.dele_many(numbers)

    def dele_many(self, numbers: Sequence[int]) -> None:
        """Mark messages deleted (they go only at QUIT); pipelined like :meth:`fetch_many`."""
        if not numbers:
            return
        conn: Any = self._c()
        if self.outstanding:
            raise ProtocolError("internal error: DELE while answers are still to be read")
        self._marked = True  # QUIT's answer now says whether they went (see quit)
        during = f"DELE {numbers[0]}" if len(numbers) == 1 else f"DELE {numbers[0]}-{numbers[-1]}"
        with self._mapped(during):
            if len(numbers) > 1 and self.pipelining:
                conn._putline("\r\n".join(f"DELE {n}" for n in numbers).encode("ascii"))
                for _ in numbers:
                    conn._getresp()
            else:
                for n in numbers:
                    conn.dele(n)

    def quit(self) -> None:
        """QUIT: the server removes the deleted messages only if this succeeds. With none
        marked deleted its answer tells nothing: QUIT is sent and the session closed without
        waiting for it (a round trip and the server's own QUIT work at every empty poll)."""
        try:
            with self._mapped("QUIT"):
                conn: Any = self._c()
                if self._marked or self.outstanding:
                    conn.quit()
                else:
                    conn._putcmd("QUIT")
        finally:
            self.close()

    def abort(self) -> None:
        """Undo pending deletions (RSET), then QUIT; best effort, the socket closes anyway.

        Not when the session is out of step (an answer half-read, or not yet read) or past
        its deadline: then it is only closed, which deletes nothing either (RFC 1939), and
        takes no time whatever the server does."""
        conn = self.conn
        if conn is None:
            return
        try:
            if not (self._lost or self.outstanding or time.monotonic() >= self.deadline):
                conn.rset()
                conn.quit()
        except (poplib.error_proto, OSError, FetchError):
            pass
        finally:
            self.close()

    def interrupt(self) -> None:
        """Shut the socket down from another thread: a call blocked on it returns at once.

        Only the raw socket is touched: closing poplib's buffered file would wait for the
        reader's lock. The session is unusable afterwards and deletes nothing.
        """
        self._interrupted = True  # an open() still connecting gives up before logging in
        self._lost = True
        conn = self.conn
        sock = getattr(conn, "sock", None) if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Drop the connection without QUIT: RFC 1939 says nothing is deleted then."""
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()

    @contextlib.contextmanager
    def _mapped(
        self, during: str | Callable[[], str], *, malformed: bool = False
    ) -> Iterator[None]:
        """Translate what poplib, ssl and socket raise inside into :mod:`engine.errors`
        (httpcore's ``map_exceptions`` is the model), ``during`` naming the command (or a
        function giving it, called only on failure). ``malformed``: the answers make a
        listing, and a -ERR or a bad line in it is a malformed listing.

        Any failure leaves the session out of step (see :meth:`abort`), except a -ERR to a
        command when no other answer is pending: the server said no, and knows where it is.
        """
        try:
            yield
        except poplib.error_proto as exc:
            self._lost = self._lost or malformed or bool(self.outstanding)
            if malformed:
                raise _malformed(exc) from None
            raise _server_error(exc, during if isinstance(during, str) else during()) from None
        except FetchError:
            self._lost = True
            raise
        except BaseException as exc:
            self._lost = True
            if malformed and isinstance(exc, ValueError):  # a line that is not a listing's
                raise _malformed(exc) from None
            error = self._library_error(exc, during if isinstance(during, str) else during())
            if error is None:
                raise
            raise error from exc

    def _library_error(self, exc: BaseException, during: str) -> FetchError | None:
        """The engine's error for an exception of poplib, ssl or socket; None for another."""
        if isinstance(exc, poplib.error_proto):
            return _server_error(exc, during)
        return network_error(exc, self.server, self.deadline, self.seconds, during)


def _authenticate(
    conn: poplib.POP3, mechanism: str, server: ServerConfig, token: AccessToken
) -> None:
    """One SASL exchange: ``AUTH mech``, then the initial response after the server's
    empty challenge (a token does not fit RFC 5034's 255-octet AUTH line). A refusal is an
    error challenge, answered with an empty line, then -ERR: both read, then classified."""
    c: Any = conn
    c._putline(f"AUTH {mechanism}".encode("ascii"))
    c._getresp()  # "+ " (a -ERR: the mechanism is refused, mapped as a login error)
    initial = sasl.initial_response(
        mechanism, server.user_name, token.value, server.host, server.port
    )
    c._putline(base64.b64encode(initial))
    refusal: dict[str, str] = {}
    try:
        resp: bytes = c._getresp()
        if resp.startswith(b"+OK"):
            return
        refusal = sasl.parse_refusal(resp[1:])
        c._putline(b"")
        c._getresp()
    except poplib.error_proto as exc:
        error = _server_error(exc, "login")
        if not isinstance(error, AuthError):  # [IN-USE], [SYS/TEMP]: not the token
            raise error from None
    raise sasl.classify(refusal, mechanism, token.expires_at, token.scopes)


def _sizes(lines: list[bytes]) -> dict[int, int]:
    """The sizes a LIST answer gives, by message number. Raises ValueError if malformed."""
    sizes: dict[int, int] = {}
    for line in lines:
        num, size = (int(field) for field in line.split()[:2])
        if num < 1 or size < 0:
            raise ValueError(f"message {num} of {size} bytes")
        sizes[num] = size
    return sizes


def _malformed(exc: Exception) -> ProtocolError:
    return ProtocolError(f"the server's message listing is malformed: {exc}")
