"""The blocking POP3 session, on stdlib poplib. It runs only in worker threads.

A thread cannot be cancelled, so the socket timeout is what bounds every call here. Every
library exception is translated into :mod:`engine.errors` at this boundary. We never format
the password into a message, but a server may echo it in its ``-ERR``: the line it sent is
scrubbed of every configured secret before it is quoted or cut.
"""

from __future__ import annotations

import contextlib
import logging
import poplib
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.config import ServerConfig
from engine.errors import (
    AuthError,
    ConnectError,
    DuplicateUidlError,
    FetchError,
    FetchTimeout,
    MailboxLockedError,
    ProtocolError,
    ServerTempError,
    TLSError,
)
from engine.logs import scrub

log = logging.getLogger("engine.pop3")

# poplib's 2048-byte line limit rejects real mail (8-bit HTML has longer lines); getmail6
# raises it the same way. The limit still bounds a hostile line.
MAX_LINE = 1024 * 1024
setattr(poplib, "_MAXLINE", MAX_LINE)  # noqa: B010 - a private knob, no API

_CODE = re.compile(rb"\[([A-Z/-]+)\]")


@dataclass(frozen=True)
class Listed:
    number: int
    uidl: str | None
    size: int


def tls_context(server: ServerConfig) -> ssl.SSLContext:
    """Verified by default (system CAs, or ``caFile``); unverified only when configured."""
    cafile = str(server.ca_file) if server.ca_file else None
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"cannot load caFile {cafile}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not server.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


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


