"""Start-up cost: the fast validation path of mailbox files, and what it must never change.

engine/config.py validates with libxml2 (lxml) first and builds xmlschema, a quarter of a second
of start-up, only for a file libxml2 refuses. xmlschema stays the judge: these tests check, on
the shipped files and on over a thousand variants of a file using every element, that a file
is accepted exactly when xmlschema accepts it, and that the fast path never accepts a file
xmlschema would refuse.
"""

from __future__ import annotations

import copy
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from lxml import etree
from support import LOGIN, LOGIN_PASSWORD, Mailbox, message

from engine import config
from engine.errors import ConfigError
from tools.demo import MAILBOX_XML as DEMO_XML

ROOT = Path(__file__).resolve().parent.parent
XS = "{http://www.w3.org/2001/XMLSchema}"

SHIPPED = sorted(
    [*(ROOT / "tests" / "configs").glob("*.xml"), *(ROOT / "mailboxes.d").rglob("*.xml")]
)

# A valid value of each simple type of the schema, to build a file using every element.
SAMPLES = {
    "booleanType": "true",
    "portType": "110",
    "timeoutSecondsType": "30",
    "sessionSecondsType": "900",
    "bytesPerSecondType": "32768",
    "messageBytesType": "2048",
    "attachmentBytesType": "1",
    "pollIntervalSecondsType": "60",
    "requiredTextType": "x",
    "optionalTextType": "x",
    "secretType": "s",
    "pathType": "p",
    "envVarNameType": "E",
    "mailAddressType": "a@example.com",
    "regexType": "(?P<number>[0-9]+)",
    "templateTextType": "{subject}",
    "oauthProviderType": "generic",
    "oauthFlowType": "refreshToken",
    "dateType": "2027-05-01",
    "warnDaysType": "14",
    "protocolType": "imap",
    "afterProcessingType": "keep",
    "idleSecondsType": "60",
    "patternType": "(?P<host>x)",
    "flappingType": "reopen",
    "minutesType": "30",
    "severalMailboxesType": "onePerTeam",
    "floodMessagesType": "20",
    "forwardsType": "agents",
    "referenceTokenType": "[ref:MI-{number}-{hmac}]",
}

# The named complex types of the schema (the rest are simple types).
COMPLEX_TYPES = {"ruleType"}

# White space to Python but not to XSD: where xmlschema and libxml2 read xs:token differently.
PYTHON_ONLY_SPACE = [
    chr(c)
    for c in [*range(0x20, 0xD800), *range(0xE000, 0xFFFE)]
    if chr(c).isspace() and chr(c) != " "
]

VALUES = [
    *["", " ", "0", "1", "-1", "+1", "01", " 7 ", "1.0", "1e3", "0x10", "1_000", "1 000"],
    *["\uff11", "\u0661\u0662", "\U0001d7cf", "\u00b2", "65535", "65536", "2147483647"],
    *["2147483648", "99999999999999999999", "1023", "1024", "1073741824", "1073741825"],
    *["3600", "3601", "86400", "86401", "true", "TRUE", "tRuE", " false ", "yes", "tru e"],
    *["1740", "1741", "pop3", "IMAP", "imap4", "Move", "keep ", "archive"],
    *["a@b", "Name <a@b>", "<a@b>", "a@b@c", "a b@c", "\u00e9@\u00fc", "a@b c@d", "x <a@b> y"],
    *["A_1", "_", "1A", "A-B", "\u00c9", "x" * 300, "(?P<number>1)", "{subject}", "&", "]]>"],
    *PYTHON_ONLY_SPACE,
    *(form.format(c) for form in ("a{}b@c", "1{}", "{}true") for c in "\x85\xa0\u3000"),
]


def parse(path: Path) -> etree._Element:
    """A file as load_mailbox sees it just before validation."""
    root = config._parse(path, config._Context(str(path)))
    config._canonicalize(root)
    return root


def xmlschema_valid(root: etree._Element) -> bool:
    errors = config._xmlschema().iter_errors(root, use_location_hints=False)
    return next(errors, None) is None


