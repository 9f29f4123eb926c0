"""The HTTP endpoint: ``/healthz`` and ``/metrics``, a Starlette app served by Hypercorn inside
the engine's task group. Imported only when an HTTP port is set (``once`` starts without it).

It must never be a reason for the engine to fall over, nor take its signals:

- Hypercorn runs with a ``shutdown_trigger`` of ours, so it installs no signal handler
  (SIGTERM stays the engine's), and stops when the engine's task group is cancelled.
- Limits are Hypercorn's own settings: a connection idle for ``keep_alive_timeout``, one
  that never sends a request included, is closed; ``read_timeout`` bounds each wait for
  data; ``h11_max_incomplete_size`` bounds the request line and headers.
- Neither Hypercorn nor uvicorn caps concurrent connections (uvicorn's limit_concurrency
  answers 503 to requests, and keeps the connections), so the listening socket does: past
  ``max_connections`` open ones, a new connection is accepted and closed at once. The
  endpoint then never holds more than that many file descriptors, whatever a client opens;
  accept errors (EMFILE) are asyncio's to log and retry, never the task group's.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import weakref
from typing import Any

import anyio
import anyio.abc
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.utils import wrap_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.ops import Health, Metrics

log = logging.getLogger("engine.http")

DEFAULT_MAX_CONNECTIONS = 100
IDLE_SECONDS = 5  # an idle connection is closed after this (keep_alive_timeout)
READ_SECONDS = 10  # each wait for a request's bytes
MAX_HEAD_BYTES = 16 * 1024  # request line and headers (two GETs need far less)
BACKLOG = 128
_REFUSAL_LOG_SECONDS = 60.0


def app(health: Health, metrics: Metrics) -> Starlette:
    """The ASGI app; the JSON and the metrics text are byte for byte what they were."""

    async def healthz(request: Request) -> Response:
        body = json.dumps(health.document(), indent=2).encode() + b"\n"
        return Response(body, 200 if health.ok else 503, media_type="application/json")

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return Starlette(routes=[Route("/healthz", healthz), Route("/metrics", metrics_text)])


class CappedListener(socket.socket):
    """A listening socket that keeps at most ``cap`` accepted connections open at once.

    asyncio accepts through the listening socket's ``accept()``; past the cap this one
    closes the new connection straight away and takes the next (asyncio stops on
    BlockingIOError once none waits), so a flood costs no descriptor beyond the cap.
    """

    def __init__(self, family: int, cap: int) -> None:
        super().__init__(family, socket.SOCK_STREAM)
        self.cap = cap
        self.refused = 0
        self._open: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._logged_at = -_REFUSAL_LOG_SECONDS
        self._logged_count = 0

    def accept(self) -> tuple[socket.socket, Any]:
        while True:
            fd, addr = self._accept()  # type: ignore[attr-defined]
            if sum(1 for s in self._open if s.fileno() != -1) < self.cap:
                conn = socket.socket(self.family, self.type, self.proto, fileno=fd)
                self._open.add(conn)
                return conn, addr
            os.close(fd)
            self.refused += 1
            self._log_refusals()

    def _log_refusals(self) -> None:
        now = time.monotonic()
        if now - self._logged_at >= _REFUSAL_LOG_SECONDS:
            log.warning(
                "http: %d connection(s) closed at once since the last report: %d are open, "
                "the limit (--http-max-connections)",
                self.refused - self._logged_count,
                self.cap,
            )
            self._logged_at, self._logged_count = now, self.refused


async def listen(host: str, port: int, max_connections: int) -> CappedListener:
    """Bind and listen (before Hypercorn starts: connections wait in the backlog)."""
    # Resolved in a thread: a host name asks DNS, which must not stall the event loop.
    family, _, _, _, address = (
        await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    )[0]
    sock = CappedListener(family, max_connections)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _config() -> Config:
    config = Config()
    config.keep_alive_timeout = IDLE_SECONDS
    config.read_timeout = READ_SECONDS
    config.h11_max_incomplete_size = MAX_HEAD_BYTES
    config.backlog = BACKLOG
    config.graceful_timeout = 1
    config.accesslog = None
    config.errorlog = logging.getLogger("engine.http.server")
    config.include_server_header = False
    return config


async def serve(
    host: str,
    port: int,
    health: Health,
    metrics: Metrics,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. ``task_status`` receives the bound port (useful with port 0)."""
    await serve_asgi(
        host,
        port,
        app(health, metrics),
        what="/healthz and /metrics",
        max_connections=max_connections,
        task_status=task_status,
    )


async def serve_asgi(
    host: str,
    port: int,
    asgi_app: Any,
    *,
    what: str,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an ASGI app (the endpoint's, or the web console's) with the limits above until
    cancelled; ``task_status`` receives the bound port."""
    sock = await listen(host, port, max_connections)
    config = _config()
    # Starlette is an ASGI callable; Hypercorn's type names its own scope classes.
    asgi = wrap_app(asgi_app, config.wsgi_max_body_size, "asgi")
    stopped = anyio.Event()

    async def server() -> None:
        # Shielded: on cancellation Hypercorn is asked to stop (the trigger) and closes its
        # connections within graceful_timeout, rather than being cut mid-shutdown.
        with anyio.CancelScope(shield=True):
            await worker_serve(
                asgi, config, sockets=Sockets([], [sock], []), shutdown_trigger=stopped.wait
            )

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server)
            bound = sock.getsockname()[1]
            log.info("http: %s on %s:%d", what, host, bound)
            task_status.started(bound)
            try:
                await anyio.sleep_forever()
            finally:
                stopped.set()
    finally:
        sock.close()
