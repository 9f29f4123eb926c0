"""A TCP proxy on 127.0.0.1 that a test can cut: for the faults a real PostgreSQL will not
produce on demand without restarting the machine's shared cluster (a connection dropped in
the middle of a transaction, a server that cannot be reached for a while)::

    with TcpProxy("127.0.0.1", 5432) as proxy:     # the engine connects to proxy.port
        proxy.cut()              # every open connection reset at once (both sides closed)
        proxy.refuse(True)       # new connections closed as soon as they are accepted
        proxy.refuse(False)      # back to normal
        proxy.stall(True)        # open connections stay open but carry nothing (half-open)

Threads, one pair per connection; bounded by the test's own connections.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

__all__ = ["TcpProxy"]


class TcpProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._refusing = False
        self._stalled = False
        self._closed = False
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()

    def refuse(self, on: bool) -> None:
        """Close new connections at once (``on``), or let them through again."""
        self._refusing = on

    def stall(self, on: bool) -> None:
        """Drop what either side sends, without closing anything: a network gone silent."""
        self._stalled = on

    def cut(self) -> int:
        """Reset every open connection (an RST to both sides); returns how many."""
        with self._lock:
            sockets, self._open = list(self._open), set()
        for s in sockets:
            with contextlib.suppress(OSError):
                # SO_LINGER 0: the close sends RST, as a crashed server does.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                # A close alone neither wakes the pipe thread blocked in recv() nor, while
                # that thread holds the socket, tells the peer anything: shut it down first.
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        return len(sockets) // 2

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self.accepted += 1
            with self._lock:
                self._open.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._stalled:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.difference_update((src, dst))
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