def engine_accepts(root: etree._Element) -> bool:
    try:
        config._validate(root, config._Context("test.xml"))
    except ConfigError:
        return False
    return True


def shipped_files(tmp: Path) -> list[Path]:
    """The sample files, the docker-compose mailboxes and the demo's mailbox file."""
    demo = tmp / "demo.xml"
    demo.write_text(DEMO_XML.format(port=995, ca="ca.pem"), encoding="utf-8")
    return [*SHIPPED, demo]


def every_element() -> tuple[etree._Element, set[str]]:
    """A valid file with every element of the schema, each once, built from the XSD; and the
    path of one element of each simple type."""
    xsd = etree.parse(str(config.SCHEMA_PATH))
    one_per_type: dict[str, str] = {}

    top = xsd.getroot()

    def build(decl: etree._Element, path: str) -> etree._Element:
        ref = decl.get("ref")
        if ref is not None:  # a global element (rules)
            found = top.find(f"{XS}element[@name='{ref}']")
            assert found is not None
            decl = found
        name = str(decl.get("name"))
        el = etree.Element(name)
        complex_type = decl.find(f"{XS}complexType")
        if complex_type is None and decl.get("type") in COMPLEX_TYPES:
            complex_type = top.find(f"{XS}complexType[@name='{decl.get('type')}']")
        content = None
        if complex_type is not None:
            content = complex_type.find(f"{XS}all")
            if content is None:
                content = complex_type.find(f"{XS}sequence")
        if content is None:
            xsd_type = str(decl.get("type"))
            el.text = SAMPLES[xsd_type]
            one_per_type.setdefault(xsd_type, f"{path}/{name}")
        else:
            el.extend(build(child, f"{path}/{name}") for child in content.iterfind(f"{XS}element"))
        return el

    root_decl = xsd.getroot().find(f"{XS}element[@name='{config._ROOT}']")
    assert root_decl is not None
    return build(root_decl, ""), set(one_per_type.values())


def variants(base: etree._Element, typed: set[str]) -> Iterator[etree._Element]:
    """``base`` with one element added, removed, repeated or given children, or (for the
    elements in ``typed``, one of each simple type) given each of VALUES."""
    paths = [base.getroottree().getpath(el) for el in base.iter()]

    def copy_at(path: str) -> tuple[etree._Element, etree._Element]:
        root = copy.deepcopy(base)
        found = root.getroottree().xpath(path)
        assert isinstance(found, list)
        el = found[0]
        assert isinstance(el, etree._Element)
        return root, el

    for path in paths:
        _, original = copy_at(path)
        if len(original) == 0:
            for value in VALUES if path in typed else ():
                root, el = copy_at(path)
                el.text = value
                yield root
            root, el = copy_at(path)
            etree.SubElement(el, "x")
            yield root
        else:
            for child in range(len(original)):
                root, el = copy_at(path)
                del el[child]
                yield root
                root, el = copy_at(path)
                el.append(copy.deepcopy(el[child]))
                yield root
            for extra in ("bogus", "{urn:x}server", original[0].tag.upper()):
                root, el = copy_at(path)
                etree.SubElement(el, extra)
                yield root
            for text in ("x", "\u00a0", " \t\r\n"):
                root, el = copy_at(path)
                el[0].tail = text
                yield root
        root, el = copy_at(path)
        el.set("a", "1")
        yield root


def test_shipped_files_are_valid_to_both_validators(tmp_path: Path) -> None:
    files = shipped_files(tmp_path)
    assert len(files) >= 4
    for path in files:
        root = parse(path)
        assert xmlschema_valid(root), path
        assert config._LIBXML_SCHEMA.validate(root), path
        # The point of the fast path: the files people use never need xmlschema.
        assert config._fast_valid(root), path


