"""The command line: the modern subcommands and the original ``/Switch:value`` form.

mailintegration once --config box.xml            one pass (cron, Task Scheduler, tests)
mailintegration run --config-dir mailboxes.d     the daemon
mailintegration check --config box.xml           test the POP3 connection, change nothing
mailintegration oauth login|status --config box.xml   OAuth2 device sign-in, token health
mailintegration requests list|show               what was created
mailintegration directory import dir.json        teams, sites, groups, sources, priorities, users...
mailintegration status                           per-mailbox health from the store
mailintegration /Login:system /Password:… /Team:1 /ConfigFilePath:C:\\x.xml
        [/LogFilePath:…] [/Debug]                    the original command line
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sqlite3
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import anyio

from engine import commands, logs
from engine.errors import AuthenticationFailed, ConfigError, EngineError
from engine.store import store_error

log = logging.getLogger("engine.cli")

_SWITCH = re.compile(r"^/(login|password|team|configfilepath|logfilepath|debug)(?::(.*))?$", re.I)


def translate_original(argv: Sequence[str]) -> list[str] | None:
    """The original switches, names in any case; a value may contain spaces (several argv
    words up to the next switch). Returns ``None`` when ``argv`` is not in that form."""
    if not argv or not _SWITCH.match(argv[0]):
        return None
    values: dict[str, str | None] = {}
    current: str | None = None
    for word in argv:
        m = _SWITCH.match(word)
        if m:
            current = m.group(1).lower()
            if current in values:
                raise ConfigError(f"the switch /{m.group(1)} is given twice")
            values[current] = m.group(2)
        elif current is not None and values.get(current) is not None:
            values[current] = f"{values[current]} {word}"
        else:
            raise ConfigError(
                f"unexpected argument {word!r}: the original form takes /Login: /Password: "
                "/Team: /ConfigFilePath: /LogFilePath: /Debug"
            )
    for required in ("login", "password", "configfilepath"):
        if not values.get(required):
            raise ConfigError(f"the switch /{required} (with a value) is required")
    out = ["once", "--config", str(values["configfilepath"]), "--login", str(values["login"])]
    out += ["--password", str(values["password"])]
    if values.get("team"):
        out += ["--team", str(values["team"])]
    if values.get("logfilepath"):
        out += ["--log-file", str(values["logfilepath"])]
    if "debug" in values:
        out.append("--debug")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailintegration", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_once, _run, _ingest, _check, _oauth, _requests, _directory, _status):
        add(sub)
    return p


# The subcommands' arguments; what each one does is in engine.commands (see COMMANDS).


def _once(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    once = sub.add_parser("once", help="one pass over the mailboxes, then exit")
    src = once.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="one mailbox XML file")
    src.add_argument("--config-dir", type=Path, help="a folder of mailbox XML files")
    once.add_argument("--dry-run", action="store_true", help="fetch and explain; change nothing")
    historic = once.add_argument_group(
        "historic import",
        "take a mailbox's backlog in: no automatic reply is sent, no request is reopened, the "
        "flood limit does not apply",
    )
    historic.add_argument(
        "--since",
        type=_date,
        metavar="DATE",
        help="only messages dated DATE (YYYY-MM-DD, UTC, or an ISO 8601 time) or later; older "
        "ones are skipped and LEFT ON THE SERVER (a later run without --since takes them)",
    )
    historic.add_argument(
        "--status",
        choices=["closed", "resolved"],
        help="the status of the requests it creates (default: new, as usual)",
    )
    _replica_opts(once)
    _http_opts(once, 0, "serve /healthz, /metrics")
    _follow_symlinks(once)
    _engine_opts(once)


def _date(text: str) -> datetime:
    """A --since value: a date or an ISO 8601 time; without a zone, UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date (YYYY-MM-DD) or an ISO 8601 time"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="the daemon: poll every mailbox, hot-reload the folder")
    run.add_argument("--config-dir", type=Path, default=Path("mailboxes.d"))
    run.add_argument("--poll-interval", type=float, default=60.0, help="seconds (default 60)")
    run.add_argument("--reload-seconds", type=float, default=2.0)
    run.add_argument("--grace-seconds", type=float, default=30.0)
    _replica_opts(run)
    _http_opts(run, 8080, "0 turns the endpoint off")
    _follow_symlinks(run)
    _engine_opts(run)


