"""What each subcommand does, once :mod:`engine.cli` has parsed the command line.

This module never imports :mod:`engine.cli` (cli reaches it through its table of commands),
and nothing else in the engine imports this one.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread

from engine import logs
from engine.errors import AuthenticationFailed, ConfigError, EngineError, FetchError
from engine.store import DataDirLock, Store, open_store, private_file

if TYPE_CHECKING:
    from engine.items import Historic
    from engine.leases import Leases
    from engine.supervisor import Engine, MailboxOutcome, MailboxSource
    from engine.validation import FileReport

# The pipeline (supervisor, fetcher, parser, writer, config) is imported while the login is
# checked. Against SQLite, scrypt (~50 ms in a thread without the GIL) began as soon as the
# command line was read (engine.passwords.EarlyCheck), so by then the check is mostly done
# and these imports (~50 ms with the GIL) are what a start waits for.
_PIPELINE = ("engine.supervisor", "engine.ops", "engine.gateways")

log = logging.getLogger("engine.cli")


def _postgres(args: argparse.Namespace) -> str | None:
    """The PostgreSQL DSN ``--store`` names, if it names one. Without ``--store`` nothing is
    imported: engine.store.postgres brings asyncpg (~25 ms, before the store opens)."""
    store: str | None = getattr(args, "store", None)
    if not store:
        return None
    from engine.store.postgres import is_postgres

    if not is_postgres(store):
        raise ConfigError(
            "--store (MAILINTEGRATION_STORE) must be a postgresql:// URL; leave it out to "
            "keep the store in SQLite in --data-dir"
        )
    return store


async def open_any_store(args: argparse.Namespace, *, sweep: bool = False) -> Store:
    """The store ``--store`` names (PostgreSQL), or SQLite in ``--data-dir``. asyncpg is
    imported only for PostgreSQL: a SQLite user's every start does not pay for it."""
    dsn = _postgres(args)
    if dsn is None:
        return await open_store(args.data_dir, sweep=sweep)
    from engine.store.postgres import open_postgres, read_password

    password = read_password(getattr(args, "store_password_file", None))
    return await open_postgres(dsn, password=password)


async def open_for_reading(args: argparse.Namespace) -> Store:
    """The store, read-only: works on a read-only data directory, and never changes it."""
    if _postgres(args) is not None:
        return await open_any_store(args)
    data_dir: Path = args.data_dir
    if not (data_dir / "mailintegration.sqlite3").exists():
        raise EngineError(f"no store in {data_dir}: nothing has run there yet (see --data-dir)")
    return await open_store(data_dir, read_only=True)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _import_pipeline() -> None:
    for name in _PIPELINE:
        importlib.import_module(name)


def _setup_logging(args: argparse.Namespace) -> None:
    log_file: Path | None = getattr(args, "log_file", None)
    if log_file is not None and not log_file.parent.is_dir():
        raise ConfigError(
            f"the folder of the log file {log_file} does not exist; create it or fix /LogFilePath"
        )
    password_file: Path | None = getattr(args, "password_file", None)
    if password_file is not None and not getattr(args, "password", None):
        try:
            lines = password_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the password file {password_file}: {exc}") from None
        args.password = lines[0] if lines else ""
    logs.register_secret(getattr(args, "password", None))
    if log_file is not None:
        private_file(log_file)
    logs.configure(
        level=logging.DEBUG if getattr(args, "debug", False) else logging.INFO,
        log_file=log_file,
        fmt=getattr(args, "log_format", "text"),
    )


async def _login(store: Store, args: argparse.Namespace) -> str:
    """Check the login; meanwhile import the pipeline (see _PIPELINE), in a thread."""
    if not args.login or not args.password:
        raise AuthenticationFailed(
            "a login is required: --login and --password, MAILINTEGRATION_LOGIN and "
            "MAILINTEGRATION_PASSWORD, or /Login: and /Password:"
        )
    ok: list[bool] = []

    async def check() -> None:
        early = getattr(args, "early_check", None)
        ok.append(await store.check_login(args.login, args.password, early))

    async with anyio.create_task_group() as tg:
        tg.start_soon(check)
        await anyio.to_thread.run_sync(_import_pipeline)
    if not ok[0]:
        raise AuthenticationFailed(
            f"the login {args.login!r} failed: no such user in the store, or a wrong password"
        )
    return str(args.login)


