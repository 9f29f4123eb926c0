"""The command line: the modern subcommands and the original /Switch:value form.

mailintegration once --config box.xml            one pass (cron, Task Scheduler, tests)
mailintegration run --config-dir mailboxes.d     the daemon
mailintegration init                             write a mailbox file (asks, or takes flags)
mailintegration config validate                  what every mailbox file resolves to
mailintegration check --config box.xml           test the connection, change nothing
mailintegration oauth login|status --config box.xml   OAuth2 device sign-in, token health
mailintegration requests list|show               what was created
mailintegration directory import dir.json        teams, sites, groups, sources, priorities, users...
mailintegration status                           per-mailbox health from the store
mailintegration completion bash|zsh              shell completion script
mailintegration console [--listen 127.0.0.1:8090]  the web console without the daemon
mailintegration /Login:system /Password:… /Team:1 /ConfigFilePath:C:\\x.xml
        [/LogFilePath:…] [/Debug]                    the original command line
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sqlite3
import sys
import textwrap
import traceback
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from engine import dataclass_cache, logs
from engine.errors import AuthenticationFailed, ConfigError, EngineError
from engine.passwords import EarlyCheck

# Nothing heavier at the top: the login's scrypt starts once the command line is read
# (engine.passwords), and the engine's ~100 ms of imports (anyio, the store, the pipeline)
# come after it, beside it.

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


# What each variable of the environment means, for the help of the commands that read it.
ENVIRONMENT: dict[str, str] = {
    "MAILINTEGRATION_DATA_DIR": "the data directory (--data-dir), default ./data",
    "MAILINTEGRATION_STORE": "a postgresql:// URL: the store in PostgreSQL (--store)",
    "MAILINTEGRATION_STORE_PASSWORD_FILE": "the PostgreSQL password's file (--store-password-file)",
    "PGPASSFILE": "with --store: PostgreSQL's password file, as libpq reads it",
    "PGPASSWORD": "with --store: PostgreSQL's password, as libpq reads it",
    "MAILINTEGRATION_LOGIN": "the login recorded as creator of every request (--login)",
    "MAILINTEGRATION_PASSWORD": "that login's password (--password)",
    "MAILINTEGRATION_PASSWORD_FILE": "a file whose first line is that password (--password-file)",
    "MAILINTEGRATION_REPLICA_ID": "this replica's name in the leases (--replica-id)",
    "MAILINTEGRATION_LEASE_SECONDS": "how long a mailbox lease lasts unrenewed (--lease-seconds)",
    "(passwordEnv, clientSecretEnv)": "the variables a mailbox file names for its secrets",
    "MAILINTEGRATION_DATACLASS_CACHE": "where starts keep compiled code (engine.dataclass_cache)",
    "MAILINTEGRATION_NO_DATACLASS_CACHE": "set: every start compiles its dataclasses' code",
    "MAILINTEGRATION_NO_NATIVE": "set: the interpreted parser, even where a compiled one is built",
}
_MAILBOX_SECRETS = "(passwordEnv, clientSecretEnv)"


class _Parser(argparse.ArgumentParser):
    """A parser whose help ends like a manual page: its examples, then the variables of
    the environment it reads (registered by the helpers that add the options)."""

    def __init__(self, *args: Any, examples: Sequence[str] = (), **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.examples = list(examples)
        self.environment: list[str] = []

    def reads(self, *names: str) -> None:
        """This command reads these variables of the environment (keys of ENVIRONMENT)."""
        self.environment += [n for n in names if n not in self.environment]

    def format_help(self) -> str:
        parts = []
        if self.examples:
            parts.append("examples:\n" + "\n".join(f"  {e}" for e in self.examples))
        if self.environment:
            width = max(len(n) for n in self.environment)
            parts.append(
                "environment:\n"
                + "\n".join(f"  {n:<{width}}  {ENVIRONMENT[n]}" for n in self.environment)
            )
        self.epilog = "\n\n".join(parts) or None
        if self.description:
            self.description = _rewrap(self.description)
        return super().format_help()


def _rewrap(text: str) -> str:
    """Paragraphs of prose refilled to the terminal's width (as argparse fills the options'
    help; the raw formatter that keeps the examples as written would leave them one line
    each); indented lines, such as a command, stay as they are."""
    width = max(40, min(100, shutil.get_terminal_size().columns - 2))
    out = []
    for para in text.split("\n\n"):
        lines = para.splitlines()
        if any(line.startswith(" ") for line in lines):
            out.append(para)
        else:
            out.append(textwrap.fill(" ".join(line.strip() for line in lines), width))
    return "\n\n".join(out)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mailintegration")
    except Exception:  # a checkout run without installing it
        from engine import __version__

        return __version__


class _Version(argparse.Action):
    """--version, as argparse's own, but the version is read only when asked: looking the
    installed package up (importlib.metadata scans the path) was ~5 ms of every start."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS) -> None:
        help = "show program's version number and exit"
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(f"{parser.prog} {_version()}")
        parser.exit()