def _replica_opts(sp: argparse.ArgumentParser) -> None:
    group = sp.add_argument_group(
        "replicas", "with --store postgresql://...: several replicas share the mailboxes"
    )
    group.add_argument(
        "--replica-id",
        default=os.environ.get("MAILINTEGRATION_REPLICA_ID") or None,
        help="this replica's name in the leases and `status` (env MAILINTEGRATION_REPLICA_ID; "
        "default: host name and process id)",
    )
    group.add_argument(
        "--lease-seconds",
        type=float,
        default=float(os.environ.get("MAILINTEGRATION_LEASE_SECONDS") or 30.0),
        help="how long a mailbox lease lasts unrenewed: a replica killed with -9 has its "
        "mailboxes taken over after this plus a poll interval (default 30)",
    )


def _ingest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ingest = sub.add_parser("ingest", help="process .eml files as if fetched from a mailbox")
    ingest.add_argument("files", type=Path, nargs="+")
    ingest.add_argument("--config", type=Path, required=True)
    ingest.add_argument("--dry-run", action="store_true")
    _engine_opts(ingest)


def _check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser("check", help="test a mailbox's POP3 connection; change nothing")
    check.add_argument("--config", type=Path, required=True)
    # OAuth2 mailboxes: the token store (a token check may refresh and keep a token).
    _data_dir(check)


