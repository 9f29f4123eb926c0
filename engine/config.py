"""Mailbox and engine settings: frozen dataclasses built only from XML validated by our XSD.

A mailbox file is in the Octopus "MailIntegration" format (``schemas/mailintegration.xsd``
documents every element). :func:`load_mailbox` reads one safely: no DTD, no entity expansion, no
schema location hint is ever followed; element names are accepted in any case and the HTML
named entities of the original documentation (``&eacute;``) work. Every problem is reported as
one :class:`~engine.errors.ConfigError` naming the file, line and element, and never containing
a password.

:func:`mailbox_copy` writes a loaded mailbox back as XML, rebuilt from the model with every
password masked: what an outage event attaches (never the file itself, which may be anything
once it fails to load). :func:`redact_config` gives a file's text with its passwords masked,
for support bundles.
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime
import functools
import html
import html.entities
import os
import re
import stat
import string
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from lxml import etree

from engine import config_handling
from engine.config_handling import Handling
from engine.config_rules import CustomRecogniser, Processing, Rule, build, rules_of
from engine.errors import ConfigError
from engine.keys import account_key

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import xmlschema
    from xmlschema import XMLSchemaValidationError

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_SUBJECT_PATTERN",
    "MAX_COPY_BYTES",
    "REPLY_PLACEHOLDERS",
    "SCHEMA_PATH",
    "CustomRecogniser",
    "DirectoryNeed",
    "MailboxConfig",
    "OAuth2Config",
    "Processing",
    "ProcessorKind",
    "ReplyTemplate",
    "Rule",
    "ServerConfig",
    "SmtpConfig",
    "directory_needs",
    "load_mailbox",
    "mailbox_copy",
    "redact_config",
    "secret_values",
]

ProcessorKind = Literal["incident", "event", "service-request"]
GatewayKind = Literal["pop3", "imap"]
AfterProcessing = Literal["delete", "move", "keep"]


OAuthProvider = Literal["microsoft", "google", "generic"]
OAuthFlow = Literal["clientCredentials", "refreshToken"]

# Each provider's endpoints and default scopes; {tenant} is filled in.
_MS_LOGIN: Final = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
_GOOGLE_TOKEN: Final = "https://oauth2.googleapis.com/token"
_GOOGLE_DEVICE: Final = "https://oauth2.googleapis.com/device/code"
_DEFAULT_SCOPES: Final[dict[tuple[str, str], str]] = {
    ("microsoft", "clientCredentials"): "https://outlook.office365.com/.default",
    ("microsoft", "refreshToken"): (
        "https://outlook.office.com/POP.AccessAsUser.All "
        "https://outlook.office.com/SMTP.Send offline_access"
    ),
    ("google", "clientCredentials"): "https://mail.google.com/",
    ("google", "refreshToken"): "https://mail.google.com/",
}


@dataclass(frozen=True)
class OAuth2Config:
    """How a mailbox signs in with OAuth2 (the XML's ``server/oauth2``): the provider, the
    flow, the app, and where its secret comes from. Endpoints and scopes are resolved here,
    the provider's defaults filled in."""

    provider: OAuthProvider
    flow: OAuthFlow
    client_id: str
    token_endpoint: str
    device_endpoint: str | None
    scopes: tuple[str, ...]
    tenant: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    # Where the secret came from (names, not secrets).
    client_secret_file: str | None = None
    client_secret_env: str | None = None
    certificate_file: Path | None = None
    client_secret_expires: datetime.date | None = None
    warn_days: int = 14
    ca_file: Path | None = None

    @property
    def authority(self) -> str:
        """msal's authority: the token endpoint without ``/oauth2/v2.0/token``."""
        return self.token_endpoint.rsplit("/oauth2/", 1)[0]

    @property
    def custom_authority(self) -> bool:
        """The token endpoint is not Microsoft's own (a test server, a sovereign cloud)."""
        return not self.token_endpoint.startswith("https://login.microsoftonline.com/")


@dataclass(frozen=True)
class ServerConfig:
    """The POP3 or IMAP account of one mailbox (the XML's ``server`` element)."""

    gateway: GatewayKind
    host: str
    port: int
    use_ssl: bool
    starttls: bool
    user_name: str
    password: str = field(repr=False)
    ca_file: Path | None = None
    tls_verify: bool = True
    timeout: float = 30.0
    # Where the password came from, when not written in the file: passwordFile as written
    # (relative to the file's folder) or the passwordEnv variable's name. Not secrets.
    password_file: str | None = None
    password_env: str | None = None
    # The ledger's name for this account (``accountId``); None: user and normalized host.
    account_id: str | None = None
    # The whole session's deadline (``sessionTimeoutSeconds``); None: derived from the bytes
    # to fetch at ``min_rate`` bytes a second (see engine.gateways.session_seconds).
    session_timeout: float | None = None
    min_rate: int = 32 * 1024
    # Sign in with OAuth2 instead of ``password`` (which is then empty).
    oauth2: OAuth2Config | None = None
    # IMAP: the folders read, what happens to a message once committed (``afterProcessing``,
    # POP3: always delete), where move puts it, where failure events' messages go, and the
    # daemon's IDLE (renewed every ``idle_renew`` s, a NOOP every ``idle_keepalive`` s).
    folders: tuple[str, ...] = ("INBOX",)
    after_processing: AfterProcessing = "delete"
    move_folder: str | None = None
    failed_folder: str | None = None
    idle: bool = True
    idle_renew: float = 1500.0
    idle_keepalive: float = 300.0


@dataclass(frozen=True)
class SmtpConfig:
    """Where automatic replies are sent from."""

    host: str
    port: int
    sender: str
    use_ssl: bool = False
    starttls: bool = False
    user_name: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    tls_verify: bool = True
    timeout: float = 30.0
    password_file: str | None = None
    password_env: str | None = None
    # Sign in with the mailbox's OAuth2 token (server/oauth2) as user_name; the tokens are
    # the mailbox's own (the token store's record of this account).
    oauth2: OAuth2Config | None = None
    oauth_account: str | None = None


@dataclass(frozen=True)
class ReplyTemplate:
    """The automatic reply to a message that created a request.

    Both texts are ``str.format`` templates using only :data:`REPLY_PLACEHOLDERS`, checked at
    load time.
    """

    subject: str
    body: str


@dataclass(frozen=True)
class MailboxConfig:
    """One mailbox, as one XML file describes it."""

    name: str
    path: Path
    processor: ProcessorKind
    server: ServerConfig
    team: str | None
    fallback_site: str | None
    fallback_user: str | None
    group: str | None
    assignee: str | None
    source: str | None
    ignored_attachments: tuple[str, ...]
    create_new_requests: bool
    include_raw_message: bool
    subject_pattern: re.Pattern[str]
    smtp: SmtpConfig | None
    reply_template: ReplyTemplate | None
    max_message_bytes: int
    poll_interval: float | None
    max_attachment_bytes: int | None = None
    max_attachments_bytes: int | None = None
    # Correlation, service requests, priority, routing rules, foreign numbers (issue 17).
    processing: Processing = field(default_factory=Processing)
    # Own addresses, watchers, flood limit, several mailboxes (engine.config_handling).
    handling: Handling = field(default_factory=Handling)

    @property
    def account(self) -> str:
        """The POP3 account: what UIDLs are unique within, so the ledger's key. Without
        ``accountId``, the user and the normalized host, without the port (engine.keys)."""
        s = self.server
        return account_key(s.user_name, s.host, s.account_id)


@dataclass(frozen=True)
class DirectoryNeed:
    """A directory entry a mailbox names: the element naming it, the directory table, the
    name (None for a team: the only team, if there is just one), and the problem to report
    when the directory lacks it."""

    label: str
    table: Literal["teams", "users", "sites", "groups", "sources", "priorities"]
    name: str | None
    missing: str


def directory_needs(cfg: MailboxConfig, default_team: str | None = None) -> list[DirectoryNeed]:
    """Every directory entry ``cfg`` needs: what the writer checks before a session, and
    what ``config validate`` lists."""
    team = cfg.team or default_team
    needs = [
        DirectoryNeed(
            "team",
            "teams",
            team,
            f"team {team or '(none given, and not exactly one)'} is not in the directory",
        )
    ]
    for label, value in (
        ("incidentFallbackUserLogon", cfg.fallback_user),
        ("assignee", cfg.assignee),
    ):
        if value:
            needs.append(DirectoryNeed(label, "users", value, f"{label} {value!r} is not a user"))
    group_label = "group" if cfg.processor == "event" else "incidentGroup"
    for table, label, value in (
        ("sites", "incidentFallbackSiteName", cfg.fallback_site),
        ("groups", group_label, cfg.group),
        ("sources", "incidentSource", cfg.source),
    ):
        if value:
            needs.append(
                DirectoryNeed(label, table, value, f"{label} {value!r} is not in the directory")  # type: ignore[arg-type]
            )
    p = cfg.processing
    named: list[tuple[str, str, str | None]] = [("incidentPriority", "priorities", p.priority)]
    if any(rule.priority_from_headers for rule in p.rules):
        named += [
            (f"headerPriorities {level}", "priorities", getattr(p.header_priorities, level))
            for level in ("high", "normal", "low")
        ]
    for rule in p.rules:
        where = f"rule {rule.name!r} ({rule.where})"
        named += [
            (f"{where} setGroup", "groups", rule.group),
            (f"{where} setPriority", "priorities", rule.priority),
            (f"{where} setSource", "sources", rule.source),
            (f"{where} setAssignee", "users", rule.assignee),
            (f"{where} setTeam", "teams", rule.team),
        ]
    needs += [
        DirectoryNeed(label, table, value, f"{label}: {value!r} is not in the directory")  # type: ignore[arg-type]
        for label, table, value in named
        if value
    ]
    return needs


# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

# engine/schemas links to the top-level schemas/ folder, so the XSD ships inside the package
# and this path holds for a checkout, an editable install and a wheel alike.
SCHEMA_PATH: Final = Path(__file__).resolve().parent / "schemas" / "mailintegration.xsd"
"""Our schema: the only one a mailbox file is ever validated against."""

_ROOT: Final = "mailIntegration"
_XS: Final = "{http://www.w3.org/2001/XMLSchema}"

DEFAULT_SUBJECT_PATTERN: Final = re.compile(
    # The communication type in square brackets ("[Incident]", "[Service Request]"), then an
    # optional team or database name ("IT", "OCTOPUS_PROD"), then the request number with an
    # optional "#". Brackets are excluded from the team so that "[EXT] [Incident] #12" skips
    # the first tag instead of stopping there; "\b" keeps "#12abc" from reading as request 12.
    r"\[(?P<type>[^\[\]\r\n]+)\]\s*"
    r"(?:(?P<team>[^\s#\[\]0-9][^\s#\[\]]*)\s+)?"
    r"#?(?P<number>[0-9]+)\b"
)
"""Finds a request reference anywhere in a subject (use ``search``); groups type, team, number."""

DEFAULT_MAX_MESSAGE_BYTES: Final = 26_214_400
"""``maxMessageBytes`` when the file does not give it (25 MiB)."""

REPLY_PLACEHOLDERS: Final = ("subject", "sender", "mailbox")
"""The only names a reply template may use, as ``{subject}``, ``{sender}``, ``{mailbox}``."""

_REDACTED: Final = "********"
_MAX_CONFIG_BYTES: Final = 1_048_576
_MAX_SECRET_FILE_BYTES: Final = 65_536
_PASSWORD_SOURCES: Final = ("password", "passwordFile", "passwordEnv")
_IMAP_ONLY: Final = (
    "folders",
    "moveToFolder",
    "failedFolder",
    "idle",
    "idleRenewSeconds",
    "idleKeepAliveSeconds",
)

_PROCESSORS: Final[dict[str, ProcessorKind]] = {
    "enduserincidentmailmessageprocessor": "incident",
    "eventmailmessageprocessor": "event",
    "endusernewsrmailmessageprocessor": "service-request",
}
_VALID_PROCESSORS: Final = (
    "Octopus.MailIntegration.Processors.EndUserIncidentMailMessageProcessor (incidents) or "
    "Octopus.MailIntegration.Processors.EventMailMessageProcessor (events), "
    "ESI.Octopus.MailIntegration.EndUserNewSRMailMessageProcessor (service requests), optionally "
    'followed by ", Octopus.MailIntegration"'
)
_POP3_GATEWAYS: Final = frozenset({"sidepopmailboxgateway", "mailkitmailboxgateway"})
_IMAP_GATEWAYS: Final = frozenset({"imapmailboxgateway", "mailkitimapmailboxgateway"})
_VALID_GATEWAYS: Final = (
    "Octopus.MailIntegration.Gateways.SidePopMailboxGateway, "
    "Octopus.MailIntegration.Gateways.MailKitMailboxGateway (both POP3), or pop3; "
    "Octopus.MailIntegration.Gateways.ImapMailboxGateway, "
    "Octopus.MailIntegration.Gateways.MailKitImapMailboxGateway (both IMAP), or imap"
)
_GATEWAY_TYPE_NAMES: Final[dict[str, str]] = {
    "pop3": "Octopus.MailIntegration.Gateways.SidePopMailboxGateway, Octopus.MailIntegration",
    "imap": "Octopus.MailIntegration.Gateways.ImapMailboxGateway, Octopus.MailIntegration",
}

# Encodings we decode ourselves. All are ASCII-compatible (or UTF-16 with a byte-order mark), so
# after decoding the markup is plain text to our checks; an encoding such as UTF-7 could spell
# "<!DOCTYPE" invisibly to them, so anything else is refused.
_ALLOWED_ENCODINGS: Final = frozenset({"utf-8", "ascii", "iso8859-1", "iso8859-15", "cp1252"})
_XML_DECL_ENCODING: Final = re.compile(r"""\A(<\?xml\s[^>]*?\bencoding\s*=\s*)(["'])([^"']*)\2""")
_DECLARATION: Final = re.compile(r"<!\s*(?:DOCTYPE|ENTITY)\b", re.IGNORECASE)
_ENTITY_OR_VERBATIM: Final = re.compile(
    r"<!\[CDATA\[.*?\]\]>|<!--.*?-->|&([A-Za-z][A-Za-z0-9]*;)", re.DOTALL
)
_CDATA: Final = re.compile(r"<!\[CDATA\[.*?\]\]>", re.DOTALL)
_XML_ENTITIES: Final = frozenset({"amp;", "lt;", "gt;", "quot;", "apos;"})
_XSI_NAMESPACE: Final = "http://www.w3.org/2001/XMLSchema-instance"
_LOCATION_HINTS: Final = frozenset({"schemalocation", "nonamespaceschemalocation"})

# "(?!name char)" after "password" so that passwordFile / passwordEnv, which are references
# and not secrets, are never taken for a password.
# Any element or attribute whose name looks like a secret: "password", but also a misspelled
# "pasword", "passwd", "pwd", "secret" or "token", so a typo never stores a password in clear.
# passwordFile and passwordEnv only say where the secret is, and stay readable; so do OAuth2's
# clientSecretFile, clientSecretEnv, clientSecretExpires and tokenEndpoint.
_SECRET_NAME: Final = (
    r"(?:[A-Za-z_][\w.-]*:)?"
    r"(?!(?:password(?:file|env)|clientsecret(?:file|env|expires)|tokenendpoint)(?![\w.:-]))"
    r"[\w.-]*(?:pas|pwd|secret|token)[\w.-]*(?![\w.:-])"
)
_PASSWORD_OPEN: Final = re.compile(r"<" + _SECRET_NAME, re.IGNORECASE)
_PASSWORD_CLOSE: Final = re.compile(r"</" + _SECRET_NAME + r"\s*>", re.IGNORECASE)
_PASSWORD_ATTR: Final = re.compile(r"(?<![\w.:-])" + _SECRET_NAME + r"\s*=\s*", re.IGNORECASE)
_UNQUOTED_VALUE: Final = re.compile(r"[^\s>]*")


def _load_schema() -> tuple[etree.XMLSchema, dict[tuple[str, ...], dict[str, str]]]:
    """The schema compiled by libxml2, and the children allowed under each element path.

    Both at import, in about a millisecond, so that a broken schema fails at once rather than
    when the first mailbox is read. The children (lowercase -> canonical name) drive the
    case-insensitive renaming and the "valid elements here" of error messages; they are read
    from the same XSD as validation, so they cannot drift from what it accepts (a test also
    checks them against xmlschema's reading of it).
    """
    # Our own file: nothing to fetch, no entity to expand.
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    xsd = etree.parse(str(SCHEMA_PATH), parser)
    children: dict[tuple[str, ...], dict[str, str]] = {}

    top = xsd.getroot()

    def content(decl: etree._Element) -> etree._Element | None:
        """The xs:all or xs:sequence of an element's complex type: inline, named
        (type="ruleType") or through a reference to a global element (ref="rules")."""
        ref = decl.get("ref")
        if ref is not None:
            found = top.find(f"{_XS}element[@name='{ref}']")
            assert found is not None, ref
            decl = found
        complex_type = decl.find(f"{_XS}complexType")
        named = decl.get("type")
        if complex_type is None and named is not None:
            complex_type = top.find(f"{_XS}complexType[@name='{named}']")
        if complex_type is None:
            return None
        found_all = complex_type.find(f"{_XS}all")
        return found_all if found_all is not None else complex_type.find(f"{_XS}sequence")

    def walk(decl: etree._Element, path: tuple[str, ...]) -> None:
        body = content(decl)
        if body is None:
            return
        names: dict[str, str] = {}
        for child in body.iterfind(f"{_XS}element"):
            name = str(child.get("name") or child.get("ref"))
            names[name.lower()] = name
            walk(child, (*path, name))
        children[path] = names

    root = top.find(f"{_XS}element[@name='{_ROOT}']")
    if root is None:
        raise RuntimeError(f"{SCHEMA_PATH} declares no <{_ROOT}> element")
    walk(root, (_ROOT,))
    rules = top.find(f"{_XS}element[@name='rules']")
    assert rules is not None
    walk(rules, ("rules",))  # the root of a team folder's _rules.xml
    return etree.XMLSchema(xsd), children


_LIBXML_SCHEMA, _CHILDREN = _load_schema()

# White space to Python (str.isspace) that is not white space to XSD (space, tab, CR, LF):
# no-break space, U+0085, U+2000-U+200A... xmlschema collapses and strips it in token values,
# libxml2 keeps it, so the two may disagree on a value holding one (see _fast_valid).
_NON_XSD_SPACE: Final = re.compile(r"[^\S \t\n\r]")


@functools.cache
def _xmlschema() -> xmlschema.XMLSchema:
    """xmlschema's reading of our schema, the reference for validity and error messages.

    Built on first use only: importing xmlschema and building the schema take about a quarter
    of a second, which a valid file (the common case) never needs.
    """
    import xmlschema

    return xmlschema.XMLSchema(SCHEMA_PATH)


@functools.cache
def _decls() -> dict[tuple[str, ...], Any]:
    """xmlschema's element declarations by path, for the wording of error messages."""
    decls: dict[tuple[str, ...], Any] = {}

    def walk(decl: Any, path: tuple[str, ...]) -> None:
        decls[path] = decl
        if decl.type.is_simple():
            return
        for child in decl.type.content.iter_elements():
            walk(child, (*path, child.local_name))

    walk(_xmlschema().elements[_ROOT], (_ROOT,))
    walk(_xmlschema().elements["rules"], ("rules",))  # a team folder's _rules.xml
    return decls


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def load_mailbox(
    path: Path,
    *,
    default_team: str | None = None,
    name: str | None = None,
    team_rules: Path | None = None,
) -> MailboxConfig:
    """Read, validate and convert one mailbox file.

    ``default_team`` is used when the file has no ``team`` (the caller derives it from the
    folder or the engine's settings); ``name`` defaults to the file name without extension.
    Passwords are resolved here (``passwordFile`` read, ``passwordEnv`` looked up) so that a
    missing secret is reported at start-up, not at the first poll.

    Raises:
        ConfigError: for the first problem found, naming the file, the line, the element and
            what would be valid. The message never contains a password.
    """
    ctx = _Context(str(path))
    root = _parse(path, ctx)
    _canonicalize(root)
    if root.tag != _ROOT:
        raise ctx.error(f"the root element must be <{_ROOT}>, not <{_display(root)}>", at=root)
    _validate(root, ctx)
    cfg = _build(root, path, ctx, default_team=default_team, name=name or path.stem)
    if team_rules is None:
        return cfg
    # The team folder's rules apply after the mailbox's own.
    extra = load_rules(team_rules)
    processing = dataclasses.replace(cfg.processing, rules=cfg.processing.rules + extra)
    return dataclasses.replace(cfg, processing=processing)


def load_rules(path: Path) -> tuple[Rule, ...]:
    """A team folder's ``_rules.xml``: a ``<rules>`` root element, read and validated as
    safely as a mailbox file, against the same schema."""
    ctx = _Context(str(path))
    root = _parse(path, ctx)
    _canonicalize(root)
    if root.tag != "rules":
        raise ctx.error(f"the root element must be <rules>, not <{_display(root)}>", at=root)
    _validate(root, ctx)
    return rules_of(root, _error_at(ctx), str(path))


def _error_at(ctx: _Context) -> Callable[[str, etree._Element | None], ConfigError]:
    def error(reason: str, at: etree._Element | None) -> ConfigError:
        return ctx.error(reason, at=at)

    return error


def mailbox_copy(cfg: MailboxConfig) -> bytes:
    """``cfg`` as a mailbox file, rebuilt from the model: what an outage event attaches.

    Every element the model holds is written (defaults included, so the copy shows what the
    engine used), in the schema's spelling. A password written in the file becomes
    ``********``; ``passwordFile`` and ``passwordEnv`` keep the names they are. Any other value
    holding a password has it masked too. Each value is cut at 4 KiB (escaped), so the copy
    stays under :data:`MAX_COPY_BYTES` whatever the file held. Loading the copy gives the same
    model but for the masked passwords (and the name and path, which come from the file).
    """
    w = _CopyWriter(secret_values(cfg))
    root = etree.Element(_ROOT)
    root.append(
        etree.Comment(
            " Rebuilt by mailintegration from the configuration it loaded; every password is "
            f"replaced by {_REDACTED}. "
        )
    )
    w.add(root, "messageProcessorTypeName", _PROCESSOR_TYPE_NAMES[cfg.processor])
    _copy_server(w, etree.SubElement(root, "server"), cfg.server)
    _copy_settings(w, root, cfg)
    if cfg.smtp is not None:
        _copy_smtp(w, etree.SubElement(root, "smtp"), cfg.smtp)
    if cfg.reply_template is not None:
        reply = etree.SubElement(root, "replyTemplate")
        w.add(reply, "subject", cfg.reply_template.subject)
        w.add(reply, "body", cfg.reply_template.body)
    config_handling.copy(w.add, root, cfg.handling)
    added = _copy_processing(w, root, cfg)
    etree.indent(root, space="  ")
    out: bytes = etree.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
    if len(out) > MAX_COPY_BYTES:
        # Many long rules: the copy stays bounded, and says what it leaves out.
        for el in added:
            root.remove(el)
        root.append(etree.Comment(" rules, correlation and the like: too large to show "))
        out = etree.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
    return out


def _copy_processing(w: _CopyWriter, root: etree._Element, cfg: MailboxConfig) -> list[Any]:
    """The settings of engine.config_rules, as elements of ``root``; returns them."""
    p = cfg.processing
    before = len(root)
    w.add(root, "incidentPriority", p.priority)
    sr = p.service_requests
    if cfg.processor == "service-request":
        w.add(root, "newSRBodyEnclosingToken", sr.token)
        w.add(root, "serviceRequestFormField", sr.form_field)
        w.add(root, "serviceRequestForm", sr.default_form)
    levels = etree.SubElement(root, "headerPriorities")
    for level in ("high", "normal", "low"):
        etree.SubElement(levels, level).text = getattr(p.header_priorities, level) or ""
    _copy_correlation(w, etree.SubElement(root, "correlation"), p)
    if p.rules:
        rules = etree.SubElement(root, "rules")
        for rule in p.rules:
            _copy_rule(w, etree.SubElement(rules, "rule"), rule)
    if p.foreign_patterns:
        foreign = etree.SubElement(root, "foreignTicketNumbers")
        for f in p.foreign_patterns:
            el = etree.SubElement(foreign, "foreignTicketNumber")
            w.add(el, "system", f.system)
            w.add(el, "pattern", f.pattern.pattern)
    return list(root)[before:]


def _copy_correlation(w: _CopyWriter, el: etree._Element, p: Processing) -> None:
    c = p.correlation
    w.add(el, "enabled", c.enabled)
    w.add(el, "flapping", c.flapping)
    w.add(el, "flappingMinutes", c.flapping_minutes)
    if not c.recognisers:
        return
    listed = etree.SubElement(el, "recognisers")
    for r in c.recognisers:
        one = etree.SubElement(listed, "recogniser")
        w.add(one, "name", r.name)
        w.add(one, "subject", None if r.subject is None else r.subject.pattern)
        w.add(one, "body", None if r.body is None else r.body.pattern)
        for name, states in (
            ("problemStates", r.problem),
            ("recoveryStates", r.recovery),
            ("acknowledgementStates", r.acknowledgement),
        ):
            w.add(one, name, ", ".join(sorted(states)) or None)


def _copy_rule(w: _CopyWriter, el: etree._Element, rule: Rule) -> None:
    w.add(el, "name", rule.name)
    for c in rule.conditions:
        w.add(
            el,
            c.what,
            c.pattern.pattern if c.header is None else f"{c.header}: {c.pattern.pattern}",
        )
    if rule.conditions and not rule.conditions[0].pattern.flags & re.IGNORECASE:
        w.add(el, "caseSensitive", True)
    for name, value in (
        ("setTeam", rule.team),
        ("setGroup", rule.group),
        ("setAssignee", rule.assignee),
        ("setPriority", rule.priority),
        ("setType", rule.type),
        ("setSource", rule.source),
        ("addTag", ", ".join(rule.tags) or None),
    ):
        w.add(el, name, value)
    for name, flag in (
        ("priorityFromHeaders", rule.priority_from_headers),
        ("ignore", rule.ignore),
        ("refuse", rule.refuse),
        ("stop", rule.stop),
    ):
        if flag:
            w.add(el, name, True)


def _copy_server(w: _CopyWriter, server: etree._Element, s: ServerConfig) -> None:
    w.add(server, "gatewayTypeName", _GATEWAY_TYPE_NAMES[s.gateway])
    w.add(server, "serverName", s.host)
    w.add(server, "port", s.port)
    w.add(server, "useSsl", s.use_ssl)
    w.add(server, "startTls", s.starttls)
    w.add(server, "userName", s.user_name)
    w.password(server, s.password, s.password_file, s.password_env)
    if s.oauth2 is not None:
        _copy_oauth2(w, etree.SubElement(server, "oauth2"), s.oauth2)
    w.add(server, "caFile", s.ca_file)
    w.add(server, "tlsVerify", s.tls_verify)
    w.add(server, "timeoutSeconds", int(s.timeout))
    w.add(server, "accountId", s.account_id)
    timeout = s.session_timeout
    w.add(server, "sessionTimeoutSeconds", None if timeout is None else int(timeout))
    w.add(server, "minimumBytesPerSecond", s.min_rate)
    if s.gateway == "imap":
        _copy_imap(w, server, s)


def _copy_imap(w: _CopyWriter, server: etree._Element, s: ServerConfig) -> None:
    folders = etree.SubElement(server, "folders")
    for name in s.folders:
        w.add(folders, "folder", name)
    w.add(server, "afterProcessing", s.after_processing)
    w.add(server, "moveToFolder", s.move_folder)
    w.add(server, "failedFolder", s.failed_folder)
    w.add(server, "idle", s.idle)
    w.add(server, "idleRenewSeconds", int(s.idle_renew))
    w.add(server, "idleKeepAliveSeconds", int(s.idle_keepalive))


def _copy_oauth2(w: _CopyWriter, el: etree._Element, o: OAuth2Config) -> None:
    """The secret itself is never written: only where it comes from."""
    w.add(el, "provider", o.provider)
    w.add(el, "flow", o.flow)
    w.add(el, "tenant", o.tenant)
    w.add(el, "clientId", o.client_id)
    w.add(el, "clientSecretFile", o.client_secret_file)
    w.add(el, "clientSecretEnv", o.client_secret_env)
    w.add(el, "certificateFile", o.certificate_file)
    w.add(el, "tokenEndpoint", o.token_endpoint)
    w.add(el, "deviceEndpoint", o.device_endpoint)
    w.add(el, "scope", " ".join(o.scopes))
    expires = o.client_secret_expires
    w.add(el, "clientSecretExpires", None if expires is None else expires.isoformat())
    w.add(el, "warnDays", o.warn_days)
    w.add(el, "caFile", o.ca_file)


def _copy_settings(w: _CopyWriter, root: etree._Element, cfg: MailboxConfig) -> None:
    w.add(root, "team", cfg.team)
    w.add(root, "incidentFallbackSiteName", cfg.fallback_site)
    w.add(root, "incidentFallbackUserLogon", cfg.fallback_user)
    # The model keeps one group: the element this processor reads first gives it back.
    w.add(root, "incidentGroup" if cfg.processor != "event" else "group", cfg.group)
    w.add(root, "assignee", cfg.assignee)
    w.add(root, "incidentSource", cfg.source)
    w.add(root, "ignoredAttachments", ", ".join(cfg.ignored_attachments) or None)
    w.add(root, "createNewRequests", cfg.create_new_requests)
    w.add(root, "includeRawMessageAsAttachment", cfg.include_raw_message)
    if cfg.subject_pattern != DEFAULT_SUBJECT_PATTERN:
        w.add(root, "subjectPattern", cfg.subject_pattern.pattern)
    w.add(root, "maxMessageBytes", cfg.max_message_bytes)
    w.add(root, "maxAttachmentBytes", cfg.max_attachment_bytes)
    w.add(root, "maxAttachmentsBytes", cfg.max_attachments_bytes)
    poll = cfg.poll_interval
    w.add(root, "pollIntervalSeconds", None if poll is None else int(poll))


def _copy_smtp(w: _CopyWriter, smtp: etree._Element, m: SmtpConfig) -> None:
    w.add(smtp, "serverName", m.host)
    w.add(smtp, "port", m.port)
    w.add(smtp, "useSsl", m.use_ssl)
    w.add(smtp, "startTls", m.starttls)
    w.add(smtp, "userName", m.user_name)
    w.password(smtp, m.password, m.password_file, m.password_env)
    w.add(smtp, "from", m.sender)
    w.add(smtp, "caFile", m.ca_file)
    w.add(smtp, "tlsVerify", m.tls_verify)
    w.add(smtp, "timeoutSeconds", int(m.timeout))
    if m.oauth2 is not None:
        w.add(smtp, "useOAuth2", True)


def redact_config(data: bytes) -> bytes:
    """The file ``data`` with the content of every password masked, for logs and bug reports.

    Works on text, not on a parse, so that malformed files (the ones people send) are redacted
    too: ``<password>`` elements in any case and with any namespace prefix (smtp's included),
    an unclosed ``<password>`` up to the end of its line, and ``password="..."`` attributes.
    ``passwordFile`` and ``passwordEnv`` only name where the secret is, and are kept. Bytes
    outside the masked values are unchanged.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) and not data.startswith(b"\xff\xfe\x00\x00"):
        codec = "utf-16-le" if data.startswith(b"\xff\xfe") else "utf-16-be"
        try:
            text = data[2:].decode(codec)
        except UnicodeDecodeError:
            # Exactness gives way to safety: a damaged file is still redacted.
            text = data[2:].decode(codec, "replace")
        return data[:2] + _redact_text(text).encode(codec)
    # Latin-1 maps each byte to one character and back: markup in any ASCII-compatible
    # encoding is found, and the bytes of every other character are kept as they were.
    return _redact_text(data.decode("latin-1")).encode("latin-1")


def secret_values(cfg: MailboxConfig) -> tuple[str, ...]:
    """The non-empty passwords of ``cfg`` (POP3, SMTP, the OAuth2 client secret), for a log
    filter to mask."""
    oauth2 = cfg.server.oauth2
    values = [
        cfg.server.password,
        cfg.smtp.password if cfg.smtp else None,
        oauth2.client_secret if oauth2 else None,
    ]
    return tuple(dict.fromkeys(v for v in values if v))


# --------------------------------------------------------------------------------------------
# Error reporting
# --------------------------------------------------------------------------------------------


@dataclass
class _Context:
    """The file being loaded, and the secrets no message about it may contain."""

    file: str
    secrets: set[str] = field(default_factory=set)

    def add_secret(self, value: str | None) -> None:
        if not value:
            return
        # The ways the value may show once unescaped, unwrapped or trimmed.
        variants = {value, value.strip(), html.unescape(value), html.unescape(value.strip())}
        for variant in list(variants):
            cdata = _CDATA.fullmatch(variant.strip())
            if cdata:
                variants.add(variant.strip()[9:-3])
        self.secrets.update(v for v in variants if v.strip())

    def scrub(self, text: str) -> str:
        # Longest first, so that a secret containing another is replaced whole.
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, _REDACTED)
        return text

    def error(
        self,
        reason: str,
        *,
        at: etree._Element | None = None,
        line: int | None = None,
        element: str | None = None,
    ) -> ConfigError:
        if at is not None:
            line = line or _sourceline(at)
            element = element or _element_path(at)
        return ConfigError(
            self.scrub(reason),
            file=self.scrub(self.file),
            line=line,
            element=self.scrub(element) if element else None,
        )


def _element_path(el: etree._Element) -> str:
    """``server/port`` (port exists in server and in smtp); the root is named alone."""
    names = [_display(e) for e in _ancestors_and_self(el)]
    return "/".join(names[1:]) if len(names) > 1 else names[0]


def _ancestors_and_self(el: etree._Element) -> list[etree._Element]:
    chain = [el]
    parent = el.getparent()
    while parent is not None:
        chain.append(parent)
        parent = parent.getparent()
    return chain[::-1]


def _sourceline(el: etree._Element) -> int | None:
    line = el.sourceline
    return line if isinstance(line, int) else None


def _display(el: etree._Element) -> str:
    """The element's name as written: ``prefix:name`` for a namespaced one."""
    qname = etree.QName(el)
    return f"{el.prefix}:{qname.localname}" if el.prefix else qname.localname


def _strip_quotes(message: str) -> str:
    """Drop quoted fragments, which may be instance values, from a library message."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", message)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _parse(path: Path, ctx: _Context) -> etree._Element:
    """Bytes -> a safe, well-formed lxml tree whose elements know their source line."""
    try:
        data = _read_bounded(path, _MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ctx.error(f"cannot read the file: {exc.strerror or type(exc).__name__}") from None
    if data is None:
        raise ctx.error("not a regular file; a mailbox file must be one")
    if len(data) > _MAX_CONFIG_BYTES:
        raise ctx.error(f"the file is over {_MAX_CONFIG_BYTES} bytes; is it a mailbox file?")

    text = _decode(data, ctx)
    for start, end in _secret_spans(text):
        ctx.add_secret(text[start:end])

    # Refused before the parser sees anything: without a DTD there is no entity to expand
    # (billion laughs) and no external entity to fetch (XXE), whatever the parser settings.
    found = _DECLARATION.search(text)
    if found:
        raise ctx.error(
            "DOCTYPE and ENTITY declarations are not allowed (they can expand without bound or "
            "read other files); remove them: named entities such as &eacute; work without one",
            line=_line_of(text, found.start()),
        )

    text = _ENTITY_OR_VERBATIM.sub(_numeric_reference, text)
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )
    try:
        root = etree.fromstring(text.encode("utf-8"), parser)
    except etree.XMLSyntaxError as exc:
        raise _syntax_error(exc, text, ctx) from None

    # Defence in depth: the scan above should make this unreachable.
    docinfo = root.getroottree().docinfo
    if docinfo.internalDTD is not None:
        raise ctx.error("DOCTYPE declarations are not allowed", line=1)

    _refuse_schema_attributes(root, ctx)
    return root


def _refuse_schema_attributes(root: etree._Element, ctx: _Context) -> None:
    """No location hint is ever followed, and no xsi: attribute changes the validation."""
    for el in root.iter():
        for attr in el.attrib:
            qname = etree.QName(attr)
            prefix = "xsi:" if qname.namespace == _XSI_NAMESPACE else ""
            if qname.localname.lower() in _LOCATION_HINTS:
                raise ctx.error(
                    f"the {prefix}{qname.localname} attribute is not allowed: mailbox files are "
                    "validated against the engine's own schema only; remove the attribute",
                    at=el,
                )
            if prefix:
                # xsi:type and xsi:nil would change how the validator reads the element.
                raise ctx.error(
                    f"the xsi:{qname.localname} attribute is not allowed: mailbox files use no "
                    "attributes; remove it",
                    at=el,
                )


def _read_bounded(path: Path, limit: int) -> bytes | None:
    """At most ``limit`` + 1 bytes of ``path``, or None if it is not a regular file.

    Opened without blocking: a FIFO would otherwise hang the open until some writer came
    (a device such as /dev/zero is refused the same way).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return fh.read(limit + 1)


def _decode(data: bytes, ctx: _Context) -> str:
    """Decode the file ourselves, so that every later check sees the markup the parser will.

    The declaration's encoding is then rewritten to UTF-8 (the parser gets UTF-8 bytes); only
    that value changes, so line numbers stay those of the file.
    """
    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")) or data[:2] in (
        b"\x00<",
        b"<\x00",
    ):
        raise ctx.error("UTF-32 and UTF-16 without byte-order mark are not supported; use UTF-8")
    if data.startswith(b"\xef\xbb\xbf"):
        encoding, body, bom = "utf-8", data[3:], True
    elif data.startswith(b"\xff\xfe"):
        encoding, body, bom = "utf-16-le", data[2:], True
    elif data.startswith(b"\xfe\xff"):
        encoding, body, bom = "utf-16-be", data[2:], True
    else:
        encoding, body, bom = "utf-8", data, False
        declared = _XML_DECL_ENCODING.match(data[:256].decode("latin-1"))
        if declared:
            encoding = _codec_name(declared.group(3), ctx)
            if encoding.startswith("utf-16"):
                # The declaration was readable as ASCII: the file cannot be UTF-16.
                raise ctx.error(
                    f"the file declares encoding {declared.group(3)!r} but is not UTF-16 (no "
                    "byte-order mark); fix the declaration or save the file as UTF-8",
                    line=1,
                )

    try:
        text = body.decode(encoding)
    except UnicodeDecodeError as exc:
        line = body[: exc.start].decode(encoding, "replace").count("\n") + 1
        raise ctx.error(
            f"the file is not valid {encoding}; save it as UTF-8 (or declare its real encoding "
            'in <?xml version="1.0" encoding="..."?>)',
            line=line,
        ) from None

    declared = _XML_DECL_ENCODING.match(text)
    if declared:
        if bom and not _codec_name(declared.group(3), ctx).startswith(encoding[:6]):
            raise ctx.error(
                f"the file starts with a {encoding[:6].upper()} byte-order mark but declares "
                f"encoding {declared.group(3)!r}; fix the declaration",
                line=1,
            )
        text = _XML_DECL_ENCODING.sub(r"\1\2utf-8\2", text, count=1)
    return text


