"""The supervisor: finds the mailboxes, owns the task group, runs fetchers and the writer.

``once`` (burst mode) fetches every mailbox once, lets the writer drain and returns; cron,
Task Scheduler and the tests use it. ``run`` (the daemon) is the same parts on a schedule.
Shutdown works by closing the channel: every fetcher holds its own clone of the send side,
and when the last one closes the writer drains what is left and ends by itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import random
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from engine import logs
from engine.budget import ByteBudget
from engine.config import MailboxConfig, ServerConfig, SmtpConfig, load_mailbox, secret_values
from engine.errors import ConfigError, EngineError, ProtocolError, StoreError
from engine.items import DirectoryCheck, Envelope, Historic, Item, SessionReport
from engine.keys import ingest_key
from engine.leases import Leases
from engine.oauth.broker import TokenBroker
from engine.ops import Health, Metrics
from engine.outbox import Outbox
from engine.parsers import Parsers
from engine.push import PushState, idle_until_mail, wants_push
from engine.session import FetchOptions, SessionResult, make_envelope, run_session, submit
from engine.store import Store
from engine.writer import ReplyLimits, Writer

log = logging.getLogger("engine.supervisor")


@dataclass(frozen=True)
class MailboxSource:
    """A mailbox file. ``name`` is its path below the config folder, without ``.xml``.

    ``refused`` says why discovery refused the entry (a symbolic link, not a regular file):
    it is then never read, and reported as a config outage of that name.
    """

    name: str
    path: Path
    team: str | None = None
    refused: str | None = None
    # The team folder's routing rules (``<team>/_rules.xml``), if it has them.
    rules: Path | None = None


def discover(config_dir: Path, *, follow_symlinks: bool = False) -> list[MailboxSource]:
    """``*.xml`` in the folder and in one level of per-team subfolders (``<team>/x.xml``).

    Only regular files are read. A symbolic link (to a file, or a team folder) is refused
    unless ``follow_symlinks``, and even then when it resolves outside the config folder: a
    link named ``x.xml`` to ``/etc/shadow`` or ``/proc/self/environ`` must never be read, let
    alone end up in an outage event. Refused entries are returned, marked, so that each
    becomes a config outage instead of vanishing silently.
    """
    root = config_dir.resolve()
    found: list[MailboxSource] = []
    entries = sorted(config_dir.iterdir())
    found += _folder_sources(config_dir, "", None, root, follow_symlinks)
    for sub in entries:
        if sub.name.startswith(".") or not _is_folder(sub):
            continue
        if sub.is_symlink():
            why = _refused_link(sub, root, follow_symlinks, "team folder")
            if why is not None:
                found.append(MailboxSource(f"{sub.name}/", sub, team=sub.name, refused=why))
                continue
        found += _folder_sources(sub, f"{sub.name}/", sub.name, root, follow_symlinks)
    return found


TEAM_RULES = "_rules.xml"
"""A folder's routing rules (``mailboxes.d/IT/_rules.xml``, or ``mailboxes.d/_rules.xml``
for the mailboxes outside team folders): applied to each of its mailboxes after the
mailbox's own. Never a mailbox itself."""


def _folder_sources(
    folder: Path, prefix: str, team: str | None, root: Path, follow_symlinks: bool
) -> list[MailboxSource]:
    """The mailbox files of one folder, each with the folder's rules file if it has one."""
    rules = folder / TEAM_RULES
    with_rules = rules.exists() or rules.is_symlink()
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.endswith(".xml") and not _is_folder(p) and p.name != TEAM_RULES:
            src = _source(f"{prefix}{p.stem}", p, team, root, follow_symlinks)
            found.append(_with_rules(src, rules, root, follow_symlinks) if with_rules else src)
    return found


