"""Operations: Prometheus metrics, what ``/healthz`` reports (served by :mod:`engine.web`),
and the process's resources (memory, file descriptors)."""

from __future__ import annotations

import ctypes
import functools
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.logs import scrub

log = logging.getLogger("engine.ops")

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_MMAP_FROM = 256 * 1024


def bound_large_allocations() -> bool:
    """Have glibc give every buffer of 256 KiB or more back to the system once it is freed.

    glibc raises its mmap threshold (up to 32 MiB) each time it frees a large mapped block,
    so after the first 20 MB message the next ones come from the heap, and the heap keeps
    what they leave: measured over 2,000 messages with 5 of 21 MB, the engine's peak RSS was
    123 MiB, and 100 MiB with the threshold fixed. Setting it turns the adjustment off.
    Not 1 MiB, as first: the threads that read the parsing processes' answers (~0.5 MB a
    window, engine.parsers) each allocate from a heap of their own, whose small survivors
    then held what the answers left (peak 138-148 MiB in that case, 137 from 256 KiB).
    Elsewhere than glibc this does nothing (and returns False).
    """
    # The process's own symbols (dlopen(NULL)) hold libc's: ctypes.util.find_library("c")
    # would run `ldconfig -p` in a child process (~5 ms and a fork) at every start.
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM))


# With no hard limit, the soft one is raised this far: beyond it the kernel may refuse anyway.
_FD_CEILING = 1 << 16


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one, where allowed; (before, after).

    The usual soft limit is 1,024: 1,100 idle connections to the HTTP endpoint made accept()
    fail with EMFILE and the engine exit, and POP3 sessions, SQLite and attachment files
    share the same table. The HTTP endpoint has its own cap (engine.web); this is the room.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _FD_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open-file limit from %d to %d: %s", soft, want, exc)
            return soft, soft
        log.debug("open-file limit raised from %d to %d", soft, want)
        return soft, want
    return soft, soft


