"""Reference POP3 clients: what "as fast as POP3 goes here" means for the benchmarks.

- :func:`poplib_loop`: the plain stdlib loop (USER/PASS, UIDL, RETR + DELE each, QUIT).
- :func:`imaplib_loop`: the plain stdlib IMAP loop (LOGIN, SELECT, UID SEARCH, then UID FETCH
  of BODY.PEEK[] and UID STORE \\Deleted for each message, one EXPUNGE, LOGOUT).
- :func:`pipelined`: a raw-socket client that keeps a window of RETR (then DELE) commands in
  flight before reading the answers (RFC 2449 PIPELINING, which Dovecot advertises).

Both fetch and delete everything in one mailbox and return what they received; every read is
bounded by the socket timeout and every loop by the listing's length.
"""

from __future__ import annotations

import contextlib
import imaplib
import poplib
import socket
import ssl
from dataclasses import dataclass

# Same knob the engine turns (engine/gateways/pop3.py): poplib's 2048-byte line limit is too
# small for real mail. Set here too so the reference loop does not depend on importing the engine.
setattr(poplib, "_MAXLINE", 1024 * 1024)  # noqa: B010

TIMEOUT = 60.0


@dataclass
class Fetched:
    messages: int = 0
    octets: int = 0


def poplib_loop(
    host: str, port: int, user: str, password: str, *, tls: ssl.SSLContext | None = None
) -> Fetched:
    """USER/PASS, UIDL, then RETR and DELE for each message, QUIT."""
    if tls is not None:
        conn: poplib.POP3 = poplib.POP3_SSL(host, port, timeout=TIMEOUT, context=tls)
    else:
        conn = poplib.POP3(host, port, timeout=TIMEOUT)
    out = Fetched()
    try:
        conn.user(user)
        conn.pass_(password)
        _, lines, _ = conn.uidl()
        numbers = [int(line.split()[0]) for line in lines]
        for number in numbers:
            _, _lines, octets = conn.retr(number)
            out.messages += 1
            out.octets += octets
            conn.dele(number)
        conn.quit()
    finally:
        conn.close()
    return out


def imaplib_loop(host: str, port: int, user: str, password: str) -> Fetched:
    """LOGIN, SELECT INBOX, UID SEARCH ALL, then for each message UID FETCH (BODY.PEEK[])
    and UID STORE +FLAGS (\\Deleted); one EXPUNGE, LOGOUT: a round trip per command."""
    conn = imaplib.IMAP4(host, port, timeout=TIMEOUT)
    out = Fetched()
    try:
        conn.login(user, password)
        conn.select("INBOX")
        _, data = conn.uid("SEARCH", "ALL")
        for uid in data[0].split() if data and data[0] else []:
            _, parts = conn.uid("FETCH", uid, "(BODY.PEEK[])")
            body = next(p[1] for p in parts if isinstance(p, tuple))
            out.messages += 1
            out.octets += len(body)
            conn.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")
        conn.expunge()
        conn.logout()
    finally:
        with contextlib.suppress(OSError):
            conn.shutdown()
    return out


class _Reader:
    """Buffered reads of POP3 answers from a socket (plain or TLS)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.pos = 0

    def _fill(self) -> None:
        if self.pos > 1 << 20:
            # Keep the 2 bytes before pos: multiline() looks back at the status line's CRLF.
            del self.buf[: self.pos - 2]
            self.pos = 2
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                out = bytes(self.buf[self.pos : end])
                self.pos = end + 2
                return out
            self._fill()

    def status(self, what: str) -> bytes:
        line = self.line()
        if not line.startswith(b"+OK"):
            raise poplib.error_proto(f"{what}: {line!r}")
        return line

    def multiline(self, what: str) -> bytes:
        """A +OK status line and the body up to the terminating ``.CRLF`` line (not unstuffed)."""
        self.status(what)
        start = self.pos
        # The status line's CRLF is at start - 2, so an empty body ends at start - 2 too.
        scan = start - 2
        while True:
            end = self.buf.find(b"\r\n.\r\n", scan)
            if end >= 0:
                out = bytes(self.buf[start : end + 2]) if end >= start else b""
                self.pos = end + 5
                return out
            # The terminator may straddle the chunk boundary: rescan the last 4 bytes.
            scan = max(start - 2, len(self.buf) - 4)
            before = self.pos
            self._fill()
            # _fill may have compacted the buffer (dropping everything before self.pos, which
            # is `start` here): shift our offsets with it.
            shift = before - self.pos
            start -= shift
            scan -= shift


def pipelined(
    host: str,
    port: int,
    user: str,
    password: str,
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    window: int = 64,
) -> Fetched:
    """Log in, UIDL, then RETR every message and DELE every message with ``window`` commands
    in flight, QUIT. Raises if the server does not advertise PIPELINING."""
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)
    out = Fetched()
    try:
        r = _Reader(sock)
        r.status("greeting")
        sock.sendall(b"CAPA\r\n")
        caps = r.multiline("CAPA").split(b"\r\n")
        if b"PIPELINING" not in caps:
            raise poplib.error_proto("the server does not advertise PIPELINING")
        sock.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
        r.status("USER")
        r.status("PASS")
        sock.sendall(b"UIDL\r\n")
        listing = r.multiline("UIDL")
        numbers = [int(line.split()[0]) for line in listing.split(b"\r\n") if line]

        def run(command: str, multi: bool) -> None:
            sent = 0
            answered = 0
            while answered < len(numbers):
                if sent < len(numbers) and sent - answered <= window // 2:
                    batch = numbers[sent : min(len(numbers), answered + window)]
                    sock.sendall(b"".join(f"{command} {n}\r\n".encode() for n in batch))
                    sent += len(batch)
                if multi:
                    body = r.multiline(command)
                    out.messages += 1
                    out.octets += len(body)
                else:
                    r.status(command)
                answered += 1

        run("RETR", True)
        run("DELE", False)
        sock.sendall(b"QUIT\r\n")
        r.status("QUIT")
    finally:
        sock.close()
    return out