def _codec_name(declared: str, ctx: _Context) -> str:
    try:
        name = codecs.lookup(declared).name
    except LookupError:
        name = declared
    if name in _ALLOWED_ENCODINGS or name.startswith("utf-16"):
        return name
    raise ctx.error(
        f"encoding {declared!r} is not supported; use UTF-8 (or ISO-8859-1, ISO-8859-15, "
        "windows-1252, or UTF-16 with a byte-order mark)",
        line=1,
    )


def _numeric_reference(match: re.Match[str]) -> str:
    """HTML named entity -> numeric character reference; CDATA, comments and XML's five kept."""
    name = match.group(1)
    if name is None or name in _XML_ENTITIES:
        return match.group(0)
    chars = html.entities.html5.get(name)
    if chars is None:
        # Left for the parser, which reports it with its line.
        return match.group(0)
    return "".join(f"&#{ord(c)};" for c in chars)


def _syntax_error(exc: etree.XMLSyntaxError, text: str, ctx: _Context) -> ConfigError:
    line = exc.lineno or None
    message = str(exc.msg or exc)
    # lxml appends ", line N, column M"; ConfigError states the line itself.
    position = re.search(r",? line \d+, column (\d+)\s*$", message)
    if position:
        message = f"{message[: position.start()]} (column {position.group(1)})"
    if line is not None and _line_has_secret(text, line):
        # A message about a password's line may quote part of it ("Entity 'x' not defined").
        message = _strip_quotes(message)
    return ctx.error(f"the file is not well-formed XML: {message}", line=line)


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _line_has_secret(text: str, line: int) -> bool:
    for start, end in _secret_spans(text):
        # From the opening tag's line (possibly one above the value) to the value's last.
        if _line_of(text, start) - 1 <= line <= _line_of(text, end):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Redaction
