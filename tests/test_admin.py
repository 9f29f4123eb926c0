"""The admin's first hour (issue 21): init in a pseudo-terminal for each preset, config
validate on a folder with every kind of problem, the help of every subcommand, completion."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pexpect
import pytest

from engine.cli import ENVIRONMENT, build_parser
from engine.config import load_mailbox
from tests.support import (
    LOGIN,
    LOGIN_PASSWORD,
    Mailbox,
    cli,
    engine_argv,
    import_directory,
    mailbox_xml,
    message,
)
from tools.dovecot import Dovecot
from tools.oauthserver import OAuthServer

ROOT = Path(__file__).resolve().parent.parent


def spawn(*args: str | Path, cwd: Path) -> pexpect.spawn:
    """The real command in a pseudo-terminal (stdin and stdout are a TTY)."""
    return pexpect.spawn(
        sys.executable,
        ["-m", "engine", *(str(a) for a in args)],
        cwd=str(cwd),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        encoding="utf-8",
        timeout=60,
        dimensions=(50, 200),
    )


def answer(child: pexpect.spawn, *pairs: tuple[str, str]) -> None:
    """Answer each prompt (a regular expression) in order."""
    for prompt, reply in pairs:
        child.expect(prompt)
        child.sendline(reply)


def finish(child: pexpect.spawn) -> tuple[int, str]:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus is not None
    return child.exitstatus, child.before or ""


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


def common_answers(team: str) -> list[tuple[str, str]]:
    return [
        ("Team", team),
        ("Mail becomes", "incident"),
        ("Fallback user", "unknown.user"),
        ("Fallback site", "Montréal"),
    ]


def test_init_generic_pop3_with_a_password_writes_a_valid_file_and_checks_it(
    dovecot: Dovecot, pop3_user: tuple[str, str], tmp_path: Path
) -> None:
    """The generic POP3 preset asked in a terminal: STARTTLS with the server's CA, the
    password (typed without echo) in a 0600 file beside the XML, never inline; check runs
    against the real Dovecot at the end and passes."""
    user, password = pop3_user
    child = spawn("init", "--config-dir", "mailboxes.d", "--data-dir", "data", cwd=tmp_path)
    answer(
        child,
        ("Provider", "pop3"),
        ("Mailbox address", f"{user}@example.com"),
        ("Sign-in name", user),
        ("Server host name", "127.0.0.1"),
        ("TLS", "starttls"),
        (r"Port.*\(110\)", str(dovecot.pop3_port)),
        ("Sign in with", "password"),
        ("CA file", str(dovecot.ca_file)),
        *common_answers("IT"),
        ("not shown", password),
    )
    code, out = finish(child)
    assert code == 0, out
    assert password not in out  # not echoed, not printed
    target = tmp_path / "mailboxes.d" / "IT" / f"{user}@example.com.xml"
    assert "OK: connected to 127.0.0.1" in out and "TLS: STLS" in out, out
    text = target.read_text(encoding="utf-8")
    assert password not in text and "<!--" in text
    assert f"<passwordFile>{user}@example.com.secret</passwordFile>" in text
    secret = target.with_suffix(".secret")
    assert private(secret) and secret.read_text() == password + "\n"
    cfg = load_mailbox(target)
    assert (cfg.server.gateway, cfg.server.starttls, cfg.team) == ("pop3", True, "IT")
    assert (cfg.fallback_user, cfg.fallback_site) == ("unknown.user", "Montréal")
    # The sign-in name is not the address: the address is declared ours, never a watcher.
    assert f"{user}@example.com" in cfg.handling.own_addresses


def test_init_generic_imap_with_oauth2_signs_in_at_check(
    oauth_server: OAuthServer, oauth_dovecot: Dovecot, tmp_path: Path
) -> None:
    """The generic IMAP preset with OAuth2 (client credentials at the test authorization
    server): the client secret goes to a 0600 file, check signs in over IMAPS with it."""
    box = f"box-{uuid.uuid4().hex[:10]}"
    oauth_dovecot.add_user(box, uuid.uuid4().hex)
    client_id, client_secret = f"app-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    oauth_server.add_client(client_id, client_secret, scopes=["mail"], username=box)
    child = spawn("init", "--config-dir", "cfg", "--data-dir", "data", cwd=tmp_path)
    answer(
        child,
        ("Provider", "imap"),
        ("Mailbox address", f"{box}@example.com"),
        ("Sign-in name", box),
        ("Server host name", "127.0.0.1"),
        ("TLS", ""),  # the default: ssl
        (r"Port.*\(993\)", str(oauth_dovecot.imaps_port)),
        ("Sign in with", "oauth2"),
        ("CA file", str(oauth_dovecot.ca_file)),
        ("client\\) id", client_id),
        ("Token endpoint", oauth_server.token_url()),
        ("Scope", "mail"),
        *common_answers("Service Desk"),
        ("not shown", client_secret),
    )
    code, out = finish(child)
    assert code == 0, out
    assert "IMAPS" in out and "with OAuth2" in out, out
    assert client_secret not in out
    target = tmp_path / "cfg" / "Service_Desk" / f"{box}@example.com.xml"
    cfg = load_mailbox(target)
    assert cfg.server.oauth2 is not None and cfg.server.oauth2.client_secret == client_secret
    assert cfg.team == "Service Desk"  # the folder is a safe name; the element says the team
    assert private(target.with_suffix(".secret"))


@pytest.mark.parametrize(
    ("provider", "host", "port", "oauth_provider", "steps"),
    [
        ("m365", "outlook.office365.com", 993, "microsoft", "IMAP.AccessAsApp"),
        ("google", "imap.gmail.com", 993, "google", "oauth login --config"),
    ],
)
def test_init_cloud_presets_write_their_servers_and_print_the_registration_steps(
    tmp_path: Path, provider: str, host: str, port: int, oauth_provider: str, steps: str
) -> None:
    """Microsoft 365 and Google in a terminal (no network here: --no-check): the preset's
    host, port, TLS and OAuth2 provider, the app-registration steps printed."""
    child = spawn("init", "--config-dir", "cfg", "--no-check", cwd=tmp_path)
    pairs = [("Provider", provider), ("Protocol", "imap"), ("Mailbox address", "help@contoso.com")]
    pairs += [("Sign-in name", "")]
    if provider == "m365":
        pairs += [("Tenant", "contoso.onmicrosoft.com")]
    pairs += [("client\\) id", "11111111-2222"), *common_answers("1"), ("not shown", "s3cr3t")]
    answer(child, *pairs)
    code, out = finish(child)
    assert code == 0, out
    assert steps in out, out
    target = tmp_path / "cfg" / "1" / "help@contoso.com.xml"
    cfg = load_mailbox(target)
    s = cfg.server
    assert (s.host, s.port, s.use_ssl, s.gateway) == (host, port, True, "imap")
    assert s.oauth2 is not None and s.oauth2.provider == oauth_provider
    assert s.oauth2.client_secret == "s3cr3t" and "s3cr3t" not in target.read_text()
    assert s.user_name == "help@contoso.com"


def test_init_pop3_variants_of_the_cloud_presets(tmp_path: Path) -> None:
    """The same presets over POP3: their POP3 hosts on 995."""
    for provider, host in (("m365", "outlook.office365.com"), ("google", "pop.gmail.com")):
        args = ["init", "--config-dir", tmp_path / "cfg", "--provider", provider]
        args += ["--protocol", "pop3", "--address", f"{provider}@contoso.com", "--team", "IT"]
        args += ["--client-id", "abc", "--tenant", "t", "--secret-file", tmp_path / provider]
        args += ["--non-interactive", "--no-check"]
        result = subprocess.run(
            [sys.executable, "-m", "engine", *map(str, args)],
            input="the-secret\n",
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        cfg = load_mailbox(tmp_path / "cfg" / "IT" / f"{provider}@contoso.com.xml")
        assert (cfg.server.host, cfg.server.port, cfg.server.gateway) == (host, 995, "pop3")
        assert private(tmp_path / provider)


def test_init_makes_a_hostile_team_a_safe_folder_and_refuses_to_overwrite(
    tmp_path: Path,
) -> None:
    """A team name with slashes and dots stays one folder inside the config folder (the
    team element keeps the name, escaped); a second init without --force changes nothing."""
    secret = tmp_path / "pw"
    secret.write_text("pw\n")
    secret.chmod(0o600)
    team = "../../etc/<x>"
    args = ["init", "--config-dir", tmp_path / "cfg", "--provider", "imap", "--host", "h.test"]
    args += ["--address", "a@b.test", "--team", team, "--secret-file", secret]
    args += ["--non-interactive", "--no-check"]
    code, out = cli(*args)
    assert code == 0, out
    [target] = (tmp_path / "cfg").rglob("*.xml")
    assert target.parent.parent == tmp_path / "cfg" and target.parent.name == "_.._etc__x_"
    cfg = load_mailbox(target)
    assert cfg.team == team and cfg.server.password == "pw"
    assert cfg.server.password_file == str(secret)
    before = target.read_bytes()
    code, _ = cli(*args)
    assert code == 2 and target.read_bytes() == before
    assert cli(*args, "--force")[0] == 0


def test_init_refuses_a_secret_file_others_can_read(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pw\n")
    secret.chmod(0o644)
    args = ["init", "--config-dir", tmp_path / "cfg", "--provider", "pop3", "--host", "h.test"]
    args += ["--address", "a@b.test", "--team", "IT", "--secret-file", secret]
    code, _ = cli(*args, "--non-interactive", "--no-check")
    assert code == 2
    assert not (tmp_path / "cfg").exists() or not list((tmp_path / "cfg").rglob("*.xml"))


def test_init_says_why_it_cannot_write_the_secret_and_leaves_nothing(tmp_path: Path) -> None:
    args = ["init", "--config-dir", tmp_path / "cfg", "--provider", "pop3", "--host", "h.test"]
    args += ["--address", "a@b.test", "--team", "IT", "--secret-file", tmp_path / "no" / "pw"]
    result = subprocess.run(engine_argv(*args, "--non-interactive", "--no-check"), input="pw\n",
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 2 and f"cannot write {tmp_path / 'no' / 'pw'}" in result.stderr
    assert not list((tmp_path / "cfg").rglob("*.xml"))


def test_init_without_a_terminal_names_the_missing_option(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "engine", "init", "--provider", "imap", "--config-dir", "c"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 2
    assert "--address is needed" in result.stderr


# ------------------------------------------------------------------------- config validate


def validate_folder(tmp_path: Path) -> Path:
    cfg = tmp_path / "cfg"
    (cfg / "IT").mkdir(parents=True)
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    mailbox_xml(
        cfg / "IT" / "good.xml",
        port=110,
        user="good",
        password=None,
        server_extra=f"    <passwordFile>{pw}</passwordFile>\n",
        team=None,
    )
    mailbox_xml(cfg / "dup1.xml", port=110, user="same", password="x")
    mailbox_xml(cfg / "dup2.xml", port=110, user="same", password="y")
    mailbox_xml(cfg / "missing.xml", port=110, user="m", password="x", assignee="nobody")
    (cfg / "broken.xml").write_text(
        '<?xml version="1.0"?>\n<mailIntegration>\n  <server>\n  </server>\n</mailIntegration>\n'
    )
    return cfg


def without_values(out: str) -> list[str]:
    """The report without its effective values (checked apart)."""
    kept, in_values = [], False
    for line in out.splitlines():
        if line.startswith("  "):
            if line.strip() == "values:":
                in_values = True
                continue
            if in_values and line.startswith("    "):
                continue
        in_values = False
        kept.append(line)
    return kept


def test_config_validate_reports_every_file_with_its_problems_and_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    validate_folder(tmp_path)
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out = cli("config", "validate", "--config-dir", "cfg", "--data-dir", "data")
    assert code == 1
    directory = [
        "  directory:",
        "    team: 1 (teams): exists",
        "    incidentFallbackUserLogon: unknown.user (users): exists",
        "    incidentFallbackSiteName: Montréal (sites): exists",
        "    incidentGroup: Service Desk (groups): exists",
        "    incidentSource: Email (sources): exists",
    ]
    inline = ["  secrets:", "    server password: written in the mailbox file (prefer "
              "passwordFile or passwordEnv)"]  # fmt: skip
    assert without_values(out) == [
        "cfg/broken.xml: PROBLEMS",
        "  mailbox: broken",
        "  team: -",
        "  would not load",
        "  problems:",
        "    cfg/broken.xml:3: missing required elements <serverName>, <userName> in "
        "<server> (element <server>)",
        "cfg/dup1.xml: PROBLEMS",
        "  mailbox: dup1",
        "  team: 1",
        *directory,
        *inline,
        "  problems:",
        "    cfg/dup1.xml:9: the same mailbox (same@localhost) is read by cfg/dup2.xml",
        "cfg/dup2.xml: PROBLEMS",
        "  mailbox: dup2",
        "  team: 1",
        *directory,
        *inline,
        "  problems:",
        "    cfg/dup2.xml:9: the same mailbox (same@localhost) is read by cfg/dup1.xml",
        "cfg/missing.xml: PROBLEMS",
        "  mailbox: missing",
        "  team: 1",
        *directory[:3],
        "    assignee: nobody (users): MISSING",
        *directory[3:],
        *inline,
        "  problems:",
        "    cfg/missing.xml:18: assignee 'nobody' is not a user",
        "cfg/IT/good.xml: ok",
        "  mailbox: IT/good",
        "  team: IT",
        *[line.replace(": 1 (teams)", ": IT (teams)") for line in directory],
        "  secrets:",
        f"    server password: file {tmp_path / 'pw'}",
        "5 file(s): 1 ok, 4 with problems, 1 would not load",
    ]
    # The effective values carry the defaults the files leave out, never a password.
    assert "    max_message_bytes: 26214400" in out and "    server.port: 110" in out
    assert "secret" not in out.replace("secrets:", "") and ">x<" not in out


def test_config_validate_without_a_data_dir_says_unknown_and_json_has_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = validate_folder(tmp_path)
    (cfg / "dup2.xml").unlink()
    (cfg / "broken.xml").unlink()
    monkeypatch.delenv("MAILINTEGRATION_DATA_DIR", raising=False)
    code, out = cli("config", "validate", "--config-dir", cfg)
    assert code == 0, out  # nothing that would not load, nothing known to be missing
    assert "    assignee: nobody (users): unknown" in out
    # A data directory where nothing ran yet (a first start): unknown too, and said so.
    code, out = cli("config", "validate", "--config-dir", cfg, "--data-dir", tmp_path / "new")
    assert code == 0 and out.startswith(f"no store in {tmp_path / 'new'} yet: the directory")
    assert not (tmp_path / "new").exists()
    # --quiet: only the files with problems, the summary counting every file.
    mailbox_xml(cfg / "bad.xml", port=110, user="b", password="x", team="<x/>")
    code, out = cli("config", "validate", "--config-dir", cfg, "--quiet")
    assert code == 1
    assert out.splitlines()[0] == "cfg/bad.xml: PROBLEMS".replace("cfg", str(cfg))
    assert out.splitlines()[-1] == "4 file(s): 3 ok, 1 with problems, 1 would not load"
    code, out = cli("config", "validate", "--config-dir", cfg, "--json")

    reports = {r["mailbox"]: r for r in json.loads(out)}
    assert reports["IT/good"]["team"] == "IT" and reports["IT/good"]["loaded"] is True
    assert reports["missing"]["needs"][2] == {
        "element": "assignee",
        "kind": "users",
        "name": "nobody",
        "exists": None,
        "missing": "assignee 'nobody' is not a user",
        "line": 18,
    }
    assert reports["IT/good"]["values"]["server.password_file"] == str(tmp_path / "pw")
    assert "password" not in reports["dup1"]["values"]


# ------------------------------------------------------------------------------------ help


def leaf_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    found = []

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(f"{name} {sub_name}", sub)

    walk("mailintegration", build_parser())
    return found


def engine_variables() -> set[str]:
    """Every MAILINTEGRATION_ variable the engine's code names."""
    names: set[str] = set()
    for path in (ROOT / "engine").rglob("*.py"):
        names |= set(re.findall(r"\"(MAILINTEGRATION_[A-Z_]+)\"", path.read_text()))
    return names