def test_validation_decides_as_xmlschema_on_variants_of_every_element() -> None:
    base, typed = every_element()
    assert len(typed) == len(SAMPLES)
    assert xmlschema_valid(base) and config._fast_valid(base)
    seen = {"fast": 0, "refused": 0, "xmlschema only": 0}
    for root in variants(base, typed):
        valid = xmlschema_valid(root)
        fast = config._fast_valid(root)
        # Never accept what xmlschema refuses...
        assert valid or not fast, etree.tostring(root, encoding="unicode")
        # ...and accept exactly what it accepts, as before the fast path existed.
        assert engine_accepts(root) == valid, etree.tostring(root, encoding="unicode")
        seen["fast" if fast else "xmlschema only" if valid else "refused"] += 1
    # Every kind of case happened: the loop above did not pass by testing nothing.
    assert seen["fast"] > 300 and seen["refused"] > 500 and seen["xmlschema only"] > 50, seen


def test_children_table_matches_xmlschema() -> None:
    """The names used to canonicalise element case are those xmlschema reads in the XSD."""
    expected: dict[tuple[str, ...], dict[str, str]] = {}
    for path, decl in config._decls().items():
        if not decl.type.is_simple():
            expected[path] = {
                c.local_name.lower(): c.local_name for c in decl.type.content.iter_elements()
            }
    assert expected == config._CHILDREN