# --------------------------------------------------------------------------------------------


def _secret_spans(text: str) -> list[tuple[int, int]]:
    """Offsets of every password value in ``text``, sorted and merged; tolerant of bad XML."""
    spans: list[tuple[int, int]] = []
    for opening in _PASSWORD_OPEN.finditer(text):
        pos = opening.end()
        line_end = _line_end(text, pos)
        gt = text.find(">", pos, line_end)
        if gt < 0:
            # "<password secret" with no ">": whatever follows on the line may be the secret.
            spans.append((pos, line_end))
            continue
        if text[gt - 1] == "/":
            continue  # <password/>
        start = gt + 1
        line_end = _line_end(text, start)
        closing = _closing_tag(text, start)
        if closing < 0:
            # A CDATA section that never ends: it runs to the end of the file, and so may
            # the secret.
            spans.append((start, len(text)))
        elif closing <= line_end or "<" not in _CDATA.sub("", text[start:closing]):
            spans.append((start, closing))
        else:
            # Unclosed (or closed only after other elements): mask to the end of the line, the
            # most a hand-written value can be without hiding the rest of the file.
            spans.append((start, line_end))
    for attr in _PASSWORD_ATTR.finditer(text):
        pos = attr.end()
        if pos < len(text) and text[pos] in "\"'":
            quote = text.find(text[pos], pos + 1)
            if quote >= 0 and "<" not in text[pos + 1 : quote]:
                spans.append((pos + 1, quote))
            else:
                spans.append((pos + 1, _line_end(text, pos)))
        else:
            unquoted = _UNQUOTED_VALUE.match(text, pos)
            if unquoted:
                spans.append((pos, unquoted.end()))

    return _merge(spans)


