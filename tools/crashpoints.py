"""Run the engine and SIGKILL it at a chosen dangerous moment, for crash-consistency tests.

    python -m tools.crashpoints KILLPOINT N -- <engine arguments>

patches the engine inside this process only, then runs ``engine.cli.main`` with the engine
arguments; at the N-th occurrence (1-based) of KILLPOINT the process kills itself with SIGKILL,
leaving whatever a power cut or an OOM kill would leave. If the run ends before the N-th
occurrence, it exits with the engine's own status. The engine itself has no test hooks: every
point below is a wrapper around a real engine function.

Kill points:

- ``after-commit``: right after the COMMIT of a batch holding messages returned, before any
  answer reaches a session (so before the DELE of those messages);
- ``before-commit``: a batch transaction holding messages is complete, COMMIT not called yet;
- ``attachment-write``: an attachment file is written and fsynced under its temporary name,
  and not yet renamed into place;
- ``mid-retr``: the RETR command was sent and the first line of the answer read (IMAP: the
  UID FETCH sent and a message's literal announced, not read);
- ``none``: no kill (a plain run, as ``python -m engine``).
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

POINTS = ("after-commit", "before-commit", "attachment-write", "mid-retr")


def die() -> NoReturn:
    """SIGKILL this process: no finally block, no atexit, no flush runs."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise SystemExit(137)  # pragma: no cover - SIGKILL cannot be caught


class _Countdown:
    def __init__(self, n: int) -> None:
        self.left = n

    def hit(self) -> bool:
        self.left -= 1
        return self.left == 0


class _OsWithDeadlyReplace:
    """Stands in for ``os`` inside engine.store.files: everything passes through, except
    ``replace`` (the rename of the temporary attachment file), which may kill first."""

    def __init__(self, countdown: _Countdown) -> None:
        self._countdown = countdown

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def replace(self, src: Any, dst: Any) -> None:
        if self._countdown.hit():
            die()
        os.replace(src, dst)


def arm(point: str, n: int) -> None:
    """Install the patch for ``point`` in this process; the N-th occurrence kills it."""
    if point == "none":
        return
    if point not in POINTS:
        raise ValueError(f"unknown kill point {point!r}; valid: none, {', '.join(POINTS)}")
    if n < 1:
        raise ValueError("N counts occurrences from 1")
    countdown = _Countdown(n)
    if point in ("after-commit", "before-commit"):
        from engine.items import Envelope, Item
        from engine.store.sqlite import SqliteTransaction
        from engine.writer import Writer

        real_apply = Writer.apply
        real_commit = SqliteTransaction.commit
        before = point == "before-commit"
        # Only the transactions that carry messages count: the others (directory checks,
        # ledger queries, session reports) hold nothing a DELE depends on.
        carrying_mail = [False]

        async def apply(self: Writer, batch: list[Item]) -> list[Item]:
            carrying_mail[0] = any(isinstance(item, Envelope) for item in batch)
            try:
                return await real_apply(self, batch)
            finally:
                carrying_mail[0] = False

        async def commit(self: SqliteTransaction) -> None:
            counts = carrying_mail[0]
            if before and counts and countdown.hit():
                die()
            await real_commit(self)
            if not before and counts and countdown.hit():
                die()

        Writer.apply = apply  # type: ignore[method-assign]
        SqliteTransaction.commit = commit  # type: ignore[method-assign]
    elif point == "attachment-write":
        from engine.store import files

        setattr(files, "os", _OsWithDeadlyReplace(countdown))  # noqa: B010
    else:
        _arm_mid_fetch(countdown)


def _arm_mid_fetch(countdown: _Countdown) -> None:
    """``mid-retr`` for both gateways: POP3 per RETR, IMAP per message literal."""
    from engine.gateways import Answer, Request
    from engine.gateways.imap import ImapGateway
    from engine.gateways.pop3 import Pop3Gateway, command

    real_message = ImapGateway._message

    def message(self: ImapGateway, conn: Any, *args: Any) -> Any:
        if countdown.hit():
            die()  # the FETCH line announcing the literal read, the literal not
        return real_message(self, conn, *args)

    ImapGateway._message = message  # type: ignore[method-assign,assignment]

    real_fetch_many = Pop3Gateway.fetch_many

    def fetch_many(
        self: Pop3Gateway, requests: Sequence[Request], grant: float = math.inf
    ) -> list[Answer]:
        # Counted per message, not per pipelined window: the N-th message's RETR dies.
        for i, request in enumerate(requests):
            if countdown.hit():
                if i:
                    real_fetch_many(self, requests[:i], math.inf)
                conn: Any = self.conn
                if self.outstanding:  # already sent, pipelined: read its +OK line
                    conn._getresp()
                else:
                    conn._shortcmd(command(request).decode())  # sends RETR, reads +OK
                conn.file.readline()  # and the first line of the message
                die()
        return real_fetch_many(self, requests, grant)

    Pop3Gateway.fetch_many = fetch_many  # type: ignore[method-assign]


def run(point: str, n: int, argv: Sequence[str]) -> int:
    """Arm ``point`` then run the engine's command line with ``argv``."""
    arm(point, n)
    from engine.cli import main as engine_main

    return engine_main(list(argv))


def fork_child(argv: list[str], env: dict[str, str], point: str, n: int, log: str) -> None:
    """The body of a run forked by ``tools.crash --launcher fork``: output goes to ``log``,
    ``env`` is added to the environment, and the process ends with the engine's status."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(env)
    try:
        code = run(point, n, argv)
    except SystemExit as exc:  # argparse's usage error, as a process would exit with it
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    # The status also goes beside the log: the forkserver reports an exit status it failed to
    # read as 255 (seen once in 1,000 iterations under load), which would pass for the engine's.
    with open(f"{log}.status", "w") as f:
        f.write(str(code))
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: python -m tools.crashpoints {{none,{','.join(POINTS)}}} N -- ENGINE-ARGS..."
    if len(args) < 3 or args[2] != "--" or not args[1].isdigit():
        print(usage, file=sys.stderr)
        return 2
    try:
        arm(args[0], int(args[1]))
    except ValueError as exc:
        print(f"{exc}\n{usage}", file=sys.stderr)
        return 2
    from engine.cli import main as engine_main

    return engine_main(args[3:])


if __name__ == "__main__":
    sys.exit(main())