class Metrics:
    """The engine's metrics, in a registry of its own (several engines in one test process)."""

    def __init__(self) -> None:
        # Imported here, not at the top: prometheus_client brings http.server, wsgiref and
        # urllib (about 15 ms) to every command, and only an engine has metrics.
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self._mailbox_metrics()
        self._writer_metrics()
        self._oauth_metrics()

    def _mailbox_metrics(self) -> None:
        """What each mailbox did: messages, sessions, outages, replies."""
        from prometheus_client import Counter, Gauge

        r, mailbox = self.registry, ["mailbox"]
        self.fetched = Counter(
            "mailintegration_messages_fetched", "Messages fetched (RETR).", mailbox, registry=r
        )
        self.processed = Counter(
            "mailintegration_messages_processed",
            "Messages committed as a request, activity or refusal.",
            mailbox,
            registry=r,
        )
        self.failed = Counter(
            "mailintegration_messages_failed",
            "Messages committed as a failure event.",
            mailbox,
            registry=r,
        )
        self.sessions = Counter(
            "mailintegration_sessions",
            "Mailbox sessions by result.",
            [*mailbox, "result"],
            registry=r,
        )
        self.outage = Gauge(
            "mailintegration_mailbox_outage",
            "1 while the mailbox cannot be read.",
            mailbox,
            registry=r,
        )
        self.kept_deleted = Gauge(
            "mailintegration_server_kept_deleted",
            "Messages of the last listing whose deletion the server had confirmed before "
            "(a server that keeps deleted mail).",
            mailbox,
            registry=r,
        )
        self.replies = Counter(
            "mailintegration_replies",
            "Sends of automatic replies by result (sent, retry, failed).",
            [*mailbox, "result"],
            registry=r,
        )
        self.replies_suppressed = Counter(
            "mailintegration_replies_suppressed",
            "Automatic replies not made, by reason (undeliverable: a permanent bounce).",
            [*mailbox, "reason"],
            registry=r,
        )
        self.flood_collapsed = Counter(
            "mailintegration_flood_collapsed",
            "Messages over a mailbox's flood limit, added to a request instead of a new one.",
            mailbox,
            registry=r,
        )

    def _oauth_metrics(self) -> None:
        """Token health of OAuth2 mailboxes (engine.oauth.health), to alert before it fails.
        Labels are mailbox names only: never a token, a client id or a secret."""
        from prometheus_client import Gauge

        r, mailbox = self.registry, ["mailbox"]
        self.oauth_access_expiry = Gauge(
            "mailintegration_oauth_access_token_expiry_timestamp_seconds",
            "When the stored access token expires (epoch seconds).",
            mailbox,
            registry=r,
        )
        self.oauth_last_refresh = Gauge(
            "mailintegration_oauth_last_refresh_timestamp_seconds",
            "When a token was last obtained from the token endpoint (epoch seconds).",
            mailbox,
            registry=r,
        )
        self.oauth_refresh_age = Gauge(
            "mailintegration_oauth_refresh_token_age_seconds",
            "Age of the refresh token since the sign-in that gave it (-1: none).",
            mailbox,
            registry=r,
        )
        self.oauth_refresh_idle = Gauge(
            "mailintegration_oauth_refresh_token_idle_seconds",
            "Time since the refresh token was last used (-1: none).",
            mailbox,
            registry=r,
        )
        self.oauth_secret_expiry = Gauge(
            "mailintegration_oauth_client_secret_expiry_timestamp_seconds",
            "clientSecretExpires as epoch seconds (-1: not configured).",
            mailbox,
            registry=r,
        )
        self.oauth_warnings = Gauge(
            "mailintegration_oauth_warnings",
            "Token health warnings now (a known expiry within warnDays).",
            mailbox,
            registry=r,
        )

    def _writer_metrics(self) -> None:
        """How the single writer keeps up: its queue, transactions and their sizes."""
        from prometheus_client import Counter, Gauge, Histogram

        r = self.registry
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

    def lease_metrics(self, replica: str, counts: Callable[[], dict[str, int]]) -> None:
        """With leases: this replica's id and its lease counts, read when scraped."""
        from prometheus_client import Gauge

        r = self.registry
        info = Gauge(
            "mailintegration_replica",
            "1, labelled with this replica's id.",
            ["replica"],
            registry=r,
        )
        info.labels(replica).set(1)
        for key, text in (
            ("held", "Mailbox leases this replica holds."),
            ("mailboxes", "Mailboxes in this replica's configuration."),
            ("replicas", "Replicas alive, as this replica last saw them."),
        ):
            gauge = Gauge(f"mailintegration_leases_{key}", text, ["replica"], registry=r)
            gauge.labels(replica).set_function(functools.partial(_count, counts, key))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    @property
    def content_type(self) -> str:
        """The Content-Type of :meth:`render`'s text."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return CONTENT_TYPE_LATEST


def _count(counts: Callable[[], dict[str, int]], key: str) -> float:
    return float(counts()[key])


@dataclass
class MailboxHealth:
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    cause: str | None = None
    # How the daemon waits for the next session: "IDLE" (push) or "poll", and for how long.
    wait: str | None = None
    wait_seconds: float | None = None
    # Messages the last session listed and left for a later one (engine.session's
    # SessionResult.waiting), and when a session first saw that backlog (None: none now).
    backlog: int = 0
    backlog_since: float | None = None


@dataclass
class Health:
    """What ``/healthz`` reports: liveness of the supervisor and writer, per-mailbox state."""

    supervisor_alive: bool = False
    writer_alive: bool = False
    mailboxes: dict[str, MailboxHealth] = field(default_factory=dict)
    # The last transaction's failure while the store fails (None: it commits).
    store_error: str | None = None
    # With leases (several replicas): this replica's id and its lease counts.
    replica: str | None = None
    leases: Callable[[], dict[str, int]] | None = None

    def success(self, name: str) -> None:
        h = self.mailboxes.setdefault(name, MailboxHealth())
        h.last_success, h.cause = time.time(), None

    def failure(self, name: str, cause: str, error: str) -> None:
        h = self.mailboxes.setdefault(name, MailboxHealth())
        h.last_error, h.last_error_at, h.cause = error, time.time(), cause

    def waiting(self, name: str, how: str, seconds: float) -> None:
        """The daemon waits for the mailbox's next session by ``how`` (IDLE or poll)."""
        h = self.mailboxes.setdefault(name, MailboxHealth())
        h.wait, h.wait_seconds = how, seconds

    def backlogged(self, name: str, count: int) -> None:
        """The mailbox's last session left ``count`` listed messages for a later one: since
        when is kept from the session that first saw a backlog, until a session leaves none."""
        h = self.mailboxes.setdefault(name, MailboxHealth())
        if count <= 0:
            h.backlog, h.backlog_since = 0, None
            return
        h.backlog = count
        if h.backlog_since is None:
            h.backlog_since = time.time()

    def forget(self, name: str) -> None:
        self.mailboxes.pop(name, None)

    def document(self) -> dict[str, Any]:
        def ts(t: float | None) -> str | None:
            return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

        doc: dict[str, Any] = {
            "status": "ok" if self.ok else "failing",
            "supervisor": self.supervisor_alive,
            "writer": self.writer_alive,
            "store": "ok" if self.store_error is None else self.store_error,
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
        if self.replica is not None:
            doc["replica"] = self.replica
        if self.leases is not None:
            doc["leases"] = self.leases()
        return doc

    def store_state(self, error: str | None) -> None:
        """The writer's word on the store: an error (scrubbed here), or None: it commits."""
        self.store_error = None if error is None else scrub(error)

    @property
    def ok(self) -> bool:
        """Alive, and the store commits: a replica whose store fails is not ready."""
        return self.supervisor_alive and self.writer_alive and self.store_error is None