def _closing_tag(text: str, start: int) -> int:
    """Where the password's closing tag begins: the first one after ``start`` outside CDATA
    sections (``<![CDATA[a</password>b]]>`` is one value). ``len(text)`` if there is none, -1
    if a CDATA section is left open."""
    pos = start
    while True:
        closing = _PASSWORD_CLOSE.search(text, pos)
        end = closing.start() if closing else len(text)
        cdata = text.find("<![CDATA[", pos, end)
        if cdata < 0:
            return end
        pos = text.find("]]>", cdata + 9)
        if pos < 0:
            return -1
        pos += 3


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Non-empty spans, sorted, overlapping ones joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _secret_variants(value: str) -> set[str]:
    """The ways a password found in a file may be written elsewhere in it: as found, trimmed,
    unwrapped from CDATA, unescaped, and escaped again."""
    variants = {value, value.strip()}
    inner = "".join(m.group(0)[9:-3] for m in _CDATA.finditer(value))
    if inner:
        variants |= {inner, inner.strip()}
    for v in list(variants):
        plain = html.unescape(v)
        minimal = plain.replace("&", "&amp;").replace("<", "&lt;")  # all XML requires
        variants |= {
            plain,
            minimal,
            minimal.replace('"', "&quot;"),
            html.escape(plain, quote=False),
            html.escape(plain),
        }
    return {v for v in variants if v.strip()}


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    if end < 0:
        return len(text)
    # Keep a CRLF file's "\r" out of the mask.
    return end - 1 if end > pos and text[end - 1] == "\r" else end