def test_every_subcommand_has_a_manual_page_without_markup_naming_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each command: a description, examples, no backticks; and every variable of the
    environment whose value reaches one of its options is named in its help (found by
    setting each to a value of its own and looking for it in the options' defaults)."""
    variables = sorted(engine_variables())
    assert "MAILINTEGRATION_DATA_DIR" in variables and set(variables) <= set(ENVIRONMENT)
    values = {name: f"98765{i}" for i, name in enumerate(variables)}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COLUMNS", "80")
    parsers = leaf_parsers()
    assert {"mailintegration init", "mailintegration config validate"} <= {n for n, _ in parsers}
    for name, parser in parsers:
        text = parser.format_help()
        assert "`" not in text, name
        assert parser.description and "examples:\n  mailintegration" in text, name
        assert "``" not in (parser.description or "") and "engine." not in text, name
        read = {
            var
            for action in parser._actions
            for var, value in values.items()
            if str(action.default) in (value, str(float(value)))
        }
        # The description reads as a paragraph fitted to the terminal (COLUMNS, as argparse).
        description = text.split("\n\n", 1)[1].split("\n\noptions:", 1)[0]
        prose = [line for line in description.splitlines() if not line.startswith(" ")]
        too_long = [line for line in prose if len(line) > 78]  # a command stays as written
        assert not too_long, (name, too_long)
        env_section = text.split("environment:", 1)[-1] if "environment:" in text else ""
        for var in read:
            assert var in env_section, f"{name} reads {var} but its help does not say so"


def test_version_and_completion_scripts() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "engine", "--version"], capture_output=True, text=True, check=True
    )
    assert re.fullmatch(r"mailintegration \d+\.\d+\.\d+\S*\n", result.stdout)
    for shell in ("bash", "zsh"):
        code, out = cli("completion", shell)
        assert code == 0 and "validate" in out and "--fallback-user" in out
    code, script = cli("completion", "bash")
    checked = subprocess.run(["bash", "-n"], input=script, text=True, check=False)
    assert checked.returncode == 0