def build_parser(command: str | None = None) -> _Parser:
    """The whole command line; with ``command`` (a subcommand's name), only that subcommand
    under the program: what a run parses, without building the other ten (~10 ms)."""
    p = _Parser(
        prog="mailintegration",
        description=(
            "Turns the mail of service-desk mailboxes (POP3, IMAP, OAuth2) into incidents, "
            "events, service requests and activities, exactly once.\n\n"
            "The original form works too:\n"
            "  mailintegration /Login:system /Password:... /Team:1 "
            "/ConfigFilePath:C:\\path\\box.xml [/LogFilePath:...] [/Debug]"
        ),
        examples=[
            "mailintegration init",
            "mailintegration config validate --config-dir mailboxes.d",
            "mailintegration once --config-dir mailboxes.d --login system --password-file pw",
            "mailintegration run --config-dir mailboxes.d",
            "mailintegration COMMAND --help",
        ],
    )
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, add in SUBCOMMANDS.items():
        if command in (None, name) or command not in SUBCOMMANDS:
            add(sub)
    return p


# The subcommands' arguments; what each one does is in engine.commands (see COMMANDS).


def _once(sub: argparse._SubParsersAction[_Parser]) -> None:
    once = sub.add_parser(
        "once",
        help="one pass over the mailboxes, then exit",
        description="Fetch every mailbox once, process what is there, then exit (cron).",
        examples=[
            "mailintegration once --config-dir mailboxes.d --login system --password-file pw",
            "mailintegration once --config support.xml --dry-run --login system --password x",
        ],
    )
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
    _progress_opts(once)