# --------------------------------------------------------------------------------------------
# The rebuilt copy
# --------------------------------------------------------------------------------------------

_PROCESSOR_TYPE_NAMES: Final[dict[ProcessorKind, str]] = {
    "incident": "Octopus.MailIntegration.Processors.EndUserIncidentMailMessageProcessor, "
    "Octopus.MailIntegration",
    "event": "Octopus.MailIntegration.Processors.EventMailMessageProcessor, "
    "Octopus.MailIntegration",
    "service-request": "ESI.Octopus.MailIntegration.EndUserNewSRMailMessageProcessor",
}
_MAX_COPY_VALUE_BYTES: Final = 4096
MAX_COPY_BYTES: Final = 256 * 1024
"""The most :func:`mailbox_copy` returns: its ~40 elements of at most 4 KiB each, and markup."""

# Characters XML 1.0 cannot hold, even as references. A parsed file holds none, but a value
# may come from elsewhere (--team on the command line). Written as what is outside XML's
# Char production (#x9 | #xA | #xD | [#x20-#xD7FF] | [#xE000-#xFFFD] | [#x10000-#x10FFFF])
# rather than as its negation: the same characters (tests/test_config.py holds the two
# equal over every code point), but re compiles the negated class in ~7 ms, at every start.
_NOT_XML: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ESCAPED_SIZE: Final = {"&": 5, "<": 4, ">": 4, "\r": 5}


