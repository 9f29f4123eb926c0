"""Run a real Dovecot POP3 and IMAP server on loopback for tests, demos and benchmarks.

`start_dovecot` writes a self-contained configuration under one base directory (runtime
sockets, state, log, TLS material, passwd-files and mail), starts the master without systemd
and waits until POP3 answers. The returned `Dovecot` handle adds mailboxes, delivers mail
straight into their Maildirs (INBOX or a folder), manages folders, lists what the server
holds (UIDs, flags, keywords) and stops the server again.

IMAP and IMAPS listen beside POP3 and POP3S when Debian's dovecot-imapd is installed
(`imap_port` / `imaps_port`, 0 otherwise). With `oauth2_introspection_url`, the server also
accepts XOAUTH2 and/or OAUTHBEARER (`oauth2_mechanisms`), checking each token with that
RFC 7662 introspection endpoint (tools/oauthserver.py); the password logins stay. Folders
use the Maildir++ layout (`Maildir/.Name`, "." separates levels, as in IMAP here); the
folder operations and listings go through `doveadm`, so they see what the server sees.

A refused token (Dovecot 2.3.19) is answered with an error challenge, `+ <base64 JSON>`;
the client sends an empty line and then reads `-ERR [AUTH] Authentication failed.` (POP3)
or `NO [AUTHENTICATIONFAILED] Authentication failed.` (IMAP). The JSON depends on the
mechanism, not on the cause: XOAUTH2 gives `{"status":"401","schemes":"bearer",
"scope":"mail"}` and OAUTHBEARER `{"status":"invalid_token"}`, whether the token was
inactive (unknown, expired, revoked) or lacked `oauth2_scope`; the cause is in Dovecot's
log and in the authorization server's records.

Command line, for shell scripts (the state needed by the later commands lives in DIR)::

    python -m tools.dovecot start DIR [--max-connections N]   # prints one JSON line
    python -m tools.dovecot add-user DIR NAME PASSWORD
    python -m tools.dovecot deliver DIR USER FILE [--folder F] # FILE "-" reads stdin
    python -m tools.dovecot count DIR USER
    python -m tools.dovecot stop DIR
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import grp
import hashlib
import itertools
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "Certificates",
    "Dovecot",
    "DovecotError",
    "DovecotNotFoundError",
    "FolderStatus",
    "StoredMessage",
    "find_dovecot",
    "imap_available",
    "make_certificates",
    "start_dovecot",
]

HOST = "127.0.0.1"

# Dovecot refuses uid 0 for mail access, so as root the mailboxes belong to this numeric
# uid/gid; no /etc/passwd entry is needed for it.
ROOT_MAIL_ID = 5000

STATE_FILE = "state.json"
DH_PARAMS = Path("/usr/share/dovecot/dh.pem")
# Debian's dovecot-imapd; without it a master configured for IMAP refuses to start.
IMAP_BINARY = Path("/usr/lib/dovecot/imap")
OAUTH2_MECHANISMS = ("xoauth2", "oauthbearer")

# Unix socket paths are limited to 108 bytes and Dovecot puts sockets with names of up to
# about 25 characters under base_dir: longer base directories move the sockets to /tmp.
_MAX_RUN_DIR_LEN = 80

_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0
_STRAGGLER_GRACE = 1.5
_START_ATTEMPTS = 5

# Characters that have a meaning in dovecot.conf (quoting, comments, $variables) or in
# passwd-file arguments (%variables); refusing them is simpler than escaping them everywhere.
_UNSAFE_PATH = re.compile(r"[\s\"'#$%{}\\]")
_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@-]{0,127}$")
# Folder names: levels separated by "." (Maildir++), no characters that need escaping in a
# file name or in doveadm's arguments.
_FOLDER_NAME = re.compile(
    r"^[A-Za-z0-9$_+@-][A-Za-z0-9 $_+@-]{0,63}(\.[A-Za-z0-9$_+@-][A-Za-z0-9 $_+@-]{0,63}){0,7}$"
)
_DOVEADM_TIMEOUT = 30.0

_delivery_counter = itertools.count(1)


class DovecotError(RuntimeError):
    """Dovecot could not be started, stopped or driven."""


class DovecotNotFoundError(DovecotError):
    """The `dovecot` binary is not installed."""


def imap_available() -> bool:
    """Whether Debian's dovecot-imapd is installed (IMAP listeners can be configured)."""
    return IMAP_BINARY.is_file()


