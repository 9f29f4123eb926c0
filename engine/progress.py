"""Progress on a terminal for long work: ``once``, ``ingest`` and ``directory import``.

Drawn with rich: it keeps one live bar per mailbox with rate and time-left columns, redraws
in place only when the output is a terminal, and prints other output above the bars. (tqdm
draws one bar per line position and needs its own logging redirection; rich's Progress
does both, and computes the rate and the estimate from the updates.)

Nothing here is called by the pipeline. The numbers are what it already counts: messages
committed per mailbox are the writer's outcomes as its metrics count them
(``mailintegration_messages_processed`` and ``_failed``); listed and fetched are the
session's running counts (``Engine.live``). A task polls them a few times a second.

On a terminal, the writer's line per message gives way to the bars and one summary line per
mailbox; ``--verbose`` keeps the lines. Without a terminal, or with ``--log-format json``,
nothing changes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio

from engine import logs

if TYPE_CHECKING:
    from rich.progress import Progress, Task
    from rich.text import Text

    from engine.supervisor import Engine

__all__ = ["EngineBars", "bars", "wanted"]

_POLL_SECONDS = 0.2


def wanted(args: argparse.Namespace) -> bool:
    """Bars only on a terminal, for text logs, and not for a dry run (which prints a
    report of its own)."""
    return (
        sys.stdout.isatty()
        and getattr(args, "log_format", "text") != "json"
        and not getattr(args, "dry_run", False)
    )


def _columns(unit: str) -> list[Any]:
    """Counts (``12/40 processed``; ``?`` until the listing is known) and the rate."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Counts(ProgressColumn):
        def render(self, task: Task) -> Text:
            total = "?" if task.total is None else f"{task.total:.0f}"
            return Text(f"{task.completed:.0f}/{total} {unit}")

    class Rate(ProgressColumn):
        """Committed messages a second, as rich measures the task's speed."""

        def render(self, task: Task) -> Text:
            speed = task.speed
            return Text("-- msg/s" if speed is None else f"{speed:,.1f} msg/s")

    return [Counts(), Rate()]


@contextlib.contextmanager
def bars(args: argparse.Namespace, unit: str = "processed") -> Iterator[Progress]:
    """A live display on stdout; the log's terminal lines print above it, and (unless
    ``--verbose``) the writer's per-message lines are left out."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[fetched]}"),
        *_columns(unit),
        TimeRemainingColumn(),
        console=Console(file=sys.stdout),
        refresh_per_second=5,
    )
    quiet = None if getattr(args, "verbose", False) else logs.PerMessageFilter()
    with progress, _log_above(quiet):
        yield progress


@contextlib.contextmanager
def _log_above(quiet: logging.Filter | None) -> Iterator[None]:
    """Point the log's terminal handler at the redirected stderr, so each line prints above
    the bars instead of through them; put it back afterwards."""
    moved: list[tuple[logging.StreamHandler[Any], Any]] = []
    for h in logging.getLogger().handlers:
        if type(h) is logging.StreamHandler and h.stream is sys.__stderr__:
            moved.append((h, h.setStream(sys.stderr)))
            if quiet is not None:
                h.addFilter(quiet)
    try:
        yield
    finally:
        for h, stream in moved:
            h.setStream(stream)
            if quiet is not None:
                h.removeFilter(quiet)


class EngineBars:
    """One bar per mailbox of an engine's pass, updated by :meth:`follow` until cancelled.

    ``total`` gives a bar's size when known beforehand (ingest: its files); else the
    session's listing gives it. :meth:`finish` settles a mailbox's bar when its session
    ends (messages already in the ledger are listed but never committed again)."""

    def __init__(
        self,
        progress: Progress,
        engine: Engine,
        names: list[str],
        total: Callable[[str], int] | None = None,
    ) -> None:
        self.progress = progress
        self.engine = engine
        self.total = total
        self.tasks = {
            name: progress.add_task(
                name,
                total=None if total is None else total(name),
                fetched="0 fetched" if total is None else "",
            )
            for name in names
        }
        self.finished: set[str] = set()

    async def follow(self) -> None:
        while True:
            self.update()
            await anyio.sleep(_POLL_SECONDS)

    def committed(self, name: str) -> float:
        """Messages of ``name`` the writer committed: its metrics' processed and failed."""
        assert self.engine.metrics is not None  # on whenever there are bars
        sample = self.engine.metrics.registry.get_sample_value
        return sum(
            sample(f"mailintegration_messages_{kind}_total", {"mailbox": name}) or 0.0
            for kind in ("processed", "failed")
        )

    def update(self) -> None:
        for name, task in self.tasks.items():
            if name in self.finished:
                continue
            fields: dict[str, Any] = {}
            live = self.engine.live.get(name)
            if live is not None:
                fields["fetched"] = f"{live.fetched} fetched"
                if self.total is None and live.listed:
                    fields["total"] = live.listed
            self.progress.update(task, completed=self.committed(name), **fields)

    def finish(self, name: str) -> None:
        if name not in self.tasks or name in self.finished:
            return
        self.update()
        self.finished.add(name)
        done = self.committed(name)
        self.progress.update(self.tasks[name], total=max(done, 1), completed=max(done, 1))