class _CopyWriter:
    """Adds the elements of :func:`mailbox_copy`: values masked, bounded and XML-safe."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        self.secrets = secrets

    def add(self, parent: etree._Element, name: str, value: str | int | bool | Path | None) -> None:
        if value is None:
            return
        if isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = _NOT_XML.sub("\ufffd", _mask_secrets(str(value), self.secrets))
        child = etree.SubElement(parent, name)
        child.text, cut = _bounded(text)
        if cut:
            parent.append(etree.Comment(f" {name}: {cut} more characters not shown "))

    def password(
        self, parent: etree._Element, password: str | None, file: str | None, env: str | None
    ) -> None:
        if file is not None:
            self.add(parent, "passwordFile", file)
        elif env is not None:
            self.add(parent, "passwordEnv", env)
        elif password:
            etree.SubElement(parent, "password").text = _REDACTED


def _mask_secrets(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every occurrence of each secret masked."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = re.sub(_occurrences(secret), _REDACTED, text)
    return text


def _occurrences(secret: str) -> str:
    """A pattern finding ``secret`` in a text: anywhere, or, under four characters, only where
    it stands alone (masking each "pw" inside words would garble the text)."""
    if len(secret) >= 4:
        return re.escape(secret)
    return rf"(?<!\w){re.escape(secret)}(?!\w)"


def _bounded(value: str) -> tuple[str, int]:
    """``value`` cut so that, UTF-8 encoded and escaped, it fits in 4 KiB; and how many
    characters were cut."""
    if len(value) * 5 <= _MAX_COPY_VALUE_BYTES:
        return value, 0
    size = 0
    for i, ch in enumerate(value):
        size += _ESCAPED_SIZE.get(ch) or len(ch.encode("utf-8", "surrogatepass"))
        if size > _MAX_COPY_VALUE_BYTES:
            return value[:i], len(value) - i
    return value, 0


def _redact_text(text: str) -> str:
    spans = _secret_spans(text)
    # The same values anywhere else (an attribute, another element, a comment) are masked too.
    values: set[str] = set()
    for start, end in spans:
        values |= _secret_variants(text[start:end])
    for value in values:
        spans += [m.span() for m in re.finditer(_occurrences(value), text)]
    parts: list[str] = []
    last = 0
    for start, end in _merge(spans):
        parts += [text[last:start], _REDACTED]
        last = end
    parts.append(text[last:])
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _canonicalize(root: etree._Element) -> None:
    """Rename known elements to the schema's spelling; unknown ones stay as written."""
    roots = {_ROOT.lower(): _ROOT, "rules": "rules"}
    if _is_plain(root) and root.tag.lower() in roots:
        root.tag = roots[root.tag.lower()]
    if root.tag not in roots.values():
        return
    stack: list[tuple[etree._Element, tuple[str, ...]]] = [(root, (root.tag,))]
    while stack:
        el, path = stack.pop()
        names = _CHILDREN.get(path)
        if names is None:
            continue
        for child in el:
            canonical = names.get(child.tag.lower()) if _is_plain(child) else None
            if canonical is not None:
                child.tag = canonical
                stack.append((child, (*path, canonical)))


def _is_plain(el: etree._Element) -> bool:
    """An element without namespace, as the format's are."""
    return isinstance(el.tag, str) and not el.tag.startswith("{")


def _validate(root: etree._Element, ctx: _Context) -> None:
    """Raise the first schema error of ``root``, in our words.

    xmlschema decides and words every error, but building it costs about a quarter of a second
    of start-up. libxml2 (lxml) validates against the same XSD in microseconds, so a file it
    accepts is accepted without xmlschema; anything else goes to xmlschema, which either finds
    the error to report or, where the two differ (xmlschema reads non-ASCII digits in numbers,
    for instance), accepts the file as it always has. tests/test_startup.py checks that the
    fast path never accepts a file xmlschema refuses.
    """
    if _fast_valid(root):
        return
    # On the element itself: no location hint, no other schema, no network is ever used.
    errors: Iterator[XMLSchemaValidationError] = _xmlschema().iter_errors(
        root,
        use_location_hints=False,
    )
    first = next(errors, None)
    if first is not None:
        raise _schema_error(first, ctx)


def _fast_valid(root: etree._Element) -> bool:
    """True if ``root`` is valid for libxml2 and xmlschema would say so too.

    A text holding white space that only Python counts as such is left to xmlschema: it
    collapses that space in xs:token values where libxml2 keeps it, so a value such as a
    lone no-break space is too short for one and not for the other.
    """
    for el in root.iter():
        if (el.text and _NON_XSD_SPACE.search(el.text)) or (
            el.tail and _NON_XSD_SPACE.search(el.tail)
        ):
            return False
    # Only the compiled schema: libxml2 loads no other for an instance (and _parse has
    # already refused location hints).
    return _LIBXML_SCHEMA.validate(root)


def _schema_error(err: XMLSchemaValidationError, ctx: _Context) -> ConfigError:
    """Our own message for a schema error.

    xmlschema's reasons may quote the instance (a password included), so they only help to
    recognise the case and are never copied, except, quotes stripped, in the last fallback.
    Each case below is tried in turn; the first that recognises the error words it.
    """
    reason = str(err.reason or "")
    elem: Any = err.elem
    if not isinstance(elem, etree._Element):
        return ctx.error(f"does not match the schema: {_strip_quotes(reason)}")
    el: etree._Element = elem
    path = tuple(_display(e) for e in _ancestors_and_self(el))
    if el.getparent() is None and el.tag != _ROOT:
        return ctx.error(f"the root element must be <{_ROOT}>, not <{_display(el)}>", at=el)
    allowed = list(_CHILDREN.get(path, {}).values())
    return (
        _children_error(err, el, allowed, ctx)
        or _content_error(reason, el, _decls().get(path), allowed, ctx)
        or ctx.error(f"does not match the schema: {_strip_quotes(reason)}", at=el)
    )


def _children_error(
    err: XMLSchemaValidationError, el: etree._Element, allowed: list[str], ctx: _Context
) -> ConfigError | None:
    """A child element too many, unknown or missing."""
    # Imported by _xmlschema(), which produced ``err``.
    from xmlschema import XMLSchemaChildrenValidationError

    if not isinstance(err, XMLSchemaChildrenValidationError):
        return None
    child: Any = err.invalid_child
    if isinstance(child, etree._Element):
        if _is_plain(child) and child.tag in allowed:
            return ctx.error(
                f"<{child.tag}> appears more than once in <{el.tag}>; each element may be "
                "given at most once",
                at=child,
            )
        return ctx.error(
            f"unknown element <{_display(child)}> in <{el.tag}>; valid elements here: "
            + ", ".join(allowed),
            at=child,
        )
    missing = [str(tag) for tag in (err.expected_tags or ())]
    if not missing:
        return None
    what = "element" if len(missing) == 1 else "elements"
    listed = ", ".join(f"<{m}>" for m in missing)
    return ctx.error(f"missing required {what} {listed} in <{el.tag}>", at=el)


def _content_error(
    reason: str, el: etree._Element, decl: Any, allowed: list[str], ctx: _Context
) -> ConfigError | None:
    """Attributes, a bad value, elements inside a value, or text among elements."""
    if "attribute" in reason and el.attrib:
        names = ", ".join(sorted(str(a) for a in el.attrib))
        return ctx.error(f"attributes are not used in mailbox files; remove {names}", at=el)
    if decl is None:
        return None
    if decl.type.is_simple():
        if len(el):
            return ctx.error("must contain text only, not elements", at=el)
        return ctx.error(_bad_value(el, decl.type, ctx), at=el)
    if (el.text or "").strip() or any((c.tail or "").strip() for c in el):
        return ctx.error(
            f"text is not allowed directly inside <{el.tag}>, only the elements "
            + ", ".join(allowed),
            at=el,
        )
    return None


def _bad_value(el: etree._Element, xsd_type: Any, ctx: _Context) -> str:
    expected = _describe_type(xsd_type)
    # Scrubbed before it is cut: a password cut in two would be recognised by no scrub.
    value = ctx.scrub(" ".join((el.text or "").split()))
    if not value:
        return f"must not be empty; expected {expected}"
    if el.tag == "password":
        return f"invalid value; expected {expected}"
    shown = value if len(value) <= 60 else value[:57] + "..."
    return f"{shown!r} is not valid; expected {expected}"


def _describe_type(xsd_type: Any) -> str:
    """What a simple type accepts, in words: from its facets or its xs:documentation."""
    if xsd_type.local_name == "booleanType":
        return "true or false (in any case), or 1 or 0"
    if xsd_type.min_value is not None and xsd_type.max_value is not None:
        return f"an integer from {xsd_type.min_value} to {xsd_type.max_value}"
    annotation = xsd_type.annotation
    if annotation is not None and annotation.documentation:
        doc = " ".join("".join(annotation.documentation[0].itertext()).split())
        sentence = doc.split(". ")[0].rstrip(".")
        return sentence[:1].lower() + sentence[1:]
    return f"a valid {xsd_type.local_name}"


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _token(parent: etree._Element, name: str) -> str | None:
    """The element's text with white space collapsed (xs:token); None if absent or empty."""
    el = parent.find(name)
    if el is None:
        return None
    return " ".join((el.text or "").split()) or None


def _bool(parent: etree._Element, name: str, default: bool) -> bool:
    value = _token(parent, name)
    return default if value is None else value.lower() in ("true", "1")


def _int(parent: etree._Element, name: str) -> int | None:
    value = _token(parent, name)
    return None if value is None else int(value)


def _type_leaf(type_name: str) -> str:
    """``A.B.Name, Assembly`` -> ``name``: the part before the comma, last dotted component."""
    return type_name.split(",", 1)[0].strip().rsplit(".", 1)[-1].strip().lower()