class _POP3(poplib.POP3):
    """poplib leaks its socket when the greeting is -ERR; close it before raising."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        try:
            super().__init__(host, port, timeout=timeout)
        except BaseException:
            _close_quietly(self)
            raise


class _POP3_SSL(poplib.POP3_SSL):
    def __init__(self, host: str, port: int, timeout: float, context: ssl.SSLContext) -> None:
        try:
            super().__init__(host, port, timeout=timeout, context=context)
        except BaseException:
            _close_quietly(self)
            raise


class Pop3Session:
    """One POP3 session. Use :meth:`open` first and always :meth:`quit` or :meth:`abort`."""

    def __init__(self, server: ServerConfig) -> None:
        self.server = server
        self.conn: poplib.POP3 | None = None
        self._interrupted = False
        # Whether the server announced PIPELINING in CAPA (RFC 2449), learnt after login.
        self.pipelining = False

    def _c(self) -> poplib.POP3:
        if self.conn is None:
            raise ProtocolError("the session is not open")
        return self.conn

    def open(self) -> None:
        s = self.server
        if not s.tls_verify and (s.use_ssl or s.starttls):
            log.warning(
                "server=%s:%d TLS certificate verification is OFF (tlsVerify false)", s.host, s.port
            )
        try:
            if s.use_ssl:
                self.conn = _POP3_SSL(s.host, s.port, s.timeout, tls_context(s))
            else:
                self.conn = _POP3(s.host, s.port, s.timeout)
                if s.starttls:
                    self._starttls()
            if self._interrupted:
                # Cancelled while connecting (the caller abandoned this thread): close what
                # was opened instead of logging in on a session nobody will use or close.
                raise ProtocolError("the session was cancelled while connecting")
            self._login()
        except FetchError:
            self.close()
            raise
        except BaseException as exc:
            self.close()
            raise self._translate(exc, "login") from exc

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
            conn.stls(context=tls_context(self.server))
        except poplib.error_proto as exc:
            # Offered in CAPA, refused when asked: still a TLS problem, not the credentials.
            text = exc.args[0] if exc.args else b""
            line = (text if isinstance(text, bytes) else str(text).encode())[:300]
            raise TLSError(
                f"the server refused STLS ({line.decode('utf-8', 'replace').strip()}); "
                "refusing to log in without TLS (startTls true)"
            ) from None

    def _login(self) -> None:
        conn = self._c()
        try:
            conn.user(self.server.user_name)
            conn.pass_(self.server.password)
        except poplib.error_proto as exc:
            raise _server_error(exc, "login") from None
        try:
            self.pipelining = "PIPELINING" in conn.capa()
        except poplib.error_proto:
            self.pipelining = False  # no CAPA: one command at a time

    def listing(self) -> list[Listed]:
        """Every message with its size and UIDL (``None`` when the server lacks UIDL)."""
        conn = self._c()
        try:
            _, lines, _ = conn.list()
            sizes: dict[int, int] = {}
            for line in lines:
                num, size = line.split()[:2]
                sizes[int(num)] = int(size)
            uidls: dict[int, str] = {}
            try:
                _, ulines, _ = conn.uidl()
            except poplib.error_proto:
                ulines = []
                log.warning("server=%s has no UIDL: keying messages by content", self.server.host)
            seen: dict[str, int] = {}
            for line in ulines:
                num_b, uid_b = line.split()[:2]
                uid = uid_b.decode("ascii", "replace")
                if uid in seen:
                    raise DuplicateUidlError(
                        f"the server listed UIDL {uid!r} for messages {seen[uid]} and {int(num_b)}"
                    )
                seen[uid] = int(num_b)
                uidls[int(num_b)] = uid
        except FetchError:
            raise
        except (poplib.error_proto, ValueError) as exc:
            raise ProtocolError(f"the server's message listing is malformed: {exc}") from None
        except BaseException as exc:
            raise self._translate(exc, "LIST") from exc
        return [Listed(n, uidls.get(n), sizes[n]) for n in sorted(sizes)]

    def retr(self, number: int) -> bytes:
        """The message exactly as sent, dot-stuffing removed.

        Only ``.CRLF`` ends the answer: a bare-LF ``.`` line is message content, and treating
        it as the end (as poplib does) would desynchronise the session.
        """
        return self.retr_many([number])[0]

    def retr_many(self, numbers: Sequence[int]) -> list[bytes]:
        """Several messages in one exchange: with PIPELINING (RFC 2449) every RETR goes out at
        once and the answers are read in order, so the round trips overlap."""
        # poplib has no streaming or pipelined RETR; its private helpers send and check +OK.
        conn: Any = self._c()
        during = f"RETR {numbers[0]}" if len(numbers) == 1 else f"RETR {numbers[0]}-{numbers[-1]}"
        try:
            if len(numbers) > 1 and self.pipelining:
                conn._putline("\r\n".join(f"RETR {n}" for n in numbers).encode("ascii"))
                out = []
                for n in numbers:
                    conn._getresp()
                    out.append(self._read_message(conn, n))
                return out
            out = []
            for n in numbers:
                conn._shortcmd(f"RETR {n}")
                out.append(self._read_message(conn, n))
            return out
        except FetchError:
            raise
        except poplib.error_proto as exc:
            raise _server_error(exc, during) from None
        except BaseException as exc:
            raise self._translate(exc, during) from exc

    @staticmethod
    def _read_message(conn: Any, number: int) -> bytes:
        """The answer's lines up to ``.CRLF``, exactly as sent but for the dot-stuffing.

        Read in the reader's buffered chunks, not line by line (a 10 KiB message is ~150
        lines: reading them one by one was most of the session thread's time), and only up
        to the terminator: what follows is the next pipelined answer. A line is a run of
        bytes ending in LF, as for readline: a bare-LF ``.`` line is content, not the end.
        """
        reader = conn.file
        raw = bytearray()
        run = 0  # bytes since the last LF: the line still open, bounded by MAX_LINE
        while True:
            chunk = reader.peek(65536)
            if not chunk:
                raise ProtocolError(f"the connection closed during RETR {number}")
            before = len(raw)
            raw += chunk
            if before < 3 and raw.startswith(b".\r\n"):
                end, keep = 3, 0  # an empty message
            else:
                at = raw.find(b"\n.\r\n", max(0, before - 3))
                end, keep = (at + 4, at + 1) if at >= 0 else (-1, -1)
            if end >= 0:
                reader.read(end - before)  # consume up to the terminator, no further
                del raw[keep:]
                break
            reader.read(len(chunk))
            newline = chunk.rfind(b"\n")
            run = run + len(chunk) if newline < 0 else len(chunk) - newline - 1
            if run > MAX_LINE:
                raise ProtocolError(f"a line of message {number} exceeds {MAX_LINE} bytes")
        if raw.startswith(b".."):
            del raw[0]
        data = bytes(raw)
        raw.clear()  # two copies of a 20 MB message at most, never three
        return data.replace(b"\n..", b"\n.") if b"\n.." in data else data

    def dele(self, number: int) -> None:
        self.dele_many([number])

    def dele_many(self, numbers: Sequence[int]) -> None:
        """Mark messages deleted (they go only at QUIT); pipelined like :meth:`retr_many`."""
        if not numbers:
            return
        conn: Any = self._c()
        during = f"DELE {numbers[0]}" if len(numbers) == 1 else f"DELE {numbers[0]}-{numbers[-1]}"
        try:
            if len(numbers) > 1 and self.pipelining:
                conn._putline("\r\n".join(f"DELE {n}" for n in numbers).encode("ascii"))
                for _ in numbers:
                    conn._getresp()
            else:
                for n in numbers:
                    conn.dele(n)
        except poplib.error_proto as exc:
            raise _server_error(exc, during) from None
        except BaseException as exc:
            raise self._translate(exc, during) from exc

    def quit(self) -> None:
        """QUIT: the server removes the deleted messages only if this succeeds."""
        try:
            self._c().quit()
        except poplib.error_proto as exc:
            raise _server_error(exc, "QUIT") from None
        except BaseException as exc:
            raise self._translate(exc, "QUIT") from exc
        finally:
            self.close()

    def abort(self) -> None:
        """Undo pending deletions (RSET), then QUIT; best effort, the socket closes anyway."""
        conn = self.conn
        if conn is None:
            return
        try:
            conn.rset()
            conn.quit()
        except (poplib.error_proto, OSError):
            pass
        finally:
            self.close()

    def interrupt(self) -> None:
        """Shut the socket down from another thread: a call blocked on it returns at once.

        Only the raw socket is touched: closing poplib's buffered file would wait for the
        reader's lock. The session is unusable afterwards and deletes nothing.
        """
        self._interrupted = True  # an open() still connecting gives up before logging in
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

    def _translate(self, exc: BaseException, during: str) -> BaseException:
        s = self.server
        where = f"{s.host}:{s.port}"
        if isinstance(exc, poplib.error_proto):
            return _server_error(exc, during)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return TLSError(f"the certificate of {where} is not trusted: {exc.verify_message}")
        if isinstance(exc, ssl.SSLError):
            return TLSError(f"TLS with {where} failed: {exc.reason or exc}")
        if isinstance(exc, TimeoutError | socket.timeout):
            return FetchTimeout(f"{where} did not answer within {s.timeout:g} s ({during})")
        if isinstance(exc, socket.gaierror):
            return ConnectError(f"cannot resolve {s.host}: {exc.strerror}")
        if isinstance(exc, ConnectionRefusedError):
            return ConnectError(f"{where} refused the connection")
        if isinstance(exc, OSError):
            if during == "login" and self.conn is None:
                return ConnectError(f"cannot connect to {where}: {exc.strerror or exc}")
            return ProtocolError(f"the connection to {where} was lost ({during}): {exc}")
        return exc