def _with_rules(src: MailboxSource, rules: Path, root: Path, follow: bool) -> MailboxSource:
    """``src`` with its folder's rules file, or refused as the rules file would be."""
    checked = _source(src.name, rules, src.team, root, follow)
    if checked.refused is not None and src.refused is None:
        return dataclasses.replace(src, refused=f"its folder's {TEAM_RULES} {checked.refused}")
    return dataclasses.replace(src, rules=rules)


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _source(
    name: str, path: Path, team: str | None, root: Path, follow_symlinks: bool
) -> MailboxSource:
    why = None
    if path.is_symlink():
        why = _refused_link(path, root, follow_symlinks, "mailbox file")
    if why is None:
        try:
            regular = stat.S_ISREG(path.stat().st_mode)
        except OSError as exc:
            why = f"cannot be read: {exc.strerror or type(exc).__name__}"
        else:
            if not regular:
                why = "is not a regular file; a mailbox file must be one"
    return MailboxSource(name, path, team, refused=why)


def _refused_link(path: Path, root: Path, follow_symlinks: bool, what: str) -> str | None:
    """Why the link ``path`` may not be followed, or None if it may."""
    if not follow_symlinks:
        return (
            f"the {what} is a symbolic link, which the engine does not follow unless told to "
            "(--follow-symlinks, for links that stay inside the config folder)"
        )
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return f"the {what} is a symbolic link to nothing"
    if not target.is_relative_to(root):
        return (
            f"the {what} is a symbolic link to {target}, outside the config folder {root}; "
            "refused even with --follow-symlinks"
        )
    return None


def default_parse_processes() -> int:
    """One per CPU but one: that core is the event loop's and the writer's."""
    return max(1, (os.cpu_count() or 1) - 1)


@dataclass(frozen=True)
class EngineSettings:
    data_dir: Path
    created_by: str
    default_team: str | None = None
    queue_size: int = 256
    max_sessions: int = 16
    max_threads: int = 32
    # Worker threads held by IMAP mailboxes waiting for mail by IDLE (one each, with one
    # connection); past it, a mailbox polls (engine.push). 0: no IDLE at all.
    max_idle: int = 256
    max_batch: int = 256
    dry_run: bool = False
    # once --since/--status: a historic import (engine.items.Historic).
    historic: Historic | None = None
    debug_dir: Path | None = None
    poll_interval: float = 60.0
    max_backoff: float = 900.0
    # Bytes of fetched, unacknowledged messages held at once over all mailboxes.
    max_inflight_bytes: int = 16 * 1024 * 1024
    # Worker processes parsing messages beside the event loop; 0 parses in threads only.
    parse_processes: int = field(default_factory=lambda: default_parse_processes())
    # Prometheus metrics, for /metrics: without an HTTP endpoint nobody reads them, and
    # prometheus_client costs every start ~15 ms.
    metrics: bool = True
    # Whether discovery follows symbolic links that stay inside the config folder.
    follow_symlinks: bool = False
    # Automatic replies: rate limits, and the outbox's retries (see engine/outbox.py).
    reply_limits: ReplyLimits = field(default_factory=ReplyLimits)
    reply_retry_seconds: float = 60.0
    reply_max_attempts: int = 8
    # How long `once` (and `ingest`) may spend sending the replies due before it exits.
    reply_drain_seconds: float = 60.0


@dataclass
class MailboxOutcome:
    name: str
    result: SessionResult | None
    error: EngineError | None
    dry_run_lines: list[str] = field(default_factory=list)
    poll_interval: float | None = None
    # Not polled: its lease went while the session waited for a slot (nothing happened).
    skipped: bool = False
    # The account read, when the daemon waits for its mail by IDLE (engine.push).
    push: ServerConfig | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and (self.result is None or self.result.failed == 0)


