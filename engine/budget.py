"""The byte budget and the "last message": the protocol between the sessions and the writer.

Messages go from the sessions (:mod:`engine.session`) to the writer (:mod:`engine.writer`) as
:class:`~engine.items.Envelope` items on one bounded memory channel. The channel bounds how
many are on their way; the :class:`ByteBudget`, shared by every session of the engine, bounds
how many bytes are held between their RETR and the writer's answer (16 MiB by default,
``EngineSettings.max_inflight_bytes``), so that a burst of 20 MB messages cannot pile up.
This is the whole protocol; the session and the writer each keep their side of it as
written here.

1. **Acquire** (session). Before it fetches a window of messages, a session acquires the
   bytes the server announced for them, waiting until they are free. A grant larger than the
   whole budget proceeds alone (once nothing else is held), so that one message over the
   budget still goes. Before it waits, the session hands over the windows it has already
   fetched: their bytes come back only once the writer answers them, so waiting while
   holding them could wait for ever.
2. **Settle** (session). Once read, the window's grant becomes the bytes really held
   (:meth:`ByteBudget.settle`). It never waits: a server whose LIST sizes lie can take the
   budget over its limit by one window at most, and the next grants then wait until enough
   has come back.
3. **Hand over** (session). The window's envelopes go to the writer in fetch order. The last
   of them to be sent carries ``on_done``, a release of the whole window's grant; from then
   on the window's bytes are the writer's to give back. A window of which nothing is sent
   (each message the same as its ledger row: answered at once, never processed again) is
   given back by the session straight away.
4. **Release** (writer). When the transaction that answers an envelope ends, committed or
   not (a failure, a cancellation), the writer sets ``done``, drops the envelope's ``raw``
   and ``parsed`` (the session needs only the answer now), then calls ``on_done`` once. A
   release never blocks: the writer calls it from its loop.
5. **Last** (session, then writer). The last envelope a session sends is marked ``last``:
   the session then sends nothing more until it has the answers (it disposes of the messages
   and quits only after them). The writer's group commit waits up to its ``linger`` for more
   messages while its batch is small; a ``last`` envelope ends that wait, as nothing more is
   coming from that session. Without it, a mailbox with one new message would wait the
   linger for nothing on every poll.
6. **Cancellation and errors** (session). A session that ends early (a server error, its
   deadline, a cancellation) gives back the grants of the windows it has not handed over.
   What it has handed over stays the writer's to release as in 4, whatever becomes of the
   session, until the writer itself stops (and the budget ends with the engine).
"""

from __future__ import annotations

import anyio


class ByteBudget:
    """Bounds the bytes of fetched messages not yet answered by the writer, over all
    mailboxes (see the module's docstring for who acquires and who releases). One grant
    larger than the budget proceeds alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = anyio.Event()

    def available(self, size: int) -> bool:
        """Whether :meth:`acquire` would grant ``size`` at once."""
        return not self.used or self.used + min(size, self.limit) <= self.limit

    async def acquire(self, size: int) -> int:
        """Wait until ``size`` bytes (at most the whole budget) are free; take and return them."""
        size = min(size, self.limit)
        while not self.available(size):
            await self._freed.wait()
        self.used += size
        return size

    def release(self, size: int) -> None:
        """Give ``size`` bytes back (the writer, once a window is answered); never blocks."""
        self.used -= size
        freed, self._freed = self._freed, anyio.Event()
        freed.set()

    def settle(self, granted: int, held: int) -> int:
        """Replace a grant, made on the sizes the server listed, by the bytes really held
        once read, and return them. Never blocks: over the limit, grants wait until enough
        comes back (a LIST that lies cannot make the budget hold more than it says)."""
        if held < granted:
            self.release(granted - held)
        else:
            self.used += held - granted
        return held