def _date(text: str) -> datetime:
    """A --since value: a date or an ISO 8601 time; without a zone, UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date (YYYY-MM-DD) or an ISO 8601 time"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _run(sub: argparse._SubParsersAction[_Parser]) -> None:
    run = sub.add_parser(
        "run",
        help="the daemon: poll every mailbox, hot-reload the folder",
        description="Poll every mailbox of the folder until stopped; files added, changed "
        "or removed are picked up by themselves.",
        examples=[
            "mailintegration run --config-dir mailboxes.d --login system --password-file pw",
            "mailintegration run --store postgresql://mi@db/mi --replica-id a --login system",
        ],
    )
    run.add_argument("--config-dir", type=Path, default=Path("mailboxes.d"))
    run.add_argument("--poll-interval", type=float, default=60.0, help="seconds (default 60)")
    run.add_argument("--reload-seconds", type=float, default=2.0)
    run.add_argument("--grace-seconds", type=float, default=30.0)
    _replica_opts(run)
    _http_opts(run, 8080, "0 turns the endpoint off")
    run.add_argument(
        "--console",
        type=listen_address,
        metavar="[HOST:]PORT",
        help="serve the web console there (off by default; HOST defaults to 127.0.0.1)",
    )
    _console_opts(run)
    _follow_symlinks(run)
    _engine_opts(run)


def _console(sub: argparse._SubParsersAction[_Parser]) -> None:
    c = sub.add_parser(
        "console",
        help="the web console without the daemon (read-only, plus replay)",
        description=(
            "Serve the web console (mailboxes, failed mail, requests, flow) from a data "
            "directory, without the daemon: for a once or cron set-up. Pages are read-only; "
            "replaying a failed message (role replay) goes through ingest and takes the data "
            "directory's lock while it runs. Binds 127.0.0.1 unless told otherwise; log in "
            "with a directory user's password."
        ),
        examples=[
            "mailintegration console --data-dir /var/lib/mailintegration",
            "mailintegration console --listen 127.0.0.1:8090 --config-dir mailboxes.d",
        ],
    )
    c.add_argument(
        "--listen",
        type=listen_address,
        default=("127.0.0.1", 8090),
        metavar="[HOST:]PORT",
        help="where to serve it (default 127.0.0.1:8090)",
    )
    c.add_argument(
        "--config-dir",
        type=Path,
        default=Path("mailboxes.d"),
        help="the mailbox files, for replay (default mailboxes.d)",
    )
    c.add_argument(
        "--http-max-connections",
        type=_at_least(1),
        default=100,
        help="open HTTP connections at once; more are closed at once (default 100)",
    )
    c.add_argument("--log-format", choices=["text", "json"], default="text")
    _console_opts(c)
    _follow_symlinks(c)
    _data_dir(c)


def _console_opts(sp: _Parser) -> None:
    sp.add_argument(
        "--console-secure-cookie",
        action="store_true",
        help="send the console's session cookie only over HTTPS (set it behind a TLS proxy)",
    )
    sp.add_argument(
        "--console-trust-proxy",
        action="store_true",
        help="the console is reached through one reverse proxy whose X-Forwarded-For, "
        "-Proto and -Host it believes (never set it without such a proxy in front)",
    )


def listen_address(text: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[IPv6]:PORT``; the host defaults to 127.0.0.1."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not [HOST:]PORT")
    return host, int(port)


def _replica_opts(sp: _Parser) -> None:
    sp.reads("MAILINTEGRATION_REPLICA_ID", "MAILINTEGRATION_LEASE_SECONDS")
    group = sp.add_argument_group(
        "replicas", "with --store postgresql://...: several replicas share the mailboxes"
    )
    group.add_argument(
        "--replica-id",
        default=os.environ.get("MAILINTEGRATION_REPLICA_ID") or None,
        help="this replica's name in the leases and in status (env MAILINTEGRATION_REPLICA_ID; "
        "default: host name and process id)",
    )
    group.add_argument(
        "--lease-seconds",
        type=float,
        default=float(os.environ.get("MAILINTEGRATION_LEASE_SECONDS") or 30.0),
        help="how long a mailbox lease lasts unrenewed: a replica killed with -9 has its "
        "mailboxes taken over after this plus a poll interval (default 30)",
    )


def _ingest(sub: argparse._SubParsersAction[_Parser]) -> None:
    ingest = sub.add_parser(
        "ingest",
        help="process .eml files as if fetched from a mailbox",
        description="Process message files as if the mailbox had fetched them: a failure "
        "event's attachment once its cause is fixed, say.",
        examples=["mailintegration ingest failed.eml --config support.xml --login system"],
    )
    ingest.add_argument("files", type=Path, nargs="+")
    ingest.add_argument("--config", type=Path, required=True)
    ingest.add_argument("--dry-run", action="store_true")
    _engine_opts(ingest)
    _progress_opts(ingest)


def _check(sub: argparse._SubParsersAction[_Parser]) -> None:
    check = sub.add_parser(
        "check",
        help="test a mailbox's connection and sign-in; change nothing",
        description="Connect, sign in and list the mailbox (IMAP: folders and capabilities); "
        "nothing is fetched or deleted.",
        examples=["mailintegration check --config mailboxes.d/IT/support.xml"],
    )
    check.add_argument("--config", type=Path, required=True)
    check.reads(_MAILBOX_SECRETS)
    # OAuth2 mailboxes: the token store (a token check may refresh and keep a token).
    _data_dir(check)


def _oauth(sub: argparse._SubParsersAction[_Parser]) -> None:
    oauth = sub.add_parser(
        "oauth",
        help="OAuth2 sign-in and token health",
        description="Sign a mailbox in with OAuth2 once, and see its tokens' health.",
        examples=[
            "mailintegration oauth login --config m365.xml",
            "mailintegration oauth status --config-dir mailboxes.d --json",
        ],
    )
    o_sub = oauth.add_subparsers(dest="oauth_command", required=True, parser_class=_Parser)
    login = o_sub.add_parser(
        "login",
        help="sign in once with a device code (refreshToken flow)",
        description="Sign in once with a device code (refreshToken flow) and keep the "
        "tokens in the data directory.",
        examples=["mailintegration oauth login --config mailboxes.d/IT/gmail.xml"],
    )
    login.add_argument("--config", type=Path, required=True)
    login.add_argument(
        "--refresh-token-file",
        type=Path,
        help="keep this refresh token (obtained elsewhere) instead of a device-code sign-in",
    )
    login.reads(_MAILBOX_SECRETS)
    _data_dir(login)
    status = o_sub.add_parser(
        "status",
        help="per mailbox: token source, expiries, last refresh",
        description="Per mailbox: where the token comes from, when it and the client "
        "secret expire, the last refresh.",
        examples=["mailintegration oauth status --config-dir mailboxes.d"],
    )
    status.add_argument("--config", type=Path, help="one mailbox file")
    status.add_argument("--config-dir", type=Path, help="every mailbox file of a folder")
    status.add_argument("--json", action="store_true")
    status.reads(_MAILBOX_SECRETS)
    _data_dir(status)


def _requests(sub: argparse._SubParsersAction[_Parser]) -> None:
    req = sub.add_parser(
        "requests",
        help="show requests",
        description="List or show the requests the engine created.",
        examples=["mailintegration requests list --type event", "mailintegration requests show 12"],
    )
    req_sub = req.add_subparsers(dest="action", required=True, parser_class=_Parser)
    rl = req_sub.add_parser(
        "list",
        help="one line per request",
        description="One line per request, newest last.",
        examples=["mailintegration requests list --status new --json"],
    )
    rl.add_argument("--type", choices=["incident", "event", "service request"])
    rl.add_argument("--status")
    rl.add_argument("--json", action="store_true")
    _data_dir(rl)
    rs = req_sub.add_parser(
        "show",
        help="one request with its activities",
        description="One request with its activities and attachments.",
        examples=["mailintegration requests show 12 --json"],
    )
    rs.add_argument("number", type=int)
    rs.add_argument("--json", action="store_true")
    _data_dir(rs)


def _directory(sub: argparse._SubParsersAction[_Parser]) -> None:
    d = sub.add_parser(
        "directory",
        help="load the directory",
        description="Load the directory: teams, sites, groups, sources, priorities, "
        "categories and users.",
        examples=["mailintegration directory import directory.json"],
    )
    d_sub = d.add_subparsers(dest="action", required=True, parser_class=_Parser)
    di = d_sub.add_parser(
        "import",
        help="import a directory JSON file",
        description="Import a directory JSON file; entries already there are updated.",
        examples=["mailintegration directory import directory.json --data-dir /data"],
    )
    di.add_argument("file", type=Path)
    _data_dir(di)
    _progress_opts(di)


def _status(sub: argparse._SubParsersAction[_Parser]) -> None:
    st = sub.add_parser(
        "status",
        help="per-mailbox status from the store",
        description="Per mailbox: open outages, last success, counts, the replica polling it.",
        examples=["mailintegration status", "mailintegration status --json"],
    )
    st.add_argument("--json", action="store_true")
    _data_dir(st)


def _data_dir(sp: _Parser) -> None:
    sp.reads(
        "MAILINTEGRATION_DATA_DIR",
        "MAILINTEGRATION_STORE",
        "MAILINTEGRATION_STORE_PASSWORD_FILE",
        "PGPASSFILE",
        "PGPASSWORD",
    )
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


def _engine_opts(sp: _Parser) -> None:
    _data_dir(sp)
    sp.reads(
        "MAILINTEGRATION_LOGIN",
        "MAILINTEGRATION_PASSWORD",
        "MAILINTEGRATION_PASSWORD_FILE",
        _MAILBOX_SECRETS,
    )
    sp.add_argument("--team", help="default team (number or name) for mailboxes without one")
    sp.add_argument(
        "--login",
        default=os.environ.get("MAILINTEGRATION_LOGIN"),
        help="a user of the store, recorded as the creator of every request "
        "(env MAILINTEGRATION_LOGIN)",
    )
    sp.add_argument(
        "--password",
        default=os.environ.get("MAILINTEGRATION_PASSWORD"),
        help="that login's password (env MAILINTEGRATION_PASSWORD; prefer --password-file)",
    )
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


def _reply_limits(sp: _Parser) -> None:
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


def _http_opts(sp: _Parser, port: int, help_port: str) -> None:
    sp.add_argument("--http-port", type=int, default=port, help=help_port)
    sp.add_argument("--http-host", default="127.0.0.1")
    sp.add_argument(
        "--http-max-connections",
        type=_at_least(1),
        default=100,
        help="open HTTP connections at once; more are closed at once (default 100)",
    )


def _follow_symlinks(sp: _Parser) -> None:
    sp.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read mailbox files (and team folders) that are symbolic links, if they lead "
        "to a place inside the config folder (Kubernetes ConfigMap volumes need this); "
        "off by default, and links leading out of the folder are refused anyway",
    )


# Issue 21 (the admin's first hour): init, config validate, completion, progress.


def _init(sub: argparse._SubParsersAction[_Parser]) -> None:
    init = sub.add_parser(
        "init",
        help="write a mailbox file: asks on a terminal, or takes every answer as options",
        description="Write a commented mailbox file into CONFIG_DIR/<team>/ from a provider's "
        "preset (Microsoft 365, Google Workspace, or any IMAP or POP3 server), keep its "
        "secret in a file only its owner can read, then test the connection (check).\n\n"
        "On a terminal it asks for what the options do not give; with --non-interactive "
        "every missing answer is an error. The secret is asked for without echo, or read "
        "from --secret-file, or from the first line of standard input.",
        examples=[
            "mailintegration init",
            "mailintegration init --provider m365 --address support@contoso.com --team IT \\\n"
            "      --tenant contoso.onmicrosoft.com --client-id 1234... --secret-file app.secret"
            " \\\n      --fallback-user unknown.user --fallback-site HQ --non-interactive",
            "mailintegration init --provider imap --host mail.example.com --tls ssl \\\n"
            "      --address help@example.com --team IT --processor incident \\\n"
            "      --fallback-user unknown.user --fallback-site HQ --secret-file pw "
            "--non-interactive",
        ],
    )
    init.add_argument("--config-dir", type=Path, default=Path("mailboxes.d"))
    init.add_argument("--provider", choices=["m365", "google", "imap", "pop3"])
    init.add_argument("--protocol", choices=["imap", "pop3"], help="m365 and google: default imap")
    init.add_argument("--address", help="the mailbox's address")
    init.add_argument("--user-name", help="the sign-in name, when it is not the address")
    init.add_argument("--team", help="the team (number or name) its requests go to")
    init.add_argument("--name", help="the file's name without .xml (default: the address)")
    init.add_argument("--processor", choices=["incident", "event", "service-request"])
    init.add_argument("--fallback-user", help="the user for mail from unknown senders")
    init.add_argument("--fallback-site", help="the site of requests from unknown senders")
    server = init.add_argument_group("server (imap and pop3 providers)")
    server.add_argument("--host")
    server.add_argument("--port", type=_at_least(1))
    server.add_argument("--tls", choices=["ssl", "starttls", "none"])
    server.add_argument("--auth", choices=["password", "oauth2"])
    server.add_argument("--ca-file", type=Path, help="a CA file to verify the server with")
    oauth = init.add_argument_group("OAuth2")
    oauth.add_argument("--client-id")
    oauth.add_argument("--tenant", help="m365: the directory (tenant) name or id")
    oauth.add_argument("--token-endpoint", help="generic OAuth2: the https:// token URL")
    oauth.add_argument("--scope", help="generic OAuth2: the scope to ask for")
    init.add_argument(
        "--secret-file",
        type=Path,
        help="the password or client secret: an existing file is referenced as it is (it "
        "must be readable by its owner only); a new one is written with mode 0600 "
        "(default: <name>.secret beside the mailbox file)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing mailbox file")
    init.add_argument("--no-check", action="store_true", help="do not test the connection")
    init.add_argument(
        "--non-interactive", action="store_true", help="never ask: a missing answer is an error"
    )
    init.reads(_MAILBOX_SECRETS)
    _data_dir(init)


def _config(sub: argparse._SubParsersAction[_Parser]) -> None:
    cfg = sub.add_parser(
        "config",
        help="check mailbox files without connecting",
        description="Check mailbox files without connecting to any server.",
        examples=["mailintegration config validate --config-dir mailboxes.d --data-dir /data"],
    )
    c_sub = cfg.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    val = c_sub.add_parser(
        "validate",
        help="what every mailbox file resolves to, and every problem with file:line",
        description="Load every mailbox file the daemon would load, without connecting. Per "
        "file: the effective values (defaults included), the team, the directory entries it "
        "needs and whether they exist (with a data directory; unknown without), where its "
        "secrets come from (never their values) and every problem with file:line. The same "
        "mailbox in two files is a problem. Exits 1 when any file would not load.",
        examples=[
            "mailintegration config validate --config-dir mailboxes.d",
            "mailintegration config validate --config-dir mailboxes.d --data-dir /data --json",
        ],
    )
    val.add_argument("--config-dir", type=Path, default=Path("mailboxes.d"))
    val.add_argument(
        "--data-dir",
        type=Path,
        default=_env_path("MAILINTEGRATION_DATA_DIR"),
        help="check the directory entries against this data directory's store (env "
        "MAILINTEGRATION_DATA_DIR; without it they are unknown)",
    )
    val.add_argument(
        "--store",
        default=os.environ.get("MAILINTEGRATION_STORE") or None,
        help="check them against this PostgreSQL store instead (env MAILINTEGRATION_STORE)",
    )
    val.add_argument(
        "--store-password-file",
        type=Path,
        default=_env_path("MAILINTEGRATION_STORE_PASSWORD_FILE"),
        help="the PostgreSQL password's file (env MAILINTEGRATION_STORE_PASSWORD_FILE)",
    )
    val.add_argument("--team", help="default team (number or name) for mailboxes without one")
    val.add_argument("--json", action="store_true")
    val.add_argument(
        "--quiet", action="store_true", help="only the files with problems, and the summary"
    )
    val.reads(
        "MAILINTEGRATION_DATA_DIR",
        "MAILINTEGRATION_STORE",
        "MAILINTEGRATION_STORE_PASSWORD_FILE",
        "PGPASSFILE",
        "PGPASSWORD",
        _MAILBOX_SECRETS,
    )
    _follow_symlinks(val)


def _completion(sub: argparse._SubParsersAction[_Parser]) -> None:
    comp = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh)",
        description="Print a completion script for bash or zsh: static, generated from "
        "these options, with no hook back into the program while typing.",
        examples=[
            "mailintegration completion bash > /etc/bash_completion.d/mailintegration",
            "mailintegration completion zsh > ~/.zfunc/_mailintegration",
        ],
    )
    comp.add_argument("shell", choices=["bash", "zsh"])


def _progress_opts(sp: _Parser) -> None:
    sp.add_argument(
        "--verbose",
        action="store_true",
        help="on a terminal, log a line per message as well as the progress bars",
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
    argv_in = translated if translated is not None else args_in
    # Only the subcommand named first is built; the completion script needs them all.
    first = argv_in[0] if argv_in and argv_in[0] != "completion" else None
    parser = build_parser(first)
    args = parser.parse_args(argv_in)
    if args.command == "completion":
        return _print_completion(parser, args.shell)
    args.early_check = _early_check(args)
    import anyio

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
        from engine.store import store_error

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
    dataclass_cache.save()  # what this start compiled, the next need not (a first start)
    logging.shutdown()  # what atexit would have done for the log handlers
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe: as Python's own exit would say
            code = code or 120
    os._exit(code)


# Each subcommand's arguments, in the order of the help (see build_parser).
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction[_Parser]], None]] = {
    "once": _once,
    "run": _run,
    "ingest": _ingest,
    "check": _check,
    "oauth": _oauth,
    "requests": _requests,
    "directory": _directory,
    "status": _status,
    "console": _console,
    "init": _init,
    "config": _config,
    "completion": _completion,
}

# What each subcommand runs (a function of engine.commands, imported once the command line
# is read): the only way this module reaches engine.commands.
COMMANDS: dict[str, str] = {
    "once": "cmd_once",
    "run": "cmd_run",
    "ingest": "cmd_ingest",
    "check": "cmd_check",
    "oauth": "cmd_oauth",
    "requests": "cmd_requests",
    "directory": "cmd_directory",
    "status": "cmd_status",
    "init": "cmd_init",
    "config": "cmd_config",
    "console": "cmd_console",
}

# The commands that log in (engine.commands._login) before they run the engine.
_LOG_IN = frozenset({"once", "run", "ingest"})


def _early_check(args: argparse.Namespace) -> EarlyCheck | None:
    """The login's check, begun now against a SQLite store (engine.passwords), or None."""
    if args.command not in _LOG_IN or getattr(args, "store", None):
        return None
    login, password = getattr(args, "login", None), getattr(args, "password", None)
    if not login or not password:
        return None
    return EarlyCheck(args.data_dir / "mailintegration.sqlite3", login, password)


def _print_completion(parser: argparse.ArgumentParser, shell: str) -> int:
    """shtab writes the script from the parser itself: static, so completing never runs
    the program (no import time, no hook in the shell's start-up)."""
    import shtab

    print(shtab.complete(parser, shell=shell, root_prefix="mailintegration"))
    return 0


async def _dispatch(args: argparse.Namespace) -> int:
    from engine import commands

    run: Callable[[argparse.Namespace], Awaitable[int]] = getattr(commands, COMMANDS[args.command])
    return await run(args)
