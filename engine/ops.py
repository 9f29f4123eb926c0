"""Operations: Prometheus metrics, the ``/healthz`` + ``/metrics`` HTTP endpoint, and the
process's memory behaviour.

The endpoint is a few lines on an anyio listener rather than a web framework: it serves two
read-only GETs and must never be a reason for the engine to fall over.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import SocketStream

log = logging.getLogger("engine.ops")

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_MMAP_FROM = 1024 * 1024


def bound_large_allocations() -> bool:
    """Have glibc give every buffer of 1 MiB or more back to the system once it is freed.

    glibc raises its mmap threshold (up to 32 MiB) each time it frees a large mapped block,
    so after the first 20 MB message the next ones come from the heap, and the heap keeps
    what they leave: measured over 2,000 messages with 5 of 21 MB, the engine's peak RSS was
    123 MiB, and 100 MiB with the threshold fixed. Setting it turns the adjustment off.
    Elsewhere than glibc this does nothing (and returns False).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM))


class Metrics:
    """The engine's metrics, in a registry of its own (several engines in one test process)."""

    def __init__(self) -> None:
        # Imported here, not at the top: prometheus_client brings http.server, wsgiref and
        # urllib (about 15 ms) to every command, and only an engine has metrics.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.fetched = Counter(
            "mailintegration_messages_fetched", "Messages fetched (RETR).", ["mailbox"], registry=r
        )
        self.processed = Counter(
            "mailintegration_messages_processed",
            "Messages committed as a request, activity or refusal.",
            ["mailbox"],
            registry=r,
        )
        self.failed = Counter(
            "mailintegration_messages_failed",
            "Messages committed as a failure event.",
            ["mailbox"],
            registry=r,
        )
        self.sessions = Counter(
            "mailintegration_sessions",
            "Mailbox sessions by result.",
            ["mailbox", "result"],
            registry=r,
        )
        self.outage = Gauge(
            "mailintegration_mailbox_outage",
            "1 while the mailbox cannot be read.",
            ["mailbox"],
            registry=r,
        )
        self.kept_deleted = Gauge(
            "mailintegration_server_kept_deleted",
            "Messages of the last listing whose deletion the server had confirmed before "
            "(a server that keeps deleted mail).",
            ["mailbox"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "mailintegration_queue_depth", "Items waiting for the writer.", registry=r
        )
        self.transactions = Counter(
            "mailintegration_transactions", "Committed writer transactions.", registry=r
        )
        self.batch_size = Histogram(
            "mailintegration_batch_size",
            "Items per writer transaction.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "mailintegration_commit_seconds", "Duration of a writer transaction.", registry=r
        )

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    @property
    def content_type(self) -> str:
        """The Content-Type of :meth:`render`'s text."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return CONTENT_TYPE_LATEST


@dataclass
class MailboxHealth:
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    cause: str | None = None


@dataclass
class Health:
    """What ``/healthz`` reports: liveness of the supervisor and writer, per-mailbox state."""

    supervisor_alive: bool = False
    writer_alive: bool = False
    mailboxes: dict[str, MailboxHealth] = field(default_factory=dict)

    def success(self, name: str) -> None:
        h = self.mailboxes.setdefault(name, MailboxHealth())
        h.last_success, h.cause = time.time(), None

    def failure(self, name: str, cause: str, error: str) -> None:
        h = self.mailboxes.setdefault(name, MailboxHealth())
        h.last_error, h.last_error_at, h.cause = error, time.time(), cause

    def forget(self, name: str) -> None:
        self.mailboxes.pop(name, None)

    def document(self) -> dict[str, Any]:
        def ts(t: float | None) -> str | None:
            return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

        return {
            "status": "ok" if self.ok else "failing",
            "supervisor": self.supervisor_alive,
            "writer": self.writer_alive,
            "mailboxes": {
                name: {
                    "last_success": ts(h.last_success),
                    "last_error": h.last_error,
                    "last_error_at": ts(h.last_error_at),
                    "outage": h.cause,
                }
                for name, h in sorted(self.mailboxes.items())
            },
        }

    @property
    def ok(self) -> bool:
        return self.supervisor_alive and self.writer_alive


async def serve_http(
    host: str,
    port: int,
    health: Health,
    metrics: Metrics,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. ``task_status`` receives the bound port (useful with port 0)."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)

    async def handle(stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(5):
                    request = b""
                    while b"\r\n\r\n" not in request and len(request) < 8192:
                        request += await stream.receive(4096)
            except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return
            line = request.split(b"\r\n", 1)[0].decode("latin-1").split()
            path = line[1].split("?")[0] if len(line) >= 2 else ""
            if len(line) < 2 or line[0] != "GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/healthz":
                status = "200 OK" if health.ok else "503 Service Unavailable"
                ctype = "application/json"
                body = json.dumps(health.document(), indent=2).encode() + b"\n"
            elif path == "/metrics":
                status, ctype, body = "200 OK", metrics.content_type, metrics.render()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /healthz or /metrics\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send(head + body)

    async with listener:
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        log.info("http: /healthz and /metrics on %s:%d", host, bound)
        task_status.started(bound)
        await listener.serve(handle)