# -------------------------------------------------------------------------------- progress


def once_args(box: Mailbox, *extra: str) -> list[str]:
    return ["once", "--config", str(box.config), "--data-dir", str(box.data), "--login", LOGIN,
            "--password", LOGIN_PASSWORD, "--parse-processes", "0", *extra]  # fmt: skip


def test_once_shows_progress_bars_on_a_terminal_and_one_line_per_mailbox(
    mailbox: Mailbox,
) -> None:
    """On a pseudo-terminal: a bar for the mailbox with its counts and rate, and its summary
    line; the writer's line per message is left out, and --verbose brings it back."""
    mailbox.deliver(*(message(f"Backlog {i}") for i in range(12)))
    child = spawn(*once_args(mailbox), cwd=mailbox.data.parent)
    code, out = finish(child)
    assert code == 0, out
    name = mailbox.config.stem
    assert re.search(rf"{name} .*━.*12 fetched.*12/12 processed.*msg/s", out), out
    assert f"{name}: fetched 12, processed 12, failed 0; ok" in out
    assert "uidl=" not in out  # the per-message INFO lines gave way to the bar
    mailbox.assert_exactly_once()
    mailbox.deliver(message("One more"))
    code, out = finish(spawn(*once_args(mailbox, "--verbose"), cwd=mailbox.data.parent))
    assert code == 0 and "uidl=" in out and "1/1 processed" in out, out


