"""A scripted fake POP3 server for the protocol faults a real server cannot produce on demand.

It speaks enough of RFC 1939 (USER/PASS, STAT, LIST, UIDL, RETR, TOP, DELE, RSET, NOOP,
QUIT), RFC 2449 (CAPA, response codes) and RFC 2595 (STLS), plus implicit TLS, on
127.0.0.1 with an ephemeral port. Each connection is served by its own thread, so the server
works the same under synchronous and asynchronous tests::

    with FakePOP3Server(Script(messages=[raw], quit_response="-ERR failed")) as server:
        client = poplib.POP3(server.host, server.port)
        ...
    assert server.deleted == []

Message ids: every message has an id, its 1-based position in `Script.messages` (then in
the order of `add_message`). Inside a session, message numbers are the ids of the messages
still in the mailbox, renumbered from 1; in the first session they are the same. The
fault and override fields of `Script` refer to ids.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import NoReturn

import anyio.to_thread

__all__ = ["FakePOP3Server", "Script"]

HOST = "127.0.0.1"

# How often blocked reads and accepts wake up to check whether the server is stopping.
_POLL = 0.1
_MAX_LINE = 4096


@dataclass
class Script:
    """What the fake server holds and how it misbehaves.

    Faults (auth_response, stall_on_retr, drop_after_dele, drop_after_quit,
    quit_response, endless_retr, endless_list, trickle_retr, trickle_greeting) apply in
    every session, or only in the first `fault_sessions` ones: a client's retry then meets
    a healthy server.
    """

    messages: list[bytes] = field(default_factory=list)
    """Raw messages; LF or CRLF line ends (they are sent with CRLF, as real servers do)."""
    uidls: list[str | bytes] | None = None
    """UIDL of each message, by id (duplicates allowed; bytes are sent as they are, spaces
    and 8-bit bytes included); default "uid-<id>"."""
    capabilities: list[str] | None = None
    """CAPA lines; default USER, UIDL, TOP, PIPELINING, RESP-CODES, AUTH-RESP-CODE and
    STLS when an ssl_context is given without implicit_tls."""
    support_uidl: bool = True
    """False: UIDL is answered with "-ERR"."""
    user: str | None = None
    """Accepted user name (None accepts any)."""
    password: str | None = None
    """Accepted password (None accepts any)."""
    auth_response: str | None = None
    """Answer to PASS instead of "+OK", e.g. "-ERR [IN-USE] mailbox locked" (a "+OK ..."
    answer logs in whatever the credentials)."""
    greeting: str | None = None
    """Whole greeting line instead of the default "+OK ..." one (e.g. "-ERR go away")."""
    stall_on_retr: int | None = None
    """Message id whose RETR sends "+OK" and half of the message, then nothing more; the
    connection stays open (until the client leaves, the server stops or stall_timeout)."""
    drop_after_dele: int | None = None
    """Close the connection right after answering the N-th DELE of a session."""
    drop_after_quit: bool = False
    """Close the connection on QUIT without answering and without deleting."""
    quit_response: str | None = None
    """Answer to QUIT instead of "+OK" (e.g. "-ERR failed"); nothing is deleted."""
    list_size_override: dict[int, int] = field(default_factory=dict)
    """Message id -> size reported by LIST and counted by STAT, unlike what RETR sends."""
    raw_retr_override: dict[int, bytes] = field(default_factory=dict)
    """Message id -> bytes sent verbatim as the whole RETR response (status line, body
    and terminator are up to the test: e.g. a bare-LF "." line)."""
    padding: dict[int, int] = field(default_factory=dict)
    """Message id -> bytes of filler lines (of 1,000 bytes; rounded up) RETR sends after
    the message's own lines, made as they are sent, never held: 48 messages of 20 MB cost
    the server nothing. With list_size_override, a server whose LIST sizes lie."""
    endless_retr: int | None = None
    """Message id whose RETR answer never ends: filler lines until the client leaves."""
    endless_list: bool = False
    """LIST answers with message lines that never end."""
    trickle_retr: int | None = None
    """Message id whose RETR answer comes one byte every trickle_interval seconds."""
    trickle_greeting: bool = False
    """The greeting comes one byte every trickle_interval seconds."""
    trickle_interval: float = 1.0
    dele_keeps: bool = False
    """DELE and QUIT say +OK, but nothing is ever removed (a server that keeps deleted
    mail: a retention policy, or a broken index)."""
    ssl_context: ssl.SSLContext | None = None
    """Server-side context: implicit TLS if implicit_tls, else offered through STLS."""
    implicit_tls: bool = False
    fault_sessions: int | None = None
    stall_timeout: float = 30.0
    """Upper bound of a stall, seconds."""
    idle_timeout: float = 60.0
    """A session waiting this long for a command is closed."""


class _Closed(Exception):
    """The client went away (EOF, reset) or the session must end now."""


@dataclass(frozen=True)
class _Message:
    raw: bytes
    uidl: bytes
    lines: list[bytes]  # CRLF-stripped lines as sent
    size: int  # octets of the CRLF form, what RFC 1939 calls the message size


def _parse_message(raw: bytes, uidl: str | bytes) -> _Message:
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    lines = [line.removesuffix(b"\r") for line in lines]
    uid = uidl if isinstance(uidl, bytes) else uidl.encode()
    return _Message(raw, uid, lines, sum(len(line) + 2 for line in lines))


_FILLER = b"x" * 998 + b"\r\n"


def _dot_stuff(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


class FakePOP3Server:
    """The server: construct with a `Script`, then use as a (sync or async) context manager.

    Observations, safe to read once the client has finished (see `wait_idle`):

    - `received`: every byte clients sent, decrypted when TLS was in use;
      `received_plain`: the bytes received before TLS started (all of them without TLS);
    - `commands`: each command line, decoded, without its line end;
    - `deleted`: ids of the messages whose deletion was committed by a completed QUIT;
    - `sessions`: connections accepted so far;
    - `errors`: unexpected session failures (e.g. a TLS handshake the client rejected).
    """

    def __init__(self, script: Script | None = None) -> None:
        """Prepare (but do not start) a server for `script`."""
        self.script = script if script is not None else Script()
        uidls = self.script.uidls
        if uidls is not None and len(uidls) != len(self.script.messages):
            raise ValueError("Script.uidls must have one entry per message")
        if self.script.implicit_tls and self.script.ssl_context is None:
            raise ValueError("implicit_tls needs an ssl_context")
        self.host = HOST
        self.port = 0
        self.received = bytearray()
        self.received_plain = bytearray()
        self.commands: list[str] = []
        self.deleted: list[int] = []
        self.sessions = 0
        self.errors: list[BaseException] = []
        self._messages: list[_Message] = []
        self._gone: set[int] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._active = 0
        for index, raw in enumerate(self.script.messages):
            self._messages.append(
                _parse_message(raw, uidls[index] if uidls is not None else f"uid-{index + 1}")
            )

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to connect to."""
        return (self.host, self.port)

    def start(self) -> FakePOP3Server:
        """Listen on 127.0.0.1 (ephemeral port) and serve in background threads."""
        if self._listener is not None:
            raise RuntimeError("already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((HOST, 0))
            listener.listen(64)
            # accept() wakes up regularly so stop() never waits on a blocked call.
            listener.settimeout(_POLL)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"fakepop3-accept-{self.port}", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, end every session and wait (at most `timeout` s) for threads."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        if self._acceptor is not None:
            self._acceptor.join(max(0.0, deadline - time.monotonic()))
        for worker in list(self._workers):
            worker.join(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> FakePOP3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> FakePOP3Server:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Joining threads blocks: keep it off the event loop.
        await anyio.to_thread.run_sync(self.stop)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no session is running; False if some still run after `timeout` s.

        A client that closes without waiting for answers can leave the server a few
        lines behind: call this before asserting on what the server saw.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._active == 0:
                    return True
            time.sleep(0.01)
        return False

    # ------------------------------------------------------------------ mailbox

    def add_message(self, raw: bytes, uidl: str | bytes | None = None) -> int:
        """Add a message for the next sessions and return its id."""
        with self._lock:
            msg_id = len(self._messages) + 1
            self._messages.append(_parse_message(raw, uidl or f"uid-{msg_id}"))
            return msg_id

    @property
    def remaining(self) -> list[int]:
        """Ids of the messages still in the mailbox."""
        with self._lock:
            return [i for i in range(1, len(self._messages) + 1) if i not in self._gone]

    # ------------------------------------------------------------------ serving

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._stopping.is_set():
                    self.errors.append(exc)
                return
            with self._lock:
                self.sessions += 1
                number = self.sessions
                self._active += 1
            worker = threading.Thread(
                target=self._run_session,
                args=(conn, number),
                name=f"fakepop3-session-{self.port}-{number}",
                daemon=True,
            )
            self._workers = [w for w in self._workers if w.is_alive()]
            self._workers.append(worker)
            worker.start()

    def _run_session(self, conn: socket.socket, number: int) -> None:
        session = _Session(self, conn, number)
        try:
            session.run()
        except _Closed:
            pass
        except (ConnectionResetError, BrokenPipeError):
            pass  # the client hung up: ordinary in fault tests
        except Exception as exc:  # recorded for the test: threads must not raise
            with self._lock:
                self.errors.append(exc)
        finally:
            session.close()
            with self._lock:
                self._active -= 1

    def _record(self, data: bytes, *, tls: bool) -> None:
        with self._lock:
            self.received += data
            if not tls:
                self.received_plain += data

    def _commit(self, ids: list[int]) -> None:
        with self._lock:
            for msg_id in sorted(ids):
                if msg_id not in self._gone:
                    self._gone.add(msg_id)
                    self.deleted.append(msg_id)


class _Session:
    """One connection: the RFC 1939 state machine plus the scripted faults."""

    def __init__(self, server: FakePOP3Server, conn: socket.socket, number: int) -> None:
        self.server = server
        self.script = server.script
        self.sock: socket.socket | ssl.SSLSocket = conn
        self.tls = False
        self.buffer = bytearray()
        self.faulty = self.script.fault_sessions is None or number <= self.script.fault_sessions
        self.user: str | None = None
        self.authenticated = False
        self.view: list[int] = []  # message number - 1 -> id
        self.marked: set[int] = set()  # ids marked for deletion in this session
        self.deles = 0

    # --------------------------------------------------------------- I/O

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.script.idle_timeout)
        self.sock.sendall(data)

    def reply(self, line: str) -> None:
        self.send(line.encode() + b"\r\n")

    def _recv(self, deadline: float) -> bytes:
        """Wait for data until `deadline`; raise _Closed on EOF, stop or deadline."""
        self.sock.settimeout(_POLL)
        while True:
            if self.server._stopping.is_set():
                raise _Closed("server stopping")
            if time.monotonic() >= deadline:
                raise _Closed("timed out")
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ssl.SSLWantReadError:
                continue
            if not data:
                raise _Closed("client closed")
            self.server._record(data, tls=self.tls)
            return data

    def readline(self) -> bytes:
        deadline = time.monotonic() + self.script.idle_timeout
        while b"\n" not in self.buffer:
            if len(self.buffer) > _MAX_LINE:
                raise _Closed("line too long")
            self.buffer += self._recv(deadline)
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line.removesuffix(b"\r")

    def start_tls(self) -> None:
        assert self.script.ssl_context is not None
        # The handshake is a blocking exchange: give it the idle timeout, not the poll.
        self.sock.settimeout(self.script.idle_timeout)
        self.sock = self.script.ssl_context.wrap_socket(self.sock, server_side=True)
        self.tls = True

    def endless(self, lines: Iterator[bytes]) -> NoReturn:
        """Send ``lines`` until the client leaves (or the server stops): an answer without
        end, in pieces of about 64 KiB."""
        piece = bytearray()
        for line in lines:
            piece += line
            if len(piece) >= 65536:
                if self.server._stopping.is_set():
                    raise _Closed("server stopping")
                self.send(bytes(piece))
                piece.clear()
        raise AssertionError("unreachable: the lines never end")

    def trickle(self, data: bytes) -> None:
        """Send ``data`` one byte at a time, ``trickle_interval`` seconds apart: each byte
        comes well within any per-read timeout, the whole never does."""
        for i in range(len(data)):
            if self.server._stopping.is_set():
                raise _Closed("server stopping")
            self.send(data[i : i + 1])
            time.sleep(self.script.trickle_interval)

    def stall(self) -> NoReturn:
        """Answer nothing more; keep reading (and recording) until the end of the stall."""
        deadline = time.monotonic() + self.script.stall_timeout
        while True:
            self._recv(deadline)

    # --------------------------------------------------------------- protocol

    def run(self) -> None:
        if self.script.implicit_tls:
            self.start_tls()
        greeting = self.script.greeting or f"+OK fakepop3 ready <{os.getpid()}.{id(self)}@fakepop3>"
        if self.faulty and self.script.trickle_greeting:
            self.trickle(greeting.encode() + b"\r\n")
        else:
            self.reply(greeting)
        while True:
            line = self.readline()
            text = line.decode("utf-8", "replace")
            with self.server._lock:
                self.server.commands.append(text)
            verb, _, arg = text.partition(" ")
            handler = getattr(self, f"cmd_{verb.upper()}", None) if verb.isalpha() else None
            if handler is None or (verb.upper() in _TRANSACTION_ONLY and not self.authenticated):
                self.reply("-ERR unknown command or wrong state")
                continue
            handler(arg)

    def capabilities(self) -> list[str]:
        if self.script.capabilities is not None:
            return list(self.script.capabilities)
        caps = ["USER", "UIDL", "TOP", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE"]
        if self.script.ssl_context is not None and not self.script.implicit_tls:
            caps.append("STLS")
        return caps

    def cmd_CAPA(self, arg: str) -> None:
        self.send(
            b"+OK capability list follows\r\n"
            + b"".join(c.encode() + b"\r\n" for c in self.capabilities())
            + b".\r\n"
        )

    def cmd_STLS(self, arg: str) -> None:
        if self.tls or self.authenticated:
            self.reply("-ERR command not permitted now")
        elif self.script.ssl_context is None or "STLS" not in self.capabilities():
            self.reply("-ERR STLS not supported")
        else:
            self.reply("+OK begin TLS negotiation")
            # RFC 2595: anything the client pipelined after STLS is discarded, never
            # taken as if it had come through TLS.
            self.buffer.clear()
            self.start_tls()

    def cmd_USER(self, arg: str) -> None:
        if self.authenticated:
            self.reply("-ERR already authenticated")
            return
        self.user = arg
        self.reply("+OK send PASS")

    def cmd_PASS(self, arg: str) -> None:
        if self.authenticated or self.user is None:
            self.reply("-ERR send USER first")
            return
        if self.faulty and self.script.auth_response is not None:
            self.reply(self.script.auth_response)
            if self.script.auth_response.startswith("+OK"):
                self._enter_transaction()
            return
        if (self.script.user is not None and self.user != self.script.user) or (
            self.script.password is not None and arg != self.script.password
        ):
            self.user = None
            self.reply("-ERR [AUTH] invalid credentials")
            return
        self._enter_transaction()
        self.reply(f"+OK {len(self.view)} messages")

    def _enter_transaction(self) -> None:
        self.authenticated = True
        with self.server._lock:
            total = len(self.server._messages)
            self.view = [i for i in range(1, total + 1) if i not in self.server._gone]

    def cmd_QUIT(self, arg: str) -> None:
        if self.authenticated:
            if self.faulty and self.script.drop_after_quit:
                raise _Closed("drop_after_quit")
            if self.faulty and self.script.quit_response is not None:
                self.reply(self.script.quit_response)
                raise _Closed("quit_response")
            # UPDATE state (RFC 1939): deletions take effect only now, before the answer,
            # so a client that read "+OK" can rely on them.
            if not self.script.dele_keeps:
                self.server._commit(sorted(self.marked))
        self.reply("+OK bye")
        raise _Closed("quit")

    def cmd_NOOP(self, arg: str) -> None:
        self.reply("+OK")

    def cmd_RSET(self, arg: str) -> None:
        self.marked.clear()
        self.reply(f"+OK {len(self.view)} messages")

    def _message(self, arg: str) -> tuple[int, _Message] | None:
        """The (id, message) numbered `arg` in this session, or None after "-ERR"."""
        try:
            number = int(arg.split()[0])
        except (ValueError, IndexError):
            self.reply("-ERR invalid message number")
            return None
        if not 1 <= number <= len(self.view) or self.view[number - 1] in self.marked:
            self.reply("-ERR no such message")
            return None
        msg_id = self.view[number - 1]
        return msg_id, self.server._messages[msg_id - 1]

    def _size(self, msg_id: int) -> int:
        return self.script.list_size_override.get(msg_id, self.server._messages[msg_id - 1].size)

    def _listing(self) -> Iterator[tuple[int, int]]:
        for number, msg_id in enumerate(self.view, 1):
            if msg_id not in self.marked:
                yield number, msg_id

    def cmd_STAT(self, arg: str) -> None:
        ids = [msg_id for _, msg_id in self._listing()]
        self.reply(f"+OK {len(ids)} {sum(self._size(i) for i in ids)}")

    def cmd_LIST(self, arg: str) -> None:
        if arg.strip():
            found = self._message(arg)
            if found is not None:
                self.reply(f"+OK {arg.split()[0]} {self._size(found[0])}")
            return
        rows = [f"{number} {self._size(msg_id)}\r\n" for number, msg_id in self._listing()]
        if self.faulty and self.script.endless_list:
            self.send(f"+OK {len(rows)} messages\r\n{''.join(rows)}".encode())
            self.endless(b"%d 100\r\n" % n for n in itertools.count(len(rows) + 1))
        self.send(f"+OK {len(rows)} messages\r\n{''.join(rows)}.\r\n".encode())

    def cmd_UIDL(self, arg: str) -> None:
        if not self.script.support_uidl:
            self.reply("-ERR unknown command")
            return
        if arg.strip():
            found = self._message(arg)
            if found is not None:
                self.send(b"+OK %s %s\r\n" % (arg.split()[0].encode(), found[1].uidl))
            return
        rows = [
            b"%d %s\r\n" % (number, self.server._messages[msg_id - 1].uidl)
            for number, msg_id in self._listing()
        ]
        self.send(b"+OK\r\n" + b"".join(rows) + b".\r\n")

    def cmd_RETR(self, arg: str) -> None:
        found = self._message(arg)
        if found is None:
            return
        msg_id, message = found
        if msg_id in self.script.raw_retr_override:
            self.send(self.script.raw_retr_override[msg_id])
            return
        body = _dot_stuff(message.lines)
        status = f"+OK {message.size} octets\r\n".encode()
        if self.faulty and self.script.stall_on_retr == msg_id:
            self.send(status + body[: len(body) // 2])
            self.stall()  # never returns
        if self.faulty and self.script.endless_retr == msg_id:
            self.send(status + body)
            self.endless(itertools.repeat(_FILLER))
        if self.faulty and self.script.trickle_retr == msg_id:
            self.trickle(status + body + b".\r\n")
            return
        self.send(status + body)
        padding = self.script.padding.get(msg_id, 0)
        while padding > 0:  # in pieces of 1 MiB: never the whole filler at once
            piece = _FILLER * min(-(-padding // len(_FILLER)), 1024 * 1024 // len(_FILLER))
            self.send(piece)
            padding -= len(piece)
        self.send(b".\r\n")

    def cmd_TOP(self, arg: str) -> None:
        parts = arg.split()
        if len(parts) != 2 or not parts[1].isdigit():
            self.reply("-ERR usage: TOP msg lines")
            return
        found = self._message(parts[0])
        if found is None:
            return
        lines = found[1].lines
        end = lines.index(b"") if b"" in lines else len(lines)
        selected = lines[: end + 1 + int(parts[1])]
        self.send(b"+OK top of message follows\r\n" + _dot_stuff(selected) + b".\r\n")

    def cmd_DELE(self, arg: str) -> None:
        found = self._message(arg)
        if found is None:
            return
        self.marked.add(found[0])
        self.deles += 1
        self.reply(f"+OK message {arg.split()[0]} deleted")
        if self.faulty and self.script.drop_after_dele == self.deles:
            raise _Closed("drop_after_dele")


_TRANSACTION_ONLY = frozenset({"STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "NOOP"})
