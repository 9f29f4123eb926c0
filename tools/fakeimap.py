"""A scripted fake IMAP4rev1 server for the faults a real server will not produce on demand.

Like tools/fakepop3.py for POP3: 127.0.0.1, an ephemeral port, one thread per connection,
usable from synchronous and asynchronous tests::

    with FakeIMAPServer(Script(messages=[raw], support_uidplus=False)) as server:
        client = imaplib.IMAP4(server.host, server.port)
        ...
    assert server.folder("INBOX") == [...]

It speaks enough of RFC 3501 and its extensions for imaplib and IMAPClient: CAPABILITY,
NOOP, LOGOUT, LOGIN, AUTHENTICATE (PLAIN, XOAUTH2, OAUTHBEARER, with SASL-IR), STARTTLS
(and implicit TLS), SELECT, EXAMINE, LIST, CREATE, DELETE, STATUS, CHECK, CLOSE, UNSELECT,
SEARCH and FETCH, STORE, COPY, MOVE (RFC 6851), EXPUNGE, each also as UID command, UID
EXPUNGE (RFC 4315, UIDPLUS, with COPYUID answers), IDLE (RFC 2177) with "* n EXISTS"
pushed when `add_message` delivers; literals (with LITERAL+).

Faults (each in every session, or in the first `fault_sessions` only): no UIDPLUS, no MOVE,
no IDLE (capability absent, command refused with BAD); IDLE dropped after a delay without
BYE; `[UNAVAILABLE]` answers to the login or to SELECT, or a BYE greeting; an `[ALERT]`
after login; a stall or a dropped connection in the middle of a FETCH literal; a UIDVALIDITY
change between sessions (`uidvalidity_changes`: the folder is renumbered from UID 1, as a
server that rebuilt it would).

Message identity: each message has a UID in its folder (1, 2, ... by delivery) and the
server keeps its flags; `folder(name)` returns `(uid, flags, raw)` for the assertions.
"""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import NoReturn

import anyio.to_thread

__all__ = ["FakeIMAPServer", "Script", "StoredMessage"]

HOST = "127.0.0.1"

_POLL = 0.1
_MAX_LINE = 8192
_MAX_LITERAL = 32 * 1024 * 1024
_SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


@dataclass
class Script:
    """What the fake server holds and how it misbehaves."""

    messages: list[bytes] = field(default_factory=list)
    """Raw messages of INBOX (LF or CRLF; sent with CRLF), UIDs 1, 2, ..."""
    uidvalidity: int = 1000
    """UIDVALIDITY of INBOX (other folders get the next numbers)."""
    uidvalidity_changes: dict[int, int] = field(default_factory=dict)
    """Session number -> new INBOX UIDVALIDITY applied when that session starts; the
    messages are renumbered from UID 1 (a rebuilt mailbox)."""
    capabilities: list[str] | None = None
    """The whole capability list instead of the computed one."""
    support_uidplus: bool = True
    support_move: bool = True
    support_idle: bool = True
    user: str | None = None
    """Accepted user name for LOGIN and SASL (None accepts any)."""
    password: str | None = None
    """Accepted password (None accepts any)."""
    tokens: set[str] | None = None
    """Accepted bearer tokens for XOAUTH2 / OAUTHBEARER (None accepts any)."""
    greeting: str | None = None
    """Whole greeting line, e.g. "* BYE [UNAVAILABLE] Server restarting"."""
    login_response: str | None = None
    """Tagged answer to LOGIN / AUTHENTICATE instead of OK, e.g. "NO [UNAVAILABLE] Try
    later" (an "OK ..." answer logs in whatever the credentials)."""
    select_response: str | None = None
    """Tagged answer to SELECT / EXAMINE instead of the usual, e.g. "NO [UNAVAILABLE] ..."."""
    alert: str | None = None
    """Text of an untagged "* OK [ALERT] ..." sent right after a successful login."""
    stall_on_fetch: int | None = None
    """UID whose body FETCH sends half of the literal, then nothing more (until the client
    leaves, the server stops or stall_timeout)."""
    drop_on_fetch: int | None = None
    """UID whose body FETCH sends half of the literal, then closes the connection."""
    idle_drop_after: float | None = None
    """Seconds after which an IDLE connection is closed without BYE or any answer."""
    fault_sessions: int | None = None
    ssl_context: ssl.SSLContext | None = None
    """Server-side context: implicit TLS if implicit_tls, else offered through STARTTLS."""
    implicit_tls: bool = False
    stall_timeout: float = 30.0
    idle_timeout: float = 60.0
    """A session waiting this long for a command is closed (IDLE included)."""


@dataclass
class StoredMessage:
    """A message in a folder of the fake server."""

    uid: int
    raw: bytes
    flags: set[str] = field(default_factory=set)

    @property
    def size(self) -> int:
        """RFC822.SIZE: the octets sent, with CRLF line ends."""
        return len(_crlf(self.raw))


