"""The single writer: the only code that touches the store.

Fetchers send :class:`Envelope` items (one per fetched message) and a few kinds of small
requests through one bounded memory channel. The writer takes whatever is waiting, up to a
batch limit, and applies it in one ``BEGIN IMMEDIATE … COMMIT`` (group commit). A message that
fails is rolled back alone (see :meth:`Writer.apply`) and recorded as a failure event in the
same transaction as its ledger row. Only after the commit does the writer answer the items: a
fetcher deletes a message from the server only once its answer says the outcome is durable.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream

from engine import reply
from engine.config import MailboxConfig, mailbox_copy
from engine.errors import (
    DirectoryError,
    MessageError,
    MessageKept,
    StoreError,
    sole,
)
from engine.items import (
    DirectoryCheck,
    Envelope,
    Item,
    Kind,
    KnownQuery,
    OutboxFetch,
    OutboxResult,
    Outcome,
    SessionReport,
)
from engine.model import Attachment, LedgerRow, Team
from engine.ops import Metrics
from engine.processors import (
    AddActivity,
    Context,
    Decision,
    NewRequest,
    Refuse,
    decide,
    referenced,
)
from engine.store import SqliteStore

log = logging.getLogger("engine.writer")


@dataclass(frozen=True)
class ReplyLimits:
    """How many automatic replies may be recorded, counted over every mailbox of the store.

    Per address per day: RFC 3834 asks to answer one sender at most once in a while (Znuny
    allows 40 a day; five is plenty for "this mailbox takes no requests"). The address is
    normalized first (case, +tag, quotes, IDNA), or victim+1@, victim+2@... each got five.
    Per domain per hour: a forged campaign at one domain through distinct local parts; 20 is
    more than a desk gets from one company's people in an hour. Per mailbox per hour: what the
    desk may reflect at all, one a minute on average.
    """

    per_address_per_day: int = 5
    per_domain_per_hour: int = 20
    per_mailbox_per_hour: int = 60


@dataclass
class WriterStats:
    transactions: int = 0
    outcomes: Counter[Kind] = field(default_factory=Counter)


class Writer:
    """Owns the store. Run :meth:`run` in the supervisor's task group."""

    def __init__(
        self,
        store: SqliteStore,
        *,
        created_by: str,
        default_team: str | None = None,
        max_batch: int = 256,
        max_batch_seconds: float = 2.0,
        min_batch: int = 128,
        linger: float = 0.02,
        reply_limits: ReplyLimits | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.created_by = created_by
        self.default_team = default_team
        self.max_batch = max_batch
        self.max_batch_seconds = max_batch_seconds
        self.min_batch = min_batch
        self.linger = linger
        self.reply_limits = reply_limits or ReplyLimits()
        self.stats = WriterStats()
        self.metrics = metrics
        # Called after a commit that recorded replies: the outbox's wake-up.
        self.on_reply: Callable[[], None] | None = None
        self._replies_queued = 0
        # The rate limits already logged as reached: (kind, key, window); logged once each.
        self._limits_logged: set[tuple[str, str, str]] = set()
        # (account, uidl) in the ledger, as seen by the current transaction; and those whose
        # message was left on the server (a later session may take it whole: see _ledger).
        self._recorded: set[tuple[str, str]] = set()
        self._kept: dict[tuple[str, str], LedgerRow] = {}

    async def run(
        self,
        receive: MemoryObjectReceiveStream[Item],
        *,
        task_status: Any = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Drain the channel until every sender has closed its clone, then return."""
        task_status.started()
        # Attachment files are written by tasks of this group while transactions go on; they
        # record their errors for the commit rather than raise.
        try:
            async with receive, anyio.create_task_group() as files:
                self.store.spawn = files.start_soon
                try:
                    await self._drain(receive)
                finally:
                    self.store.spawn = None
        except BaseExceptionGroup as group:
            raise sole(group) from None

    async def _drain(self, receive: MemoryObjectReceiveStream[Item]) -> None:
        batch: list[Item] = []
        while True:
            if not batch:
                try:
                    batch.append(await receive.receive())
                except anyio.EndOfStream:
                    return
            # Group commit: whatever is already waiting joins this transaction, and while
            # messages keep coming a short wait gathers more.
            await self._gather(batch, receive)
            if self.metrics is not None:
                self.metrics.queue_depth.set(receive.statistics().current_buffer_used)
            batch = await self.apply(batch)

    async def _gather(self, batch: list[Item], receive: MemoryObjectReceiveStream[Item]) -> None:
        """Add what is waiting to ``batch``; with messages in it, wait up to ``linger`` for
        more while it is under ``min_batch``.

        A transaction has fixed costs whatever its size (BEGIN, the ledger query, an fsync for
        each attachment file and its folder, the executemany calls, COMMIT's fsync: ~15 ms
        here), so many small ones cost more than a few larger: measured, 2,000 messages went
        in 72-86 transactions of ~26, the commits taking 1.2 s. PostgreSQL's commit_delay is
        the same idea. A session's last message ends the wait: nothing more is coming from it
        (one message polled by the daemon is not held back for the linger).
        """
        deadline = anyio.current_time() + self.linger
        messages = any(isinstance(item, Envelope) and not item.last for item in batch)
        while len(batch) < self.max_batch:
            try:
                item = receive.receive_nowait()
            except anyio.EndOfStream:
                return
            except anyio.WouldBlock:
                remaining = deadline - anyio.current_time()
                if not messages or len(batch) >= self.min_batch or remaining <= 0:
                    return
                with anyio.move_on_after(remaining) as waited:
                    try:
                        item = await receive.receive()
                    except anyio.EndOfStream:
                        return
                if waited.cancelled_caught:
                    return
            batch.append(item)
            if isinstance(item, Envelope):
                messages = not item.last

    async def apply(self, batch: list[Item]) -> list[Item]:
        """One transaction for (the head of) the batch; answer each item only once durable.

        A transaction is bounded by count (the batch) and by time: once ``max_batch_seconds``
        have passed it commits what it has, and the rest is returned for the next one, so a
        fetcher never waits long for its acknowledgement behind a large batch.

        The first attempt takes no savepoints (two round trips per message saved): a processor
        only reads, so a message that fails before its first write still becomes a failure
        event in place. Only a failure after a message's writes began sends the batch round
        again, rolled back, with a savepoint per message so that message is undone alone.
        """
        started = time.monotonic()
        rest: list[Item] = []
        try:
            careful = False
            while True:
                try:
                    batch, rest = await self._transaction(batch, started, careful=careful)
                    break
                except _Careful as signal:
                    log.warning(
                        "a message failed half-way (%s): the transaction of %d item(s) is "
                        "done again with a savepoint per message",
                        signal.__cause__,
                        len(batch),
                    )
                    await self.store.rollback()
                    self._replies_queued = 0
                    for item in batch:
                        _reset(item)
                    careful = True
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                try:
                    await self.store.rollback()
                except sqlite3.Error:
                    log.exception("rollback failed")
            self._replies_queued = 0
            failure = StoreError(f"the store could not commit: {exc!r}")
            # Every answer must say "not committed", cancellation included: a fetcher that
            # outlives the writer must never take a rolled-back message for a durable one.
            for item in batch:
                item.failure = failure
            if not isinstance(exc, Exception):
                for item in rest:  # never to be handled now: answer them too
                    item.failure = failure
                    item.done.set()
                raise
            log.error("transaction of %d item(s) failed, nothing is deleted: %s", len(batch), exc)
        else:
            self.stats.transactions += 1
            if self.metrics is not None:
                self.metrics.transactions.inc()
                self.metrics.batch_size.observe(len(batch))
                self.metrics.commit_seconds.observe(time.monotonic() - started)
            for item in batch:
                if isinstance(item, Envelope):
                    self._account(item)
        finally:
            for item in batch:
                item.done.set()
                if isinstance(item, Envelope):
                    # The fetcher needs only the answer now: let the bytes go.
                    item.raw, item.parsed = b"", None
                    if item.on_done is not None:
                        item.on_done()
        if self._replies_queued:
            self._replies_queued = 0
            if self.on_reply is not None:
                self.on_reply()  # committed: the outbox may send them now
        return rest

    async def _transaction(
        self, batch: list[Item], started: float, *, careful: bool
    ) -> tuple[list[Item], list[Item]]:
        """Handle and commit (the head of) ``batch``; returns it and the rest."""
        rest: list[Item] = []
        await self.store.begin()
        # The ledger rows of the whole batch in one query per account, not one per message.
        self._recorded, self._kept = set(), {}
        wanted: dict[str, list[str]] = {}
        for item in batch:
            if isinstance(item, Envelope) and not item.dry_run:
                wanted.setdefault(item.account, []).append(item.uidl)
        for account, uidls in wanted.items():
            for uidl, row in (await self.store.ledger_rows(account, uidls)).items():
                if row.kept:
                    self._kept[account, uidl] = row
                else:
                    self._recorded.add((account, uidl))
        # And the requests their subjects name (replies), in one query too.
        await self.store.read_ahead(
            number
            for item in batch
            if isinstance(item, Envelope) and item.parsed is not None
            if (number := referenced(item.parsed, item.mailbox)) is not None
        )
        for i, item in enumerate(batch):
            await self._handle(item, careful)
            if time.monotonic() - started > self.max_batch_seconds:
                batch, rest = batch[: i + 1], batch[i + 1 :]
                break
        await self.store.commit()
        return batch, rest

    def _account(self, env: Envelope) -> None:
        """Log and count one committed message."""
        cfg = env.mailbox
        outcome = env.outcome
        assert outcome is not None  # every committed envelope is answered
        kind = outcome.kind
        self.stats.outcomes[kind] += 1
        if outcome.again:
            log.debug("mailbox=%s uidl=%s still left on the server", cfg.name, env.uidl)
            return
        if kind in (Kind.FAILED, Kind.KEPT):
            log.warning(
                "mailbox=%s uidl=%s message could not be processed (%s); failure event #%d",
                cfg.name,
                env.uidl,
                env.problem,
                env.request_number,
            )
        elif kind is not Kind.DRY_RUN:
            log.info(
                "mailbox=%s uidl=%s %s #%s",
                cfg.name,
                env.uidl,
                outcome,
                env.request_number if env.request_number else "-",
            )
        if self.metrics is not None and kind not in (Kind.DUPLICATE, Kind.DRY_RUN):
            failed = kind in (Kind.FAILED, Kind.KEPT)
            counter = self.metrics.failed if failed else self.metrics.processed
            counter.labels(cfg.name).inc()

    async def _handle(self, item: Item, careful: bool) -> None:
        if isinstance(item, Envelope):
            await self._envelope(item, careful)
        elif isinstance(item, KnownQuery):
            item.known = await self.store.ledger_rows(item.account, item.uidls)
        elif isinstance(item, DirectoryCheck):
            item.problem = await self._check_directory(item.mailbox)
            item.account = await self._resolve(item.mailbox, remember=item.remember)
        elif isinstance(item, SessionReport):
            await self._session_report(item)
        elif isinstance(item, OutboxFetch):
            item.due, item.next_due = await self.store.due_replies(
                item.mailboxes, exclude=item.exclude, limit=item.limit
            )
        elif isinstance(item, OutboxResult):
            await self.store.record_attempt(item.reply_id, error=item.error, retry_at=item.retry_at)
        else:  # pragma: no cover - a programming error, surfaced loudly
            raise TypeError(f"unknown item {item!r}")

    async def _resolve(self, cfg: MailboxConfig, *, remember: bool) -> str:
        """The account the ledger knows this mailbox by: its own (MailboxConfig.account),
        unless the mailbox used another one before, with the same user name, which has
        ledger rows while the new one has none (the same mailbox, whose messages must not
        be taken again):

        - without ``accountId`` (the server's name changed, say pop.example.com to
          10.0.0.5), the old account is kept, with a warning;
        - with ``accountId``, taken as given, the old account's rows move to it (once: the
          admin named the account, as the XSD tells them to when moving the mailbox).
        """
        new, user = cfg.account, cfg.server.user_name
        last = await self.store.mailbox_account(cfg.name)
        if (
            last is not None
            and last[0] != new
            and last[1] == user
            and not await self.store.account_has_rows(new)
            and await self.store.account_has_rows(last[0])
        ):
            if cfg.server.account_id is None:
                log.warning(
                    "mailbox=%s its account is now %s, a name the ledger does not know; it "
                    "keeps the one it had, %s (set <accountId> to name the account yourself)",
                    cfg.name,
                    new,
                    last[0],
                )
                return last[0]
            if not remember:  # a dry run changes nothing
                return last[0]
            log.warning(
                "mailbox=%s the ledger's entries of account %s now belong to accountId %s",
                cfg.name,
                last[0],
                new,
            )
            await self.store.rename_account(last[0], new)
        if remember and last != (new, user):
            await self.store.remember_account(cfg.name, new, user)
        return new

    # -- teams and directory ---------------------------------------------------------------

    async def _team(self, ref: str | None) -> Team | None:
        return await self.store.team(ref if ref else self.default_team)

    async def _any_team(self, ref: str | None) -> Team:
        """The team an engine-made event goes to: the mailbox's, the default, else the first."""
        team = await self._team(ref) or await self.store.team(self.default_team)
        if team is None:
            team = await self.store.first_team()
        if team is None:
            raise StoreError("the directory has no team: run 'mailintegration directory import'")
        return team

    async def _check_directory(self, cfg: MailboxConfig) -> DirectoryError | None:
        problems = []
        if await self._team(cfg.team) is None:
            problems.append(
                f"team {cfg.team or self.default_team or '(none given, and not exactly one)'}"
                " is not in the directory"
            )
        if cfg.fallback_user and await self.store.user_by_login(cfg.fallback_user) is None:
            problems.append(f"incidentFallbackUserLogon {cfg.fallback_user!r} is not a user")
        if cfg.assignee and await self.store.user_by_login(cfg.assignee) is None:
            problems.append(f"assignee {cfg.assignee!r} is not a user")
        for table, label, value in (
            ("sites", "incidentFallbackSiteName", cfg.fallback_site),
            ("groups", "group" if cfg.processor == "event" else "incidentGroup", cfg.group),
            ("sources", "incidentSource", cfg.source),
        ):
            if value and not await self.store.has_name(table, value):
                problems.append(f"{label} {value!r} is not in the directory")
        if not problems:
            return None
        return DirectoryError("; ".join(problems))

    # -- messages --------------------------------------------------------------------------

    async def _envelope(self, env: Envelope, careful: bool) -> None:
        cfg = env.mailbox
        if not env.dry_run and (env.account, env.uidl) in self._recorded:
            env.outcome = Outcome(Kind.DUPLICATE)
            return
        left = self._kept.get((env.account, env.uidl))
        if (
            left is not None
            and isinstance(env.error, MessageKept)
            and not env.dry_run
            and left.sha256 == _sha(env.raw)
        ):
            # Left on the server before, and cut off the same way again (a server without
            # UIDL: it cannot be told before it is read): nothing new to record.
            env.outcome = Outcome.kept_again(left.request_number)
            return
        writing = False
        if careful:
            await self.store.savepoint("msg")
        try:
            if env.error is not None:
                raise env.error
            assert env.parsed is not None
            team = await self._team(cfg.team)
            if team is None:
                raise DirectoryError(
                    f"team {cfg.team or self.default_team} is not in the directory"
                )
            decision = await decide(env.parsed, Context(mailbox=cfg, team=team), self.store)
            if env.dry_run:
                env.outcome = Outcome(Kind.DRY_RUN, note=describe(decision))
                if careful:
                    await self.store.rollback_to("msg")
                return
            writing = True
            env.outcome = await self._apply(env, team, decision)
            await self._ledger(env)
            if careful:
                await self.store.release("msg")
        except (sqlite3.Error, StoreError):
            raise  # the store itself is failing: the whole batch rolls back, nothing is deleted
        except Exception as exc:
            if writing and not careful:
                raise _Careful from exc
            if careful:
                await self.store.rollback_to("msg")
            if env.dry_run:
                env.outcome = Outcome(Kind.DRY_RUN, note=f"failure event: {_cause(exc)}: {exc}")
                return
            if careful:
                await self.store.savepoint("fail")
            try:
                number = await self._failure_event(env, exc)
                kept = exc if isinstance(exc, MessageKept) else None
                problem = f"{_cause(exc)}: {exc}"
                if kept is not None:
                    env.outcome = Outcome(Kind.KEPT, kept.reason, number, problem)
                else:
                    env.outcome = Outcome(Kind.FAILED, _cause(exc), number, problem)
                await self._ledger(env, kept.needed if kept else None)
            except (sqlite3.Error, StoreError):
                raise
            except Exception as again:
                if careful:
                    raise
                raise _Careful from again
            if careful:
                await self.store.release("fail")

    async def _ledger(self, env: Envelope, needed: int | None = None) -> None:
        """The message's ledger row. One left on the server before (kept) and now taken
        whole has its row updated, and its failure event says what became of it."""
        key = (env.account, env.uidl)
        assert env.outcome is not None
        outcome = str(env.outcome)
        fields: dict[str, Any] = {
            "message_id": env.parsed.message_id if env.parsed else _message_id(env),
            "sha256": env.parsed.sha256 if env.parsed else _sha(env.raw),
            "outcome": outcome,
            "request_number": env.request_number,
            "size": env.size,
            "needed": needed,
        }
        before = self._kept.pop(key, None)
        if env.outcome.kind is Kind.KEPT:
            self._kept[key] = LedgerRow(**fields, deleted_at=None)
        else:
            self._recorded.add(key)
        if before is None:
            await self.store.record_ledger(
                account=env.account, uidl=env.uidl, mailbox=env.mailbox.name, **fields
            )
            return
        await self.store.update_ledger(account=env.account, uidl=env.uidl, **fields)
        if before.request_number is not None and before.request_number != env.request_number:
            number = f" #{env.request_number}" if env.request_number else ""
            await self.store.add_activity(
                before.request_number,
                author="mailintegration",
                email="",
                body=f"The message (UIDL {env.uidl}) was taken whole from mailbox "
                f"{env.mailbox.name} by a later session: {outcome}{number}.",
                automatic=True,
            )

    async def _apply(self, env: Envelope, team: Team, d: Decision) -> Outcome:
        msg = env.parsed
        assert msg is not None
        if isinstance(d, NewRequest):
            number = await self.store.create_request(
                team_id=team.id,
                type=d.type,
                subject=d.subject,
                description=d.description,
                html=d.html,
                created_by=self.created_by,
                requester_id=d.requester.id if d.requester else None,
                user_id=d.requester.id if d.requester else None,
                site=d.site,
                group=d.group,
                assignee_id=d.assignee.id if d.assignee else None,
                source=d.source,
                mailbox=env.mailbox.name,
                message_id=msg.message_id,
                sha256=msg.sha256,
            )
            await self.store.add_attachments(number, None, d.attachments)
            return Outcome(Kind.CREATED, request_number=number)
        if isinstance(d, AddActivity):
            number = d.request.number
            activity = await self.store.add_activity(
                number,
                author=d.author,
                email=msg.from_addr,
                body=d.body,
                date=msg.date,
                automatic=d.automatic,
                message_id=msg.message_id,
            )
            await self.store.add_attachments(number, activity, d.attachments)
            if d.reopen and not d.automatic:
                status = "new" if d.request.type == "event" else "reopened"
                await self.store.set_status(
                    number,
                    status,
                    by=self.created_by,
                    why=f"Reopened by a reply from {msg.from_addr or d.author}.",
                )
            return Outcome(Kind.ACTIVITY, request_number=number)
        if isinstance(d, Refuse):
            return Outcome(Kind.REFUSED, await self._refuse(env, d))
        return Outcome(Kind.IGNORED, d.reason)

    async def _refuse(self, env: Envelope, d: Refuse) -> str:
        """Record the refusal's automatic reply (an outbox row, in this transaction), unless
        it would loop or go over a rate limit. The outbox sends it after the commit.
        Returns the ledger detail of the refusal."""
        msg = env.parsed
        cfg = env.mailbox
        assert msg is not None
        if not d.reply or cfg.smtp is None:
            return f"no reply ({d.no_reply_because or 'no smtp configured'})"
        if _header(env.raw, b"x-loop").startswith("mailintegration") or (
            msg.message_id or ""
        ).endswith(f".mailintegration@{reply.reply_domain(cfg)}"):
            return "no reply (our own loop header or Message-ID)"
        try:
            out = reply.build_reply(
                mailbox=cfg,
                recipient_address=msg.from_addr,
                sender_name=msg.from_name,
                subject=msg.subject,
                in_reply_to=msg.message_id,
            )
        except ValueError as exc:
            return f"no reply ({exc})"
        if await self._over_reply_limit(env, out.to):
            return "no reply (rate limit)"
        await self.store.queue_reply(
            mailbox=cfg.name,
            request_number=None,
            recipient=out.to.address,
            rcpt_key=out.to.key,
            rcpt_domain=out.to.domain,
            message_id=out.message_id,
            message=out.data,
        )
        self._replies_queued += 1
        return "replied"

    async def _over_reply_limit(self, env: Envelope, to: reply.Recipient) -> bool:
        """Whether one more reply to ``to`` from this mailbox goes over a limit (logged once
        per limit, key and window: a flood must not become a flood of log lines)."""
        limits = self.reply_limits
        now = datetime.now(UTC)
        day, hour = now - timedelta(days=1), now - timedelta(hours=1)
        for kind, column, key, since, limit, window in (
            ("address", "rcpt_key", to.key, day, limits.per_address_per_day, "day"),
            ("domain", "rcpt_domain", to.domain, hour, limits.per_domain_per_hour, "hour"),
            ("mailbox", "mailbox", env.mailbox.name, hour, limits.per_mailbox_per_hour, "hour"),
        ):
            if await self.store.replies_since(column, key, since) < limit:
                continue
            stamp = now.strftime("%Y-%m-%d" if window == "day" else "%Y-%m-%dT%H")
            if (kind, key, stamp) not in self._limits_logged:
                if len(self._limits_logged) > 10_000:
                    self._limits_logged.clear()  # bounded; at worst a limit is logged again
                self._limits_logged.add((kind, key, stamp))
                log.warning(
                    "mailbox=%s uidl=%s no reply: the %s %s already got %d replies in the "
                    "last %s (further replies over this limit are not logged)",
                    env.mailbox.name,
                    env.uidl,
                    kind,
                    key,
                    limit,
                    window,
                )
            return True
        return False

    async def _failure_event(self, env: Envelope, exc: Exception) -> int:
        cfg = env.mailbox
        sha = env.parsed.sha256 if env.parsed else _sha(env.raw)
        mid = env.parsed.message_id if env.parsed else _message_id(env)
        cause = _cause(exc)
        hint = getattr(exc, "hint", MessageError.hint)
        existing = await self.store.failure_event(mid, sha)
        if existing is not None:
            await self.store.add_activity(
                existing,
                author="mailintegration",
                email="",
                body=f"The same message arrived again in mailbox {cfg.name} (UIDL {env.uidl}) "
                f"and still could not be processed: {exc}",
                automatic=True,
            )
            return existing
        team = await self._any_team(cfg.team)
        subject = env.parsed.subject if env.parsed else _header(env.raw, b"subject")
        sender = env.parsed.from_addr if env.parsed else _header(env.raw, b"from")
        name, size, attached = (
            "message.eml",
            f"{len(env.raw)} bytes",
            ("The original message is attached byte for byte (message.eml)."),
        )
        if isinstance(exc, MessageKept):
            # Never taken whole: what was read of it is all the engine has.
            name, size = "message-start.eml", f"{len(env.raw)} bytes read of {exc.needed}"
            attached = (
                f"The message is still on the server. What was read of it is attached ({name})."
                if env.raw
                else "The message is still on the server."
            )
        description = (
            f"A message in mailbox {cfg.name} could not be turned into a request.\n\n"
            f"What went wrong: {exc}\n"
            f"Cause: {cause}\n"
            f"What to do: {hint}\n\n"
            f"From: {sender}\nSubject: {subject}\nMessage-ID: {mid or '(none)'}\n"
            f"UIDL: {env.uidl}\nSize: {size}\nSHA-256: {sha}\n\n{attached}"
        )
        number = await self.store.create_request(
            team_id=team.id,
            type="event",
            kind="message-failure",
            subject=f"Mail integration: a message in {cfg.name} could not be processed",
            description=description,
            created_by=self.created_by,
            group=team.default_group,
            mailbox=cfg.name,
            cause=cause,
            message_id=mid,
            sha256=sha,
        )
        if env.raw:
            await self.store.add_attachments(
                number, None, [Attachment(name, "message/rfc822", env.raw)]
            )
        return number

    # -- outages ---------------------------------------------------------------------------

    async def _session_report(self, rep: SessionReport) -> None:
        open_events = await self.store.open_outages(rep.name)
        error = rep.error
        if error is None:
            for cause, number in open_events.items():
                await self.store.add_activity(
                    number,
                    author="mailintegration",
                    email="",
                    body=f"Mailbox {rep.name} works again; this {cause} outage is over.",
                    automatic=True,
                )
                await self.store.set_status(
                    number, "processed", by=self.created_by, why="Closed: the mailbox works again."
                )
                log.info("mailbox=%s outage %s (#%d) closed", rep.name, cause, number)
        else:
            cause = getattr(error, "cause", "error")
            hint = getattr(error, "hint", "")
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            if cause in open_events:
                number = open_events[cause]
                await self.store.add_activity(
                    number,
                    author="mailintegration",
                    email="",
                    body=f"{stamp}: still failing: {error}",
                    automatic=True,
                )
                log.warning(
                    "mailbox=%s outage %s goes on (#%d): %s", rep.name, cause, number, error
                )
            else:
                team = await self._any_team(rep.team)
                number = await self.store.create_request(
                    team_id=team.id,
                    type="event",
                    kind="outage",
                    subject=f"Mail integration: mailbox {rep.name} cannot be read ({cause})",
                    description=(
                        f"Since {stamp} the mailbox {rep.name} cannot be read.\n\n"
                        f"What went wrong: {error}\nCause: {cause}\nWhat to check: {hint}\n\n"
                        f"{_copy_note(rep.config)} Messages stay on the server until the "
                        "mailbox works again; this event closes by itself then."
                    ),
                    created_by=self.created_by,
                    group=team.default_group,
                    mailbox=rep.name,
                    cause=cause,
                )
                if rep.config is not None:
                    copy = Attachment(
                        rep.path.name or "config.xml", "application/xml", mailbox_copy(rep.config)
                    )
                    await self.store.add_attachments(number, None, [copy])
                log.error("mailbox=%s outage %s opened (#%d): %s", rep.name, cause, number, error)
        if rep.account is not None and rep.deleted:
            await self.store.mark_deleted(rep.account, rep.deleted)
        await self.store.note_session(
            rep.name,
            error=None if error is None else f"{getattr(error, 'cause', 'error')}: {error}",
            fetched=rep.fetched,
            processed=rep.processed,
            failed=rep.failed,
            kept_deleted=rep.kept_deleted,
        )


class _Careful(Exception):
    """A message failed after its first write, in a transaction without savepoints."""


def _reset(item: Item) -> None:
    """Forget what a rolled-back attempt decided for ``item``."""
    if isinstance(item, Envelope):
        item.outcome = None


def describe(d: Decision) -> str:
    """One line for ``once --dry-run``."""
    if isinstance(d, NewRequest):
        who = d.requester.login if d.requester else "(no requester)"
        names = ", ".join(a.name for a in d.attachments) or "none"
        if d.notes:
            names += f" ({len(d.notes)} left out over a size limit)"
        return (
            f"new {d.type} {d.subject!r}: requester {who}, site {d.site or '-'}, "
            f"group {d.group or '-'}, assignee {d.assignee.login if d.assignee else '-'}, "
            f"attachments: {names}"
        )
    if isinstance(d, AddActivity):
        extra = " and reopen it" if d.reopen else ""
        return f"activity on request #{d.request.number} (found by {d.via}){extra}"
    if isinstance(d, Refuse):
        return f"no request ({d.reason}); " + (
            "auto-reply" if d.reply else f"no reply ({d.no_reply_because})"
        )
    return str(Outcome(Kind.IGNORED, d.reason))


def _cause(exc: BaseException) -> str:
    return str(getattr(exc, "cause", None) or "processor-error")


def _sha(raw: bytes) -> str:
    import hashlib

    return hashlib.sha256(raw).hexdigest()


def _header(raw: bytes, name: bytes) -> str:
    """A header read without the parser, for messages the parser refused."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0][:65536]
    for line in head.splitlines():
        if line.lower().startswith(name + b":"):
            text = line[len(name) + 1 :].decode("utf-8", "replace").strip()
            return "".join(c if c.isprintable() else " " for c in text)[:300]
    return ""


def _message_id(env: Envelope) -> str | None:
    mid = _header(env.raw, b"message-id").strip().strip("<>")
    return mid or None


def _copy_note(config: MailboxConfig | None) -> str:
    """What an outage event says of the configuration attached, or of why none is."""
    if config is not None:
        return (
            "The mailbox's configuration is attached as the engine read it, rebuilt from its "
            "settings with every password removed."
        )
    return (
        "No copy of the configuration is attached: the file could not be read as a mailbox "
        "configuration, and the engine only ever attaches one it has read (a file that is "
        "not one may hold anything)."
    )
