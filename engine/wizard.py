"""``mailintegration init``: one mailbox file from a provider's preset and a few answers.

The answers come from the options first; on a terminal the wizard asks for the rest, and
without one (or with ``--non-interactive``) a missing answer is an error naming its option.
Every answer is hostile input until checked here: the team and the address become a folder
and a file name only through :func:`safe_component`, and reach the XML only escaped.

What is written, nothing left half done: the secret in a file of mode 0600 (never inline),
then the mailbox file, first under a temporary name, loaded back by :func:`load_mailbox`
(the daemon's own reader) and only then renamed to ``<team>/<name>.xml``. If it does not
load, both are removed and the error says why.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from xml.sax.saxutils import escape

from engine.config import MailboxConfig, load_mailbox
from engine.errors import ConfigError

__all__ = ["PRESETS", "Answers", "Preset", "collect", "mailbox_text", "safe_component", "write"]


@dataclass(frozen=True)
class Preset:
    """What a provider fixes: its servers per protocol, TLS, and how it signs in."""

    label: str
    servers: dict[str, tuple[str, int]]
    oauth_provider: str | None = None
    flow: str | None = None


PRESETS: Final[dict[str, Preset]] = {
    "m365": Preset(
        "Microsoft 365 (Exchange Online), OAuth2 XOAUTH2",
        {"imap": ("outlook.office365.com", 993), "pop3": ("outlook.office365.com", 995)},
        "microsoft",
        "clientCredentials",
    ),
    "google": Preset(
        "Google Workspace (Gmail), OAuth2 XOAUTH2",
        {"imap": ("imap.gmail.com", 993), "pop3": ("pop.gmail.com", 995)},
        "google",
        "refreshToken",
    ),
    "imap": Preset("any IMAP server", {}),
    "pop3": Preset("any POP3 server", {}),
}

PROCESSORS: Final = {
    "incident": "Octopus.MailIntegration.Processors.EndUserIncidentMailMessageProcessor, "
    "Octopus.MailIntegration",
    "event": "Octopus.MailIntegration.Processors.EventMailMessageProcessor, "
    "Octopus.MailIntegration",
    "service-request": "ESI.Octopus.MailIntegration.EndUserNewSRMailMessageProcessor",
}

_DEFAULT_PORTS: Final = {("imap", True): 993, ("imap", False): 143}
_DEFAULT_PORTS_POP3: Final = {("pop3", True): 995, ("pop3", False): 110}
_MAX_TRIES: Final = 5
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE_IN_NAME: Final = re.compile(r"[^\w.@+-]")


def safe_component(text: str, what: str) -> str:
    """``text`` as one path component: letters, digits and ``_.@+-`` kept, anything else
    (a slash, a backslash, a NUL, a space) made ``_``; no leading dot (a hidden or parent
    folder, and discovery skips dot folders); at most 100 characters."""
    cleaned = _UNSAFE_IN_NAME.sub("_", text).lstrip(".")[:100]
    if not cleaned.strip("_"):
        raise ConfigError(f"the {what} {text!r} gives no usable file name")
    return cleaned


@dataclass
class Answers:
    """Everything the mailbox file is written from."""

    provider: str
    protocol: str
    address: str
    user_name: str
    host: str
    port: int
    tls: str  # ssl, starttls or none
    auth: str  # password or oauth2
    team: str
    processor: str
    fallback_user: str | None
    fallback_site: str | None
    name: str
    ca_file: Path | None = None
    client_id: str | None = None
    tenant: str | None = None
    token_endpoint: str | None = None
    scope: str | None = None

    @property
    def oauth_provider(self) -> str | None:
        if self.auth != "oauth2":
            return None
        return PRESETS[self.provider].oauth_provider or "generic"

    @property
    def flow(self) -> str | None:
        if self.auth != "oauth2":
            return None
        return PRESETS[self.provider].flow or "clientCredentials"


class _Asker:
    """Options first; then the terminal, if allowed; else an error naming the option."""

    def __init__(self, args: argparse.Namespace, interactive: bool) -> None:
        self.args = args
        self.interactive = interactive

    def __call__(
        self,
        key: str,
        question: str,
        *,
        default: str | None = None,
        choices: tuple[str, ...] = (),
        optional: bool = False,
    ) -> str | None:
        given = getattr(self.args, key, None)
        if given is not None:
            return _checked(key, str(given), choices)
        if not self.interactive:
            if default is not None or optional:
                return default
            raise ConfigError(
                f"--{key.replace('_', '-')} is needed: give it, or run init on a terminal"
            )
        hint = f" [{'/'.join(choices)}]" if choices else ""
        shown = f" ({default})" if default else " (none)" if optional else ""
        for _ in range(_MAX_TRIES):
            try:
                answer = input(f"{question}{hint}{shown}: ").strip()
            except EOFError:
                raise ConfigError("init: no answer (end of input)") from None
            if not answer:
                if default is not None or optional:
                    return default
                print("  an answer is needed")
                continue
            try:
                return _checked(key, answer, choices)
            except ConfigError as exc:
                print(f"  {exc}")
        raise ConfigError(f"init: no valid answer for {question!r}")

    def required(self, key: str, question: str, **kw: str | tuple[str, ...]) -> str:
        value = self(key, question, **kw)  # type: ignore[arg-type]
        assert value is not None
        return value


def _checked(key: str, value: str, choices: tuple[str, ...]) -> str:
    if choices and value not in choices:
        raise ConfigError(f"{value!r} is not one of {', '.join(choices)}")
    if _CONTROL.search(value):
        raise ConfigError(f"--{key.replace('_', '-')} must not contain control characters")
    if key in {"address", "host", "client_id", "tenant", "token_endpoint", "user_name"} and (
        not value or any(c.isspace() for c in value)
    ):
        raise ConfigError(f"--{key.replace('_', '-')} must not contain spaces")
    if key == "address" and not re.fullmatch(r"[^@]+@[^@]+\.[^@]+", value):
        raise ConfigError(f"{value!r} is not a mail address")
    if key == "token_endpoint" and not value.lower().startswith("https://"):
        raise ConfigError("the token endpoint must be an https:// URL")
    if key == "port" and not (value.isdigit() and 0 < int(value) < 65536):
        raise ConfigError(f"{value!r} is not a port number")
    return value


def collect(args: argparse.Namespace, interactive: bool) -> Answers:
    """Every answer, from the options and, where allowed, the terminal."""
    ask = _Asker(args, interactive)
    provider = ask.required(
        "provider", "Provider: m365, google, imap or pop3", choices=tuple(PRESETS)
    )
    preset = PRESETS[provider]
    if preset.servers:
        protocol = ask.required("protocol", "Protocol", choices=("imap", "pop3"), default="imap")
    else:
        protocol = provider
    address = ask.required("address", "Mailbox address")
    user_name = ask.required("user_name", "Sign-in name", default=address)
    ca_file: Path | None = None
    if preset.servers:
        host, port = preset.servers[protocol]
        tls, auth = "ssl", "oauth2"
    else:
        host = ask.required("host", "Server host name")
        tls = ask.required("tls", "TLS", choices=("ssl", "starttls", "none"), default="ssl")
        default_port = (_DEFAULT_PORTS | _DEFAULT_PORTS_POP3)[(protocol, tls == "ssl")]
        port = int(ask.required("port", "Port", default=str(default_port)))
        auth = ask.required(
            "auth", "Sign in with", choices=("password", "oauth2"), default="password"
        )
        ca = ask(
            "ca_file", "CA file to verify the server with (empty: the system's)", optional=True
        )
        ca_file = Path(ca).resolve() if ca else None
        if auth == "oauth2" and tls == "none":
            raise ConfigError("OAuth2 needs TLS (ssl or starttls): a token is worth a password")
    answers = Answers(
        provider=provider, protocol=protocol, address=address, user_name=user_name,
        host=host, port=port, tls=tls, auth=auth, team="", processor="", fallback_user=None,
        fallback_site=None, name="", ca_file=ca_file,
    )  # fmt: skip
    if auth == "oauth2":
        if provider == "m365":
            answers.tenant = ask.required("tenant", "Tenant (directory) name or id")
        answers.client_id = ask.required("client_id", "Application (client) id")
        if preset.oauth_provider is None:
            answers.token_endpoint = ask.required("token_endpoint", "Token endpoint (https://)")
            answers.scope = ask.required("scope", "Scope")
    answers.team = ask.required("team", "Team (number or name)")
    answers.processor = ask.required(
        "processor", "Mail becomes", choices=tuple(PROCESSORS), default="incident"
    )
    answers.fallback_user = ask("fallback_user", "Fallback user (unknown senders)", optional=True)
    answers.fallback_site = ask("fallback_site", "Fallback site", optional=True)
    answers.name = safe_component(getattr(args, "name", None) or address, "mailbox name")
    return answers


def _el(name: str, value: object, indent: str = "    ") -> str:
    return "" if value is None else f"{indent}<{name}>{escape(str(value))}</{name}>\n"


def _own_address(a: Answers) -> str:
    """``mailHandling/ownAddresses`` when the sign-in name is not the address people write
    to: without it, the desk's own address would be kept as a watcher of every request."""
    if a.address.lower() == a.user_name.lower():
        return ""  # the user name is the address: the engine knows it already
    return (
        "  <!-- This desk's own address: never kept as a watcher. -->\n"
        "  <mailHandling>\n" + _el("ownAddresses", a.address) + "  </mailHandling>\n"
    )