@dataclass
class _Folder:
    uidvalidity: int
    messages: list[StoredMessage] = field(default_factory=list)
    uidnext: int = 1

    def add(self, raw: bytes, flags: Iterable[str] = ()) -> StoredMessage:
        message = StoredMessage(self.uidnext, raw, set(flags))
        self.uidnext += 1
        self.messages.append(message)
        return message


def _crlf(raw: bytes) -> bytes:
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line.removesuffix(b"\r") + b"\r\n" for line in lines)


class _Closed(Exception):
    """The client went away or the session must end now."""


class FakeIMAPServer:
    """The server: construct with a `Script`, then use as a (sync or async) context manager.

    Observations (read them once the client has finished; see `wait_idle`): `received`
    (every byte received, decrypted), `received_plain` (before TLS), `commands` (each
    command line without its tag, literals left out), `sessions`, `errors`, `expunged`
    ((folder, uid) of every expunged message, in order).
    """

    def __init__(self, script: Script | None = None) -> None:
        """Prepare (but do not start) a server for `script`."""
        self.script = script if script is not None else Script()
        if self.script.implicit_tls and self.script.ssl_context is None:
            raise ValueError("implicit_tls needs an ssl_context")
        self.host = HOST
        self.port = 0
        self.received = bytearray()
        self.received_plain = bytearray()
        self.commands: list[str] = []
        self.sessions = 0
        self.errors: list[BaseException] = []
        self.expunged: list[tuple[str, int]] = []
        self._folders: dict[str, _Folder] = {"INBOX": _Folder(self.script.uidvalidity)}
        for raw in self.script.messages:
            self._folders["INBOX"].add(raw)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._active = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to connect to."""
        return (self.host, self.port)

    def start(self) -> FakeIMAPServer:
        """Listen on 127.0.0.1 (ephemeral port) and serve in background threads."""
        if self._listener is not None:
            raise RuntimeError("already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((HOST, 0))
            listener.listen(64)
            listener.settimeout(_POLL)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"fakeimap-accept-{self.port}", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, end every session and wait (at most `timeout` s) for threads."""
        self._stopping.set()
        with self._lock:
            self._changed.notify_all()
        deadline = time.monotonic() + timeout
        if self._acceptor is not None:
            self._acceptor.join(max(0.0, deadline - time.monotonic()))
        for worker in list(self._workers):
            worker.join(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> FakeIMAPServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> FakeIMAPServer:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await anyio.to_thread.run_sync(self.stop)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no session is running; False if some still run after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._active == 0:
                    return True
            time.sleep(0.01)
        return False

    # ------------------------------------------------------------------ mailbox

    def add_message(self, raw: bytes, folder: str = "INBOX", flags: Iterable[str] = ()) -> int:
        """Deliver a message (an IDLE session in that folder hears "* n EXISTS"); its UID."""
        with self._lock:
            box = self._folders.get(folder) or self._create(folder)
            uid = box.add(raw, flags).uid
            self._changed.notify_all()
            return uid

    def folder(self, name: str = "INBOX") -> list[StoredMessage]:
        """A copy of the messages of a folder (KeyError if it does not exist)."""
        with self._lock:
            return [StoredMessage(m.uid, m.raw, set(m.flags)) for m in self._folders[name].messages]

    def folders(self) -> list[str]:
        """Folder names, INBOX first."""
        with self._lock:
            return ["INBOX", *sorted(n for n in self._folders if n != "INBOX")]

    def uidvalidity(self, folder: str = "INBOX") -> int:
        """The folder's current UIDVALIDITY."""
        with self._lock:
            return self._folders[folder].uidvalidity

    def change_uidvalidity(self, uidvalidity: int, folder: str = "INBOX") -> None:
        """Give a folder a new UIDVALIDITY and renumber its messages from UID 1."""
        with self._lock:
            box = self._folders[folder]
            box.uidvalidity = uidvalidity
            box.uidnext = 1
            for message in box.messages:
                message.uid = box.uidnext
                box.uidnext += 1

    def _create(self, name: str) -> _Folder:
        top = max(f.uidvalidity for f in self._folders.values())
        self._folders[name] = _Folder(top + 1)
        return self._folders[name]

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
                new_uidvalidity = self.script.uidvalidity_changes.get(number)
                if new_uidvalidity is not None:
                    self.change_uidvalidity(new_uidvalidity)
            worker = threading.Thread(
                target=self._run_session,
                args=(conn, number),
                name=f"fakeimap-session-{self.port}-{number}",
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
            pass
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


# --------------------------------------------------------------------------- parsing

_TOKEN = re.compile(rb'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()"\[]+(?:\[[^\]]*\])?(?:<[\d.]+>)?|\[[^\]]*\]')


class _Literal(bytes):
    """A literal argument (kept apart from atoms: it is never parsed)."""


Token = bytes | list["Token"]


def _tokens(pieces: list[bytes]) -> list[Token]:
    """Split a command (text pieces and literals) into atoms, strings, literals and lists."""
    flat: list[bytes] = []
    for piece in pieces:
        if isinstance(piece, _Literal):
            flat.append(piece)
            continue
        for match in _TOKEN.finditer(piece):
            token = match.group()
            if token.startswith(b'"'):
                token = _Literal(re.sub(rb"\\(.)", rb"\1", token[1:-1]))
            flat.append(token)
    stack: list[list[Token]] = [[]]
    for token in flat:
        if token == b"(" and not isinstance(token, _Literal):
            stack.append([])
        elif token == b")" and not isinstance(token, _Literal) and len(stack) > 1:
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(token)
    while len(stack) > 1:
        done = stack.pop()
        stack[-1].append(done)
    return stack[0]


def _text(token: Token) -> str:
    if isinstance(token, list):
        raise ValueError("a list where a string was expected")
    return token.decode("utf-8", "replace")


def _sequence(spec: str, largest: int) -> Callable[[int], bool]:
    """A sequence set ("1:3,5,7:*") as a membership test; "*" is `largest`.

    Kept as ranges, never expanded: "1:4294967295" is an ordinary UID set.
    """
    ranges: list[tuple[int, int]] = []
    for part in spec.split(","):
        low, _, high = part.partition(":")
        a = largest if low == "*" else int(low)
        b = a if not high else (largest if high == "*" else int(high))
        ranges.append((min(a, b), max(a, b)))
    return lambda n: any(a <= n <= b for a, b in ranges)


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------- session


class _Session:
    """One connection: the IMAP state machine plus the scripted faults."""

    def __init__(self, server: FakeIMAPServer, conn: socket.socket, number: int) -> None:
        self.server = server
        self.script = server.script
        self.sock: socket.socket | ssl.SSLSocket = conn
        self.tls = False
        self.buffer = bytearray()
        self.faulty = self.script.fault_sessions is None or number <= self.script.fault_sessions
        self.authenticated = False
        self.selected: str | None = None
        self.readonly = False
        self.seen_count = 0  # messages announced to the client in the selected folder

    # --------------------------------------------------------------- I/O

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.script.idle_timeout)
        self.sock.sendall(data)

    def reply(self, line: str) -> None:
        self.send(line.encode() + b"\r\n")

    def _recv(self, deadline: float, wake: Callable[[], None] | None = None) -> bytes:
        self.sock.settimeout(_POLL)
        while True:
            if self.server._stopping.is_set():
                raise _Closed("server stopping")
            if time.monotonic() >= deadline:
                raise _Closed("timed out")
            if wake is not None:
                wake()
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            if not data:
                raise _Closed("client closed")
            self.server._record(data, tls=self.tls)
            return data

    def readline(
        self, deadline: float | None = None, wake: Callable[[], None] | None = None
    ) -> bytes:
        deadline = deadline or time.monotonic() + self.script.idle_timeout
        while b"\n" not in self.buffer:
            if len(self.buffer) > _MAX_LINE:
                raise _Closed("line too long")
            self.buffer += self._recv(deadline, wake)
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line.removesuffix(b"\r")

    def read_exact(self, size: int) -> bytes:
        deadline = time.monotonic() + self.script.idle_timeout
        while len(self.buffer) < size:
            self.buffer += self._recv(deadline)
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def read_command(self) -> tuple[str, list[bytes]]:
        """A tagged command as (tag, text pieces and literals); answers literal requests."""
        pieces: list[bytes] = []
        line = self.readline()
        while True:
            literal = re.search(rb"\{(\d+)(\+?)\}$", line)
            if literal is None:
                pieces.append(line)
                break
            size = int(literal.group(1))
            if size > _MAX_LITERAL:
                raise _Closed("literal too large")
            pieces.append(line[: literal.start()])
            if not literal.group(2):
                self.reply("+ Ready for literal data")
            pieces.append(_Literal(self.read_exact(size)))
            line = self.readline()
        tag, _, rest = pieces[0].partition(b" ")
        pieces[0] = rest
        return tag.decode("ascii", "replace"), pieces

    def start_tls(self) -> None:
        assert self.script.ssl_context is not None
        self.sock.settimeout(self.script.idle_timeout)
        self.sock = self.script.ssl_context.wrap_socket(self.sock, server_side=True)
        self.tls = True

    def stall(self) -> NoReturn:
        deadline = time.monotonic() + self.script.stall_timeout
        while True:
            self._recv(deadline)

    # --------------------------------------------------------------- protocol

    def capabilities(self) -> list[str]:
        if self.script.capabilities is not None:
            return list(self.script.capabilities)
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "UNSELECT", "ID"]
        if self.script.support_uidplus:
            caps.append("UIDPLUS")
        if self.script.support_move:
            caps.append("MOVE")
        if self.script.support_idle:
            caps.append("IDLE")
        if self.script.ssl_context is not None and not self.tls:
            caps.append("STARTTLS")
        caps += ["AUTH=PLAIN", "AUTH=XOAUTH2", "AUTH=OAUTHBEARER"]
        return caps

    def offers(self, capability: str) -> bool:
        return capability in self.capabilities()

    def run(self) -> None:
        if self.script.implicit_tls:
            self.start_tls()
        greeting = self.script.greeting if self.faulty else None
        if greeting is not None:
            self.reply(greeting)
            if greeting.startswith("* BYE"):
                raise _Closed("greeting BYE")
        else:
            self.reply(f"* OK [CAPABILITY {' '.join(self.capabilities())}] fakeimap ready")
        while True:
            tag, pieces = self.read_command()
            tokens = _tokens(pieces)
            text = b" ".join(p for p in pieces if not isinstance(p, _Literal))
            with self.server._lock:
                self.server.commands.append(text.decode("utf-8", "replace"))
            if not tokens or isinstance(tokens[0], list):
                self.reply(f"{tag} BAD empty command")
                continue
            verb = _text(tokens[0]).upper()
            args = tokens[1:]
            if verb == "UID" and args and not isinstance(args[0], list):
                verb = "UID " + _text(args[0]).upper()
                args = args[1:]
            handler = _HANDLERS.get(verb)
            if handler is None or (verb in _OPTIONAL and not self.offers(_OPTIONAL[verb])):
                self.reply(f"{tag} BAD Command unknown or not supported")
                continue
            state = _STATES.get(verb, "any")
            if state != "any" and not self.authenticated:
                self.reply(f"{tag} BAD Not logged in")
                continue
            if state == "selected" and self.selected is None:
                self.reply(f"{tag} BAD No mailbox selected")
                continue
            try:
                handler(self, tag, args)
            except (ValueError, IndexError, KeyError) as exc:
                self.reply(f"{tag} BAD {type(exc).__name__}: malformed arguments")

    # --------------------------------------------------------------- any state

    def cmd_capability(self, tag: str, args: list[Token]) -> None:
        self.reply(f"* CAPABILITY {' '.join(self.capabilities())}")
        self.reply(f"{tag} OK CAPABILITY completed")

    def cmd_noop(self, tag: str, args: list[Token]) -> None:
        self.announce_new()
        self.reply(f"{tag} OK NOOP completed")

    def cmd_logout(self, tag: str, args: list[Token]) -> None:
        self.reply("* BYE fakeimap logging out")
        self.reply(f"{tag} OK LOGOUT completed")
        raise _Closed("logout")

    def cmd_starttls(self, tag: str, args: list[Token]) -> None:
        if self.tls or self.authenticated or not self.offers("STARTTLS"):
            self.reply(f"{tag} BAD STARTTLS not possible now")
            return
        self.reply(f"{tag} OK Begin TLS negotiation now")
        self.buffer.clear()  # nothing pipelined before TLS counts (RFC 3501 6.2.1)
        self.start_tls()

    def cmd_id(self, tag: str, args: list[Token]) -> None:
        self.reply('* ID ("name" "fakeimap")')
        self.reply(f"{tag} OK ID completed")

    # --------------------------------------------------------------- login

    def login_refused(self, tag: str) -> bool:
        """Answer with the scripted login response, if any; True when that refused."""
        response = self.script.login_response if self.faulty else None
        if response is None:
            return False
        if response.startswith("OK"):
            self.enter_authenticated(tag, response)
            return True
        self.reply(f"{tag} {response}")
        return True

    def enter_authenticated(self, tag: str, response: str = "OK Logged in") -> None:
        self.authenticated = True
        if self.script.alert is not None and self.faulty:
            self.reply(f"* OK [ALERT] {self.script.alert}")
        if response == "OK Logged in":
            response = f"OK [CAPABILITY {' '.join(self.capabilities())}] Logged in"
        self.reply(f"{tag} {response}")

    def cmd_login(self, tag: str, args: list[Token]) -> None:
        if self.authenticated:
            self.reply(f"{tag} BAD Already logged in")
            return
        user, password = _text(args[0]), _text(args[1])
        if self.login_refused(tag):
            return
        if (self.script.user is not None and user != self.script.user) or (
            self.script.password is not None and password != self.script.password
        ):
            self.reply(f"{tag} NO [AUTHENTICATIONFAILED] Authentication failed.")
            return
        self.enter_authenticated(tag)

    def cmd_authenticate(self, tag: str, args: list[Token]) -> None:
        if self.authenticated:
            self.reply(f"{tag} BAD Already logged in")
            return
        mechanism = _text(args[0]).upper()
        if f"AUTH={mechanism}" not in self.capabilities():
            self.reply(f"{tag} NO [CANNOT] Unsupported authentication mechanism")
            return
        if len(args) > 1:
            initial = _text(args[1])
        else:
            self.reply("+ ")
            initial = self.readline().decode("ascii", "replace")
        if initial == "*":
            self.reply(f"{tag} BAD Authentication aborted")
            return
        try:
            response = base64.b64decode(initial, validate=True) if initial != "=" else b""
        except ValueError:
            self.reply(f"{tag} BAD Invalid base64")
            return
        if self.login_refused(tag):
            return
        user, secret = _sasl_credentials(mechanism, response)
        if mechanism == "PLAIN":
            ok = (self.script.user is None or user == self.script.user) and (
                self.script.password is None or secret == self.script.password
            )
        else:
            ok = (self.script.user is None or user == self.script.user) and (
                self.script.tokens is None or secret in self.script.tokens
            )
            if not ok:
                # RFC 7628 3.2.2: an error challenge, then the client's empty answer.
                challenge = b'{"status":"invalid_token","schemes":"bearer","scope":"mail"}'
                self.reply("+ " + base64.b64encode(challenge).decode())
                self.readline()
        if not ok:
            self.reply(f"{tag} NO [AUTHENTICATIONFAILED] Authentication failed.")
            return
        self.enter_authenticated(tag)

    # --------------------------------------------------------------- folders

    def folder_name(self, token: Token) -> str:
        name = _text(token)
        return "INBOX" if name.upper() == "INBOX" else name

    def cmd_select(self, tag: str, args: list[Token], readonly: bool = False) -> None:
        name = self.folder_name(args[0])
        self.selected = None
        response = self.script.select_response if self.faulty else None
        if response is not None:
            self.reply(f"{tag} {response}")
            return
        with self.server._lock:
            box = self.server._folders.get(name)
            if box is None:
                self.reply(f"{tag} NO [NONEXISTENT] Mailbox doesn't exist: {name}")
                return
            count, uidvalidity, uidnext = len(box.messages), box.uidvalidity, box.uidnext
        self.selected, self.readonly, self.seen_count = name, readonly, count
        flags = " ".join(_SYSTEM_FLAGS)
        self.reply(f"* FLAGS ({flags})")
        self.reply(f"* OK [PERMANENTFLAGS ({flags} \\*)] Flags permitted.")
        self.reply(f"* {count} EXISTS")
        self.reply("* 0 RECENT")
        self.reply(f"* OK [UIDVALIDITY {uidvalidity}] UIDs valid")
        self.reply(f"* OK [UIDNEXT {uidnext}] Predicted next UID")
        mode = "READ-ONLY" if readonly else "READ-WRITE"
        self.reply(f"{tag} OK [{mode}] {'EXAMINE' if readonly else 'SELECT'} completed")

    def cmd_examine(self, tag: str, args: list[Token]) -> None:
        self.cmd_select(tag, args, readonly=True)

    def cmd_list(self, tag: str, args: list[Token]) -> None:
        pattern = _text(args[1]) if len(args) > 1 else "*"
        regex = re.compile(
            "^" + re.escape(pattern).replace(r"\*", ".*").replace("%", "[^.]*") + "$"
        )
        for name in self.server.folders():
            if regex.match(name):
                self.reply(f'* LIST (\\HasNoChildren) "." {_quote(name)}')
        self.reply(f"{tag} OK LIST completed")

    def cmd_lsub(self, tag: str, args: list[Token]) -> None:
        for name in self.server.folders():
            self.reply(f'* LSUB () "." {_quote(name)}')
        self.reply(f"{tag} OK LSUB completed")

    def cmd_create(self, tag: str, args: list[Token]) -> None:
        name = self.folder_name(args[0])
        with self.server._lock:
            if name in self.server._folders:
                self.reply(f"{tag} NO [ALREADYEXISTS] Mailbox already exists")
                return
            self.server._create(name)
        self.reply(f"{tag} OK CREATE completed")

    def cmd_delete(self, tag: str, args: list[Token]) -> None:
        name = self.folder_name(args[0])
        with self.server._lock:
            if name == "INBOX" or name not in self.server._folders:
                self.reply(f"{tag} NO [NONEXISTENT] Cannot delete {name}")
                return
            del self.server._folders[name]
        self.reply(f"{tag} OK DELETE completed")

    def cmd_status(self, tag: str, args: list[Token]) -> None:
        name = self.folder_name(args[0])
        with self.server._lock:
            box = self.server._folders.get(name)
            if box is None:
                self.reply(f"{tag} NO [NONEXISTENT] Mailbox doesn't exist")
                return
            values = {
                "MESSAGES": len(box.messages),
                "UIDNEXT": box.uidnext,
                "UIDVALIDITY": box.uidvalidity,
                "UNSEEN": sum(1 for m in box.messages if "\\Seen" not in m.flags),
                "RECENT": 0,
            }
        wanted = args[1] if isinstance(args[1], list) else [args[1]]
        items = " ".join(f"{_text(w).upper()} {values[_text(w).upper()]}" for w in wanted)
        self.reply(f"* STATUS {_quote(name)} ({items})")
        self.reply(f"{tag} OK STATUS completed")

    # --------------------------------------------------------------- selected state

    def box(self) -> _Folder:
        assert self.selected is not None
        return self.server._folders[self.selected]

    def announce_new(self) -> None:
        """Tell the client about messages delivered since it last heard (EXISTS)."""
        if self.selected is None:
            return
        with self.server._lock:
            box = self.server._folders.get(self.selected)
            count = len(box.messages) if box is not None else 0
        if count > self.seen_count:
            self.seen_count = count
            self.reply(f"* {count} EXISTS")

    def targets(self, spec: str, by_uid: bool) -> list[tuple[int, StoredMessage]]:
        """(sequence number, message) for a sequence set or a UID set."""
        messages = self.box().messages
        if by_uid:
            uid_in = _sequence(spec, messages[-1].uid if messages else 0)
            return [(n, m) for n, m in enumerate(messages, 1) if uid_in(m.uid)]
        number_in = _sequence(spec, len(messages))
        return [(n, m) for n, m in enumerate(messages, 1) if number_in(n)]

    def cmd_check(self, tag: str, args: list[Token]) -> None:
        self.reply(f"{tag} OK CHECK completed")

    def cmd_close(self, tag: str, args: list[Token]) -> None:
        if not self.readonly:
            with self.server._lock:
                self.expunge(lambda m: True, announce=False)
        self.selected = None
        self.reply(f"{tag} OK CLOSE completed")

    def cmd_unselect(self, tag: str, args: list[Token]) -> None:
        self.selected = None
        self.reply(f"{tag} OK UNSELECT completed")

    def search(self, tag: str, args: list[Token], by_uid: bool) -> None:
        with self.server._lock:
            found = []
            for number, message in enumerate(self.box().messages, 1):
                if _matches(args, number, message, self.box()):
                    found.append(message.uid if by_uid else number)
        self.reply("* SEARCH" + "".join(f" {n}" for n in found))
        self.reply(f"{tag} OK SEARCH completed")

    def cmd_search(self, tag: str, args: list[Token]) -> None:
        self.search(tag, args, by_uid=False)

    def cmd_uid_search(self, tag: str, args: list[Token]) -> None:
        self.search(tag, args, by_uid=True)

    def fetch(self, tag: str, args: list[Token], by_uid: bool) -> None:
        spec = _text(args[0])
        wanted = args[1] if isinstance(args[1], list) else [args[1]]
        items = [_text(w).upper() for w in wanted if not isinstance(w, list)]
        if by_uid and "UID" not in items:
            items.insert(0, "UID")
        with self.server._lock:
            targets = self.targets(spec, by_uid)
        for number, message in targets:
            self.fetch_one(number, message, items)
        self.reply(f"{tag} OK FETCH completed")

    def fetch_one(self, number: int, message: StoredMessage, items: list[str]) -> None:
        parts: list[bytes] = []
        body: bytes | None = None
        for item in items:
            if item == "UID":
                parts.append(f"UID {message.uid}".encode())
            elif item == "RFC822.SIZE":
                parts.append(f"RFC822.SIZE {message.size}".encode())
            elif item == "INTERNALDATE":
                parts.append(b'INTERNALDATE "01-Jan-2026 00:00:00 +0000"')
            elif item in ("BODY[]", "BODY.PEEK[]", "RFC822"):
                body = _crlf(message.raw)
                if item != "BODY.PEEK[]" and not self.readonly:
                    with self.server._lock:
                        message.flags.add("\\Seen")
            elif item != "FLAGS":
                raise ValueError(f"unsupported FETCH item {item}")
        if "FLAGS" in items:
            with self.server._lock:
                flags = " ".join(sorted(message.flags))
            parts.append(f"FLAGS ({flags})".encode())
        head = f"* {number} FETCH (".encode() + b" ".join(parts)
        if body is None:
            self.send(head + b")\r\n")
            return
        name = b"RFC822" if "RFC822" in items else b"BODY[]"
        head += (b" " if parts else b"") + name + f" {{{len(body)}}}\r\n".encode()
        if self.faulty and message.uid in (self.script.stall_on_fetch, self.script.drop_on_fetch):
            self.send(head + body[: len(body) // 2])
            if message.uid == self.script.drop_on_fetch:
                raise _Closed("drop_on_fetch")
            self.stall()
        self.send(head + body + b")\r\n")

    def cmd_fetch(self, tag: str, args: list[Token]) -> None:
        self.fetch(tag, args, by_uid=False)

    def cmd_uid_fetch(self, tag: str, args: list[Token]) -> None:
        self.fetch(tag, args, by_uid=True)

    def store(self, tag: str, args: list[Token], by_uid: bool) -> None:
        if self.readonly:
            self.reply(f"{tag} NO Mailbox is read-only")
            return
        spec, action = _text(args[0]), _text(args[1]).upper()
        flags_token = args[2]
        flags = {
            _text(f) for f in (flags_token if isinstance(flags_token, list) else [flags_token])
        }
        silent = action.endswith(".SILENT")
        action = action.removesuffix(".SILENT")
        with self.server._lock:
            targets = self.targets(spec, by_uid)
            for _, message in targets:
                if action == "+FLAGS":
                    message.flags |= flags
                elif action == "-FLAGS":
                    message.flags -= flags
                elif action == "FLAGS":
                    message.flags = set(flags)
                else:
                    raise ValueError(action)
            answers = [(n, m.uid, " ".join(sorted(m.flags))) for n, m in targets]
        if not silent:
            for number, uid, current in answers:
                uid_part = f"UID {uid} " if by_uid else ""
                self.reply(f"* {number} FETCH ({uid_part}FLAGS ({current}))")
        self.reply(f"{tag} OK STORE completed")

    def cmd_store(self, tag: str, args: list[Token]) -> None:
        self.store(tag, args, by_uid=False)

    def cmd_uid_store(self, tag: str, args: list[Token]) -> None:
        self.store(tag, args, by_uid=True)

    def expunge(self, chosen: Callable[[StoredMessage], bool], *, announce: bool = True) -> None:
        """Remove the \\Deleted messages that `chosen` accepts; caller holds the lock."""
        assert self.selected is not None
        box = self.box()
        number = 1
        kept: list[StoredMessage] = []
        lines: list[str] = []
        for message in box.messages:
            if "\\Deleted" in message.flags and chosen(message):
                self.server.expunged.append((self.selected, message.uid))
                lines.append(f"* {number} EXPUNGE")
            else:
                kept.append(message)
                number += 1
        box.messages = kept
        self.seen_count = len(kept)
        if announce:
            for line in lines:
                self.reply(line)

    def cmd_expunge(self, tag: str, args: list[Token]) -> None:
        if self.readonly:
            self.reply(f"{tag} NO Mailbox is read-only")
            return
        with self.server._lock:
            self.expunge(lambda m: True)
        self.reply(f"{tag} OK EXPUNGE completed")

    def cmd_uid_expunge(self, tag: str, args: list[Token]) -> None:
        if self.readonly:
            self.reply(f"{tag} NO Mailbox is read-only")
            return
        with self.server._lock:
            uids = {m.uid for _, m in self.targets(_text(args[0]), by_uid=True)}
            self.expunge(lambda m: m.uid in uids)
        self.reply(f"{tag} OK UID EXPUNGE completed")

    def copy(self, tag: str, args: list[Token], by_uid: bool, move: bool) -> None:
        spec, target = _text(args[0]), self.folder_name(args[1])
        with self.server._lock:
            destination = self.server._folders.get(target)
            if destination is None:
                self.reply(f"{tag} NO [TRYCREATE] Mailbox doesn't exist: {target}")
                return
            targets = self.targets(spec, by_uid)
            source_uids = [m.uid for _, m in targets]
            copies = [destination.add(m.raw, m.flags - {"\\Deleted"}).uid for _, m in targets]
            self.server._changed.notify_all()
            code = ""
            if self.offers("UIDPLUS") and targets:
                code = (
                    f"[COPYUID {destination.uidvalidity} "
                    f"{','.join(map(str, source_uids))} {','.join(map(str, copies))}] "
                )
            if move:
                moved = set(source_uids)
                for _, message in targets:
                    message.flags.add("\\Deleted")
                if code:
                    self.reply(f"* OK {code}Moved")
                self.expunge(lambda m: m.uid in moved)
        verb = "MOVE" if move else "COPY"
        self.reply(f"{tag} OK {'' if move else code}{verb} completed")

    def cmd_copy(self, tag: str, args: list[Token]) -> None:
        self.copy(tag, args, by_uid=False, move=False)

    def cmd_uid_copy(self, tag: str, args: list[Token]) -> None:
        self.copy(tag, args, by_uid=True, move=False)

    def cmd_move(self, tag: str, args: list[Token]) -> None:
        self.copy(tag, args, by_uid=False, move=True)

    def cmd_uid_move(self, tag: str, args: list[Token]) -> None:
        self.copy(tag, args, by_uid=True, move=True)

    def cmd_idle(self, tag: str, args: list[Token]) -> None:
        self.reply("+ idling")
        drop_at = None
        if self.faulty and self.script.idle_drop_after is not None:
            drop_at = time.monotonic() + self.script.idle_drop_after

        def wake() -> None:
            if drop_at is not None and time.monotonic() >= drop_at:
                raise _Closed("idle_drop_after")  # no BYE, no answer: a silent drop
            self.announce_new()

        line = self.readline(time.monotonic() + self.script.idle_timeout, wake)
        if line.strip().upper() != b"DONE":
            self.reply(f"{tag} BAD Expected DONE")
            return
        self.reply(f"{tag} OK IDLE terminated")


def _sasl_credentials(mechanism: str, response: bytes) -> tuple[str, str]:
    """(user, password or token) from a PLAIN, XOAUTH2 or OAUTHBEARER client response."""
    text = response.decode("utf-8", "replace")
    if mechanism == "PLAIN":
        parts = text.split("\0")
        return (parts[1], parts[2]) if len(parts) == 3 else ("", "")
    fields: dict[str, str] = {}
    for part in text.split("\x01"):
        name, _, value = part.partition("=")
        fields[name] = value
    user = fields.get("user", "")
    if mechanism == "OAUTHBEARER":
        gs2 = text.split("\x01", 1)[0]
        match = re.search(r"(?:^|,)a=([^,]*)", gs2)
        user = match.group(1) if match else ""
    auth = fields.get("auth", "")
    return user, auth[7:] if auth.lower().startswith("bearer ") else ""


def _matches(criteria: list[Token], number: int, message: StoredMessage, box: _Folder) -> bool:
    """Whether a message matches a (small) SEARCH program: every criterion must hold."""
    items = iter(criteria)
    for item in items:
        if isinstance(item, list):
            if not _matches(item, number, message, box):
                return False
            continue
        key = _text(item).upper()
        if key in ("ALL", "CHARSET"):
            if key == "CHARSET":
                next(items)
            continue
        if key == "NOT":
            if _matches([next(items)], number, message, box):
                return False
        elif key == "UID":
            largest = box.messages[-1].uid if box.messages else 0
            if not _sequence(_text(next(items)), largest)(message.uid):
                return False
        elif key in ("KEYWORD", "UNKEYWORD"):
            keyword = _text(next(items))
            if (keyword in message.flags) != (key == "KEYWORD"):
                return False
        elif key in ("DELETED", "UNDELETED", "SEEN", "UNSEEN", "FLAGGED", "UNFLAGGED"):
            flag = "\\" + key.removeprefix("UN").capitalize()
            if (flag in message.flags) == key.startswith("UN"):
                return False
        elif key[0].isdigit() or key[0] == "*":
            if not _sequence(key, len(box.messages))(number):
                return False
        else:
            raise ValueError(f"unsupported SEARCH key {key}")
    return True


_HANDLERS: dict[str, Callable[[_Session, str, list[Token]], None]] = {
    "CAPABILITY": _Session.cmd_capability,
    "NOOP": _Session.cmd_noop,
    "LOGOUT": _Session.cmd_logout,
    "STARTTLS": _Session.cmd_starttls,
    "ID": _Session.cmd_id,
    "LOGIN": _Session.cmd_login,
    "AUTHENTICATE": _Session.cmd_authenticate,
    "SELECT": _Session.cmd_select,
    "EXAMINE": _Session.cmd_examine,
    "LIST": _Session.cmd_list,
    "LSUB": _Session.cmd_lsub,
    "CREATE": _Session.cmd_create,
    "DELETE": _Session.cmd_delete,
    "STATUS": _Session.cmd_status,
    "CHECK": _Session.cmd_check,
    "CLOSE": _Session.cmd_close,
    "UNSELECT": _Session.cmd_unselect,
    "SEARCH": _Session.cmd_search,
    "UID SEARCH": _Session.cmd_uid_search,
    "FETCH": _Session.cmd_fetch,
    "UID FETCH": _Session.cmd_uid_fetch,
    "STORE": _Session.cmd_store,
    "UID STORE": _Session.cmd_uid_store,
    "EXPUNGE": _Session.cmd_expunge,
    "UID EXPUNGE": _Session.cmd_uid_expunge,
    "COPY": _Session.cmd_copy,
    "UID COPY": _Session.cmd_uid_copy,
    "MOVE": _Session.cmd_move,
    "UID MOVE": _Session.cmd_uid_move,
    "IDLE": _Session.cmd_idle,
}

# Commands that exist only with an extension: refused (BAD) when it is not offered.
_OPTIONAL = {
    "UID EXPUNGE": "UIDPLUS",
    "MOVE": "MOVE",
    "UID MOVE": "MOVE",
    "IDLE": "IDLE",
}

_UID_COMMANDS = ("SEARCH", "FETCH", "STORE", "EXPUNGE", "COPY", "MOVE")
_STATES = {
    **dict.fromkeys(("SELECT", "EXAMINE", "LIST", "LSUB", "CREATE", "DELETE"), "authenticated"),
    **dict.fromkeys(("STATUS", "IDLE"), "authenticated"),
    **dict.fromkeys(("CHECK", "CLOSE", "UNSELECT", *_UID_COMMANDS), "selected"),
    **dict.fromkeys((f"UID {verb}" for verb in _UID_COMMANDS), "selected"),
}
