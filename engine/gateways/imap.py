"""The IMAP gateway (:class:`ImapGateway`), on stdlib imaplib. It runs only in worker threads.

Why imaplib and not IMAPClient: every byte a server sends must be bounded while it is read
(a literal by its request's cap, a line by :data:`MAX_LINE`, the session by its deadline,
checked before every read), and both libraries read a literal whole into memory, IMAPClient
through imaplib itself. So the commands that carry mail (the listing's and the messages'
``UID FETCH``, the disposals) are sent and read here, on imaplib's socket, by a small bounded
reader (:meth:`ImapGateway._exchange`); imaplib does what it does well, the connection, TLS,
LOGIN's quoting, CAPABILITY and SELECT's untagged data, with its reads bounded the same way
(:class:`_Bounded`). One library fewer to trust at run time, and the same thread model as
POP3 (poplib).

A session: connect (IMAPS, or STARTTLS that fails closed), LOGIN, CAPABILITY; per folder,
SELECT (its UIDVALIDITY makes the keys: :func:`engine.keys.imap_key`) and one
``UID FETCH 1:* (UID RFC822.SIZE FLAGS)``; messages by ``UID FETCH`` of a window's UID set
with ``BODY.PEEK[]`` (nothing is marked read), one round trip per window; then the
disposal of ``afterProcessing``, only for messages whose outcome is committed:

- ``delete``: ``UID STORE +FLAGS.SILENT (\\Deleted)`` and ``UID EXPUNGE`` of those UIDs
  (UIDPLUS). Without UIDPLUS there is no UID EXPUNGE, and a bare EXPUNGE would also remove
  what other clients marked \\Deleted: the message is then only marked \\Deleted and
  :data:`KEYWORD`, skipped from then on, and goes at the next expunge someone else does.
- ``move``: ``UID MOVE`` (RFC 6851), else ``UID COPY`` and delete as above; the folder is
  created if missing.
- ``keep``: ``UID STORE +FLAGS.SILENT ($MailIntegrationProcessed)``.

Messages carrying :data:`KEYWORD` are never listed. A message that became a failure event
goes to ``failedFolder`` when one is configured. Disposals take effect at once (there is
no QUIT to wait for), which is why the session calls them only after the commit.
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import math
import re
import socket
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from engine.config import ServerConfig
from engine.errors import (
    AuthError,
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
from engine.gateways.pop3 import DISCARD_BYTES, MAX_LISTED, read_line
from engine.keys import account_key, imap_key
from engine.logs import scrub
from engine.oauth import sasl
from engine.tls import client_context

if TYPE_CHECKING:
    from engine.oauth.broker import AccessToken, TokenBroker

log = logging.getLogger("engine.gateways.imap")

KEYWORD = "$MailIntegrationProcessed"
"""The keyword ``keep`` sets (and delete without UIDPLUS): messages carrying it are skipped."""

# A literal in an answer that carries no mail (a folder name, a capability): small.
MAX_OTHER_LITERAL = 64 * 1024
# UIDs per command: a UID set stays well under the line lengths servers accept (8 KiB+).
UIDS_PER_COMMAND = 500

# Untagged lines of one answer, at most: a listing's 10 x MAX_LISTED, and some more.
MAX_ANSWER_LINES = 10 * MAX_LISTED + 1000
# Untagged lines read while ending an IDLE before its tagged answer, at most.
MAX_IDLE_LINES = 10_000

_CODE = re.compile(rb"\[([A-Z-]+)[^\]]*\]")
_LITERAL = re.compile(rb"\{(\d{1,12})\}\r?\n\Z")
_FETCH = re.compile(rb"\* \d+ FETCH \(")
_UID = re.compile(rb"\bUID (\d{1,10})\b")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d{1,12})\b")
_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")
_INTERNALDATE = re.compile(
    rb'\bINTERNALDATE "([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)"'
)
_MONTHS = {
    m: i
    for i, m in enumerate(
        (
            b"jan",
            b"feb",
            b"mar",
            b"apr",
            b"may",
            b"jun",
            b"jul",
            b"aug",
            b"sep",
            b"oct",
            b"nov",
            b"dec",
        ),
        1,
    )
}
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d{1,10})\]")
_CHUNK = 65536


def internal_date(line: bytes) -> datetime | None:
    """The INTERNALDATE of a FETCH response line (RFC 3501's date-time), aware; None when
    the line has none or it names no real date."""
    m = _INTERNALDATE.search(line)
    month = _MONTHS.get(m.group(2).lower()) if m is not None else None
    if m is None or month is None:
        return None
    day, _, year, hour, minute, second, sign, zh, zm = m.groups()
    offset = timedelta(hours=int(zh), minutes=int(zm)) * (-1 if sign == b"-" else 1)
    try:
        at = datetime(int(year), month, int(day), int(hour), int(minute), int(second))
        return at.replace(tzinfo=timezone(offset))
    except ValueError:  # 31-Feb, hour 25, an offset of a day or more
        return None


def mutf7(name: str) -> str:
    """A folder name in IMAP's modified UTF-7 (RFC 3501, 5.1.3): ASCII as it is, ``&`` as
    ``&-``, any other run as ``&`` + modified base64 of its UTF-16BE + ``-``."""
    import base64

    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            raw = "".join(run).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            run.clear()

    for c in name:
        if 0x20 <= ord(c) <= 0x7E:
            flush()
            out.append("&-" if c == "&" else c)
        else:
            run.append(c)
    flush()
    return "".join(out)


def quoted(name: str) -> str:
    """A folder name as an IMAP quoted string (modified UTF-7 inside)."""
    text = mutf7(name)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def uid_set(uids: Sequence[int]) -> str:
    """``1:3,7`` for ``[1, 2, 3, 7]``: a UID set in ranges."""
    ordered = sorted(set(uids))
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid != prev + 1:
            parts.append(str(start) if start == prev else f"{start}:{prev}")
            start = uid
        prev = uid
    parts.append(str(start) if start == prev else f"{start}:{prev}")
    return ",".join(parts)


def first_long_line(data: bytes, limit: int = MAX_LINE) -> int:
    """Where the first line of ``limit`` bytes or more (LF included) ends at ``limit``;
    -1 if there is none. Only a message at least that long can hold one."""
    if len(data) < limit:
        return -1
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        stop = len(data) if end < 0 else end + 1
        if stop - start >= limit:
            return start + limit
        start = stop
    return -1


class _Bounded:
    """What imaplib reads, bounded: every line in time (``wait``, before each read) and in
    length, and every literal in size (mail is read by :class:`ImapGateway` itself)."""

    file: Any
    sock: Any
    wait: Callable[[Any], None]

    def readline(self) -> bytes:
        line = read_line(self.file, MAX_LINE, lambda: self.wait(self.sock))
        if not line:
            raise imaplib.IMAP4.abort("socket error: EOF")
        return line

    def read(self, size: int) -> bytes:
        if size > MAX_OTHER_LITERAL:
            raise imaplib.IMAP4.abort(f"a literal of {size} bytes where none was due")
        return read_exact(self.file, size, lambda: self.wait(self.sock))


def read_exact(reader: Any, size: int, wait: Callable[[], None]) -> bytes:
    """``size`` bytes, checking ``wait`` before every read (a trickle is cut by it)."""
    out = bytearray()
    while len(out) < size:
        wait()
        chunk = reader.read1(min(size - len(out), _CHUNK))
        if not chunk:
            raise ProtocolError("the connection closed in the middle of a literal")
        out += chunk
    return bytes(out)


class _IMAP4(_Bounded, imaplib.IMAP4):
    def __init__(self, host: str, port: int, timeout: float, wait: Callable[[Any], None]) -> None:
        self.wait = wait
        super().__init__(host, port, timeout=timeout)


class _IMAP4_SSL(_Bounded, imaplib.IMAP4_SSL):
    def __init__(
        self, host: str, port: int, timeout: float, context: Any, wait: Callable[[Any], None]
    ) -> None:
        self.wait = wait
        super().__init__(host, port, ssl_context=context, timeout=timeout)


def exc_text(exc: BaseException) -> str:
    """What imaplib put in an exception: often the server's line as bytes."""
    arg = exc.args[0] if exc.args else ""
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def server_error(text: str, during: str) -> FetchError:
    """Classify a NO, BAD or BYE by its response code (RFC 5530)."""
    line = scrub(text).strip()[:300]
    m = _CODE.search(text.encode("utf-8", "replace"))
    code = m.group(1).decode() if m else ""
    if code in ("UNAVAILABLE", "LIMIT", "OVERQUOTA", "SERVERBUG"):
        return ServerTempError(f"the server reported a temporary failure: {line}")
    if code == "INUSE":
        return MailboxLockedError(f"the mailbox is in use by another session: {line}")
    if code in ("AUTHENTICATIONFAILED", "AUTHORIZATIONFAILED", "EXPIRED") or during == "login":
        return AuthError(f"the server refused the login: {line}")
    return ProtocolError(f"the server answered {line!r} to {during}")


class ImapGateway:
    """One IMAP session: the IMAP implementation of :class:`engine.gateways.Gateway`. Use
    :meth:`open` first and always :meth:`quit` or :meth:`abort`."""

    def __init__(self, server: ServerConfig, tokens: TokenBroker | None = None) -> None:
        self.server = server
        # Where OAuth2 access tokens come from (server.oauth2); None: passwords only.
        self.tokens = tokens
        # The SASL mechanism an OAuth2 sign-in used (None: LOGIN).
        self.mechanism: str | None = None
        self.conn: imaplib.IMAP4 | None = None
        self.capabilities: frozenset[str] = frozenset()
        # One UID FETCH takes a whole window, and a header alone is BODY.PEEK[HEADER].
        self.pipelining = True
        self.top: bool | None = True
        self.mid_exchange = False
        self.started = time.monotonic()
        self.deadline = math.inf
        self.extend(0)
        self._interrupted = False
        self._lost = False
        # Listed.number - 1 -> (folder, UID); the folder's UIDVALIDITY when listed.
        self.handles: list[tuple[str, int]] = []
        self.validity: dict[str, int] = {}
        self.selected: str | None = None
        self.permanent_keywords = True
        self._created: set[str] = set()
        # UIDNEXT of the folder selected last, when the server said it.
        self.uidnext: int | None = None
        # UIDNEXT of the first folder when listed, if the listing took all of it: the push
        # (engine.push) need not wake for mail below it.
        self.mark: int | None = None
        # Per folder listed: (EXISTS, messages to process), for `check`.
        self.counts: dict[str, tuple[int, int]] = {}
        self._partial: tuple[Request, Answer] | None = None
        # The bytes a window may still keep (its grant), and the answers it kept.
        self._room: float = math.inf
        self._kept = 0

    @property
    def seconds(self) -> float:
        """The session's time limit, as it stands."""
        return self.deadline - self.started

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

    def _c(self) -> imaplib.IMAP4:
        if self.conn is None:
            raise ProtocolError("the IMAP session is not open")
        return self.conn

    # -- open ------------------------------------------------------------------------------

    def open(self) -> None:
        """Connect (IMAPS, or STARTTLS that fails closed), log in, learn the capabilities."""
        s = self.server
        if not s.tls_verify and (s.use_ssl or s.starttls):
            log.warning(
                "server=%s:%d TLS certificate verification is OFF (tlsVerify false)", s.host, s.port
            )
        try:
            with self._mapped("login"):
                self._connect()
                if self._interrupted:
                    raise ProtocolError("the session was cancelled while connecting")
                self._login()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        s = self.server
        if s.use_ssl:
            context = client_context(s.ca_file, s.tls_verify)
            self.conn = _IMAP4_SSL(s.host, s.port, s.timeout, context, self._wait)
        else:
            self.conn = _IMAP4(s.host, s.port, s.timeout, self._wait)
            if s.starttls:
                self._starttls()
        self._alerts()

    def _starttls(self) -> None:
        conn = self._c()
        if "STARTTLS" not in conn.capabilities:
            # Fail closed: never fall back to sending the password in clear text.
            raise TLSError(
                "the server does not offer STARTTLS; refusing to log in without TLS (startTls true)"
            )
        try:
            conn.starttls(client_context(self.server.ca_file, self.server.tls_verify))
        except imaplib.IMAP4.error as exc:
            raise TLSError(
                f"the server refused STARTTLS ({scrub(str(exc))[:200]}); refusing to log in "
                "without TLS (startTls true)"
            ) from None

    def _login(self) -> None:
        conn = self._c()
        if self.server.oauth2 is not None:
            self._oauth_login(conn)
        else:
            conn.login(self.server.user_name, self.server.password)
        self._alerts()  # before the next command: imaplib then drops the untagged OKs
        _typ, data = conn.capability()
        words = b" ".join(d for d in data if isinstance(d, bytes)).decode("ascii", "replace")
        self.capabilities = frozenset(w.upper() for w in words.split())
        self._alerts()

    def _oauth_login(self, conn: imaplib.IMAP4) -> None:
        """AUTHENTICATE with the mechanism CAPABILITY announces (AUTH=OAUTHBEARER, else
        AUTH=XOAUTH2) through the broker's sign_in, as POP3 does: a stored token the server
        refuses is replaced and tried once more; engine.oauth.sasl classifies a refusal."""
        s = self.server
        assert s.oauth2 is not None
        if self.tokens is None:
            raise OAuthError("token-endpoint", "internal error: no token broker for OAuth2")
        # imaplib keeps the capabilities of the greeting (after STARTTLS: asked again).
        offered = [c[5:] for c in conn.capabilities if c.upper().startswith("AUTH=")]
        mechanism = sasl.choose(offered)
        if mechanism is None:
            raise AuthError(
                "the server offers neither OAUTHBEARER nor XOAUTH2 in CAPABILITY "
                f"(AUTH=: {' '.join(offered)[:100] or 'none'})"
            )
        account = account_key(s.user_name, s.host, s.account_id)
        self.tokens.sign_in(
            account,
            s.oauth2,
            mechanism,
            lambda token: _authenticate(conn, mechanism, s, token),
        )
        self.mechanism = mechanism

    def _alerts(self) -> None:
        """RFC 3501: an ``[ALERT]`` must reach a person: a warning in the log (scrubbed).
        imaplib files ``* OK [ALERT] text`` under OK (the text) and ALERT (no text)."""
        conn = self.conn
        if conn is None or conn.untagged_responses.pop("ALERT", None) is None:
            return
        for kind in ("OK", "NO", "BAD"):
            for text in conn.untagged_responses.get(kind, []):
                if isinstance(text, bytes) and text.startswith(b"[ALERT]"):
                    self._alert(text[len(b"[ALERT]") :])

    def _alert(self, text: bytes) -> None:
        log.warning(
            "server=%s:%d ALERT from the server: %s",
            self.server.host,
            self.server.port,
            scrub(text.decode("utf-8", "replace")).strip()[:300],
        )

    # -- listing ---------------------------------------------------------------------------

    def listing(self) -> list[Listed]:
        """Every message of every configured folder not carrying :data:`KEYWORD`, oldest
        first per folder, with its key (folder, UIDVALIDITY, UID) and RFC822.SIZE; at most
        :data:`MAX_LISTED` in all."""
        out: list[Listed] = []
        self.handles.clear()
        for folder in self.server.folders:
            exists = self.select(folder)
            rows = self._list_folder(folder, MAX_LISTED - len(out)) if exists else []
            self.counts[folder] = (exists, len(rows))
            if folder == self.server.folders[0] and len(rows) < MAX_LISTED - len(out):
                self.mark = self.uidnext  # everything below it is in this listing
            validity = self.validity[folder]
            for uid, size in rows:
                self.handles.append((folder, uid))
                out.append(Listed(len(self.handles), imap_key(folder, validity, uid), size))
            if len(out) >= MAX_LISTED:
                log.warning(
                    "server=%s lists over %d messages: this session takes the first %d",
                    self.server.host,
                    MAX_LISTED,
                    MAX_LISTED,
                )
                break
        return out

    def select(self, folder: str) -> int:
        """SELECT ``folder`` (read-write: disposals need it; BODY.PEEK reads nothing as
        seen); its UIDVALIDITY must be the one listed, if it was. Returns EXISTS."""
        conn = self._c()
        with self._mapped(f"SELECT {folder}"):
            typ, data = conn.select(quoted(folder))
            self._alerts()
            if typ != "OK":
                raise server_error(_text(data), f"SELECT {folder}")
            raw = conn.untagged_responses.get("UIDVALIDITY", [b""])[-1]
            validity = int(raw) if isinstance(raw, bytes) and raw.isdigit() else 0
            flags = b" ".join(
                x for x in conn.untagged_responses.get("PERMANENTFLAGS", []) if isinstance(x, bytes)
            )
            exists_raw = data[-1] if data else b"0"
            nxt = conn.untagged_responses.get("UIDNEXT", [b""])[-1]
            self.uidnext = int(nxt) if isinstance(nxt, bytes) and nxt.isdigit() else None
        if validity <= 0:
            raise ProtocolError(f"the server gave no UIDVALIDITY for {folder!r}")
        known = self.validity.get(folder)
        if known is not None and known != validity:
            self._lost = True
            raise ProtocolError(
                f"the UIDVALIDITY of {folder!r} changed during the session ({known} -> "
                f"{validity}): nothing more is done in it until the next session"
            )
        self.validity[folder] = validity
        self.selected = folder
        self.permanent_keywords = b"\\*" in flags
        return int(exists_raw) if isinstance(exists_raw, bytes) and exists_raw.isdigit() else 0

    def _list_folder(self, folder: str, room: int) -> list[tuple[int, int]]:
        """(UID, RFC822.SIZE) of the folder's messages without :data:`KEYWORD`, by UID."""
        rows: list[tuple[int, int]] = []
        seen = 0
        for line, _literal in self._exchange(
            "UID FETCH 1:* (UID RFC822.SIZE FLAGS)", f"listing {folder}", literals=False
        ):
            seen += 1
            if seen > 10 * MAX_LISTED:
                raise ProtocolError(f"a listing of {folder!r} goes on past {seen} lines")
            uid, size, flags = _UID.search(line), _SIZE.search(line), _FLAGS.search(line)
            if uid is None or size is None:
                continue  # an unsolicited FETCH (flags changed), or not a FETCH at all
            if flags is not None and KEYWORD.lower().encode() in flags.group(1).lower().split():
                continue
            if len(rows) < room:  # servers answer in UID order: these are the oldest
                rows.append((int(uid.group(1)), int(size.group(1))))
        rows.sort()
        return rows

    def describe(self) -> list[str]:
        """For ``check``, after :meth:`listing`: the capabilities that matter, the server's
        folders (the first 200), and each folder read with its UIDVALIDITY and counts."""
        caps = ", ".join(
            f"{c} {'yes' if c in self.capabilities else 'no'}" for c in ("IDLE", "MOVE", "UIDPLUS")
        )
        names: list[str] = []
        for line, _ in self._exchange('LIST "" "*"', "LIST"):
            if line.startswith(b"* LIST ") and len(names) < 200:
                names.append(_printable(line.rstrip().rsplit(b" ", 1)[-1]))
        lines = [f"capabilities: {caps}", f"folders on the server: {', '.join(names)}"]
        for folder, (exists, todo) in self.counts.items():
            lines.append(
                f"{folder}: {exists} message(s), UIDVALIDITY {self.validity.get(folder)}, "
                f"{todo} not marked {KEYWORD}"
            )
        return lines

    # -- fetch -----------------------------------------------------------------------------

    def fetch_many(self, requests: Sequence[Request], grant: float = math.inf) -> list[Answer]:
        """The messages of ``requests`` in one ``UID FETCH`` per folder and kind (whole, or
        header alone), each literal bounded by its request's cap while it is read. Once the
        answers kept hold more than ``grant`` bytes (a server whose RFC822.SIZE is below the
        truth), the literals still coming are read and dropped, and only the answers before
        them are returned: the session asks for the rest again in its next window (nothing
        stays pending on the connection, so :attr:`mid_exchange` is always false)."""
        self._room, self._kept = grant, 0
        out: list[Answer] = []
        for group in _groups(requests, self.handles):
            answers = self._fetch_group(group)
            for answer in answers:
                if answer is None:
                    return out
                out.append(answer)
            if self._room <= 0:
                break
        return out

    def _fetch_group(self, group: list[Request]) -> list[Answer | None]:
        folder = self.handles[group[0].number - 1][0]
        if self.selected != folder:
            self.select(folder)
        by_uid = {self.handles[r.number - 1][1]: r for r in group}
        item = "BODY.PEEK[HEADER]" if group[0].headers_only else "BODY.PEEK[]"
        got: dict[int, Answer | None] = {}
        # INTERNALDATE: when the message reached the server, for the ledger's lag.
        command = f"UID FETCH {uid_set(list(by_uid))} (UID INTERNALDATE {item})"
        for _line, literal in self._exchange(command, "FETCH", by_uid=by_uid):
            if literal is not None:
                uid, answer = literal
                got[uid] = answer
        missing = [uid for uid in by_uid if uid not in got]
        if missing:
            raise ProtocolError(
                f"the server sent nothing for UID {missing[0]} of {folder!r} (expunged by "
                "another client?): the next session lists the folder again"
            )
        return [got[self.handles[r.number - 1][1]] for r in group]

    def _exchange(
        self,
        command: str,
        during: str,
        *,
        literals: bool = True,
        by_uid: dict[int, Request] | None = None,
    ) -> Iterator[tuple[bytes, tuple[int, Answer | None] | None]]:
        """Send one tagged command and yield its untagged responses as they are read:
        ``(line, None)``, or for a FETCH carrying a message literal, ``(line, (uid,
        answer))``. Ends at the tagged answer; a NO or BAD raises."""
        conn: Any = self._c()
        with self._mapped(during):
            tag = conn._new_tag()
            conn.send(tag + b" " + command.encode("ascii") + b"\r\n")
            for _ in range(MAX_ANSWER_LINES):
                line = conn.readline()
                if line.startswith(tag + b" "):
                    self._tagged(line[len(tag) + 1 :], during)
                    return
                literal = _LITERAL.search(line)
                if literal is None:
                    if line.startswith(b"* ") and b"[ALERT]" in line[:12]:
                        self._alert(line)
                    yield line, None
                    continue
                if not literals or by_uid is None or _FETCH.match(line) is None:
                    raise ProtocolError(f"an unexpected literal in the answer to {during}")
                yield line, self._message(conn, line, int(literal.group(1)), by_uid)
            raise ProtocolError(f"the answer to {during} goes on past {MAX_ANSWER_LINES} lines")

    def _tagged(self, rest: bytes, during: str) -> None:
        if rest.startswith(b"OK"):
            return
        if rest.startswith(b"NO") and b"[ALERT]" in rest:
            self._alert(rest)
        raise server_error(rest.decode("utf-8", "replace"), during)

    def _message(
        self, conn: Any, line: bytes, size: int, by_uid: dict[int, Request]
    ) -> tuple[int, Answer | None]:
        """The message literal announced at the end of ``line``, and the rest of its FETCH
        response (which may carry its UID and INTERNALDATE, when the server sends them after
        the body). None for a literal read and dropped because the window's grant is used up."""
        uid_m = _UID.search(line)
        kept: tuple[bytes, str | None] | None = None
        if self._kept and self._room <= 0:
            self._drop(conn, size, uid_m, by_uid)
        else:
            kept = self._literal(conn, size, uid_m, by_uid)
            self._kept += 1
            self._room -= len(kept[0])
        rest = conn.readline()  # ")" or " UID n)" and CRLF
        if uid_m is None:
            uid_m = _UID.search(rest)
            if uid_m is None or int(uid_m.group(1)) not in by_uid:
                raise ProtocolError("a FETCH response without the UID of its message")
        if kept is None:
            return int(uid_m.group(1)), None
        arrived = internal_date(line) or internal_date(rest)
        return int(uid_m.group(1)), Answer(kept[0], size, kept[1], arrived)

    def _drop(
        self, conn: Any, size: int, uid_m: re.Match[bytes] | None, by_uid: dict[int, Request]
    ) -> None:
        request = by_uid.get(int(uid_m.group(1))) if uid_m is not None else None
        cap = request.cap if request is not None else max(r.cap for r in by_uid.values())
        if size > cap + max(cap, DISCARD_BYTES):
            self._lost = True
            raise ProtocolError(f"a message literal of {size} bytes, over any limit")
        _discard(conn.file, size, lambda: self._wait(conn.sock))

    def _literal(
        self,
        conn: Any,
        size: int,
        uid_m: re.Match[bytes] | None,
        by_uid: dict[int, Request],
    ) -> tuple[bytes, str | None]:
        """Read a message literal of ``size`` bytes, keeping at most its request's cap (the
        largest cap of the window while its UID is not known yet), and at most up to a line
        over :data:`MAX_LINE`; the rest is read and dropped, to stay in step."""
        request = by_uid.get(int(uid_m.group(1))) if uid_m is not None else None
        cap = request.cap if request is not None else max(r.cap for r in by_uid.values())
        wait = lambda: self._wait(conn.sock)  # noqa: E731 - read_exact's hook
        data = read_exact(conn.file, min(size, cap), wait)
        cut = "size" if size > cap else None
        long_at = first_long_line(data)
        if long_at >= 0:
            data, cut = data[:long_at], "line"
        if size > cap:
            if request is not None:
                self._partial = (request, Answer(data, size, cut))
            if size - cap > max(cap, DISCARD_BYTES):
                self._lost = True
                raise ProtocolError(f"a message literal of {size} bytes, over any limit")
            _discard(conn.file, size - cap, wait)
            self._partial = None
        return data, cut

    # -- disposal --------------------------------------------------------------------------

    def dispose(self, numbers: Sequence[int], failed: Collection[int] = ()) -> None:
        """Apply ``afterProcessing`` to these messages, whose outcome is committed; those of
        ``failed`` go to ``failedFolder`` when there is one. Takes effect at once."""
        s = self.server
        failed_set = set(failed) if s.failed_folder else set()
        by_folder: dict[str, tuple[list[int], list[int]]] = {}
        for n in numbers:
            folder, uid = self.handles[n - 1]
            pair = by_folder.setdefault(folder, ([], []))
            pair[1 if n in failed_set else 0].append(uid)
        for folder, (done, bad) in by_folder.items():
            if self.selected != folder:
                self.select(folder)
            for chunk in _chunks(bad):
                self._move(chunk, s.failed_folder or "")
            for chunk in _chunks(done):
                self._dispose_uids(chunk)

    def _dispose_uids(self, uids: list[int]) -> None:
        mode = self.server.after_processing
        if mode == "keep":
            self._store(uids, KEYWORD)
        elif mode == "move":
            self._move(uids, self.server.move_folder or "")
        else:
            self._delete(uids)

    def _store(self, uids: list[int], flags: str) -> None:
        if KEYWORD in flags and not self.permanent_keywords:
            log.warning(
                "server=%s folder=%s does not keep keywords: the ledger alone keeps these "
                "messages from being processed again",
                self.server.host,
                self.selected,
            )
        self._run(f"UID STORE {uid_set(uids)} +FLAGS.SILENT ({flags})", "STORE")

    def _delete(self, uids: list[int]) -> None:
        if "UIDPLUS" in self.capabilities:
            self._store(uids, "\\Deleted")
            self._run(f"UID EXPUNGE {uid_set(uids)}", "UID EXPUNGE")
            return
        # No UID EXPUNGE, and a bare EXPUNGE would remove what others marked \Deleted.
        log.warning(
            "server=%s has no UIDPLUS: %d message(s) marked \\Deleted and %s, not expunged "
            "(they go at the next expunge of the server or another client)",
            self.server.host,
            len(uids),
            KEYWORD,
        )
        self._store(uids, f"\\Deleted {KEYWORD}")

    def _move(self, uids: list[int], target: str) -> None:
        self._ensure_folder(target)
        if "MOVE" in self.capabilities:
            self._run(f"UID MOVE {uid_set(uids)} {quoted(target)}", "MOVE")
        else:
            self._run(f"UID COPY {uid_set(uids)} {quoted(target)}", "COPY")
            self._delete(uids)

    def _ensure_folder(self, folder: str) -> None:
        """CREATE the folder unless this session did, or it exists (LIST names it)."""
        if folder in self._created:
            return
        listed = [line for line, _ in self._exchange(f'LIST "" {quoted(folder)}', "LIST")]
        if not any(line.startswith(b"* LIST ") for line in listed):
            self._run(f"CREATE {quoted(folder)}", f"CREATE {folder}")
        self._created.add(folder)

    def _run(self, command: str, during: str) -> None:
        for _ in self._exchange(command, during):
            pass

    # -- the end ---------------------------------------------------------------------------

    def quit(self) -> None:
        """LOGOUT. The disposals took effect as they were made."""
        try:
            if not self._lost:
                with self._mapped("LOGOUT"):
                    self._c().logout()
        finally:
            self.close()

    def abort(self) -> None:
        """Close the connection (LOGOUT when still in step); nothing is disposed of that was
        not committed, so there is nothing to undo."""
        conn = self.conn
        if conn is None:
            return
        try:
            if not (self._lost or time.monotonic() >= self.deadline):
                conn.logout()
        except (imaplib.IMAP4.error, OSError, FetchError):
            pass
        finally:
            self.close()

    def interrupt(self) -> None:
        """Shut the socket down from another thread: a call blocked on it returns at once."""
        self._interrupted = True
        self._lost = True
        conn = self.conn
        sock = getattr(conn, "sock", None) if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Drop the connection."""
        conn, self.conn = self.conn, None
        if conn is not None:
            for name in ("file", "sock"):
                obj = getattr(conn, name, None)
                if obj is not None:
                    with contextlib.suppress(OSError):
                        obj.close()

    @contextlib.contextmanager
    def _mapped(self, during: str) -> Iterator[None]:
        """Translate what imaplib, ssl and socket raise inside into :mod:`engine.errors`."""
        try:
            yield
        except FetchError as exc:
            if not isinstance(exc, ServerTempError | AuthError | MailboxLockedError):
                self._lost = True
            self._unfinished(exc)
            raise
        except imaplib.IMAP4.abort as exc:  # BYE, a broken answer, the end of the stream
            self._lost = True
            raise self._unfinished(server_error(exc_text(exc), during)) from None
        except imaplib.IMAP4.error as exc:  # a NO or BAD to a command imaplib sent
            raise server_error(exc_text(exc), during) from None
        except BaseException as exc:
            self._lost = True
            error = network_error(exc, self.server, self.deadline, self.seconds, during)
            if error is None:
                raise
            raise self._unfinished(error) from exc

    def _unfinished(self, error: FetchError) -> FetchError:
        if self._partial is not None and error.unfinished is None:
            error.unfinished = self._partial
        self._partial = None
        return error


def _authenticate(
    conn: imaplib.IMAP4, mechanism: str, server: ServerConfig, token: AccessToken
) -> None:
    """One AUTHENTICATE exchange: imaplib sends the initial response after the server's
    empty challenge. A refusal is an error challenge, answered with an empty line
    (:class:`engine.oauth.sasl.SaslClient`), then NO: a NO naming a temporary failure
    ([UNAVAILABLE], [INUSE]...) is the server's, not the token's; any other is classified."""
    client = sasl.SaslClient(mechanism, server.user_name, token.value, server.host, server.port)
    try:
        # imaplib's authobject takes and returns bytes (base64 is imaplib's job).
        conn.authenticate(mechanism, lambda challenge: client(challenge).encode())
    except imaplib.IMAP4.abort:
        raise  # BYE or a broken answer: ImapGateway._mapped maps it
    except imaplib.IMAP4.error as exc:
        error = server_error(exc_text(exc), "login")
        if not isinstance(error, AuthError):
            raise error from None
        raise client.refused(token.expires_at, token.scopes) from None


def _printable(raw: bytes) -> str:
    """A name the server sent, safe to print: control characters as ``?``, at most 200."""
    text = scrub(raw.decode("utf-8", "replace"))[:200]
    return "".join(c if c.isprintable() else "?" for c in text)


def _text(data: list[Any]) -> str:
    return " ".join(
        d.decode("utf-8", "replace") if isinstance(d, bytes) else str(d) for d in data if d
    )


def _discard(reader: Any, size: int, wait: Callable[[], None]) -> None:
    left = size
    while left > 0:
        wait()
        chunk = reader.read1(min(left, _CHUNK))
        if not chunk:
            raise ProtocolError("the connection closed in the middle of a literal")
        left -= len(chunk)


def _chunks(uids: list[int]) -> Iterator[list[int]]:
    for i in range(0, len(uids), UIDS_PER_COMMAND):
        yield uids[i : i + UIDS_PER_COMMAND]


def _groups(requests: Sequence[Request], handles: list[tuple[str, int]]) -> list[list[Request]]:
    """Runs of requests of one folder and one kind, in order, each a single UID FETCH."""
    groups: list[list[Request]] = []
    for r in requests:
        key = (handles[r.number - 1][0], r.headers_only)
        last = groups[-1][0] if groups else None
        if (
            last is not None
            and (handles[last.number - 1][0], last.headers_only) == key
            and len(groups[-1]) < UIDS_PER_COMMAND
        ):
            groups[-1].append(r)
            continue
        groups.append([r])
    return groups


class IdleWatcher:
    """The daemon's wait for new mail on one IMAP mailbox: IDLE (RFC 2177) on its first
    folder, on a connection of its own (one socket and one worker thread per mailbox while
    it waits). Blocking, for a worker thread; :meth:`interrupt` from another thread.

    Each IDLE lasts at most ``idleRenewSeconds`` (before the 29 minutes after which a server
    may drop it) and ``idleKeepAliveSeconds``; then DONE and a NOOP, each answered within
    ``timeoutSeconds`` or the connection is taken as dropped: a server that vanished without
    a word is found within keep-alive plus timeout. A closed connection, a BYE, a NO: a
    :class:`FetchError`, and the daemon reconnects with a backoff.
    """

    def __init__(self, server: ServerConfig, tokens: TokenBroker | None = None) -> None:
        self.server = server
        self.gateway = ImapGateway(server, tokens)
        # Waiting is bounded per read by the IDLE's own end and timeoutSeconds, not by a
        # session's deadline.
        self.gateway.deadline = math.inf
        self.folder = server.folders[0]

    def open(self) -> bool:
        """Connect and select the folder; False when the server has no IDLE (then the
        daemon polls at pollIntervalSeconds)."""
        g = self.gateway
        g.open()
        if "IDLE" not in g.capabilities:
            return False
        g.select(self.folder)
        return True

    def wait(self, seconds: float, seen: int | None) -> int | None:
        """Wait up to ``seconds`` for mail past UIDNEXT ``seen`` (None: any new mail from
        now): its UIDNEXT once there is some, None when the time is up."""
        g = self.gateway
        if seen is not None and g.uidnext is not None and g.uidnext > seen:
            return g.uidnext  # delivered before this wait began
        end = time.monotonic() + seconds
        cycle = min(self.server.idle_renew, self.server.idle_keepalive)
        while (left := end - time.monotonic()) > 0:
            if self._idle(min(cycle, left)):
                return self._uidnext() or 1  # never None: that would say "no mail"
            g._run("NOOP", "NOOP")  # the keep-alive: answered within timeoutSeconds
        return None

    def _idle(self, seconds: float) -> bool:
        """One IDLE of at most ``seconds``: whether the server announced new mail."""
        g = self.gateway
        conn: Any = g._c()
        pushed = False
        with g._mapped("IDLE"):
            tag = conn._new_tag()
            conn.send(tag + b" IDLE\r\n")
            first = conn.readline()
            if not first.startswith(b"+"):
                g._tagged(first.partition(b" ")[2], "IDLE")
                raise ProtocolError(f"the server refused IDLE: {first[:200]!r}")
            end = time.monotonic() + seconds
            while not pushed and (left := end - time.monotonic()) > 0:
                line = _line_within(conn, left)
                if line is None:
                    break
                if line.startswith(b"* BYE"):
                    raise server_error(line.decode("utf-8", "replace"), "IDLE")
                pushed = line.startswith(b"* ") and line.rstrip().endswith(b" EXISTS")
            conn.sock.settimeout(self.server.timeout)
            conn.send(b"DONE\r\n")
            for _ in range(MAX_IDLE_LINES):
                answer = conn.readline()
                if answer.startswith(tag + b" "):
                    g._tagged(answer[len(tag) + 1 :], "IDLE")
                    break
            else:
                raise ProtocolError(f"no end to IDLE after {MAX_IDLE_LINES} lines")
        return pushed

    def _uidnext(self) -> int | None:
        highest = 0
        for line, _ in self.gateway._exchange("UID FETCH * (UID)", "FETCH"):
            m = _UID.search(line)
            if m is not None:
                highest = max(highest, int(m.group(1)))
        return highest + 1 if highest else None

    def interrupt(self) -> None:
        """From another thread: end a wait blocked on the server at once."""
        self.gateway.interrupt()

    def close(self) -> None:
        """LOGOUT when still in step, and close."""
        self.gateway.abort()


def _line_within(conn: Any, seconds: float) -> bytes | None:
    """The next line, or None if none came within ``seconds``. After a timeout the socket's
    file refuses to read again (SocketIO), so it is made anew: nothing was buffered in it,
    since the read that timed out found its buffer empty."""
    conn.sock.settimeout(seconds)
    try:
        line: bytes = conn.readline()
    except TimeoutError:
        old, conn.file = conn.file, conn.sock.makefile("rb")
        with contextlib.suppress(OSError):
            old.close()
        return None
    return line