def mailbox_text(a: Answers, secret_ref: str) -> str:
    """The commented mailbox file. Values are escaped; comments are fixed text only (a
    ``--`` of an answer would end a comment)."""
    tls = {
        "ssl": _el("useSsl", "true"),
        "starttls": _el("useSsl", "false") + _el("startTls", "true"),
        "none": _el("useSsl", "false"),
    }[a.tls]
    if a.auth == "password":
        sign_in = (
            "    <!-- The password is read from this file (relative to this folder); keep it\n"
            "         readable by the engine's user only (mode 0600), and out of version\n"
            "         control. -->\n" + _el("passwordFile", secret_ref)
        )
    else:
        sign_in = (
            "    <!-- OAuth2: the engine gets its own tokens; the client secret is read from\n"
            "         clientSecretFile (mode 0600, out of version control). -->\n"
            "    <oauth2>\n"
            + _el("provider", a.oauth_provider, "      ")
            + _el("flow", a.flow, "      ")
            + _el("tenant", a.tenant, "      ")
            + _el("clientId", a.client_id, "      ")
            + _el("clientSecretFile", secret_ref, "      ")
            + _el("tokenEndpoint", a.token_endpoint, "      ")
            + _el("scope", a.scope, "      ")
            + _el("caFile", a.ca_file, "      ")
            + "    </oauth2>\n"
        )
    preset = PRESETS[a.provider]
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        "<!-- Written by mailintegration init; the elements are documented in\n"
        "     schemas/mailintegration.xsd. Check it with: mailintegration config validate -->\n"
        "<mailIntegration>\n"
        "  <!-- What a message becomes: incident, event or service request. -->\n"
        + _el("messageProcessorTypeName", PROCESSORS[a.processor], "  ")
        + "  <server>\n"
        + f"    <!-- {escape(preset.label)}. -->\n"
        + _el("protocol", a.protocol)
        + _el("serverName", a.host)
        + _el("port", a.port)
        + "    <!-- TLS: useSsl is TLS from the first byte, startTls upgrades a clear\n"
        "         connection; certificates are always verified. -->\n"
        + tls
        + _el("caFile", a.ca_file)
        + _el("userName", a.user_name)
        + sign_in
        + "  </server>\n"
        + "  <!-- The team its requests go to, and who and where a request from an unknown\n"
        "       sender is filed under. -->\n"
        + _el("team", a.team, "  ")
        + _el("incidentFallbackUserLogon", a.fallback_user, "  ")
        + _el("incidentFallbackSiteName", a.fallback_site, "  ")
        + _own_address(a)
        + "</mailIntegration>\n"
    )