def _sources(args: argparse.Namespace) -> list[MailboxSource]:
    from engine.supervisor import MailboxSource, discover

    if args.config is not None:
        return [MailboxSource(args.config.stem, args.config)]
    if not args.config_dir.is_dir():
        raise ConfigError(f"the config folder {args.config_dir} does not exist")
    return discover(args.config_dir, follow_symlinks=args.follow_symlinks)


def _historic(args: argparse.Namespace) -> Historic | None:
    """once --since/--status: a historic import, or None."""
    since, status = getattr(args, "since", None), getattr(args, "status", None)
    if since is None and status is None:
        return None
    from engine.items import Historic

    return Historic(since=since, status=status)


def _warn_stale_parser() -> None:
    """A compiled parser that is there but may not be used (engine.native) is said once per
    start: after an upgrade that forgot the build the engine runs slower, and should say why."""
    from engine import native

    if native.skipped is not None:
        log.warning(
            "the compiled parser is not used (%s): the interpreted one runs, slower; "
            "python -m engine.nativebuild compiles it again",
            native.skipped,
        )


async def _engine(args: argparse.Namespace, body: Callable[[Engine], Awaitable[int]]) -> int:
    """Lock the data directory, open the store, log in, build the engine, run ``body``."""
    _setup_logging(args)
    _warn_stale_parser()
    dry_run = getattr(args, "dry_run", False)
    # SQLite: one engine per data directory. PostgreSQL: replicas share it (leases).
    lock = DataDirLock(args.data_dir) if _postgres(args) is None else None
    if lock is not None:
        lock.acquire()
    try:
        store = await open_any_store(args, sweep=not dry_run)
        try:
            created_by = await _login(store, args)
            from engine.ops import bound_large_allocations, raise_fd_limit
            from engine.supervisor import Engine, EngineSettings, default_parse_processes
            from engine.writer import ReplyLimits

            bound_large_allocations()
            raise_fd_limit()
            debug_dir = None
            if args.debug:
                debug_dir = args.log_file.parent if args.log_file else args.data_dir / "logs"
                debug_dir.mkdir(parents=True, exist_ok=True)
            settings = EngineSettings(
                data_dir=args.data_dir,
                created_by=created_by,
                default_team=args.team,
                dry_run=dry_run,
                historic=_historic(args),
                debug_dir=debug_dir,
                max_sessions=args.max_sessions,
                max_idle=args.max_idle,
                queue_size=args.queue_size,
                parse_processes=(
                    default_parse_processes()
                    if args.parse_processes is None
                    else args.parse_processes
                ),
                poll_interval=getattr(args, "poll_interval", 60.0),
                # Progress bars read the writer's counts from the metrics (engine.progress).
                metrics=bool(getattr(args, "http_port", 0)) or getattr(args, "progress", False),
                follow_symlinks=getattr(args, "follow_symlinks", False),
                reply_limits=ReplyLimits(
                    per_address_per_day=args.replies_per_address_per_day,
                    per_domain_per_hour=args.replies_per_domain_per_hour,
                    per_mailbox_per_hour=args.replies_per_mailbox_per_hour,
                ),
            )
            return await body(Engine(store, settings))
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()
    finally:
        if lock is not None:
            lock.release()