def test_once_in_a_pipe_or_with_json_logs_prints_no_progress(mailbox: Mailbox) -> None:
    mailbox.deliver(*(message(f"Piped {i}") for i in range(3)))
    result = subprocess.run(engine_argv(*once_args(mailbox)), capture_output=True, text=True,
                            check=False, cwd=mailbox.data.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "━" not in result.stdout + result.stderr and "msg/s" not in result.stdout
    assert result.stderr.count("uidl=") == 3  # the lines as before
    mailbox.deliver(message("json"))
    child = spawn(*once_args(mailbox, "--log-format", "json"), cwd=mailbox.data.parent)
    code, out = finish(child)
    assert code == 0, out
    assert "━" not in out and "msg/s" not in out  # JSON logs: no bars, on a terminal too
    assert "uidl=" in out  # and the line per message stays


def test_ingest_and_directory_import_show_progress_on_a_terminal(
    data: Path, tmp_path: Path
) -> None:
    files = []
    for i in range(5):
        f = tmp_path / f"m{i}.eml"
        f.write_bytes(message(f"Replayed {i}"))
        files.append(str(f))
    config = mailbox_xml(tmp_path / "replay.xml", port=110, user="r", password="p")
    child = spawn("ingest", *files, "--config", config, "--data-dir", data, "--login", LOGIN,
                  "--password", LOGIN_PASSWORD, cwd=tmp_path)  # fmt: skip
    code, out = finish(child)
    assert code == 0, out
    assert re.search(r"replay .*━.*5/5 processed", out), out
    directory = {"users": [{"login": f"u{i}", "name": f"User {i}"} for i in range(120)]}
    (tmp_path / "dir.json").write_text(json.dumps(directory))
    code, out = finish(spawn("directory", "import", "dir.json", "--data-dir", data, cwd=tmp_path))
    assert code == 0 and re.search(r"directory .*120/120 users", out), out
    assert "imported: 0 teams, 0 sites, 0 groups, 0 sources, 0 priorities, 0 categories, " \
        "120 users" in out  # fmt: skip


def test_a_secret_file_init_writes_in_this_repository_is_never_committed() -> None:
    """``init`` writes ``<address>.secret`` beside the mailbox XML (the test above): in the
    repository's own mailboxes.d, git ignores it, so ``git add -A`` cannot take it."""
    repo = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("mailboxes.d/IT/it@example.com.secret", "it@example.com.secret"):
        done = subprocess.run(
            ["git", "check-ignore", "-q", path], cwd=repo, capture_output=True, check=False
        )
        assert done.returncode == 0, f"{path} is not ignored by git"


def test_a_symlinked_venv_is_never_committed() -> None:
    """A worktree often links its .venv to another checkout's: ``.venv/`` in .gitignore
    matched only a folder, so ``git add -A`` took the link (and a merge then replaced the
    other checkout's venv with it). A path git cannot see is a folder is checked as a link."""
    repo = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(
        ["git", "check-ignore", "-q", "worktree/.venv"], cwd=repo, capture_output=True, check=False
    )
    assert done.returncode == 0, ".venv as a link is not ignored by git"