def _private_enough(path: Path) -> None:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"the secret file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"the secret file {path} can be read by others (mode {st.st_mode & 0o777:o}): "
            f"run chmod 600 {path}"
        )


def read_secret(a: Answers, interactive: bool) -> str:
    """The password or client secret: asked without echo, or the first line of stdin."""
    what = "password" if a.auth == "password" else "client secret"
    if interactive:
        for _ in range(_MAX_TRIES):
            value = getpass.getpass(f"The {what} (not shown): ")
            if value:
                return value
            print(f"  the {what} must not be empty")
        raise ConfigError(f"init: no {what} given")
    if sys.stdin is None or sys.stdin.isatty():
        raise ConfigError(f"the {what} is needed: --secret-file FILE, or its first line on stdin")
    line = sys.stdin.readline(65_536).rstrip("\r\n")
    if not line:
        raise ConfigError(f"the {what} is needed: stdin gave an empty line")
    return line


def write(
    a: Answers, config_dir: Path, secret_file: Path | None, *, force: bool, interactive: bool
) -> tuple[Path, MailboxConfig]:
    """Write the secret (if new) and the mailbox file; returns the file and what it loads as."""
    folder = config_dir / safe_component(a.team, "team")
    target = folder / f"{a.name}.xml"
    if (target.exists() or target.is_symlink()) and not force:
        raise ConfigError(f"{target} exists: give --force to replace it")
    new_secret = secret_file is None or not secret_file.exists()
    secret_path = secret_file if secret_file is not None else folder / f"{a.name}.secret"
    if not new_secret:
        _private_enough(secret_path)
        secret = None
    else:
        secret = read_secret(a, interactive)
    folder.mkdir(parents=True, exist_ok=True)
    resolved = secret_path.resolve()
    ref = resolved.name if resolved.parent == folder.resolve() else str(resolved)
    tmp = folder / f".{a.name}.xml.init"
    written: list[Path] = []
    try:
        if secret is not None:
            _write_private(secret_path, secret + "\n")
            written.append(secret_path)
        _write_private(tmp, mailbox_text(a, ref))
        written.append(tmp)
        cfg = load_mailbox(tmp, name=f"{folder.name}/{a.name}")
        os.replace(tmp, target)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return target, cfg