def find_dovecot() -> Path | None:
    """Return the `dovecot` master binary, or None when Dovecot is not installed.

    `DOVECOT_BINARY` overrides the search; /usr/sbin is searched explicitly because it is
    often missing from a normal user's PATH.
    """
    override = os.environ.get("DOVECOT_BINARY")
    if override:
        path = Path(override)
        return path if path.is_file() and os.access(path, os.X_OK) else None
    found = shutil.which("dovecot")
    if found:
        return Path(found)
    for candidate in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot"):
        path = Path(candidate)
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certificates:
    """PEM files of a test CA and of a server certificate it signed."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_certificates(
    directory: Path, *, method: Literal["auto", "trustme", "openssl"] = "auto"
) -> Certificates:
    """Create a CA and a server certificate for localhost, 127.0.0.1 and ::1 in `directory`.

    "auto" uses the `trustme` package when it is importable and the `openssl` command
    otherwise. Existing files are reused, so a restarted server keeps the same CA.
    """
    directory.mkdir(parents=True, exist_ok=True)
    certs = Certificates(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
    )
    if all(p.is_file() for p in (certs.ca_file, certs.cert_file, certs.key_file)):
        return certs
    if method == "auto":
        try:
            import trustme  # noqa: F401
        except ImportError:
            method = "openssl"
        else:
            method = "trustme"
    if method == "trustme":
        _certificates_with_trustme(certs)
    else:
        _certificates_with_openssl(certs, directory)
    os.chmod(certs.key_file, 0o600)
    return certs


def _certificates_with_trustme(certs: Certificates) -> None:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1")
    ca.cert_pem.write_to_path(certs.ca_file)
    leaf.private_key_pem.write_to_path(certs.key_file)
    certs.cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))


def _certificates_with_openssl(certs: Certificates, directory: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise DovecotError("neither the trustme package nor the openssl command is available")
    ca_key = directory / "ca.key"
    csr = directory / "server.csr"
    ext = directory / "server.ext"
    # Key identifiers and key usages keep the chain acceptable to verifiers that apply
    # strict X.509 checks (Python 3.13 turns VERIFY_X509_STRICT on by default).
    ext.write_text(
        "subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid:always\n"
    )
    commands: list[list[str]] = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
         "-keyout", str(ca_key), "-out", str(certs.ca_file), "-days", "3650",
         "-subj", "/O=mailintegration tests/CN=dovecot-tools test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-sha256",
         "-keyout", str(certs.key_file), "-out", str(csr), "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(certs.ca_file),
         "-CAkey", str(ca_key), "-CAcreateserial", "-sha256", "-days", "3650",
         "-out", str(certs.cert_file), "-extfile", str(ext)],
    ]  # fmt: skip
    for command in commands:
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise DovecotError(
                f"{' '.join(command[:3])} failed: {result.stderr.decode(errors='replace')}"
            )
    os.chmod(ca_key, 0o600)


# --------------------------------------------------------------------------- handle


@dataclass(frozen=True)
class StoredMessage:
    """One message of a folder as the server holds it (from `doveadm fetch`)."""

    uid: int
    flags: frozenset[str]
    """System flags (e.g. "\\Seen", "\\Deleted") and keywords (e.g. "$Processed")."""
    size: int
    """RFC822.SIZE: octets with CRLF line ends."""

    @property
    def deleted(self) -> bool:
        """Whether the message carries \\Deleted (marked, not yet expunged)."""
        return "\\Deleted" in self.flags


@dataclass(frozen=True)
class FolderStatus:
    """What IMAP STATUS reports for a folder."""

    messages: int
    uidvalidity: int
    uidnext: int


@dataclass
class Dovecot:
    """A running Dovecot started by `start_dovecot` (or re-attached with `from_state`)."""

    host: str
    pop3_port: int
    pop3s_port: int
    ca_file: Path
    base: Path
    mail_uid: int
    mail_gid: int
    run_dir: Path
    imap_port: int = 0
    """IMAP (with STARTTLS) port; 0 when dovecot-imapd is not installed."""
    imaps_port: int = 0
    """IMAP over implicit TLS; 0 when dovecot-imapd is not installed."""
    # Set when this process started the master in the foreground: stop() then reaps it,
    # which matters where PID 1 does not reap orphans (containers) and zombies pile up.
    _process: subprocess.Popen[bytes] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @classmethod
    def from_state(cls, base: Path) -> Dovecot:
        """Re-attach to a server started in `base`, e.g. by another process through the CLI."""
        base = Path(base).resolve()
        try:
            state = json.loads((base / STATE_FILE).read_text())
        except FileNotFoundError:
            raise DovecotError(f"no Dovecot state in {base} (was it started there?)") from None
        return cls(
            host=state["host"],
            pop3_port=int(state["pop3_port"]),
            pop3s_port=int(state["pop3s_port"]),
            ca_file=Path(state["ca_file"]),
            base=Path(state["base"]),
            mail_uid=int(state["mail_uid"]),
            mail_gid=int(state["mail_gid"]),
            run_dir=Path(state["run_dir"]),
            imap_port=int(state.get("imap_port", 0)),
            imaps_port=int(state.get("imaps_port", 0)),
        )

    # ------------------------------------------------------------------ paths and info

    @property
    def users_dir(self) -> Path:
        """Directory of the one-line passwd-files, one per mailbox, named after it."""
        return self.base / "users"

    @property
    def certificates(self) -> Certificates:
        """The test CA and the server certificate (share them with tools.oauthserver)."""
        tls = self.base / "tls"
        return Certificates(self.ca_file, tls / "server.pem", tls / "server.key")

    @property
    def ports(self) -> list[int]:
        """Every listening port (POP3, POP3S, and IMAP, IMAPS when configured)."""
        return [p for p in (self.pop3_port, self.pop3s_port, self.imap_port, self.imaps_port) if p]

    @property
    def log_file(self) -> Path:
        """Dovecot's log (and the master's stdout/stderr)."""
        return self.base / "dovecot.log"

    @property
    def config_file(self) -> Path:
        """The generated dovecot.conf."""
        return self.base / "dovecot.conf"

    def home(self, user: str) -> Path:
        """Home directory of `user`; the mailbox is its Maildir/ subdirectory."""
        _check_user_name(user)
        return self.base / "mail" / user

    def maildir(self, user: str) -> Path:
        """The Maildir of an existing `user` (KeyError if it was never added)."""
        path = self.home(user) / "Maildir"
        if not path.is_dir():
            raise KeyError(user)
        return path

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the Dovecot log, for error messages."""
        return _tail(self.log_file, lines)

    def pid(self) -> int | None:
        """The master's pid from master.pid, or None when it is not running."""
        try:
            pid = int((self.run_dir / "master.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) and _is_dovecot(pid) else None

    def is_running(self) -> bool:
        """Whether the master process is alive."""
        return self.pid() is not None

    def to_json(self) -> dict[str, object]:
        """The connection facts a client needs (what the CLI prints on start)."""
        return {
            "host": self.host,
            "pop3_port": self.pop3_port,
            "pop3s_port": self.pop3s_port,
            "imap_port": self.imap_port,
            "imaps_port": self.imaps_port,
            "ca_file": str(self.ca_file),
            "base": str(self.base),
            "pid": self.pid(),
        }

    # ------------------------------------------------------------------ users

    def users(self) -> dict[str, str]:
        """Mailbox names and their passwords."""
        users: dict[str, str] = {}
        for entry in sorted(self.users_dir.iterdir()):
            if not entry.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    users[entry.name] = _read_passwd_line(entry)
        return users

    def add_user(self, name: str, password: str) -> None:
        """Create mailbox `name`, or set its password if it exists.

        The Maildir is created, and owned by the mail uid, before the user's passwd-file
        appears, so a login can never see a half-made mailbox. No restart or reload is
        needed: a new user is visible to the very next login; a changed password takes
        up to one second, waited for here (see `_write_user`).
        """
        _check_user_name(name)
        _check_password(password)
        home = self.home(name)
        maildir = home / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # A maildir left owned by root makes the first login fail with EACCES.
            for path in (home, maildir, *(maildir / s for s in ("cur", "new", "tmp"))):
                os.chown(path, self.mail_uid, self.mail_gid)
        self._write_user(name, password)

    def set_password(self, name: str, password: str) -> None:
        """Change the password of an existing mailbox (KeyError if there is none).

        Returns once Dovecot is certain to use the new password, which can take up to
        one second (see `_write_user`).
        """
        _check_user_name(name)
        _check_password(password)
        if not (self.users_dir / name).is_file():
            raise KeyError(name)
        self._write_user(name, password)

    def _write_user(self, name: str, password: str) -> None:
        # Measured on Dovecot 2.3.19 (db-passwd-file.c, passwd_file_sync): a passwd-file
        # is stat()ed at most once per second of the auth process's clock, and re-read
        # only when its mtime in whole seconds or its size changed. One shared file would
        # therefore serve a stale copy to a login in the same second as an earlier
        # lookup, so a user just added could not log in. With a path containing %u each
        # user has a file of their own, and a file Dovecot has never looked up (or whose
        # lookup failed) is read at once: new users need no wait. A changed password
        # does: the write gets an mtime different from every earlier version and the
        # call returns once the clock has moved past the second of the write.
        path = self.users_dir / name
        line = f"{name}:{{PLAIN}}{password}:{self.mail_uid}:{self.mail_gid}::{self.home(name)}::\n"
        with self._users_lock():
            try:
                previous_stat = path.stat()
                previous: str | None = _read_passwd_line(path)
            except FileNotFoundError:
                previous_stat, previous = None, None
            if previous == password:
                return
            tmp = self.users_dir / f".{name}.{os.getpid()}.{uuid.uuid4().hex}"
            tmp.write_text(line)
            # The auth process does not run as root: it must be able to read the file.
            # The passwords are throwaway test credentials.
            os.chmod(tmp, 0o644)
            now = time.time()
            stamp = int(now)
            if previous_stat is not None:
                stamp = max(stamp, int(previous_stat.st_mtime) + 1)
            os.utime(tmp, (stamp, stamp))
            # Atomic replacement: a concurrent login reads the old or the new version.
            os.replace(tmp, path)
        if previous is not None:
            deadline = int(now) + 1
            while (remaining := deadline - time.time()) > 0:
                time.sleep(min(remaining, 0.1))

    @contextlib.contextmanager
    def _users_lock(self) -> Iterator[None]:
        # flock locks belong to the open file description, so this serialises threads of
        # this process as well as other processes (the CLI) editing the same files.
        with open(self.base / "users.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ mail

    def deliver(self, user: str, raw: bytes, folder: str | None = None) -> str:
        """Deliver one message to `user` the way an MDA does and return its file name.

        `folder` None (or "INBOX") is the inbox; another folder is created when missing.
        The bytes are written to tmp/ and renamed into new/. The name is unique
        forever (time, pid, counter and a random part): Dovecot hides a message whose name
        was used before in the same maildir ("Expunged message reappeared"). Dovecot sends
        stored bare LF line ends as CRLF, so deliver CRLF text to compare bytes exactly.
        """
        maildir = self.maildir(user)
        if folder is not None and folder.upper() != "INBOX":
            if folder not in self.folders(user):
                self.create_folder(user, folder)
            maildir = self._folder_dir(user, folder)
        now = time.time_ns()
        seconds, micros = divmod(now // 1000, 1_000_000)
        name = (
            f"{seconds}.M{micros:06d}P{os.getpid()}Q{next(_delivery_counter)}"
            f"R{uuid.uuid4().hex[:16]}.dovecot-tools"
        )
        tmp = maildir / "tmp" / name
        with open(tmp, "xb") as handle:
            handle.write(raw)
        if os.geteuid() == 0:
            os.chown(tmp, self.mail_uid, self.mail_gid)
        os.rename(tmp, maildir / "new" / name)
        return name

    def _message_paths(self, user: str, folder: str | None = None) -> list[Path]:
        maildir = self.maildir(user)
        if folder is not None and folder.upper() != "INBOX":
            maildir = self._folder_dir(user, folder)
            if not maildir.is_dir():
                raise KeyError(folder)
        paths = [
            entry
            for sub in ("new", "cur")
            for entry in (maildir / sub).iterdir()
            if not entry.name.startswith(".")
        ]
        # Sorting on the part before the ":2,flags" suffix keeps delivery order, because
        # names start with the delivery time (fixed-width seconds, zero-padded µs).
        return sorted(paths, key=lambda p: p.name.split(":", 1)[0])

    def count(self, user: str, folder: str | None = None) -> int:
        """Number of messages currently in the inbox or `folder` (new/ and cur/).

        A message marked \\Deleted but not yet expunged still counts (see list_messages).
        """
        return len(self._message_paths(user, folder))

    def messages(self, user: str, folder: str | None = None) -> list[bytes]:
        """The stored bytes of every message in the inbox or `folder`, in delivery order."""
        # Dovecot moves files from new/ to cur/ while a POP3 session runs: a file listed
        # a moment ago can vanish, so the listing is retried a bounded number of times.
        for _ in range(20):
            try:
                return [path.read_bytes() for path in self._message_paths(user, folder)]
            except FileNotFoundError:
                time.sleep(0.01)
        raise DovecotError(f"mailbox {user} kept changing while being read")

    # ------------------------------------------------------------------ folders

    def _folder_dir(self, user: str, folder: str) -> Path:
        _check_folder_name(folder)
        return self.maildir(user) / f".{folder}"

    def doveadm(self, *args: str) -> str:
        """Run `doveadm ARGS` against this server's configuration and return its stdout.

        doveadm does the work itself, with the same mail location, indexes and ownership
        as the IMAP and POP3 processes (as the mail uid when run as root).
        """
        binary = shutil.which("doveadm") or "/usr/bin/doveadm"
        result = subprocess.run(
            [binary, "-c", str(self.config_file), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_DOVEADM_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise DovecotError(
                f"doveadm {' '.join(args[:2])} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout.decode("utf-8", "replace")

    def folders(self, user: str) -> list[str]:
        """Names of the user's folders, INBOX first ("." separates levels)."""
        self.maildir(user)  # KeyError for an unknown user
        names = self.doveadm("mailbox", "list", "-u", user).split("\n")
        found = sorted(n for n in names if n and n != "INBOX")
        return ["INBOX", *found]

    def create_folder(self, user: str, folder: str) -> None:
        """Create (and subscribe) a folder; creating one that exists is an error."""
        self.maildir(user)
        _check_folder_name(folder)
        self.doveadm("mailbox", "create", "-s", "-u", user, folder)

    def delete_folder(self, user: str, folder: str) -> None:
        """Delete a folder and the mail in it (its UIDVALIDITY is gone with it)."""
        self.maildir(user)
        _check_folder_name(folder)
        self.doveadm("mailbox", "delete", "-s", "-r", "-u", user, folder)

    def rename_folder(self, user: str, old: str, new: str) -> None:
        """Rename a folder (Maildir++: the directory moves, UIDVALIDITY moves with it)."""
        self.maildir(user)
        _check_folder_name(old)
        _check_folder_name(new)
        self.doveadm("mailbox", "rename", "-s", "-u", user, old, new)

    def set_uidvalidity(self, user: str, folder: str, uidvalidity: int) -> None:
        """Give a folder (INBOX too) a new UIDVALIDITY, as a server migration would."""
        self.maildir(user)
        if folder.upper() != "INBOX":
            _check_folder_name(folder)
        self.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(uidvalidity), folder)

    def folder_status(self, user: str, folder: str = "INBOX") -> FolderStatus:
        """Message count, UIDVALIDITY and UIDNEXT of a folder, as IMAP STATUS reports."""
        self.maildir(user)
        if folder.upper() != "INBOX":
            _check_folder_name(folder)
        rows = _tab_rows(
            self.doveadm(
                "-f", "tab", "mailbox", "status", "-u", user, "messages uidvalidity uidnext", folder
            )
        )
        if len(rows) != 1:
            raise DovecotError(f"doveadm mailbox status gave {len(rows)} rows for {folder}")
        fields = rows[0]
        return FolderStatus(
            messages=int(fields["messages"]),
            uidvalidity=int(fields["uidvalidity"]),
            uidnext=int(fields["uidnext"]),
        )

    def list_messages(self, user: str, folder: str = "INBOX") -> list[StoredMessage]:
        """Every message of a folder with its UID, flags and keywords, in UID order.

        Messages marked \\Deleted but not expunged are listed, with the flag.
        """
        self.maildir(user)
        if folder.upper() != "INBOX":
            _check_folder_name(folder)
        rows = _tab_rows(
            self.doveadm(
                "-f",
                "tab",
                "fetch",
                "-u",
                user,
                "uid flags size.physical",
                "mailbox",
                folder,
                "all",
            )
        )
        messages = [
            StoredMessage(
                uid=int(row["uid"]),
                flags=frozenset(row["flags"].split()),
                size=int(row["size.physical"] or 0),
            )
            for row in rows
        ]
        return sorted(messages, key=lambda m: m.uid)

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Stop the master (pid from master.pid) and wait until its ports are closed.

        Idempotent. SIGTERM first; the master then stops its children. Anything still
        alive after the timeout is killed by pid with SIGKILL.
        """
        pid = self.pid()
        if pid is None:
            # Nothing of ours runs; the ports may meanwhile belong to someone else.
            self._reap()
            self._remove_temporary_run_dir()
            return
        family = _descendants(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        # Measured: the master exits about 1.1 s after SIGTERM, but not before its
        # children do, and some ignore the signal: a login process whose client left just
        # before waits 5 s, and pop3 processes serving a client outlive the master until
        # that client disconnects. Such stragglers, children of our master known by pid,
        # are killed once the quick part of the shutdown is over.
        deadline = time.monotonic() + _STRAGGLER_GRACE
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        master_gone = not _alive(pid)
        _kill_all(p for p in family if master_gone or not _is_log_process(p))
        deadline = time.monotonic() + _STOP_TIMEOUT
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        _kill_all([pid, *family])
        deadline = time.monotonic() + _STOP_TIMEOUT
        while time.monotonic() < deadline and any(_alive(p) for p in [pid, *family]):
            time.sleep(0.05)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while time.monotonic() < deadline and any(_port_open(self.host, p) for p in self.ports):
            time.sleep(0.05)
        if any(_port_open(self.host, p) for p in self.ports):
            raise DovecotError(f"Dovecot ports still open after stop\n{self.log_tail()}")
        self._reap()
        self._remove_temporary_run_dir()

    def _reap(self) -> None:
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=_STOP_TIMEOUT)
            if self._process.returncode is not None:
                self._process = None

    def _remove_temporary_run_dir(self) -> None:
        if not self.run_dir.is_relative_to(self.base):
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- start


@dataclass(frozen=True)
class _Identity:
    """Who owns what: the mail uid/gid and the users Dovecot's own processes run as."""

    mail_uid: int
    mail_gid: int
    internal_user: str
    internal_group: str
    login_user: str
    as_root: bool


def _identity() -> _Identity:
    if os.geteuid() == 0:
        internal = _first_existing_user("dovecot", "nobody")
        login = _first_existing_user("dovenull", internal.pw_name)
        return _Identity(
            mail_uid=ROOT_MAIL_ID,
            mail_gid=ROOT_MAIL_ID,
            internal_user=internal.pw_name,
            internal_group=grp.getgrgid(internal.pw_gid).gr_name,
            login_user=login.pw_name,
            as_root=True,
        )
    # As a normal user every Dovecot process runs as that user; it needs a name.
    try:
        me = pwd.getpwuid(os.getuid())
        group = grp.getgrgid(os.getgid()).gr_name
    except KeyError:
        raise DovecotError(
            f"uid {os.getuid()} / gid {os.getgid()} has no name: Dovecot needs user and "
            "group names for default_internal_user"
        ) from None
    return _Identity(
        mail_uid=os.getuid(),
        mail_gid=os.getgid(),
        internal_user=me.pw_name,
        internal_group=group,
        login_user=me.pw_name,
        as_root=False,
    )


def _first_existing_user(*names: str) -> pwd.struct_passwd:
    for name in names:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise DovecotError(f"none of the users {names} exists")


def _config(
    *,
    base: Path,
    run_dir: Path,
    certs: Certificates,
    ident: _Identity,
    pop3_port: int,
    pop3s_port: int,
    imap_ports: tuple[int, int] | None,
    oauth2: _OAuth2 | None,
    max_connections: int,
) -> str:
    # %u: one passwd-file per user, see Dovecot._write_user for why.
    passwd = base / "users" / "%u"
    # Auth, anvil and log processes serve every login and pop3 process: their client
    # limit must cover both at full load or the master warns and may refuse clients.
    client_limit = max(1000, 4 * max_connections)
    lines = [
        "# Generated by tools/dovecot.py: test server on loopback, everything under one base.",
        f"base_dir = {run_dir}",
        f"state_dir = {base / 'state'}",
        f"instance_name = dovecot-tools-{hashlib.sha1(str(base).encode()).hexdigest()[:8]}",
        f"log_path = {base / 'dovecot.log'}",
        "protocols = pop3" + (" imap" if imap_ports else ""),
        f"listen = {HOST}",
        "ssl = yes",
        f"ssl_cert = <{certs.cert_file}",
        f"ssl_key = <{certs.key_file}",
        *([f"ssl_dh = <{DH_PARAMS}"] if DH_PARAMS.is_file() else []),
        "ssl_min_protocol = TLSv1.2",
        "disable_plaintext_auth = no",
        "auth_mechanisms = plain login" + (f" {' '.join(oauth2.mechanisms)}" if oauth2 else ""),
        # Failed logins are answered at once (at most 0.5 s: the auth process flushes
        # its failure queue every 500 ms) instead of after 2 s.
        "auth_failure_delay = 0",
        "auth_verbose = yes",
        "stats_writer_socket_path =",
        "first_valid_uid = 1",
        "first_valid_gid = 1",
        f"default_internal_user = {ident.internal_user}",
        f"default_internal_group = {ident.internal_group}",
        f"default_login_user = {ident.login_user}",
        f"default_process_limit = {max_connections}",
        f"default_client_limit = {client_limit}",
        "mail_location = maildir:~/Maildir",
        f"mail_max_userip_connections = {max_connections}",
        # UID and UIDVALIDITY: stable across sessions and independent of file names.
        "pop3_uidl_format = %08Xu%08Xv",
        # Per mechanism, Dovecot asks the passdbs in order: tokens go to the oauth2 one
        # only, passwords to the passwd-file only.
        *(
            [
                "passdb {",
                "  driver = oauth2",
                f"  mechanisms = {' '.join(oauth2.mechanisms)}",
                f"  args = {base / 'oauth2.conf.ext'}",
                "}",
            ]
            if oauth2
            else []
        ),
        "passdb {",
        "  driver = passwd-file",
        *(["  mechanisms = plain login"] if oauth2 else []),
        f"  args = scheme=PLAIN username_format=%u {passwd}",
        "}",
        "userdb {",
        "  driver = passwd-file",
        f"  args = {passwd}",
        "}",
        "service pop3-login {",
        "  inet_listener pop3 {",
        f"    address = {HOST}",
        f"    port = {pop3_port}",
        "  }",
        "  inet_listener pop3s {",
        f"    address = {HOST}",
        f"    port = {pop3s_port}",
        "    ssl = yes",
        "  }",
        f"  process_limit = {max_connections}",
        # chroot() needs root; a normal user runs the login process unconfined.
        *([] if ident.as_root else ["  chroot ="]),
        "}",
        # The documented way to switch off the per-IP auth penalty: after a failed login
        # anvil would hold back the next logins from 127.0.0.1 by 2 to 15 s (measured:
        # 4 s), auth_failure_delay = 0 notwithstanding. login_trusted_networks, said to
        # skip it, does not in 2.3.19. Costs one "Connection refused" error in the log.
        "service anvil {",
        "  unix_listener anvil-auth-penalty {",
        "    mode = 0",
        "  }",
        "}",
        "service pop3 {",
        f"  process_limit = {max_connections}",
        "}",
        "protocol pop3 {",
        f"  mail_max_userip_connections = {max_connections}",
        "}",
    ]
    if imap_ports:
        lines += [
            "service imap-login {",
            "  inet_listener imap {",
            f"    address = {HOST}",
            f"    port = {imap_ports[0]}",
            "  }",
            "  inet_listener imaps {",
            f"    address = {HOST}",
            f"    port = {imap_ports[1]}",
            "    ssl = yes",
            "  }",
            f"  process_limit = {max_connections}",
            *([] if ident.as_root else ["  chroot ="]),
            "}",
            "service imap {",
            f"  process_limit = {max_connections}",
            "}",
            "protocol imap {",
            f"  mail_max_userip_connections = {max_connections}",
            "}",
        ]
    if not ident.as_root:
        for service in ("anvil", "ipc", "old-stats"):
            lines += [f"service {service} {{", "  chroot =", "}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _OAuth2:
    introspection_url: str
    mechanisms: tuple[str, ...]
    scope: str | None


def _oauth2_file(oauth2: _OAuth2) -> str:
    """The oauth2 passdb's settings (see /work/shared/notes/dovecot.md)."""
    lines = [
        "introspection_mode = post",
        f"introspection_url = {oauth2.introspection_url}",
        "username_attribute = username",
        "active_attribute = active",
        "active_value = true",
    ]
    if oauth2.scope:
        # Dovecot refuses a token whose introspected "scope" lacks this one.
        lines.append(f"scope = {oauth2.scope}")
    return "\n".join(lines) + "\n"


def start_dovecot(
    base: Path,
    *,
    max_connections: int = 200,
    detach: bool = False,
    imap: bool | None = None,
    oauth2_introspection_url: str | None = None,
    oauth2_mechanisms: Sequence[str] = OAUTH2_MECHANISMS,
    oauth2_scope: str | None = None,
) -> Dovecot:
    """Configure and start Dovecot under `base`; return once POP3 answers "+OK".

    `imap`: listen for IMAP and IMAPS too (default: when dovecot-imapd is installed;
    True without it raises DovecotError). `oauth2_introspection_url`: accept the SASL
    mechanisms `oauth2_mechanisms` (any of "xoauth2", "oauthbearer") with tokens checked
    by that introspection endpoint, and, with `oauth2_scope`, only tokens carrying that
    scope; PLAIN and LOGIN with passwords keep working.

    Ports are picked free on 127.0.0.1 (retried if another process grabs one first).
    A server left running in the same `base` is stopped first. By default the master
    runs in the foreground as a child of this process, so `stop` can reap it; `detach`
    lets it daemonize instead, to outlive this process (the CLI's `start`). Raises
    DovecotNotFoundError when Dovecot is not installed and DovecotError, with the tail of
    the log, when it does not come up in time.

    As root, mail is accessed as uid 5000, so every parent of `base` must stay
    traversable (this function adds the x bits once). Avoid pytest's tmp_path for it:
    each pytest session that starts on the machine resets /tmp/pytest-of-<user> to 0700.
    """
    binary = find_dovecot()
    if binary is None:
        raise DovecotNotFoundError("dovecot is not installed (apt-get install dovecot-pop3d)")
    if max_connections < 1:
        raise ValueError("max_connections must be positive")
    if imap is None:
        imap = imap_available()
    elif imap and not imap_available():
        raise DovecotError(f"IMAP needs Debian's dovecot-imapd ({IMAP_BINARY} is missing)")
    oauth2 = None
    if oauth2_introspection_url is not None:
        mechanisms = tuple(m.lower() for m in oauth2_mechanisms)
        if not mechanisms or any(m not in OAUTH2_MECHANISMS for m in mechanisms):
            raise ValueError(f"oauth2_mechanisms must be some of {OAUTH2_MECHANISMS}")
        if _UNSAFE_PATH.search(oauth2_introspection_url) or (
            oauth2_scope is not None and _UNSAFE_PATH.search(oauth2_scope)
        ):
            raise ValueError("unsupported characters in the OAuth2 settings")
        oauth2 = _OAuth2(oauth2_introspection_url, mechanisms, oauth2_scope)
    base = Path(base).resolve()
    if _UNSAFE_PATH.search(str(base)):
        raise ValueError(f"unsupported characters in Dovecot base directory {base}")
    base.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(DovecotError):
        # A master left behind by an earlier run in this directory would keep the files.
        stale = Dovecot.from_state(base)
        if stale.is_running():
            stale.stop()

    ident = _identity()
    if ident.as_root:
        # Dovecot's unprivileged processes (auth as "dovecot", mail as uid 5000) must be
        # able to walk down to the passwd-files and the mailboxes; mkdtemp and pytest
        # make 0700 directories.
        _make_traversable(base)
    os.chmod(base, 0o755)
    for sub in ("mail", "state", "users"):
        (base / sub).mkdir(exist_ok=True)
        os.chmod(base / sub, 0o755)
    certs = make_certificates(base / "tls")

    run_dir = base / "run"
    if len(str(run_dir)) > _MAX_RUN_DIR_LEN:
        run_dir = Path(tempfile.mkdtemp(prefix="dovecot-run-"))
        os.chmod(run_dir, 0o755)

    # A master killed with SIGKILL leaves its pid file; a recycled pid must not make the
    # readiness check below believe that the new master is up, or that it died.
    (run_dir / "master.pid").unlink(missing_ok=True)
    log_file = base / "dovecot.log"
    last_error = ""
    if oauth2 is not None:
        (base / "oauth2.conf.ext").write_text(_oauth2_file(oauth2))
        # Read by the auth process, which does not run as root.
        os.chmod(base / "oauth2.conf.ext", 0o644)
    for _ in range(_START_ATTEMPTS):
        pop3_port, pop3s_port, imap_port, imaps_port = _free_ports(4)
        if not imap:
            imap_port = imaps_port = 0
        handle = Dovecot(
            host=HOST,
            pop3_port=pop3_port,
            pop3s_port=pop3s_port,
            ca_file=certs.ca_file,
            base=base,
            mail_uid=ident.mail_uid,
            mail_gid=ident.mail_gid,
            run_dir=run_dir,
            imap_port=imap_port,
            imaps_port=imaps_port,
        )
        handle.config_file.write_text(
            _config(
                base=base,
                run_dir=run_dir,
                certs=certs,
                ident=ident,
                pop3_port=pop3_port,
                pop3s_port=pop3s_port,
                imap_ports=(imap_port, imaps_port) if imap else None,
                oauth2=oauth2,
                max_connections=max_connections,
            )
        )
        log_offset = log_file.stat().st_size if log_file.exists() else 0
        command = [str(binary), *([] if detach else ["-F"]), "-c", str(handle.config_file)]
        # The master keeps the stdio it was given: redirect all three, or a caller that
        # captures output (subprocess.run(capture_output=True)) waits for EOF forever.
        with open(log_file, "ab") as log:
            if detach:
                returncode: int | None = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    timeout=_START_TIMEOUT,
                    check=False,
                    start_new_session=True,
                ).returncode
            else:
                handle._process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    # Its own session: a Ctrl-C meant for the tests does not hit it.
                    start_new_session=True,
                )
                returncode = None
        failure: DovecotError | None = None
        if returncode in (0, None):
            try:
                _wait_until_ready(handle)
            except DovecotError as exc:
                failure = exc
                _abort(handle)
            else:
                break
        last_error = _read_from(log_file, log_offset)
        if "Address already in use" in last_error:
            continue  # another process took a port between probing and binding
        raise failure or DovecotError(
            f"dovecot exited with status {returncode}\n{_tail(log_file, 40)}"
        )
    else:
        raise DovecotError(f"could not bind free ports after {_START_ATTEMPTS} tries\n{last_error}")
    (base / STATE_FILE).write_text(
        json.dumps(
            {
                "host": handle.host,
                "pop3_port": handle.pop3_port,
                "pop3s_port": handle.pop3s_port,
                "imap_port": handle.imap_port,
                "imaps_port": handle.imaps_port,
                "ca_file": str(handle.ca_file),
                "base": str(handle.base),
                "mail_uid": handle.mail_uid,
                "mail_gid": handle.mail_gid,
                "run_dir": str(handle.run_dir),
            },
            indent=2,
        )
    )
    return handle


def _wait_until_ready(handle: Dovecot) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    problem = "master.pid never appeared"
    dead_since: float | None = None
    while time.monotonic() < deadline:
        if handle._process is not None and handle._process.poll() is not None:
            raise DovecotError(
                f"dovecot exited with status {handle._process.returncode}\n{handle.log_tail()}"
            )
        if handle._process is None and handle.pid() is None:
            # A detached master is known by its pid file only. It writes the file in place
            # ("PID\n"): an empty or unterminated file is one being written, and a complete
            # one whose process looks gone must stay so for a while before we believe it
            # (its /proc entry can look foreign for a moment on a busy machine). A master we
            # started and still hold is judged by its exit status above, and by its port.
            pid_file = handle.run_dir / "master.pid"
            if pid_file.exists() and pid_file.read_text().endswith("\n"):
                dead_since = dead_since or time.monotonic()
                if time.monotonic() - dead_since > 2.0:
                    raise DovecotError(f"the Dovecot master died\n{handle.log_tail()}")
            time.sleep(0.05)
            continue
        try:
            with socket.create_connection((handle.host, handle.pop3_port), timeout=2) as conn:
                greeting = _read_line(conn)
                if greeting.startswith(b"+OK"):
                    # The master binds every listener before it starts any login
                    # process, so the POP3S port is open too: no need to probe it.
                    conn.sendall(b"QUIT\r\n")
                    _read_line(conn)
                    return
                else:
                    problem = f"unexpected greeting {greeting!r}"
        except OSError as exc:
            problem = f"POP3 port not answering: {exc}"
        time.sleep(0.05)
    raise DovecotError(
        f"Dovecot did not become ready within {_START_TIMEOUT:.0f} s ({problem})\n"
        f"{handle.log_tail()}"
    )


def _abort(handle: Dovecot) -> None:
    """Get rid of a master that did not come up, whatever state it is in."""
    if handle._process is not None and handle._process.poll() is None:
        handle._process.kill()
    with contextlib.suppress(DovecotError):
        handle.stop()
    if handle._process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            handle._process.wait(timeout=_STOP_TIMEOUT)


def _read_line(conn: socket.socket, limit: int = 512) -> bytes:
    """Read up to and including the first LF (or `limit` bytes, or until EOF)."""
    data = b""
    while b"\n" not in data and len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------- helpers


def _check_user_name(name: str) -> None:
    if not _USER_NAME.match(name):
        raise ValueError(f"unsupported mailbox name {name!r}")


def _check_folder_name(folder: str) -> None:
    if folder.upper() == "INBOX" or not _FOLDER_NAME.match(folder):
        raise ValueError(f"unsupported folder name {folder!r}")


def _tab_rows(output: str) -> list[dict[str, str]]:
    """doveadm's "-f tab" output: a header line of field names, then one line per row."""
    lines = output.rstrip("\n").split("\n")
    if not lines or not lines[0]:
        return []
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=False)) for line in lines[1:] if line]


def _check_password(password: str) -> None:
    # ":" separates passwd-file fields and a line end would start a new entry.
    if any(c in password for c in ":\r\n\0"):
        raise ValueError("passwords cannot contain ':' or line ends")


def _read_passwd_line(path: Path) -> str:
    """The password stored in a one-user passwd-file."""
    fields = path.read_text().split(":", 2)
    return fields[1].removeprefix("{PLAIN}") if len(fields) > 1 else ""


def _make_traversable(base: Path) -> None:
    for directory in (base, *base.parents):
        mode = stat.S_IMODE(directory.stat().st_mode)
        wanted = mode | stat.S_IXGRP | stat.S_IXOTH
        if wanted != mode:
            os.chmod(directory, wanted)


def _free_ports(count: int) -> list[int]:
    # All sockets stay open until every port is known, so the ports are distinct.
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may contain spaces: split after its closing ")".
    return text[text.rindex(")") + 2 :].split()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    # A daemon reparented to a PID 1 that does not reap stays a zombie: that is dead.
    return not (fields is not None and fields[0] == "Z")


def _is_dovecot(pid: int) -> bool:
    # Guards SIGKILL against a pid reused by an unrelated process.
    try:
        return b"dovecot" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not Path("/proc").is_dir()


def _kill_all(pids: Iterable[int]) -> None:
    """SIGKILL each process of `pids` that is still alive and still a Dovecot process."""
    for pid in pids:
        if _alive(pid) and _is_dovecot(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _is_log_process(pid: int) -> bool:
    # The log process must outlive the others so their last messages reach the log.
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/log")
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    parents: dict[int, int] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None:
                parents[int(entry.name)] = int(fields[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m tools.dovecot`."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.dovecot", description="Run a real Dovecot POP3 server on loopback."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start Dovecot in DIR, print a JSON line")
    start.add_argument("dir", type=Path)
    start.add_argument("--max-connections", type=int, default=200)
    stop = commands.add_parser("stop", help="stop the Dovecot started in DIR")
    stop.add_argument("dir", type=Path)
    add = commands.add_parser("add-user", help="add a mailbox or change its password")
    add.add_argument("dir", type=Path)
    add.add_argument("name")
    add.add_argument("password")
    deliver = commands.add_parser("deliver", help="deliver a message file (- for stdin)")
    deliver.add_argument("dir", type=Path)
    deliver.add_argument("user")
    deliver.add_argument("file")
    deliver.add_argument("--folder", help="folder to deliver into (created if missing)")
    count = commands.add_parser("count", help="print the number of messages of a mailbox")
    count.add_argument("dir", type=Path)
    count.add_argument("user")
    args = parser.parse_args(argv)

    try:
        if args.command == "start":
            server = start_dovecot(args.dir, max_connections=args.max_connections, detach=True)
            print(json.dumps(server.to_json()), flush=True)
        elif args.command == "stop":
            Dovecot.from_state(args.dir).stop()
        elif args.command == "add-user":
            Dovecot.from_state(args.dir).add_user(args.name, args.password)
        elif args.command == "deliver":
            raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
            print(Dovecot.from_state(args.dir).deliver(args.user, raw, args.folder))
        elif args.command == "count":
            print(Dovecot.from_state(args.dir).count(args.user))
    except KeyError as exc:
        print(f"error: no such mailbox: {exc.args[0]}", file=sys.stderr)
        return 1
    except (DovecotError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