class Engine:
    """The pipeline for one data directory: fetchers → bounded queue → writer → store."""

    def __init__(self, store: Store, settings: EngineSettings) -> None:
        self.store = store
        self.settings = settings
        self.metrics = Metrics() if settings.metrics else None
        self.health = Health()
        self.writer = Writer(
            store,
            created_by=settings.created_by,
            default_team=settings.default_team,
            max_batch=settings.max_batch,
            reply_limits=settings.reply_limits,
            metrics=self.metrics,
        )
        self.writer.on_store = self.health.store_state
        # The latest configuration of each mailbox loaded in this process: the outbox sends
        # a mailbox's replies with its SMTP settings (rows of other mailboxes wait).
        self.mailboxes: dict[str, MailboxConfig] = {}
        self.outbox: Outbox | None = None
        self.limiter = anyio.CapacityLimiter(settings.max_threads)
        self.idle_limiter = anyio.CapacityLimiter(max(1, settings.max_idle))
        self.sessions = anyio.Semaphore(settings.max_sessions)
        self.budget = ByteBudget(settings.max_inflight_bytes)
        self.processes = Parsers(settings.parse_processes) if settings.parse_processes else None
        # Every OAuth2 mailbox's tokens, in the data directory (engine.oauth).
        self.tokens = TokenBroker(settings.data_dir)
        self.totals: dict[str, SessionResult] = {}
        self.errors: dict[str, str] = {}  # the last session's error, per failing mailbox
        # Mailboxes whose server was seen keeping mail it had confirmed deleting (warned once).
        self.kept_deleted: set[str] = set()
        # Set by a signal: loops finish their current session, then everything drains.
        self.stop = anyio.Event()
        # Called as each mailbox of a `once` pass finishes (progress on a terminal).
        self.on_outcome: Callable[[MailboxOutcome], None] | None = None
        # Each mailbox's latest session counts, as it goes (progress bars read them).
        self.live: dict[str, SessionResult] = {}
        # With several replicas on one PostgreSQL store: which mailboxes are this one's.
        self.leases: Leases | None = None
        # The queue of the writer that runs now (the daemon's), so that an `ingest` from the
        # web console's replay goes through it: one writer per engine, never a second one.
        self._queue: MemoryObjectSendStream[Item] | None = None

    def use_leases(self, leases: Leases) -> None:
        """Poll only the mailboxes this replica holds; fence the writer's commits."""
        self.leases = leases
        self.writer.fences = leases.fence
        leases.on_store = self.health.store_state
        self.health.replica = leases.replica
        self.health.leases = leases.counts
        if self.metrics is not None:
            self.metrics.lease_metrics(leases.replica, leases.counts)

    async def _with_writer(
        self,
        body: Callable[[MemoryObjectSendStream[Item]], Awaitable[None]],
        *,
        drain: bool = True,
    ) -> None:
        """Run ``body`` with the writer and the outbox behind it; returns once the writer has
        drained. ``drain``: the outbox sends what is due before it ends (``once``), else it
        only finishes the sends under way (``run``, stopping)."""
        send, receive = anyio.create_memory_object_stream[Item](self.settings.queue_size)

        async def writer() -> None:
            self.health.writer_alive = True
            try:
                await self.writer.run(receive)
            finally:
                self.health.writer_alive = False

        outbox = None if self.settings.dry_run else self._outbox()
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            if outbox is not None:
                await tg.start(outbox.run, send.clone())
            self.health.supervisor_alive = True
            try:
                async with send:
                    self._queue = send
                    try:
                        await body(send)
                    finally:
                        self._queue = None
                        if self.processes is not None:  # no session parses any more
                            await self.processes.aclose()
            finally:
                self.health.supervisor_alive = False
                if outbox is not None and drain:
                    outbox.drain()
                elif outbox is not None:
                    outbox.stop()

    def _outbox(self) -> Outbox:
        """The outbox for one pass or daemon, woken by the writer's commits of replies."""

        def smtp_for(name: str) -> SmtpConfig | None:
            cfg = self.mailboxes.get(name)
            return cfg.smtp if cfg is not None else None

        def sendable() -> tuple[str, ...]:
            # With leases, a mailbox's replies are sent by the replica that holds it.
            leases = self.leases
            return tuple(
                sorted(
                    n
                    for n, c in self.mailboxes.items()
                    if c.smtp is not None and (leases is None or leases.holds(n))
                )
            )

        def count(mailbox: str, result: str) -> None:
            if self.metrics is not None:
                self.metrics.replies.labels(mailbox, result).inc()

        s = self.settings
        self.outbox = Outbox(
            smtp_for,
            sendable,
            retry_seconds=s.reply_retry_seconds,
            max_attempts=s.reply_max_attempts,
            drain_seconds=s.reply_drain_seconds,
            on_result=count,
            tokens=self.tokens,
        )
        self.writer.on_reply = self.outbox.wake
        return self.outbox

    def _known(self, cfg: MailboxConfig) -> None:
        """Remember a mailbox's latest configuration; the outbox may have replies for it."""
        before = self.mailboxes.get(cfg.name)
        self.mailboxes[cfg.name] = cfg
        if self.outbox is not None and cfg.smtp is not None and before != cfg:
            self.outbox.wake()

    async def once(self, sources: list[MailboxSource]) -> list[MailboxOutcome]:
        """One pass over every mailbox, concurrently; returns when the writer has drained."""
        outcomes: list[MailboxOutcome] = []

        async def body(send: MemoryObjectSendStream[Item]) -> None:
            # The leases' task outside the one cancelled at the end: it gives them back
            # when told, never cut off in the middle of a statement.
            async with anyio.create_task_group() as outer:
                done = await self._once_leases(outer, sources)
                async with anyio.create_task_group() as tg:
                    if self.processes is not None:
                        tg.start_soon(self.processes.start)
                    async with anyio.create_task_group() as fetchers:
                        for src in sources:
                            fetchers.start_soon(self._collect, src, send.clone(), outcomes)
                    # Processes never wanted, or still starting: not needed any more.
                    tg.cancel_scope.cancel()
                if done is not None:
                    done.set()

        await self._with_writer(body)
        return outcomes

    async def _once_leases(
        self, tg: anyio.abc.TaskGroup, sources: list[MailboxSource]
    ) -> anyio.Event | None:
        """With leases, a pass takes every mailbox nobody else holds (not a share: it is to
        fetch them all) and skips the others; returns the event that gives them back."""
        if self.leases is None:
            return None
        done = anyio.Event()
        self.leases.names = sorted(src.name for src in sources)
        self.leases.greedy = True
        await tg.start(self.leases.run, done)
        return done

    async def _collect(
        self, src: MailboxSource, send: MemoryObjectSendStream[Item], out: list[MailboxOutcome]
    ) -> None:
        async with send:
            outcome = await self.mailbox_once(src, send)
            out.append(outcome)
            if self.on_outcome is not None:
                self.on_outcome(outcome)

    async def run(self, config_dir: Path, *, reload_seconds: float = 2.0) -> None:
        """The daemon: a loop per mailbox file, hot reload of the folder, until ``stop`` is set.

        Each loop finishes its current session before it ends, so a stop never cuts a message
        between commit and DELE; the grace period and a second signal are the caller's.
        """

        stop = self.stop

        async def body(send: MemoryObjectSendStream[Item]) -> None:
            loops: dict[str, _Loop] = {}
            # The parsing processes' start waits until a session wants them: cancelled once
            # the loops are told to stop, or the task group would wait for it for ever.
            starting = anyio.CancelScope()

            async def start_processes(processes: Parsers) -> None:
                with starting:
                    await processes.start()

            async with anyio.create_task_group() as tg:
                if self.processes is not None:
                    tg.start_soon(start_processes, self.processes)
                started_leases = False
                while not stop.is_set():
                    found = await anyio.to_thread.run_sync(
                        functools.partial(
                            discover, config_dir, follow_symlinks=self.settings.follow_symlinks
                        )
                    )
                    current = {src.name: src for src in found}
                    if self.leases is not None:
                        self.leases.names = sorted(current)
                        if not started_leases:
                            await tg.start(self.leases.run, stop)
                            started_leases = True
                    for name, loop in list(loops.items()):
                        if name not in current or loop.src.path != current[name].path:
                            log.info("mailbox=%s removed: stopping after its current session", name)
                            loop.stop.set()
                            del loops[name]
                            self.health.forget(name)
                    for name, src in current.items():
                        stamp = _stamp(src.path, src.rules)
                        if name not in loops:
                            log.info("mailbox=%s added (%s)", name, src.path)
                            loops[name] = _Loop(src, stamp)
                            tg.start_soon(self._mailbox_loop, loops[name], send.clone(), stop)
                        elif loops[name].stamp != stamp:
                            log.info("mailbox=%s changed: reloading now", name)
                            loops[name].stamp = stamp
                            loops[name].wake()
                    with anyio.move_on_after(reload_seconds):
                        await stop.wait()
                for loop in loops.values():
                    loop.stop.set()
                starting.cancel()

        await self._with_writer(body, drain=False)

    async def _mailbox_loop(
        self, loop: _Loop, send: MemoryObjectSendStream[Item], stop: anyio.Event
    ) -> None:
        async with send:
            failures = 0
            push = PushState(loop.src.name)
            while not (stop.is_set() or loop.stop.is_set()):
                if not await self._leased(loop, stop):
                    continue
                outcome = await self.mailbox_once(loop.src, send)
                if outcome.skipped:  # its lease went while it waited for a session slot
                    continue
                if loop.stop.is_set() and not stop.is_set():
                    # Removed while this session ran: its report must not bring it back to
                    # /healthz (test_daemon_hot_reload_health_and_metrics failed so, once).
                    self.health.forget(loop.src.name)
                if outcome.error is None:
                    failures = 0
                    delay = outcome.poll_interval or self.settings.poll_interval
                else:
                    failures += 1
                    base = outcome.poll_interval or self.settings.poll_interval
                    delay = min(self.settings.max_backoff, base * 2 ** min(failures - 1, 16))
                delay *= random.uniform(0.9, 1.1)
                push.learn(outcome.result)
                self.health.waiting(
                    loop.src.name, "IDLE" if outcome.push is not None else "poll", delay
                )
                async with anyio.create_task_group() as waiters:
                    for event in (stop, loop.stop, loop.woken):
                        waiters.start_soon(_wait_then_cancel, event, waiters.cancel_scope)
                    if outcome.push is not None and outcome.error is None:
                        # New mail announced by IDLE ends the wait at once (engine.push).
                        waiters.start_soon(
                            idle_until_mail,
                            push,
                            outcome.push,
                            delay,
                            self.idle_limiter,
                            loop.wake,
                            self.tokens,
                        )
                    await anyio.sleep(delay)
                    waiters.cancel_scope.cancel()
                loop.woken = anyio.Event()

    async def _leased(self, loop: _Loop, stop: anyio.Event) -> bool:
        """Whether this replica may poll the loop's mailbox now; if not, wait for a lease to
        be gained (or one tick) first."""
        leases = self.leases
        if leases is None or leases.holds(loop.src.name):
            return True
        async with anyio.create_task_group() as waiters:
            for event in (stop, loop.stop, leases.changed):
                waiters.start_soon(_wait_then_cancel, event, waiters.cancel_scope)
            await anyio.sleep(leases.interval)
            waiters.cancel_scope.cancel()
        return False

    @asynccontextmanager
    async def _session_slot(self, name: str) -> AsyncIterator[None]:
        """One of ``--max-sessions``; with leases, only while this replica holds the mailbox,
        checked again once the slot is had (the lease may have gone meanwhile); the mailbox
        is then busy: the balance does not give its lease back before the session ends."""
        async with self.sessions:
            leases = self.leases
            if leases is None:
                yield
                return
            if not leases.holds(name):
                raise _NotLeased(name)
            async with leases.session(name):
                yield

    async def ingest(
        self, src: MailboxSource, files: list[Path], *, retry: int = 0
    ) -> list[tuple[Path, Envelope]]:
        """Process message files as if fetched from the mailbox; the ledger keys them by content
        hash, so a file ingested twice is processed once. ``retry``: see keys.ingest_key."""
        cfg = await anyio.to_thread.run_sync(self.load, src)
        self._known(cfg)
        done: list[tuple[Path, Envelope]] = []
        for path in files:
            # Before any is read or processed: a file is read whole, so it is bounded first.
            size = (await anyio.Path(path).stat()).st_size
            if size > cfg.max_message_bytes:
                raise ConfigError(
                    f"{path} is {size} bytes, over the mailbox's maxMessageBytes "
                    f"({cfg.max_message_bytes}): it would only become a failure event again; "
                    "raise maxMessageBytes to replay it"
                )

        async def body(send: MemoryObjectSendStream[Item]) -> None:
            check = await submit(send, DirectoryCheck(mailbox=cfg))
            assert isinstance(check, DirectoryCheck)
            if check.problem is not None:
                raise check.problem
            for path in files:
                raw = await anyio.Path(path).read_bytes()
                key = ingest_key(hashlib.sha256(raw).hexdigest(), retry)
                env = await anyio.to_thread.run_sync(make_envelope, cfg, key, raw)
                env.account = check.account
                env.dry_run = self.settings.dry_run
                env.historic = self.settings.historic
                await submit(send, env)
                done.append((path, env))

        if self._queue is not None:
            # The daemon's writer is running: the files join its queue (a clone of its send
            # side, closed when done, so the daemon's shutdown still ends the writer).
            async with self._queue.clone() as send:
                await body(send)
        else:
            await self._with_writer(body)
        return done

    def load(self, src: MailboxSource) -> MailboxConfig:
        if src.refused is not None:
            raise ConfigError(src.refused, file=str(src.path))
        cfg = load_mailbox(
            src.path,
            default_team=src.team or self.settings.default_team,
            name=src.name,
            team_rules=src.rules,
        )
        for secret in secret_values(cfg):
            logs.register_secret(secret)
        return cfg

    async def mailbox_once(
        self, src: MailboxSource, send: MemoryObjectSendStream[Item]
    ) -> MailboxOutcome:
        """Load, fetch, report. Never raises for a mailbox problem: the others go on."""
        outcome = MailboxOutcome(src.name, None, None)
        cfg: MailboxConfig | None = None
        envelopes: list[Envelope] = []
        opts = self._fetch_options(envelopes)
        if self.stop.is_set():
            return outcome
        try:
            cfg = await anyio.to_thread.run_sync(self.load, src)
            self._known(cfg)
            outcome.poll_interval = cfg.poll_interval
            if wants_push(cfg.server) and self.settings.max_idle and not self.settings.dry_run:
                outcome.push = cfg.server
            async with self._session_slot(src.name):
                outcome.result = SessionResult()  # counted into, even if the session fails
                self.live[src.name] = outcome.result
                await run_session(cfg, send, opts, outcome.result)
        except _NotLeased:
            outcome.skipped = True
            return outcome
        except StoreError as exc:
            log.error("mailbox=%s the store failed; nothing was deleted: %s", src.name, exc)
            outcome.error = exc
            self._account(src.name, outcome)  # the summary names it, and its error
            return outcome
        except EngineError as exc:
            outcome.error = exc
            log.error(
                "mailbox=%s cannot be read (%s): %s", src.name, getattr(exc, "cause", "?"), exc
            )
        except Exception as exc:
            # A bug must not stop the other mailboxes; it still becomes an outage event.
            log.exception("mailbox=%s session crashed", src.name)
            outcome.error = ProtocolError(f"internal error: {type(exc).__name__}: {exc}")
        for env in envelopes:
            await env.done.wait()
            outcome.dry_run_lines.append(f"{env.uidl}: {env.explanation}")
        self._account(src.name, outcome)
        warnings: tuple[tuple[str, str], ...] = ()
        if cfg is not None and cfg.server.oauth2 is not None:
            warnings = await anyio.to_thread.run_sync(self._token_health, cfg)
        if not self.settings.dry_run:
            # Busy until recorded: the balance must not give the lease back before the
            # report commits (its transaction is fenced too).
            leases = self.leases
            async with leases.session(src.name) if leases else contextlib.nullcontext():
                await self._report(src, cfg, outcome, send, warnings)
        return outcome

    def _fetch_options(self, envelopes: list[Envelope]) -> FetchOptions:
        """How this engine's sessions run; a dry run collects its envelopes in ``envelopes``."""
        return FetchOptions(
            limiter=self.limiter,
            dry_run=self.settings.dry_run,
            historic=self.settings.historic,
            debug_dir=self.settings.debug_dir,
            on_envelope=envelopes.append if self.settings.dry_run else None,
            stop=self.stop,
            budget=self.budget,
            processes=self.processes,
            tokens=self.tokens,
        )

    def _token_health(self, cfg: MailboxConfig) -> tuple[tuple[str, str], ...]:
        """An OAuth2 mailbox's token health into the metrics; its warnings (engine.oauth)."""
        from engine.oauth.health import health  # only OAuth2 mailboxes need it

        assert cfg.server.oauth2 is not None
        h = health(cfg.name, cfg.server.oauth2, self.tokens.store.load(cfg.account))
        m = self.metrics
        if m is not None:
            day = 86400.0
            m.oauth_access_expiry.labels(cfg.name).set(h.access_expires_at)
            m.oauth_last_refresh.labels(cfg.name).set(h.last_refresh)
            age, idle = h.refresh_age_days, h.refresh_idle_days
            m.oauth_refresh_age.labels(cfg.name).set(-1 if age is None else age * day)
            m.oauth_refresh_idle.labels(cfg.name).set(-1 if idle is None else idle * day)
            left = h.secret_days_left
            expiry = -1.0 if left is None else time.time() + left * day
            m.oauth_secret_expiry.labels(cfg.name).set(expiry)
            m.oauth_warnings.labels(cfg.name).set(len(h.warnings))
        return h.warnings

    async def _report(
        self,
        src: MailboxSource,
        cfg: MailboxConfig | None,
        outcome: MailboxOutcome,
        send: MemoryObjectSendStream[Item],
        warnings: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Have the writer record how the session ended (its outage events, its status,
        token health warnings)."""
        result = outcome.result or SessionResult()
        report = SessionReport(
            name=src.name,
            path=src.path,
            team=cfg.team if cfg else src.team or self.settings.default_team,
            error=outcome.error,
            config=cfg,
            fetched=result.fetched,
            processed=result.processed,
            failed=result.failed,
            account=result.account,
            deleted=result.deleted_keys,
            kept_deleted=result.kept_deleted,
            warnings=warnings,
        )
        try:
            await submit(send, report)
        except StoreError as exc:
            log.error("mailbox=%s could not record the session: %s", src.name, exc)

    def _account(self, name: str, outcome: MailboxOutcome) -> None:
        m, r, err = self.metrics, outcome.result, outcome.error
        total = self.totals.setdefault(name, SessionResult())
        if r is not None:
            if m is not None:
                m.fetched.labels(name).inc(r.fetched)
                if r.kept_deleted is not None:
                    m.kept_deleted.labels(name).set(r.kept_deleted)
            if r.kept_deleted and name not in self.kept_deleted:
                self.kept_deleted.add(name)
                log.warning(
                    "mailbox=%s the server still lists %d message(s) whose deletion it had "
                    "confirmed: it keeps deleted mail (a retention policy, or a broken index), "
                    "and the mailbox grows; each is checked and deleted again, never processed "
                    "twice (warned once)",
                    name,
                    r.kept_deleted,
                )
            for key in ("listed", "fetched", "processed", "failed", "deleted"):
                setattr(total, key, getattr(total, key) + getattr(r, key))
            # A session that failed before it listed anything says nothing of the backlog.
            if not self.settings.dry_run and (err is None or r.listed):
                self.health.backlogged(name, r.waiting)
        cause = getattr(err, "cause", "error") if err is not None else None
        if m is not None:
            m.sessions.labels(name, cause or "ok").inc()
            m.outage.labels(name).set(0 if err is None else 1)
        if err is None:
            self.health.success(name)
            self.errors.pop(name, None)
        else:
            self.health.failure(name, str(cause), logs.scrub(str(err)))
            self.errors[name] = logs.scrub(f"{cause}: {err}")

    def summary(self) -> str:
        """Each mailbox's totals, and the error of its last session if it failed."""
        parts = []
        for name, t in sorted(self.totals.items()):
            part = f"{name}: fetched {t.fetched} processed {t.processed} failed {t.failed}"
            if name in self.errors:
                part += f" ({self.errors[name]})"
            parts.append(part)
        return "; ".join(parts) or "no mailbox"


class _NotLeased(Exception):
    """Raised by Engine._session_slot: the mailbox's lease is no longer this replica's."""


@dataclass(eq=False)
class _Loop:
    src: MailboxSource
    stamp: tuple[int, ...] | None
    stop: anyio.Event = field(default_factory=anyio.Event)
    woken: anyio.Event = field(default_factory=anyio.Event)

    def wake(self) -> None:
        self.woken.set()


def _stamp(path: Path, rules: Path | None = None) -> tuple[int, ...] | None:
    """What says a mailbox file (or its team's rules file) changed."""
    try:
        st = path.stat()
        extra = rules.stat() if rules is not None else None
    except OSError:
        return None
    more = (extra.st_mtime_ns, extra.st_size) if extra is not None else ()
    return (st.st_mtime_ns, st.st_size, *more)


async def _wait_then_cancel(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