def _write_private(path: Path, text: str) -> None:
    """A new file of mode 0600 whatever the umask (a replaced one loses its old mode)."""
    try:
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or type(exc).__name__}") from None


def registration_steps(a: Answers, target: Path) -> list[str]:
    """What the admin does at the provider before the engine can sign in."""
    if a.auth != "oauth2":
        return []
    proto = "IMAP" if a.protocol == "imap" else "POP"
    if a.provider == "m365":
        return [
            "Register the application in Microsoft Entra ID (App registrations > New):",
            f"  1. API permissions > APIs my organization uses > Office 365 Exchange Online >"
            f" Application permissions > {proto}.AccessAsApp; grant admin consent.",
            "  2. Certificates & secrets > New client secret; put its value in the secret file.",
            "  3. In Exchange Online PowerShell: New-ServicePrincipal -AppId <client id>"
            " -ObjectId <enterprise app object id>, then Add-MailboxPermission -Identity"
            f" {a.address} -User <service principal id> -AccessRights FullAccess.",
            f"  4. Then: mailintegration check --config {target}",
        ]
    if a.provider == "google":
        return [
            "Create the OAuth client in the Google Cloud console:",
            "  1. APIs & Services > OAuth consent screen: internal; add the scope"
            " https://mail.google.com/.",
            "  2. Credentials > Create credentials > OAuth client ID > TVs and Limited Input"
            " devices; put its client secret in the secret file.",
            f"  3. Enable {proto} for {a.address} in Gmail's settings (Forwarding and POP/IMAP).",
            f"  4. Sign in once as {a.address}: mailintegration oauth login --config {target}",
            f"  5. Then: mailintegration check --config {target}",
        ]
    return [
        "Register a confidential client (client credentials) at your authorization server,",
        f"  allowed the scope {a.scope} for {a.user_name}; its secret is in the secret file.",
    ]