async def _serving(
    args: argparse.Namespace, engine: Engine, work: Callable[[], Awaitable[None]]
) -> None:
    """Run ``work`` with the HTTP endpoint beside it (when a port is given) and signals handled:
    the first SIGTERM/SIGINT sets the engine's stop event and starts the grace period, a second
    one (or the end of the grace period) cancels at once. Cancellation never loses mail: an
    unacknowledged message is never deleted."""
    stop = engine.stop
    async with anyio.create_task_group() as tg:

        async def signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                async for signum in received:
                    if stop.is_set():
                        log.warning(
                            "second signal (%s): cancelling now", signal.Signals(signum).name
                        )
                        tg.cancel_scope.cancel()
                        return
                    log.info("signal %s: finishing current sessions", signal.Signals(signum).name)
                    stop.set()
                    tg.start_soon(grace)

        async def grace() -> None:
            await anyio.sleep(getattr(args, "grace_seconds", 30.0))
            log.warning("grace period over: cancelling")
            tg.cancel_scope.cancel()

        tg.start_soon(signals)
        if args.http_port:
            from functools import partial

            from engine.web import serve

            assert engine.metrics is not None  # built whenever there is a port (_engine)
            await tg.start(
                partial(serve, max_connections=args.http_max_connections),
                args.http_host,
                args.http_port,
                engine.health,
                engine.metrics,
            )
        if getattr(args, "console", None) is not None:
            await tg.start(serve_console, args, engine, args.console)
        await work()
        tg.cancel_scope.cancel()


