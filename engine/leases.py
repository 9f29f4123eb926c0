"""Mailbox leases: with several replicas on one PostgreSQL store, each mailbox is polled by
at most one of them at a time.

The protocol, written down once here (the SQL is :class:`engine.store.postgres.PostgresLeases`):

1. A lease is a row ``(mailbox, owner, expires_at, epoch)``. A replica **claims** a mailbox
   nobody holds, or whose lease expired, and the epoch goes up by one: the epoch is the
   **fencing token**.
2. Every ``ttl / 3`` seconds a replica **ticks**: it says it is alive (``replicas``), renews
   the leases it holds, and balances: it aims at ``ceil(mailboxes / live replicas)``,
   releasing its idle mailboxes above that and claiming free ones below it. A replica that
   joins or leaves is balanced within a few ticks, well inside two lease periods.
3. A session runs only while its replica :meth:`holds` the mailbox, and every transaction
   carrying the session's work is **fenced** (:meth:`fence`): just before COMMIT it checks,
   under a row lock, that the lease is still this replica's at the same epoch. A replica
   paused past its lease (SIGSTOP, a long GC, a frozen VM) finds another owner and a new
   epoch when it wakes: its transaction rolls back, nothing is deleted, and the new owner
   redoes the messages (the ledger makes that exactly-once).
4. A lease is held locally only while it was renewed less than ``0.8 × ttl`` ago: a replica
   that cannot reach the database stops polling before its leases can expire under it.
5. A graceful stop releases every lease at once; a replica killed with -9 has its leases
   taken over once they expire, within one lease period plus one tick.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio

log = logging.getLogger("engine.leases")

# A lease counts as held this long after its last renewal, as a share of the lease period:
# the rest is the margin for a renewal late by a slow database.
_SAFE_SHARE = 0.8


class LeaseBackend(Protocol):
    """Where the leases live (PostgreSQL: :class:`engine.store.postgres.PostgresLeases`)."""

    async def heartbeat(self, replica: str, ttl: float) -> int: ...

    async def register(self, mailboxes: Sequence[str]) -> None: ...

    async def renew(self, replica: str, ttl: float) -> dict[str, int]: ...

    async def claim(
        self, replica: str, ttl: float, names: Sequence[str], count: int
    ) -> dict[str, int]: ...

    async def release(self, replica: str, names: Sequence[str] | None = None) -> None: ...

    def reset(self) -> None: ...

    async def close(self) -> None: ...


class Leases:
    """This replica's leases (see the module's docstring for the protocol)."""

    def __init__(self, backend: LeaseBackend, replica: str, ttl: float = 30.0) -> None:
        self.backend = backend
        self.replica = replica
        self.ttl = ttl
        self.held: dict[str, int] = {}  # mailbox -> epoch
        self.names: list[str] = []  # every mailbox this replica's configuration knows
        self.busy: set[str] = set()  # mailboxes in a session now
        self.live = 1
        # A `once` pass takes every mailbox it can, not a share (see target).
        self.greedy = False
        self._renewed = -math.inf  # time.monotonic() of the last renewal
        self.changed = anyio.Event()  # set when a lease was gained (loops wake up)
        # Told whether the store answers: a tick's failure, or None after one that worked.
        self.on_store: Callable[[str | None], None] | None = None

    @property
    def interval(self) -> float:
        return self.ttl / 3

    def holds(self, name: str) -> bool:
        """Whether this replica may poll ``name`` now."""
        fresh = time.monotonic() - self._renewed < self.ttl * _SAFE_SHARE
        return fresh and name in self.held

    def fence(self, name: str) -> tuple[str, int]:
        """What a transaction carrying ``name``'s work checks before COMMIT: this replica and
        the epoch it holds (-1, which no lease has, when it holds none: never commits)."""
        epoch = self.held.get(name) if self.holds(name) else None
        return self.replica, -1 if epoch is None else epoch

    def counts(self) -> dict[str, int]:
        """For /healthz and /metrics."""
        return {"held": len(self.held), "mailboxes": len(self.names), "replicas": self.live}

    def target(self) -> int:
        """How many mailboxes this replica aims at: its share, rounded up (all of them for a
        greedy `once` pass)."""
        if self.greedy:
            return len(self.names)
        return math.ceil(len(self.names) / max(1, self.live))

    async def tick(self) -> None:
        """Alive, renew, balance (one round of the protocol, step 2)."""
        backend, ttl = self.backend, self.ttl
        self.live = await backend.heartbeat(self.replica, ttl)
        await backend.register(self.names)
        renewed = await backend.renew(self.replica, ttl)
        self._renewed = time.monotonic()
        lost = set(self.held) - set(renewed)
        if lost:
            log.warning("leases lost to another replica: %s", ", ".join(sorted(lost)))
        surplus = self.surplus(renewed)
        if surplus:
            await backend.release(self.replica, surplus)
            for name in surplus:
                renewed.pop(name)
        free = [n for n in self.names if n not in renewed]
        gained = await backend.claim(self.replica, ttl, free, self.target() - len(renewed))
        renewed.update(gained)
        self.held = renewed
        if gained:
            self.changed.set()
            self.changed = anyio.Event()

    def surplus(self, held: dict[str, int]) -> list[str]:
        """The leases to give back: those of mailboxes no longer configured, then idle ones
        above the target; never one whose session runs (it gives it back when done)."""
        wanted = set(self.names)
        idle = [n for n in sorted(held) if n not in self.busy]
        gone = [n for n in idle if n not in wanted]
        over = len([n for n in held if n in wanted]) - self.target()
        spare = [n for n in idle if n in wanted][: max(0, over)]
        return gone + spare

    async def run(self, stop: anyio.Event, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Tick until ``stop``; a tick that fails is logged and tried again next time (the
        leases stop counting as held by themselves, step 4). Releases everything at the end."""
        started = False
        try:
            while not stop.is_set():
                await self._tick_or_log()
                if not started:
                    task_status.started()
                    started = True
                with anyio.move_on_after(self.interval):
                    await stop.wait()
            await self.drain()
        finally:
            await self.release_all()

    async def drain(self) -> None:
        """Stopping: give back the idle leases at once, keep renewing those whose session
        still runs until it ends (bounded by one lease period)."""
        self.names = []
        with anyio.move_on_after(self.ttl):
            while True:
                await self._tick_or_log()
                if not self.busy:
                    return
                await anyio.sleep(min(0.1, self.interval))

    async def _tick_or_log(self) -> None:
        """A tick; its failure (the store's) is logged and told, and retried next time."""
        try:
            await self.tick()
        except Exception as exc:
            self.backend.reset()
            error = f"{type(exc).__name__}: {exc}"
            log.error("leases could not be renewed: %s", error)
            if self.on_store is not None:
                self.on_store(f"leases: {error}")
            return
        if self.on_store is not None:
            self.on_store(None)

    async def release_all(self) -> None:
        """Step 5: a graceful stop gives every lease back at once."""
        self.held = {}
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await self.backend.release(self.replica)
                log.info("leases released")
            except Exception as exc:
                log.error("leases could not be released (they expire by themselves): %s", exc)

    @asynccontextmanager
    async def session(self, name: str) -> AsyncIterator[None]:
        """A session of ``name`` runs: its lease is not released by the balance meanwhile."""
        self.busy.add(name)
        try:
            yield
        finally:
            self.busy.discard(name)