def _oauth(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    oauth = sub.add_parser("oauth", help="OAuth2 sign-in and token health")
    o_sub = oauth.add_subparsers(dest="oauth_command", required=True)
    login = o_sub.add_parser("login", help="sign in once with a device code (refreshToken flow)")
    login.add_argument("--config", type=Path, required=True)
    login.add_argument(
        "--refresh-token-file",
        type=Path,
        help="keep this refresh token (obtained elsewhere) instead of a device-code sign-in",
    )
    _data_dir(login)
    status = o_sub.add_parser("status", help="per mailbox: token source, expiries, last refresh")
    status.add_argument("--config", type=Path, help="one mailbox file")
    status.add_argument("--config-dir", type=Path, help="every mailbox file of a folder")
    status.add_argument("--json", action="store_true")
    _data_dir(status)


def _requests(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    req = sub.add_parser("requests", help="show requests")
    req_sub = req.add_subparsers(dest="action", required=True)
    rl = req_sub.add_parser("list")
    rl.add_argument("--type", choices=["incident", "event", "service request"])
    rl.add_argument("--status")
    rl.add_argument("--json", action="store_true")
    _data_dir(rl)
    rs = req_sub.add_parser("show")
    rs.add_argument("number", type=int)
    rs.add_argument("--json", action="store_true")
    _data_dir(rs)


def _directory(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("directory", help="load the directory")
    d_sub = d.add_subparsers(dest="action", required=True)
    di = d_sub.add_parser("import")
    di.add_argument("file", type=Path)
    _data_dir(di)


def _status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = sub.add_parser("status", help="per-mailbox status from the store")
    st.add_argument("--json", action="store_true")
    _data_dir(st)


def _data_dir(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("MAILINTEGRATION_DATA_DIR", "data")),
        help="database, attachments and logs (env MAILINTEGRATION_DATA_DIR, default ./data)",
    )
    sp.add_argument(
        "--store",
        default=os.environ.get("MAILINTEGRATION_STORE") or None,
        help="postgresql://user@host:port/db to keep the store in PostgreSQL, shared by "
        "several replicas (env MAILINTEGRATION_STORE; default: SQLite in --data-dir). Put "
        "no password in it: use --store-password-file, PGPASSFILE or PGPASSWORD",
    )
    sp.add_argument(
        "--store-password-file",
        type=Path,
        default=_env_path("MAILINTEGRATION_STORE_PASSWORD_FILE"),
        help="a file whose first line is the store's password (env "
        "MAILINTEGRATION_STORE_PASSWORD_FILE; a Kubernetes secret mounted as a file)",
    )


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _engine_opts(sp: argparse.ArgumentParser) -> None:
    _data_dir(sp)
    sp.add_argument("--team", help="default team (number or name) for mailboxes without one")
    sp.add_argument("--login", default=os.environ.get("MAILINTEGRATION_LOGIN"))
    sp.add_argument("--password", default=os.environ.get("MAILINTEGRATION_PASSWORD"))
    sp.add_argument(
        "--password-file",
        type=Path,
        default=_env_path("MAILINTEGRATION_PASSWORD_FILE"),
        help="the login's password as the first line of a file, when --password is not "
        "given (env MAILINTEGRATION_PASSWORD_FILE; a secret mounted as a file)",
    )
    sp.add_argument("--log-file", type=Path, help="also log to this file")
    sp.add_argument("--log-format", choices=["text", "json"], default="text")
    sp.add_argument("--debug", action="store_true", help="debug log and RawMessage files")
    sp.add_argument("--max-sessions", type=_at_least(1), default=16)
    sp.add_argument(
        "--max-idle",
        type=_at_least(0),
        default=256,
        help="IMAP mailboxes waiting for mail by IDLE at once, in run: one connection and "
        "one thread each; the others poll (default 256)",
    )
    sp.add_argument("--queue-size", type=_at_least(1), default=256)
    sp.add_argument(
        "--parse-processes",
        type=_at_least(0),
        default=None,
        help="processes that parse messages (default: one per CPU but one; 0: threads only)",
    )
    _reply_limits(sp)


def _reply_limits(sp: argparse.ArgumentParser) -> None:
    replies = sp.add_argument_group(
        "automatic replies", "rate limits, counted over every mailbox of the data directory"
    )
    replies.add_argument(
        "--replies-per-address-per-day",
        type=_at_least(0),
        default=5,
        help="to one address, case, +tag and quoting ignored (default 5)",
    )
    replies.add_argument(
        "--replies-per-domain-per-hour",
        type=_at_least(0),
        default=20,
        help="to the addresses of one domain (default 20)",
    )
    replies.add_argument(
        "--replies-per-mailbox-per-hour",
        type=_at_least(0),
        default=60,
        help="from one mailbox (default 60)",
    )


def _http_opts(sp: argparse.ArgumentParser, port: int, help_port: str) -> None:
    sp.add_argument("--http-port", type=int, default=port, help=help_port)
    sp.add_argument("--http-host", default="127.0.0.1")
    sp.add_argument(
        "--http-max-connections",
        type=_at_least(1),
        default=100,
        help="open HTTP connections at once; more are closed at once (default 100)",
    )


def _follow_symlinks(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read mailbox files (and team folders) that are symbolic links, if they lead "
        "to a place inside the config folder (Kubernetes ConfigMap volumes need this); "
        "off by default, and links leading out of the folder are refused anyway",
    )


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number no smaller than ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, not {value}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run it; returns the exit status.

    Every file and folder the command creates is for its owner alone (umask 077): the
    database holds every mail and the login's password hash, and the log, the attachments
    and --debug's raw messages hold mail too. The caller's umask is restored on return, for
    in-process callers.
    """
    umask = os.umask(0o077)
    try:
        return _main(argv)
    finally:
        os.umask(umask)


def _main(argv: Sequence[str] | None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    try:
        translated = translate_original(args_in)
    except ConfigError as exc:
        print(f"mailintegration: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(translated if translated is not None else args_in)
    try:
        return int(anyio.run(_dispatch, args))
    except (ConfigError, AuthenticationFailed, EngineError) as exc:
        print(f"mailintegration: {logs.scrub(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except sqlite3.Error as exc:
        # The store failed outside the writer (which answers its own errors): a corrupt page
        # met by a read, say. A clear line and 2, as for an error at opening it.
        data_dir = getattr(args, "data_dir", Path("data"))
        error = store_error(exc, data_dir / "mailintegration.sqlite3")
        print(f"mailintegration: {logs.scrub(str(error))}", file=sys.stderr)
        return 2
    except Exception:
        # A bug: the traceback helps, but it may quote a password (a library's message, a
        # local's repr); it is scrubbed like every log line. 1, as Python's own exit.
        print(logs.scrub(traceback.format_exc()), file=sys.stderr, end="")
        return 1


def run() -> NoReturn:
    """The command: :func:`main`, then exit without the interpreter's teardown.

    Once the store is closed and the output flushed, freeing every module the engine
    imported is work for nothing: ~45 ms at each exit here, against ~10 ms for a bare
    interpreter, paid by every cron start. Not for in-process callers (tests): use ``main``.
    """
    code = main()
    logging.shutdown()  # what atexit would have done for the log handlers
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe: as Python's own exit would say
            code = code or 120
    os._exit(code)


# What each subcommand runs: the only way this module reaches engine.commands.
COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
    "once": commands.cmd_once,
    "run": commands.cmd_run,
    "ingest": commands.cmd_ingest,
    "check": commands.cmd_check,
    "oauth": commands.cmd_oauth,
    "requests": commands.cmd_requests,
    "directory": commands.cmd_directory,
    "status": commands.cmd_status,
}


async def _dispatch(args: argparse.Namespace) -> int:
    return await COMMANDS[args.command](args)