def _build(
    root: etree._Element,
    path: Path,
    ctx: _Context,
    *,
    default_team: str | None,
    name: str,
) -> MailboxConfig:
    # Relative paths in the file are relative to its folder: the working directory of a
    # service is nobody's choice.
    base = path.resolve().parent
    processor = _processor(root, ctx)
    server_el = root.find("server")
    assert server_el is not None  # required by the schema
    server = _server(server_el, base, ctx)
    smtp_el = root.find("smtp")
    smtp = _smtp(smtp_el, base, ctx, server) if smtp_el is not None else None
    reply_el = root.find("replyTemplate")
    reply = None
    if reply_el is not None:
        if smtp is None:
            raise ctx.error("a replyTemplate needs an <smtp> element to send it", at=reply_el)
        reply = _reply_template(reply_el, ctx)

    incident_group = _token(root, "incidentGroup")
    event_group = _token(root, "group")
    # Events name their group <group>; incidents and service requests <incidentGroup>.
    first, second = (
        (event_group, incident_group) if processor == "event" else (incident_group, event_group)
    )
    group = first or second
    ignored = tuple(part.strip() for part in (_token(root, "ignoredAttachments") or "").split(","))
    max_bytes = _int(root, "maxMessageBytes")
    poll = _int(root, "pollIntervalSeconds")
    return MailboxConfig(
        name=name,
        path=path,
        processor=processor,
        server=server,
        team=_token(root, "team") or default_team,
        fallback_site=_token(root, "incidentFallbackSiteName"),
        fallback_user=_token(root, "incidentFallbackUserLogon"),
        group=group,
        assignee=_token(root, "assignee"),
        source=_token(root, "incidentSource"),
        ignored_attachments=tuple(p for p in ignored if p),
        create_new_requests=_bool(root, "createNewRequests", True),
        include_raw_message=_bool(root, "includeRawMessageAsAttachment", False),
        subject_pattern=_subject_pattern(root, ctx),
        smtp=smtp,
        reply_template=reply,
        max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES if max_bytes is None else max_bytes,
        poll_interval=None if poll is None else float(poll),
        max_attachment_bytes=_int(root, "maxAttachmentBytes"),
        max_attachments_bytes=_int(root, "maxAttachmentsBytes"),
        processing=build(root, _error_at(ctx), str(path)),
        handling=_handling(root, server, smtp),
    )


def _handling(
    root: etree._Element, server: ServerConfig, smtp: SmtpConfig | None
) -> config_handling.Handling:
    """``<mailHandling>``; the user name and the smtp sender are our own addresses too."""
    implied = [server.user_name]
    if smtp is not None:
        import email.utils  # here: only a mailbox that sends needs it (~2 ms of a start)

        implied.append(email.utils.parseaddr(smtp.sender)[1])
    return config_handling.build(root, implied)


def _processor(root: etree._Element, ctx: _Context) -> ProcessorKind:
    el = root.find("messageProcessorTypeName")
    assert el is not None  # required by the schema
    value = " ".join((el.text or "").split())
    leaf = _type_leaf(value)
    if leaf in _PROCESSORS:
        return _PROCESSORS[leaf]
    raise ctx.error(f"unknown processor {value!r}; valid values: {_VALID_PROCESSORS}", at=el)


def _gateway(server_el: etree._Element, ctx: _Context) -> GatewayKind:
    """The protocol, from gatewayTypeName and/or protocol (at least one; the same if both)."""
    el = server_el.find("gatewayTypeName")
    proto_el = server_el.find("protocol")
    protocol: GatewayKind | None = None
    if proto_el is not None:
        protocol = "imap" if (_token(server_el, "protocol") or "").lower() == "imap" else "pop3"
    if el is None:
        if protocol is None:
            raise ctx.error("<server> needs a <gatewayTypeName> or a <protocol>", at=server_el)
        return protocol
    value = " ".join((el.text or "").split())
    leaf = _type_leaf(value)
    kind: GatewayKind
    if value.lower() == "pop3" or leaf in _POP3_GATEWAYS:
        kind = "pop3"
    elif value.lower() == "imap" or leaf in _IMAP_GATEWAYS:
        kind = "imap"
    else:
        raise ctx.error(f"unknown gateway {value!r}; valid values: {_VALID_GATEWAYS}", at=el)
    if protocol is not None and protocol != kind:
        raise ctx.error(
            f"<protocol> says {protocol} but <gatewayTypeName> names {kind}", at=proto_el
        )
    return kind


def _imap_settings(el: etree._Element, gateway: GatewayKind, ctx: _Context) -> dict[str, Any]:
    """The IMAP-only settings of <server>: refused for POP3, checked together for IMAP."""
    after = (_token(el, "afterProcessing") or "delete").lower()
    if gateway == "pop3":
        _refuse_imap_only(el, after, ctx)
        return {}
    folders_el = el.find("folders")
    folders = tuple(
        " ".join((f.text or "").split()) for f in (folders_el if folders_el is not None else [])
    )
    if len(set(folders)) != len(folders):
        raise ctx.error("a folder is listed twice in <folders>", at=folders_el)
    move = _token(el, "moveToFolder")
    if (after == "move") != (move is not None):
        raise ctx.error(
            "afterProcessing move needs a <moveToFolder>, which is only read with move",
            at=el.find("afterProcessing" if move is None else "moveToFolder"),
        )
    targets = {move, _token(el, "failedFolder")} - {None}
    if targets & set(folders or ("INBOX",)):
        raise ctx.error(
            "moveToFolder and failedFolder must not be folders the mailbox reads", at=el
        )
    renew, keepalive = _int(el, "idleRenewSeconds"), _int(el, "idleKeepAliveSeconds")
    return {
        "folders": folders or ("INBOX",),
        "after_processing": after,
        "move_folder": move,
        "failed_folder": _token(el, "failedFolder"),
        "idle": _bool(el, "idle", True),
        "idle_renew": float(renew or 1500),
        "idle_keepalive": float(keepalive or 300),
    }


def _refuse_imap_only(el: etree._Element, after: str, ctx: _Context) -> None:
    if after != "delete":
        raise ctx.error(
            f"afterProcessing {after} needs IMAP: POP3 can only delete",
            at=el.find("afterProcessing"),
        )
    for name in _IMAP_ONLY:
        if el.find(name) is not None:
            raise ctx.error(f"<{name}> is for IMAP only: POP3 can only delete", at=el.find(name))


def _server(el: etree._Element, base: Path, ctx: _Context) -> ServerConfig:
    gateway = _gateway(el, ctx)
    use_ssl, starttls = _tls_mode(el, ctx)
    oauth2_el = el.find("oauth2")
    oauth2 = None if oauth2_el is None else _oauth2(oauth2_el, base, gateway, ctx)
    if oauth2_el is not None:
        given = next((e for n in _PASSWORD_SOURCES if (e := el.find(n)) is not None), None)
        if given is not None:
            raise ctx.error(
                f"give either <oauth2> or <{given.tag}>: a mailbox signs in one way", at=given
            )
        if not (use_ssl or starttls):
            raise ctx.error(
                "<oauth2> needs useSsl or startTls: a bearer token is worth a password and "
                "never travels in clear",
                at=oauth2_el,
            )
        password = ""
    else:
        found = _password(el, base, ctx, required=True)
        assert found is not None
        password = found
    port = _int(el, "port")
    host = _token(el, "serverName")
    user = _token(el, "userName")
    assert host is not None and user is not None  # required by the schema
    session = _int(el, "sessionTimeoutSeconds")
    min_rate = _int(el, "minimumBytesPerSecond")
    default_port = {"pop3": (110, 995), "imap": (143, 993)}[gateway][use_ssl]
    return ServerConfig(
        gateway=gateway,
        host=host,
        port=port if port is not None else default_port,
        use_ssl=use_ssl,
        starttls=starttls,
        user_name=user,
        password=password,
        ca_file=_ca_file(el, base, ctx),
        tls_verify=_bool(el, "tlsVerify", True),
        timeout=float(_int(el, "timeoutSeconds") or 30),
        password_file=_token(el, "passwordFile"),
        password_env=_token(el, "passwordEnv"),
        account_id=_token(el, "accountId"),
        session_timeout=None if session is None else float(session),
        min_rate=min_rate if min_rate is not None else ServerConfig.min_rate,
        oauth2=oauth2,
        **_imap_settings(el, gateway, ctx),
    )


_OAUTH_SECRET_SOURCES: Final = ("clientSecretFile", "clientSecretEnv", "certificateFile")


def _oauth2(el: etree._Element, base: Path, gateway: GatewayKind, ctx: _Context) -> OAuth2Config:
    """``server/oauth2``: the provider's endpoints and scopes filled in, the secret read."""
    provider: OAuthProvider = _token(el, "provider")  # type: ignore[assignment]
    flow: OAuthFlow = _token(el, "flow")  # type: ignore[assignment]
    client_id = _token(el, "clientId")
    assert provider and flow and client_id  # required by the schema
    tenant = _token(el, "tenant")
    token_endpoint, device_endpoint = _oauth_endpoints(el, provider, flow, tenant, ctx)
    scope = _token(el, "scope") or _DEFAULT_SCOPES.get((provider, flow))
    if scope and gateway == "imap" and _token(el, "scope") is None:
        # Delegated Microsoft tokens are per protocol: IMAP needs IMAP.AccessAsUser.All.
        scope = scope.replace("/POP.AccessAsUser.All", "/IMAP.AccessAsUser.All")
    if scope is None:
        raise ctx.error("a generic provider needs <scope>", at=el)
    secret, certificate = _client_secret(el, base, flow, ctx)
    if certificate is not None and provider != "microsoft":
        raise ctx.error("<certificateFile> is for the microsoft provider", at=el)
    expires = _token(el, "clientSecretExpires")
    warn = _int(el, "warnDays")
    return OAuth2Config(
        provider=provider,
        flow=flow,
        client_id=client_id,
        token_endpoint=token_endpoint,
        device_endpoint=device_endpoint,
        scopes=tuple(scope.split()),
        tenant=tenant,
        client_secret=secret,
        client_secret_file=_token(el, "clientSecretFile"),
        client_secret_env=_token(el, "clientSecretEnv"),
        certificate_file=certificate,
        client_secret_expires=None if expires is None else datetime.date.fromisoformat(expires),
        warn_days=14 if warn is None else warn,
        ca_file=_ca_file(el, base, ctx),
    )


