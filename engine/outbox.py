"""The outbox: sends the automatic replies the writer recorded, outside its transactions.

A slow SMTP server used to stop every mailbox: replies were sent by the writer itself, after
its commit and before it took the next batch. Now the protocol between the two is:

1. The writer records a reply (an outbox row) in the transaction of the message it answers,
   and calls :meth:`Outbox.wake` once that transaction has committed.
2. The outbox asks for the rows that are due with an :class:`~engine.items.OutboxFetch`
   item on the writer's queue (only the writer touches the store), for the mailboxes whose
   SMTP settings it knows, and sends each in a worker thread, a few at a time.
3. Each send is bounded by an overall deadline (``DEADLINE_FACTOR`` x the SMTP
   ``timeoutSeconds``, the socket time-out bounding each operation within it, and never past
   the end of a drain); past it the socket is shut down, which ends the blocked thread, and
   the attempt is recorded as failed (to be retried).
4. Its result goes back as an :class:`~engine.items.OutboxResult` item: sent; or to be
   retried after an exponential backoff; or, after ``max_attempts`` or a permanent (5xx)
   answer, failed for good with the error (scrubbed of secrets) on the row.

A row stays pending until a result is committed, so replies survive restarts: a send cut
by a crash is made again at the next start (at most one duplicate, never a loss). ``once``
sends what is due before it exits, within ``drain_seconds``; ``run`` keeps the outbox going.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from engine import logs
from engine.config import SmtpConfig
from engine.errors import OAuthError, TLSError
from engine.items import Item, OutboxFetch, OutboxResult
from engine.model import PendingReply

if TYPE_CHECKING:
    from engine.oauth.broker import TokenBroker

log = logging.getLogger("engine.outbox")

DEADLINE_FACTOR = 3  # connect + greeting, the dialogue, the data: each bounded by the timeout
MAX_DELAY = 3600.0


class Outbox:
    """Run :meth:`run` in the engine's task group, beside the writer.

    ``smtp_for`` gives the SMTP settings of a mailbox by name (None: not known in this
    process, or without SMTP); ``sendable`` lists the names it knows.
    """

    def __init__(
        self,
        smtp_for: Callable[[str], SmtpConfig | None],
        sendable: Callable[[], tuple[str, ...]],
        *,
        concurrency: int = 4,
        retry_seconds: float = 60.0,
        max_attempts: int = 8,
        drain_seconds: float = 60.0,
        on_result: Callable[[str, str], None] | None = None,
        tokens: TokenBroker | None = None,
    ) -> None:
        self.smtp_for = smtp_for
        self.tokens = tokens  # OAuth2 access tokens, for SMTP servers signed in with them
        self.sendable = sendable
        self.concurrency = concurrency
        self.retry_seconds = retry_seconds
        self.max_attempts = max_attempts
        self.drain_seconds = drain_seconds
        self.on_result = on_result  # (mailbox, "sent" | "retry" | "failed"), for metrics
        self._wake = anyio.Event()
        self._in_flight: set[int] = set()
        self._draining = False
        self._stopping = False
        self._deadline: float | None = None  # the drain's, once draining
        self._sending: set[anyio.CancelScope] = set()  # one per send under way

    def wake(self) -> None:
        """Something may be due: a reply was committed, or a mailbox became known."""
        self._wake.set()

    def drain(self) -> None:
        """Send what is due now, then end (``once``, ``ingest``): bounded by drain_seconds."""
        self._draining = True
        self._wake.set()

    def stop(self) -> None:
        """Start no other send; end once those under way are recorded (``run``'s stop)."""
        self._stopping = True
        self._wake.set()

    async def run(
        self,
        send: MemoryObjectSendStream[Item],
        *,
        task_status: Any = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Until drained or stopped; closes ``send`` (its clone of the writer's queue)."""
        async with send, anyio.create_task_group() as sends:
            task_status.started()
            while not self._stopping:
                self._wake = anyio.Event()  # before asking: a wake-up meanwhile is kept
                if self._draining and self._deadline is None:
                    self._deadline = anyio.current_time() + self.drain_seconds
                    for scope in self._sending:  # sends under way end with the drain too
                        scope.deadline = min(scope.deadline, self._deadline)
                if self._deadline is not None and anyio.current_time() >= self._deadline:
                    log.warning("replies still due are left for the next run (drain deadline)")
                    break
                started, next_due = await self._start_due(send, sends)
                if self._draining and not started and not self._in_flight:
                    break  # nothing due now, nothing under way
                await self._sleep(next_due, self._deadline)

    async def _start_due(
        self, send: MemoryObjectSendStream[Item], sends: anyio.abc.TaskGroup
    ) -> tuple[int, float | None]:
        """Ask the writer for what is due and start sending it; (started, next due time)."""
        free = self.concurrency - len(self._in_flight)
        names = self.sendable()
        if free <= 0 or not names:
            return 0, None
        fetch = OutboxFetch(mailboxes=names, exclude=tuple(self._in_flight), limit=free)
        await send.send(fetch)
        await fetch.done.wait()
        if fetch.failure is not None:
            log.error("cannot read the outbox; trying again later: %s", fetch.failure)
            return 0, anyio.current_time() + 5.0
        for row in fetch.due:
            self._in_flight.add(row.id)
            sends.start_soon(self._deliver, row, send)
        next_due = None
        if fetch.next_due is not None:
            wait = (datetime.fromisoformat(fetch.next_due) - datetime.now(UTC)).total_seconds()
            next_due = anyio.current_time() + max(0.0, wait)
        return len(fetch.due), next_due

    async def _sleep(self, next_due: float | None, deadline: float | None) -> None:
        """Until woken, the next retry is due, or the drain deadline."""
        until = min((t for t in (next_due, deadline) if t is not None), default=None)
        if until is None:
            await self._wake.wait()
            return
        with anyio.move_on_after(max(0.0, until - anyio.current_time())):
            await self._wake.wait()

    async def _deliver(self, row: PendingReply, send: MemoryObjectSendStream[Item]) -> None:
        """Send one reply and have its result recorded. Never raises for a failed send."""
        try:
            smtp = self.smtp_for(row.mailbox)
            if smtp is None:
                return  # its mailbox went away meanwhile: the row waits for it
            started = anyio.current_time()
            deadline = started + DEADLINE_FACTOR * smtp.timeout
            if self._deadline is not None:  # draining: a send ends with the drain at the latest
                deadline = min(deadline, max(started + 1.0, self._deadline))
            waited = "no answer within the deadline of a send ({:.0f} s)"
            error: str | None = None
            permanent = False
            with anyio.CancelScope(deadline=deadline) as scope:
                self._sending.add(scope)
                try:
                    error, permanent = await _send(smtp, row, self.tokens)
                finally:
                    self._sending.discard(scope)
            if scope.cancelled_caught:
                error = waited.format(anyio.current_time() - started)
            result = self._result(row, error, permanent)
            await send.send(result)
            await result.done.wait()
            if result.failure is not None:
                # Not recorded: the row is still pending and is sent again later.
                log.error("mailbox=%s reply #%d: result not recorded", row.mailbox, row.id)
        finally:
            self._in_flight.discard(row.id)
            self._wake.set()

    def _result(self, row: PendingReply, error: str | None, permanent: bool) -> OutboxResult:
        attempt = row.attempts + 1
        if error is None:
            log.info("mailbox=%s reply #%d sent to %s", row.mailbox, row.id, row.recipient)
            outcome, result = "sent", OutboxResult(row.id, row.mailbox, None)
        elif permanent or attempt >= self.max_attempts:
            log.warning(
                "mailbox=%s reply #%d to %s not sent, giving up after %d attempt(s): %s",
                row.mailbox,
                row.id,
                row.recipient,
                attempt,
                error,
            )
            outcome, result = "failed", OutboxResult(row.id, row.mailbox, error)
        else:
            delay = min(MAX_DELAY, self.retry_seconds * 2 ** (attempt - 1))
            log.warning(
                "mailbox=%s reply #%d to %s not sent (attempt %d of %d), retry in %.0f s: %s",
                row.mailbox,
                row.id,
                row.recipient,
                attempt,
                self.max_attempts,
                delay,
                error,
            )
            retry_at = datetime.now(UTC) + timedelta(seconds=delay)
            outcome, result = "retry", OutboxResult(row.id, row.mailbox, error, retry_at)
        if self.on_result is not None:
            self.on_result(row.mailbox, outcome)
        return result


async def _send(
    smtp: SmtpConfig, row: PendingReply, tokens: TokenBroker | None = None
) -> tuple[str | None, bool]:
    """Send in a worker thread: (error or None, permanent). Cancel it to cut it short."""
    # Here, not at the top: smtplib and the email package (~9 ms) are for an engine that has
    # a reply to send, not for every start.
    import smtplib

    from engine.reply import Delivery, one_line

    delivery = Delivery(smtp, row.recipient, row.message, tokens)
    try:
        try:
            await anyio.to_thread.run_sync(delivery.run, abandon_on_cancel=True)
        finally:
            # Cancelled (the deadline, or the engine stopping): the abandoned thread is still
            # blocked on its socket; shutting the socket down ends the thread at once.
            delivery.abort()
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()), (0, b""))
        return _describe(code, text), code >= 500
    except smtplib.SMTPAuthenticationError as exc:
        # Never the server's text: one that echoes the credentials would store them.
        return f"{exc.smtp_code}: the SMTP server refused the login", exc.smtp_code >= 500
    except smtplib.SMTPResponseException as exc:
        return _describe(exc.smtp_code, exc.smtp_error), exc.smtp_code >= 500
    except OAuthError as exc:
        # Retried: a token endpoint may be back, a secret renewed, consent given again.
        return one_line(logs.scrub(f"OAuth2 ({exc.reason}): {exc}"), 300), False
    except smtplib.SMTPNotSupportedError as exc:
        return f"the SMTP server does not support it: {exc}", True
    except (smtplib.SMTPException, OSError, ValueError, TLSError) as exc:
        # TLSError: a caFile that cannot be loaded (engine.tls); retried, as it may be fixed.
        return one_line(logs.scrub(f"{type(exc).__name__}: {exc}"), 300), False
    return None, False


def _describe(code: int, text: bytes | str) -> str:
    """An SMTP answer for the row and the log: one line, bounded, secrets scrubbed."""
    from engine.reply import one_line

    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return one_line(logs.scrub(f"{code} {text}"), 300)