def test_engine_start_imports_neither_xmlschema_nor_prometheus() -> None:
    """Loading a valid file needs no xmlschema, and only a running engine needs metrics."""
    example = ROOT / "tests" / "configs" / "incident-example.xml"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "import engine.commands\n"
        "from engine.config import load_mailbox\n"
        f"load_mailbox(Path({str(example)!r}))\n"
        "print(sorted({'xmlschema', 'prometheus_client'} & set(sys.modules)))\n"
    )
    # A fresh interpreter: this one has imported xmlschema for the tests above.
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.dovecot
def test_a_run_over_plain_mail_imports_no_metrics_tables_or_tnef(mailbox: Mailbox) -> None:
    """Every start pays for what it imports (~15 ms for prometheus_client, ~9 ms each for
    inscriptis and tnefparse, ~110 ms for Starlette and Hypercorn, ~25 ms for asyncpg).
    `once` without an HTTP port has no use for metrics nor a web server, only tables in
    HTML and winmail.dat attachments need inscriptis and tnefparse, and only a --store
    naming PostgreSQL needs asyncpg. Incident mailboxes need neither the event processor
    and its recognisers (~4 ms) nor the service request processor."""
    mailbox.deliver(*[message(f"Plain {i}") for i in range(3)])
    args = ["once", "--config", str(mailbox.config), "--data-dir", str(mailbox.data)]
    args += ["--login", LOGIN, "--password", LOGIN_PASSWORD]
    script = (
        "import atexit, sys\n"
        "lazy = {'prometheus_client', 'inscriptis', 'tnefparse', 'xmlschema', 'starlette',"
        " 'hypercorn', 'h11', 'h2', 'asyncpg', 'engine.processors.event',"
        " 'engine.processors.alerts', 'engine.processors.service_request'}\n"
        "atexit.register(lambda: print(sorted(lazy & set(sys.modules))))\n"
        "from engine.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    mailbox.assert_exactly_once()


@pytest.mark.dovecot
def test_once_over_an_empty_pop3_mailbox_imports_no_imap_and_starts_no_parsing_process(
    mailbox: Mailbox,
) -> None:
    """The usual cron `once`: a POP3 mailbox with nothing waiting. imaplib and the IMAP
    gateway (~7 ms) are imported by the first IMAP session only, OAuth2 token health by the
    first OAuth2 mailbox, the parsing processes (~0.1 s of CPU each) start only for a
    session that lists enough messages to use them, the parser itself (engine.parse, ~25 ms)
    is imported by the first message to parse, and the replies' builder and sender
    (engine.reply: smtplib and the email package, ~9 ms) by the first reply, and the
    processors and their decision types (~6 ms) by the first message or outage."""
    args = ["once", "--config", str(mailbox.config), "--data-dir", str(mailbox.data)]
    args += ["--login", LOGIN, "--password", LOGIN_PASSWORD]
    script = (
        "import sys\n"
        "lazy = {'imaplib', 'engine.gateways.imap', 'engine.oauth.health', 'engine.parse.worker',"
        " 'engine.parse', 'engine.reply', 'smtplib', 'engine.processors'}\n"
        "from engine.cli import main\n"
        f"code = main({args!r})\n"
        "print(code, sorted(lazy & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 []"


@pytest.mark.dovecot
def test_the_command_exits_without_the_interpreter_s_teardown_and_loses_no_output(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    """Freeing every imported module at exit took ~45 ms (10 ms for a bare interpreter):
    the command skips it (atexit handlers never run), after flushing the log, stdout and
    stderr, and keeps its exit code."""
    mailbox.deliver(*[message(f"Exit {i}") for i in range(3)])
    data, cfg = mailbox.data, mailbox.config
    log = tmp_path / "engine.log"

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        script = (
            "import atexit, runpy, sys\n"
            "atexit.register(print, 'teardown ran', file=sys.stderr)\n"
            f"sys.argv = ['mailintegration', *{list(args)!r}]\n"
            "runpy.run_module('engine', run_name='__main__')\n"
        )
        return subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
        )

    login = ["--login", LOGIN, "--password", LOGIN_PASSWORD]
    done = command(
        "once", "--config", str(cfg), "--data-dir", str(data), "--log-file", str(log), *login
    )
    assert done.returncode == 0, done.stderr
    assert "teardown ran" not in done.stderr
    assert "once: m: fetched 3 processed 3 failed 0" in log.read_text().splitlines()[-1]
    listed = command("requests", "list", "--data-dir", str(data))
    assert listed.returncode == 0
    assert listed.stdout.splitlines()[-1] == "3 request(s)"
    refused = command(
        "once", "--config", str(cfg), "--data-dir", str(data), "--login", LOGIN, "--password", "x"
    )
    assert refused.returncode == 2 and "the login" in refused.stderr
    assert "teardown ran" not in refused.stderr


def test_the_login_is_checked_beside_the_engines_imports(tmp_path: Path, data: Path) -> None:
    """scrypt (~50 ms, in a thread without the GIL) starts as soon as the command line is
    read, before the store and the pipeline (~100 ms of imports) load; they load meanwhile,
    and the store's own check takes its answer: one scrypt per start, not two."""
    empty = tmp_path / "mailboxes.d"
    empty.mkdir()
    args = ["once", "--config-dir", str(empty), "--data-dir", str(data)]
    script = (
        "import sys, time\n"
        "import engine.passwords as passwords\n"
        "real, seen = passwords.verify_password, []\n"
        "def loaded():  # a module is in sys.modules from the start of its import\n"
        "    return hasattr(sys.modules.get('engine.supervisor'), 'Engine')\n"
        "def verify(password, stored):\n"
        "    seen.append(('engine.commands' in sys.modules, loaded()))\n"
        "    time.sleep(0.5)\n"
        "    seen.append(loaded())\n"
        "    return real(password, stored)\n"
        "passwords.verify_password = verify\n"
        "from engine.cli import main\n"
        f"code = main({[*args, '--login', LOGIN, '--password', LOGIN_PASSWORD]!r})\n"
        f"wrong = main({[*args, '--login', LOGIN, '--password', 'wrong']!r})\n"
        "print(code, wrong, seen)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    # The first check began before engine.commands (and the store) was imported, and the
    # pipeline by its end; the second start's pipeline was loaded already. A wrong password
    # still fails; each start ran scrypt once.
    assert done.stdout.split("\n")[-2] == "0 2 [(False, False), True, (True, True), True]"


def test_the_early_check_answers_only_for_the_hash_the_store_reads(
    tmp_path: Path, data: Path
) -> None:
    """The early check read the hash before the store opened; if the password changed since
    (another process), the store's check runs scrypt on what it reads itself."""
    import anyio

    from engine.passwords import EarlyCheck, hash_password
    from engine.store import open_store

    database = data / "mailintegration.sqlite3"

    async def check(password: str, change_to: str | None = None) -> tuple[bool, bool | None]:
        early = EarlyCheck(database, LOGIN, password)
        await early.answer(None)  # wait until it has read and checked
        store = await open_store(data)
        try:
            if change_to is not None:
                await store.db.execute(
                    "UPDATE users SET password_hash = ? WHERE login = ?",
                    (hash_password(change_to), LOGIN),
                )
                await store.db.commit()
            row = await store.db.execute_fetchall(
                "SELECT password_hash FROM users WHERE login = ?", (LOGIN,)
            )
            stored = next(iter(row))[0]
            return await store.check_login(LOGIN, password, early), await early.answer(stored)
        finally:
            await store.close()

    assert anyio.run(check, LOGIN_PASSWORD) == (True, True)
    assert anyio.run(check, "wrong") == (False, False)
    # Changed meanwhile: the early answer is not for this hash, the store decides.
    assert anyio.run(check, LOGIN_PASSWORD, "new password") == (False, None)
    assert anyio.run(check, "new password") == (True, True)


def test_the_early_check_reads_a_store_whatever_its_folder_is_called(tmp_path: Path) -> None:
    """The store is opened by a file: URI: a space, ?, #, % or a non-ASCII letter in the data
    directory's path must reach SQLite as the same path (quoted), not as URI syntax."""
    import anyio
    from support import data_dir

    from engine.passwords import EarlyCheck

    folder = tmp_path / "a b?c#d%e-é"
    folder.mkdir()
    database = data_dir(folder) / "mailintegration.sqlite3"
    stored = (
        sqlite3.connect(database)
        .execute("SELECT password_hash FROM users WHERE login = ?", (LOGIN,))
        .fetchone()[0]
    )
    assert anyio.run(EarlyCheck(database, LOGIN, LOGIN_PASSWORD).answer, stored) is True
    assert anyio.run(EarlyCheck(database, LOGIN, "wrong").answer, stored) is False


def test_the_early_check_creates_no_store(tmp_path: Path) -> None:
    """It opens the store read-only: where there is none, it leaves none behind and answers
    nothing, and the store's own opening says what is wrong as before."""
    import anyio

    from engine.passwords import EarlyCheck

    database = tmp_path / "mailintegration.sqlite3"
    early = EarlyCheck(database, LOGIN, LOGIN_PASSWORD)
    assert anyio.run(early.answer, "scrypt$16384$8$1$00$00") is None
    assert list(tmp_path.iterdir()) == []


def test_bounding_large_allocations_starts_no_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """ctypes.util.find_library("c") ran `ldconfig -p` in a child process at every start;
    libc's mallopt is found among the process's own symbols instead."""
    from engine.ops import bound_large_allocations

    def no_child(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError(f"a child process was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_child)
    monkeypatch.setattr(os, "posix_spawn", no_child)
    monkeypatch.setattr(os, "fork", no_child)
    assert bound_large_allocations()


def test_a_command_line_builds_only_its_subcommand_and_reads_no_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Building the eleven other subcommands' arguments (~10 ms) and looking the installed
    version up (~5 ms) were paid by every start; `--version` and `--help` still see all."""
    import importlib.metadata

    from engine import cli

    def never(*args: object) -> NoReturn:
        raise AssertionError(f"built or read when not needed: {args}")

    for name in cli.SUBCOMMANDS:
        if name != "status":
            monkeypatch.setitem(cli.SUBCOMMANDS, name, never)
    monkeypatch.setattr(importlib.metadata, "version", never)
    assert cli.main(["status", "--data-dir", str(tmp_path / "none")]) == 2
    assert "no store in" in capsys.readouterr().err
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert (
        capsys.readouterr().out
        == f"mailintegration {importlib.metadata.version('mailintegration')}\n"
    )
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    shown = capsys.readouterr().out
    assert all(f"    {name}" in shown for name in ("once", "run", "completion"))