def _oauth_endpoints(
    el: etree._Element, provider: str, flow: str, tenant: str | None, ctx: _Context
) -> tuple[str, str | None]:
    """The token and device endpoints: as given, else the provider's; https only."""
    token = _token(el, "tokenEndpoint")
    device = _token(el, "deviceEndpoint")
    if provider == "microsoft":
        if token is None and tenant is None and flow == "clientCredentials":
            raise ctx.error("microsoft clientCredentials needs <tenant>", at=el)
        login = _MS_LOGIN.format(tenant=tenant or "organizations")
        token = token or f"{login}/token"
        device = device or token.rsplit("/", 1)[0] + "/devicecode"
    elif provider == "google":
        token = token or _GOOGLE_TOKEN
        device = device or _GOOGLE_DEVICE
    elif token is None:
        raise ctx.error("a generic provider needs <tokenEndpoint>", at=el)
    for name, url in (("tokenEndpoint", token), ("deviceEndpoint", device)):
        if url is not None and not url.lower().startswith("https://"):
            raise ctx.error(
                f"<{name}> must be an https:// URL: tokens never travel in clear", at=el
            )
    return token, device


def _client_secret(
    el: etree._Element, base: Path, flow: str, ctx: _Context
) -> tuple[str | None, Path | None]:
    """The client secret (read from its file or variable), or the certificate's path."""
    given = [e for n in _OAUTH_SECRET_SOURCES if (e := el.find(n)) is not None]
    if len(given) > 1:
        raise ctx.error(
            f"give only one of <clientSecretFile>, <clientSecretEnv> or <certificateFile>; "
            f"<{given[0].tag}> and <{given[1].tag}> are both here",
            at=given[1],
        )
    if not given:
        if flow == "clientCredentials":
            raise ctx.error(
                "clientCredentials needs one of <clientSecretFile>, <clientSecretEnv> or "
                "<certificateFile>",
                at=el,
            )
        return None, None
    source = given[0]
    if source.tag == "certificateFile":
        path = base / " ".join((source.text or "").split())
        if not path.is_file():
            raise ctx.error(f"the certificate file {path} does not exist", at=source)
        return None, path
    if source.tag == "clientSecretFile":
        value = _read_secret_file(source, base, ctx)
    else:
        variable = _token(el, "clientSecretEnv") or ""
        env_value = os.environ.get(variable)
        if env_value is None:
            raise ctx.error(f"the environment variable {variable} is not set", at=source)
        value = env_value
    if not value:
        raise ctx.error("the client secret is empty", at=source)
    ctx.add_secret(value)
    return value, None


def _smtp(el: etree._Element, base: Path, ctx: _Context, server: ServerConfig) -> SmtpConfig:
    use_ssl, starttls = _tls_mode(el, ctx)
    user = _token(el, "userName")
    password = _password(el, base, ctx, required=False)
    use_oauth2 = _smtp_login(el, user, password, server, use_ssl or starttls, ctx)
    port = _int(el, "port")
    host = _token(el, "serverName")
    sender = _token(el, "from")
    assert host is not None and sender is not None  # required by the schema
    return SmtpConfig(
        host=host,
        # 25 is plain SMTP; with TLS from the first byte, the standard port is 465.
        port=port if port is not None else (465 if use_ssl else 25),
        sender=sender,
        use_ssl=use_ssl,
        starttls=starttls,
        user_name=user or (server.user_name if use_oauth2 else None),
        password=password,
        ca_file=_ca_file(el, base, ctx),
        tls_verify=_bool(el, "tlsVerify", True),
        timeout=float(_int(el, "timeoutSeconds") or 30),
        password_file=_token(el, "passwordFile"),
        password_env=_token(el, "passwordEnv"),
        oauth2=server.oauth2 if use_oauth2 else None,
        # The mailbox's own tokens (the token store keys them by its account).
        oauth_account=(
            account_key(server.user_name, server.host, server.account_id) if use_oauth2 else None
        ),
    )


def _smtp_login(
    el: etree._Element,
    user: str | None,
    password: str | None,
    server: ServerConfig,
    tls: bool,
    ctx: _Context,
) -> bool:
    """Check how ``<smtp>`` signs in; True when with the mailbox's OAuth2 token."""
    use_oauth2 = _bool(el, "useOAuth2", False)
    if use_oauth2:
        if server.oauth2 is None or password is not None or not tls:
            raise ctx.error(
                "useOAuth2 needs <oauth2> in <server>, no password in <smtp>, and useSsl or "
                "startTls (a bearer token never travels in clear)",
                at=el.find("useOAuth2"),
            )
    elif user is not None and password is None:
        raise ctx.error(
            "<userName> needs one of <password>, <passwordFile> or <passwordEnv>", at=el
        )
    if user is None and password is not None:
        source = next(e for n in _PASSWORD_SOURCES if (e := el.find(n)) is not None)
        raise ctx.error("a password needs a <userName> in <smtp>", at=source)
    return use_oauth2


def _tls_mode(el: etree._Element, ctx: _Context) -> tuple[bool, bool]:
    use_ssl = _bool(el, "useSsl", False)
    starttls = _bool(el, "startTls", False)
    if use_ssl and starttls:
        raise ctx.error(
            "useSsl and startTls cannot both be true: useSsl is TLS from the first byte, "
            "startTls upgrades a clear connection; choose one",
            at=el.find("startTls"),
        )
    return use_ssl, starttls


def _password(el: etree._Element, base: Path, ctx: _Context, *, required: bool) -> str | None:
    """The password from whichever of password / passwordFile / passwordEnv is given."""
    given = [e for n in _PASSWORD_SOURCES if (e := el.find(n)) is not None]
    choices = "<password>, <passwordFile> or <passwordEnv>"
    if len(given) > 1:
        raise ctx.error(
            f"give only one of {choices}; <{given[0].tag}> and <{given[1].tag}> are both here",
            at=given[1],
        )
    if not given:
        if required:
            raise ctx.error(f"one of {choices} is required in <{el.tag}>", at=el)
        return None
    source = given[0]
    if source.tag == "password":
        # Exactly as written: white space may be part of a password.
        value = source.text or ""
    elif source.tag == "passwordFile":
        value = _read_secret_file(source, base, ctx)
    else:
        variable = _token(el, "passwordEnv") or ""
        env_value = os.environ.get(variable)
        if env_value is None:
            raise ctx.error(f"the environment variable {variable} is not set", at=source)
        value = env_value
    if not value:
        raise ctx.error("the password is empty", at=source)
    ctx.add_secret(value)
    return value


def _read_secret_file(source: etree._Element, base: Path, ctx: _Context) -> str:
    secret_path = base / " ".join((source.text or "").split())
    try:
        data = _read_bounded(secret_path, _MAX_SECRET_FILE_BYTES)
    except OSError as exc:
        raise ctx.error(
            f"cannot read the password file {secret_path}: {exc.strerror or type(exc).__name__}",
            at=source,
        ) from None
    if data is None:
        raise ctx.error(f"the password file {secret_path} is not a regular file", at=source)
    if len(data) > _MAX_SECRET_FILE_BYTES:
        raise ctx.error(f"the password file {secret_path} is too large", at=source)
    try:
        # utf-8-sig: an editor's byte-order mark is never part of a password.
        value = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ctx.error(f"the password file {secret_path} is not UTF-8 text", at=source) from None
    # One trailing line break only: editors and "echo" add one; anything more is content.
    if value.endswith("\r\n"):
        value = value[:-2]
    elif value.endswith("\n"):
        value = value[:-1]
    return value


def _ca_file(el: etree._Element, base: Path, ctx: _Context) -> Path | None:
    value = _token(el, "caFile")
    if value is None:
        return None
    ca_path = base / value
    if not ca_path.is_file():
        raise ctx.error(f"the CA file {ca_path} does not exist", at=el.find("caFile"))
    return ca_path


def _subject_pattern(root: etree._Element, ctx: _Context) -> re.Pattern[str]:
    el = root.find("subjectPattern")
    if el is None:
        return DEFAULT_SUBJECT_PATTERN
    try:
        pattern = re.compile((el.text or "").strip())
    except re.error as exc:
        where = f" at position {exc.pos}" if exc.pos is not None else ""
        raise ctx.error(f"not a valid regular expression: {exc.msg}{where}", at=el) from None
    if "number" not in pattern.groupindex:
        raise ctx.error(
            'the pattern needs a group named "number", such as (?P<number>[0-9]+)', at=el
        )
    return pattern


def _reply_template(el: etree._Element, ctx: _Context) -> ReplyTemplate:
    subject_el = el.find("subject")
    body_el = el.find("body")
    assert subject_el is not None and body_el is not None  # required by the schema
    subject = " ".join((subject_el.text or "").split())
    lines = (body_el.text or "").splitlines()
    # Drop the blank lines and indentation that come from the XML layout, not from the author.
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    body = textwrap.dedent("\n".join(lines))
    for text, part in ((subject, subject_el), (body, body_el)):
        _check_placeholders(text, part, ctx)
    return ReplyTemplate(subject=subject, body=body)


def _check_placeholders(text: str, el: etree._Element, ctx: _Context) -> None:
    # Checked now so that a typo fails at start-up, not when the first reply is sent.
    valid = ", ".join(f"{{{n}}}" for n in REPLY_PLACEHOLDERS)
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise ctx.error(
            f"{exc}; placeholders are {valid}, and literal braces are written {{{{ and }}}}",
            at=el,
        ) from None
    for name in fields:
        if name not in REPLY_PLACEHOLDERS:
            raise ctx.error(f"unknown placeholder {{{name}}}; valid placeholders: {valid}", at=el)