async def serve_console(
    args: argparse.Namespace,
    engine: Engine | None,
    address: tuple[str, int],
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The web console until cancelled, on a store connection of its own (read-only SQLite
    beside the writer). Replay: through ``engine`` (the daemon's writer), or, without one,
    an engine of its own per replay under the data directory's lock."""
    from engine.console import Console, Replay, ReplayResult, create_app
    from engine.console.replay import replay_in, standalone
    from engine.web import serve_asgi

    store = await open_for_reading(args)
    try:
        replay: Replay
        if engine is not None:
            daemon = engine

            async def replay(mailbox: str, raw: bytes, login: str, retry: int) -> ReplayResult:
                return await replay_in(daemon, args.config_dir, mailbox, raw, retry)

        else:
            replay = standalone(
                args.data_dir,
                args.config_dir,
                lambda: open_any_store(args),
                lock=_postgres(args) is None,
            )
        console = Console(
            store,
            await anyio.to_thread.run_sync(_console_key, args.data_dir),
            replay=replay,
            health=engine.health if engine is not None else None,
            secure_cookies=args.console_secure_cookie,
            trust_proxy=args.console_trust_proxy,
        )
        host, port = address
        await serve_asgi(
            host,
            port,
            create_app(console),
            what="the web console",
            max_connections=args.http_max_connections,
            task_status=task_status,
        )
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()


def _console_key(data_dir: Path) -> str:
    """The console's session key from the data directory; in a folder the console may not
    write, a key for this process only (sessions then end when it stops)."""
    import secrets

    from engine.console.security import session_key

    try:
        return session_key(data_dir)
    except OSError as exc:
        log.warning(
            "console: no session key file in %s (%s): sessions last until the console stops",
            data_dir,
            exc.strerror or type(exc).__name__,
        )
        return secrets.token_hex(32)


async def cmd_console(args: argparse.Namespace) -> int:
    """The web console without the daemon, until SIGTERM or SIGINT."""
    _setup_logging(args)
    async with anyio.create_task_group() as tg:

        async def signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                async for _ in received:
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(signals)
        port = await tg.start(serve_console, args, None, args.listen)
        host = args.listen[0]
        shown = f"[{host}]" if ":" in host else host
        print(f"console on http://{shown}:{port}/", flush=True)
    return 0


async def cmd_once(args: argparse.Namespace) -> int:
    from engine import progress

    args.progress = progress.wanted(args)

    async def body(engine: Engine) -> int:
        outcomes: list[MailboxOutcome] = []

        async def work() -> None:
            if not args.progress:
                outcomes.extend(await engine.once(_sources(args)))
                return
            with progress.bars(args) as shown:
                bars = progress.EngineBars(shown, engine, [s.name for s in _sources(args)])

                def done(o: MailboxOutcome) -> None:
                    bars.finish(o.name)
                    print(_outcome_line(o), flush=True)

                engine.on_outcome = done
                async with anyio.create_task_group() as tg:
                    tg.start_soon(bars.follow)
                    outcomes.extend(await engine.once(_sources(args)))
                    tg.cancel_scope.cancel()

        if sys.stdout.isatty() and not args.dry_run:
            engine.on_outcome = lambda o: print(_outcome_line(o), flush=True)

        leases = None if args.dry_run else await _leases(args)
        if leases is not None:
            engine.use_leases(leases)
        try:
            await _serving(args, engine, work)
        finally:
            if leases is not None:
                await leases.backend.close()
        for o in outcomes:
            if o.skipped:
                print(f"{o.name}: skipped: another replica polls it now")
        log.info("once: %s", engine.summary())
        _print_outcomes(outcomes, dry_run=args.dry_run)
        if engine.stop.is_set() or len(outcomes) < len(_sources(args)):
            return 1
        return 0 if all(o.ok for o in outcomes) else 1

    return await _engine(args, body)


async def cmd_ingest(args: argparse.Namespace) -> int:
    for f in args.files:
        if not f.is_file():
            raise ConfigError(f"{f} is not a readable file")

    from engine import progress

    args.progress = progress.wanted(args)

    async def body(engine: Engine) -> int:
        from engine.items import Kind
        from engine.supervisor import MailboxSource

        source = MailboxSource(args.config.stem, args.config)
        if args.progress:
            with progress.bars(args) as shown:
                bars = progress.EngineBars(
                    shown, engine, [source.name], total=lambda _: len(args.files)
                )
                async with anyio.create_task_group() as tg:
                    tg.start_soon(bars.follow)
                    results = await engine.ingest(source, args.files)
                    tg.cancel_scope.cancel()
                bars.update()
        else:
            results = await engine.ingest(source, args.files)
        failed = 0
        for path, env in results:
            if env.failure is not None:
                print(logs.scrub(f"{path}: not committed: {env.failure}"))
                failed += 1
                continue
            what = env.explanation if env.dry_run else env.outcome
            number = f" #{env.request_number}" if env.request_number else ""
            print(logs.scrub(f"{path}: {what}{number}"))
            failed += env.outcome is not None and env.outcome.kind is Kind.FAILED
        return 0 if failed == 0 else 1

    return await _engine(args, body)


async def cmd_run(args: argparse.Namespace) -> int:
    if not args.config_dir.is_dir():
        raise ConfigError(f"the config folder {args.config_dir} does not exist")

    async def body(engine: Engine) -> int:
        async def work() -> None:
            await engine.run(args.config_dir, reload_seconds=args.reload_seconds)

        leases = await _leases(args)
        if leases is not None:
            engine.use_leases(leases)
        try:
            await _serving(args, engine, work)
        finally:
            if leases is not None:
                await leases.backend.close()
        log.info("stopped: %s", engine.summary())
        return 0

    return await _engine(args, body)


async def _leases(args: argparse.Namespace) -> Leases | None:
    """With PostgreSQL, this replica's leases, on a connection of their own."""
    dsn = _postgres(args)
    if dsn is None:
        return None
    import os
    import socket

    from engine.leases import Leases
    from engine.store.postgres import open_leases, read_password

    password = read_password(getattr(args, "store_password_file", None))
    backend = await open_leases(
        dsn, password=password, command_seconds=max(1.0, args.lease_seconds / 3)
    )
    replica = args.replica_id or f"{socket.gethostname()}-{os.getpid()}"
    log.info("replica %s: leases of %g s", replica, args.lease_seconds)
    return Leases(backend, replica, ttl=args.lease_seconds)


def _print_outcomes(outcomes: list[MailboxOutcome], *, dry_run: bool) -> None:
    if dry_run:
        for o in outcomes:
            print(f"{o.name}:")
            for line in o.dry_run_lines:
                print(logs.scrub(f"  {line}"))
            if o.error:
                cause = getattr(o.error, "cause", "error")
                print(logs.scrub(f"  cannot be read ({cause}): {o.error}"))
        return
    if sys.stdout.isatty() and len(outcomes) > 1:
        total = sum(o.result.processed for o in outcomes if o.result)
        bad = sum(1 for o in outcomes if not o.ok)
        print(f"{len(outcomes)} mailboxes, {total} messages processed, {bad} with problems")


def _outcome_line(o: MailboxOutcome) -> str:
    r = o.result
    state = "ok" if o.error is None else f"{getattr(o.error, 'cause', 'error')}: {o.error}"
    counts = f"fetched {r.fetched}, processed {r.processed}, failed {r.failed}" if r else ""
    return logs.scrub(f"{o.name}: {counts}{'; ' if counts else ''}{state}")


async def cmd_check(args: argparse.Namespace) -> int:
    from engine.config import load_mailbox, secret_values
    from engine.gateways import gateway_for
    from engine.oauth.broker import TokenBroker

    logs.configure(level=logging.WARNING)
    try:
        cfg = await anyio.to_thread.run_sync(load_mailbox, args.config)
    except ConfigError as exc:
        print(f"FAILED: the config is invalid: {exc}")
        return 1
    for secret in secret_values(cfg):
        logs.register_secret(secret)
    s = cfg.server
    implicit = "IMAPS" if s.gateway == "imap" else "POP3S"
    upgrade = "STARTTLS" if s.gateway == "imap" else "STLS"
    tls = implicit if s.use_ssl else upgrade if s.starttls else "none (plain text)"
    broker = TokenBroker(args.data_dir) if s.oauth2 is not None else None
    session = gateway_for(s, broker)
    details: list[str] = []
    try:
        await anyio.to_thread.run_sync(session.open)
        listing = await anyio.to_thread.run_sync(session.listing)
        # A gateway with more to say (IMAP: folders, UIDVALIDITY, capabilities).
        describe = getattr(session, "describe", None)
        if describe is not None:
            details = await anyio.to_thread.run_sync(describe)
        await anyio.to_thread.run_sync(session.quit)
    except FetchError as exc:
        reason = getattr(exc, "reason", None)
        print(f"FAILED ({exc.cause}{', ' + reason if reason else ''}): {logs.scrub(str(exc))}")
        print(f"What to check: {exc.hint}")
        return 1
    finally:
        session.close()
    size = sum(m.size for m in listing)
    how = "with a password"
    if s.oauth2 is not None:
        from engine.oauth.broker import source_name

        how = (
            f"with OAuth2 {getattr(session, 'mechanism', '?')}, token from {source_name(s.oauth2)}"
        )
    print(
        f"OK: connected to {s.host}:{s.port} (TLS: {tls}), logged in as {s.user_name} {how}; "
        f"{len(listing)} message(s), {size} bytes. Nothing was fetched or deleted."
    )
    for line in details:
        print(f"  {line}")
    return 0


async def cmd_oauth(args: argparse.Namespace) -> int:
    """``oauth login`` (device code) and ``oauth status``."""
    from engine.oauth import admin
    from engine.supervisor import discover

    logs.configure(level=logging.WARNING)
    if args.oauth_command == "login":
        return await anyio.to_thread.run_sync(
            admin.login, args.config, args.data_dir, args.refresh_token_file
        )
    files: list[Path] = []
    if args.config is not None:
        files.append(args.config)
    if args.config_dir is not None:
        files.extend(src.path for src in discover(args.config_dir) if src.refused is None)
    if not files:
        raise ConfigError("oauth status needs --config or --config-dir")
    return await anyio.to_thread.run_sync(admin.status, files, args.data_dir, args.json)


async def cmd_requests(args: argparse.Namespace) -> int:
    store = await open_for_reading(args)
    try:
        if args.action == "list":
            rows = await store.list_requests(type=args.type, status=args.status)
            if args.json:
                for r in rows:
                    r.pop("html", None)
                print_json(rows)
            else:
                for r in rows:
                    who = r["requester"] or "-"
                    extra = (
                        f" [{r['kind']}: {r['mailbox']}/{r['cause']}]"
                        if r["kind"] != "mail"
                        else ""
                    )
                    print(
                        f"#{r['number']:<5} {r['type']:<8} {r['status']:<9} {r['team']:<10} "
                        f"{who:<12} {r['subject']}{extra}"
                    )
                print(f"{len(rows)} request(s)")
            return 0
        detail = await store.request_detail(args.number)
        if detail is None:
            raise EngineError(f"there is no request #{args.number}")
        detail["reference"] = await store.reference_token(args.number)
        if args.json:
            print_json(detail)
        else:
            _print_detail(detail)
        return 0
    finally:
        await store.close()


def _print_issue17(d: dict[str, object]) -> None:
    """What only some requests have: an event's correlation, a service request's form,
    tags and foreign ticket numbers."""
    if d.get("correlation_key"):
        print(f"{'correlation':>11}: {d['correlation_key']} ({d.get('alert_state') or '-'})")
    if d.get("form"):
        print(f"{'form':>11}: {d['form']}")
    fields = d.get("fields") or {}
    assert isinstance(fields, dict)
    for name, value in fields.items():
        print(f"{'':>11}  {name}: {str(value).replace(chr(10), chr(10) + ' ' * 15)}")
    for key in ("tags", "foreign_numbers"):
        values = d.get(key)
        if values:
            assert isinstance(values, list)
            print(f"{key.replace('_', ' '):>11}: {', '.join(values)}")


def _print_watchers(d: dict[str, object]) -> None:
    """The request's watchers: a directory user by login, any other address as unknown."""
    watchers = d.get("watchers") or []
    assert isinstance(watchers, list)
    for i, w in enumerate(watchers):
        who = f"{w['address']} ({w['login']})" if w["login"] else f"{w['address']} (unknown)"
        print(f"{'watchers' if i == 0 else '':>11}{':' if i == 0 else ' '} {who}")


def _print_detail(d: dict[str, object]) -> None:
    for key in (
        "number",
        "type",
        "status",
        "kind",
        "team",
        "subject",
        "requester",
        "site",
        "group",
        "assignee",
        "source",
        "priority",
        "created_by",
        "created_at",
        "reference",
    ):
        print(f"{key:>11}: {d.get(key) if d.get(key) is not None else '-'}")
    _print_issue17(d)
    _print_watchers(d)
    print(f"\n{d['description']}\n")
    for a in d["attachments"]:  # type: ignore[attr-defined]
        print(f"  attachment: {a['name']} ({a['size']} bytes)")
    for act in d["activities"]:  # type: ignore[attr-defined]
        print(f"--- activity by {act['author']} <{act['email']}> at {act['date']}")
        print(act["body"])
        for a in act["attachments"]:
            print(f"  attachment: {a['name']} ({a['size']} bytes)")


async def cmd_directory(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the directory file: {exc}", file=str(args.file)) from exc
    # No engine lock: SQLite's BEGIN IMMEDIATE serialises this with a running engine's writer.
    store = await open_any_store(args)
    try:
        async with store.transaction() as tx:
            counts = await _import_directory(tx, data, args)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"the directory file is malformed: {exc!r}", file=str(args.file)) from exc
    finally:
        await store.close()
    print("imported: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    store = await open_for_reading(args)
    try:
        rows = await store.mailbox_status()
    finally:
        await store.close()
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        state = "OUTAGE: " + ", ".join(r["outages"]) if r["outages"] else "ok"
        kept = r["server_kept_deleted"]
        owner = r.get("owner")
        print(
            f"{r['mailbox']:<24} {state:<28} last success {r['last_success'] or '-'}  "
            f"fetched {r['fetched']} processed {r['processed']} failed {r['failed']}"
            + (f"  server keeps {kept} deleted message(s)" if kept else "")
            + (f"  polled by {owner}" if owner else "")
        )
    return 0


async def cmd_init(args: argparse.Namespace) -> int:
    """Write a mailbox file from a preset and answers (engine.wizard), then ``check`` it."""
    from engine import wizard

    interactive = sys.stdin.isatty() and sys.stdout.isatty() and not args.non_interactive
    if interactive:
        print("mailintegration init: a mailbox file from a few answers (Ctrl-C to stop).")
        print("Providers: " + "; ".join(f"{k}: {p.label}" for k, p in wizard.PRESETS.items()))
    answers = await anyio.to_thread.run_sync(wizard.collect, args, interactive)
    target, cfg = await anyio.to_thread.run_sync(
        lambda: wizard.write(
            answers, args.config_dir, args.secret_file, force=args.force, interactive=interactive
        )
    )
    print(f"Wrote {target} (team {cfg.team}, {cfg.server.host}:{cfg.server.port}).")
    for line in wizard.registration_steps(answers, target):
        print(line)
    if args.no_check:
        return 0
    if answers.flow == "refreshToken":
        print(f"Not checked yet: sign in first (mailintegration oauth login --config {target}).")
        return 0
    print("Checking the connection (nothing is fetched or deleted)...")
    check = argparse.Namespace(**vars(args))
    check.config = target
    return await cmd_check(check)


async def cmd_config(args: argparse.Namespace) -> int:
    """``config validate``: every mailbox file, loaded as the daemon would, never connecting."""
    from engine import validation

    logs.configure(level=logging.WARNING)
    if not args.config_dir.is_dir():
        raise ConfigError(f"the config folder {args.config_dir} does not exist")
    found, _ = await anyio.to_thread.run_sync(
        lambda: validation.reports(
            args.config_dir, default_team=args.team, follow_symlinks=args.follow_symlinks
        )
    )
    note = await _check_needs(args, found)
    found_shown = [r for r in found if r.problems] if args.quiet else found
    if args.json:
        print_json([dataclasses.asdict(r) for r in found_shown])
    else:
        if note:
            print(note)
        print(validation.render(found_shown, total=found))
    return 1 if any(r.problems for r in found) else 0


async def _check_needs(args: argparse.Namespace, found: list[FileReport]) -> str | None:
    """Fill in whether each directory entry exists, from the store if there is one; else
    they stay unknown, and the returned note says why."""
    from engine.writer import known_entry

    if _postgres(args) is None:
        if args.data_dir is None:
            return None
        if not (args.data_dir / "mailintegration.sqlite3").exists():
            return f"no store in {args.data_dir} yet: the directory entries are unknown"
    # Reads only; like directory import, SQLite's lock serialises it with a running engine.
    store = await open_any_store(args)
    try:
        async with store.transaction() as tx:
            for report in found:
                for need in report.needs:
                    need.exists = await known_entry(tx, need.kind, need.name)
                    if not need.exists:
                        report.problems.append(f"{report.file}:{need.line}: {need.missing}")
    finally:
        await store.close()
    return None


_USERS_PER_STEP = 50


async def _import_directory(tx: Any, data: Any, args: argparse.Namespace) -> dict[str, int]:
    """The directory in one transaction. On a terminal, the users (each password is hashed
    with scrypt, ~50 ms) go in steps of the same transaction, with a bar counting them."""
    from engine import progress

    users = data.get("users", []) if isinstance(data, dict) else []
    if not progress.wanted(args) or len(users) <= _USERS_PER_STEP:
        counts: dict[str, int] = await tx.import_directory(data)
        return counts
    counts = await tx.import_directory({k: v for k, v in data.items() if k != "users"})
    with progress.bars(args, unit="users") as shown:
        task = shown.add_task("directory", total=len(users), fetched="")
        for start in range(0, len(users), _USERS_PER_STEP):
            step = await tx.import_directory({"users": users[start : start + _USERS_PER_STEP]})
            counts["users"] += step["users"]
            shown.update(task, completed=counts["users"])
    return counts
