"""What a monitoring mail says: the alert it carries (source, host, service, state).

Each built-in recogniser reads one monitoring system's *documented default* mail template
(tests/corpus/alerts/ holds a sample of each, written from those templates). A recogniser is
a pure function of the parsed message; it answers ``None`` when the mail is not its format,
so the first that answers wins. A mailbox may add its own (``<correlation><recogniser>``):
regular expressions with named groups, tried before the built-ins.

The correlation key is ``source|host|service`` (or the alert id where the format has no
service), case-folded: one open event per key (see :mod:`engine.processors.event`).

Mail is hostile input: every recogniser reads at most :data:`MAX_SCAN` characters of the
body, and the lines it reads are bounded; a key is cut to :data:`MAX_KEY` characters.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from engine.config import CustomRecogniser
from engine.model import ParsedMessage

Phase = Literal["problem", "recovery", "acknowledgement", "info"]

MAX_SCAN: Final = 65_536
"""The characters of a body a recogniser reads (templates put their fields first)."""
MAX_KEY: Final = 400


@dataclass(frozen=True)
class Alert:
    """One alert as its monitoring mail states it."""

    source: str
    host: str
    service: str | None
    state: str
    phase: Phase
    alert_id: str | None = None

    @property
    def key(self) -> str:
        """The correlation key: one open event per key."""
        what = self.service or self.alert_id or "-"
        key = f"{self.source}|{' '.join(self.host.split())}|{' '.join(what.split())}"
        # Received text: it goes into the ledger and the logs, so nothing unprintable.
        return "".join(c for c in key.casefold()[:MAX_KEY] if c.isprintable())

    def describe(self) -> str:
        what = f"{self.service} on {self.host}" if self.service else self.host
        return f"{self.source}: {what} is {self.state}"


# -- shared readers -----------------------------------------------------------------------

_FIELD: Final = re.compile(
    r"^[ \t]*([A-Za-z][A-Za-z0-9 /_.-]{0,40}?)[ \t]*[:=][ \t]*(.{0,500})$", re.M
)


def fields(body: str) -> dict[str, str]:
    """``Name: value`` (or ``name = value``) lines of a body, first value per lower-cased
    name, stripped; what most templates write."""
    out: dict[str, str] = {}
    for m in _FIELD.finditer(body[:MAX_SCAN]):
        out.setdefault(m.group(1).strip().lower(), m.group(2).strip())
    return out


def _phase(state: str, problem: frozenset[str], recovery: frozenset[str]) -> Phase:
    s = state.strip().upper()
    if s in recovery:
        return "recovery"
    if s in problem:
        return "problem"
    return "info"


_TYPE_PHASE: Final[dict[str, Phase]] = {
    "PROBLEM": "problem",
    "RECOVERY": "recovery",
    "ACKNOWLEDGEMENT": "acknowledgement",
    "FLAPPINGSTART": "problem",
    "FLAPPINGSTOP": "info",
    "FLAPPINGEND": "info",
    "FLAPPINGDISABLED": "info",
    "DOWNTIMESTART": "info",
    "DOWNTIMEEND": "info",
    "DOWNTIMECANCELLED": "info",
    "CUSTOM": "info",
}


# -- Nagios and Icinga 1 (notify-service-by-email / notify-host-by-email) ------------------

_NAGIOS_SUBJECT: Final = re.compile(
    r"^\*\* ([A-Z]+) (Service|Host) Alert: (.{1,300}?) is ([A-Za-z]+) \*\*$"
)


def nagios(msg: ParsedMessage) -> Alert | None:
    """``** PROBLEM Service Alert: web01/HTTP is CRITICAL **``; Icinga 1 writes the same."""
    m = _NAGIOS_SUBJECT.match(msg.subject)
    if m is None:
        return None
    kind, what, state = m.group(1), m.group(2), m.group(4).upper()
    f = fields(msg.body)
    source = "icinga" if "***** icinga *****" in msg.body[:2000].lower() else "nagios"
    if what == "Service":
        host, _, service = m.group(3).partition("/")
        host, service = f.get("host", host), f.get("service", service)
    else:
        host, service = f.get("host", m.group(3)), None
    phase = _TYPE_PHASE.get(kind, "info")
    return Alert(source, host, service or None, state, phase)


# -- Icinga 2 (mail-service-notification.sh / mail-host-notification.sh) -------------------

_ICINGA2_SERVICE: Final = re.compile(r"^\[([A-Z]+)\] (.{1,300}?) on (.{1,300}?) is ([A-Za-z]+)!$")
_ICINGA2_HOST: Final = re.compile(r"^\[([A-Z]+)\] Host (.{1,300}?) is ([A-Za-z]+)!$")


def icinga2(msg: ParsedMessage) -> Alert | None:
    """``[PROBLEM] Disk /var on web01 is CRITICAL!`` with a ``***** Service Monitoring on``
    body; ``[RECOVERY] Host web01 is UP!`` for hosts."""
    if "monitoring on " not in msg.body[:2000].lower():
        return None
    f = fields(msg.body)
    m = _ICINGA2_HOST.match(msg.subject)
    if m is not None:
        host = f.get("host", m.group(2))
        return Alert("icinga2", host, None, m.group(3).upper(), _TYPE_PHASE.get(m.group(1), "info"))
    m = _ICINGA2_SERVICE.match(msg.subject)
    if m is None:
        return None
    host, service = f.get("host", m.group(3)), f.get("service", m.group(2))
    return Alert("icinga2", host, service, m.group(4).upper(), _TYPE_PHASE.get(m.group(1), "info"))


# -- Zabbix (the default "Problem" / "Problem recovery" / "Problem update" messages) -------

_ZABBIX_SUBJECT: Final = re.compile(
    r"^(Problem|Resolved(?: in [^:]{1,40})?|Updated problem(?: in [^:]{1,40})?): (.{1,500})$"
)
_ZABBIX_ACK: Final = re.compile(r"\backnowledged\b", re.I)


def zabbix(msg: ParsedMessage) -> Alert | None:
    """``Problem: High CPU`` / ``Resolved in 5m: High CPU`` / ``Updated problem in 1h: …``
    with ``Host:`` and ``Original problem ID:`` lines: the problem id is the key."""
    m = _ZABBIX_SUBJECT.match(msg.subject)
    if m is None:
        return None
    f = fields(msg.body)
    problem_id = f.get("original problem id")
    host = f.get("host")
    if not problem_id or not host:
        return None
    head = m.group(1)
    if head == "Problem":
        phase: Phase = "problem"
        state = f.get("severity", "PROBLEM").upper()
    elif head.startswith("Resolved"):
        phase, state = "recovery", "RESOLVED"
    else:
        acked = _ZABBIX_ACK.search(msg.body[:MAX_SCAN]) is not None
        phase, state = ("acknowledgement", "ACKNOWLEDGED") if acked else ("info", "UPDATED")
    name = f.get("problem name", m.group(2))
    return Alert("zabbix", host, name, state, phase, alert_id=problem_id)


# -- Checkmk (the default ASCII/HTML mail notification) ------------------------------------

_CHECKMK_SUBJECT: Final = re.compile(
    r"^Check_?MK: (?P<host>[^\s/]{1,255})(?:/(?P<service>.{1,300}?)| -) "
    r"(?P<event>[A-Z]{1,10} -> [A-Z]{1,10}|[A-Z]{4,30}(?: \([A-Z]{1,10}\))?)$",
    re.I,
)
_CHECKMK_PROBLEM: Final = frozenset({"WARN", "CRIT", "UNKNOWN", "UNKN", "DOWN", "UNREACH"})
_CHECKMK_OK: Final = frozenset({"OK", "UP"})


def checkmk(msg: ParsedMessage) -> Alert | None:
    """``Check_MK: web01/Filesystem / OK -> CRIT`` (services) or ``Check_MK: web01 - UP ->
    DOWN`` (hosts); ``ACKNOWLEDGEMENT (CRIT)`` for an acknowledgement."""
    m = _CHECKMK_SUBJECT.match(msg.subject)
    if m is None:
        return None
    event = m.group("event").strip()
    if event.upper().startswith("ACKNOWLEDGEMENT"):
        state = event[event.find("(") + 1 : event.rfind(")")] if "(" in event else "ACK"
        phase: Phase = "acknowledgement"
    else:
        state = event.rsplit("->", 1)[-1].strip().upper()
        phase = _phase(state, _CHECKMK_PROBLEM, _CHECKMK_OK)
    f = fields(msg.body)
    host, service = f.get("host", m.group("host")), m.group("service")
    if service is not None:
        service = f.get("service", service)
    return Alert("checkmk", host, service, state.upper(), phase)


# -- Prometheus Alertmanager and Grafana alerting (the same default title) -----------------

_AM_SUBJECT: Final = re.compile(r"^\[(FIRING|RESOLVED)(?::\d{1,6})?\] (.{1,500}?)\s*$")


def _labels_alert(msg: ParsedMessage, source: str) -> Alert | None:
    m = _AM_SUBJECT.match(msg.subject)
    if m is None:
        return None
    f = fields(msg.body)
    status = m.group(1)
    # The group labels (before the common labels in brackets) name the alert group: the
    # same text firing and resolved.
    group = m.group(2).split(" (", 1)[0].strip()
    host = f.get("instance") or f.get("host") or f.get("grafana_folder") or "-"
    phase: Phase = "problem" if status == "FIRING" else "recovery"
    return Alert(source, host, f.get("alertname") or group, status, phase, alert_id=group)


def alertmanager(msg: ParsedMessage) -> Alert | None:
    """Alertmanager's ``email.default.subject``: ``[FIRING:2] InstanceDown (…)``, the labels
    listed as ``alertname = …`` lines in the body."""
    if "alertname" not in msg.body[:MAX_SCAN] or "grafana" in msg.body[:MAX_SCAN].lower():
        return None
    return _labels_alert(msg, "alertmanager")


def grafana(msg: ParsedMessage) -> Alert | None:
    """Grafana alerting's default email (same title as Alertmanager's; a ``grafana_folder``
    label and a "Sent by Grafana" footer)."""
    if "grafana" not in msg.body[:MAX_SCAN].lower() and msg.header("x-grafana-version") is None:
        return None
    return _labels_alert(msg, "grafana")


# -- Monit (the default mail-format) --------------------------------------------------------

# The event may be several words; the service name is one (Monit's names have no spaces).
_MONIT_SUBJECT: Final = re.compile(r"^monit alert --\s+(.{1,80}?)\s+(\S{1,300})$", re.I)
_MONIT_RECOVERY: Final = re.compile(r"(succeeded|passed|^exists$|^started$|^running$)", re.I)
_MONIT_INFO: Final = frozenset({"action done", "monit instance changed", "monit instance started"})


def monit(msg: ParsedMessage) -> Alert | None:
    """``monit alert --  Connection failed nginx`` with ``Host:`` in the body."""
    m = _MONIT_SUBJECT.match(msg.subject)
    if m is None:
        return None
    f = fields(msg.body)
    event, service = m.group(1).strip(), m.group(2).strip()
    host = f.get("host") or msg.from_addr.rpartition("@")[2] or "-"
    if event.lower() in _MONIT_INFO:
        phase: Phase = "info"
    elif _MONIT_RECOVERY.search(event):
        phase = "recovery"
    else:
        phase = "problem"
    return Alert("monit", host, service, event.upper(), phase)


# -- Uptime Kuma (its default notification text) -------------------------------------------

_KUMA_SUBJECT: Final = re.compile(
    r"^(?:\[Uptime Kuma\]\s*)?\[(.{1,200}?)\] \[(?:\S{1,4} )?(Up|Down|Pending|Maintenance)\]", re.I
)


_KUMA_PHASES: Final[dict[str, Phase]] = {"UP": "recovery", "DOWN": "problem"}


def uptime_kuma(msg: ParsedMessage) -> Alert | None:
    """``[My Website] [🔴 Down] Request failed…`` / ``[My Website] [✅ Up] 200 - OK``."""
    m = _KUMA_SUBJECT.match(msg.subject)
    if m is None:
        return None
    state = m.group(2).upper()
    phase = _KUMA_PHASES.get(state, "info")
    return Alert("uptime-kuma", m.group(1).strip(), None, state, phase)


# -- SCOM (the default e-mail notification format) -----------------------------------------

_SCOM_SUBJECT: Final = re.compile(r"^Alert: (.{1,300}?) Resolution state: (.{1,60})$")
_SCOM_ID: Final = re.compile(
    r"AlertID=(?:%7B|\{)?([0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})", re.I
)


def scom(msg: ParsedMessage) -> Alert | None:
    """``Alert: Logical disk free space is low Resolution state: New``; ``Source:`` and
    ``Path:`` name the object; resolution state New, Acknowledged (249) or Closed (255)."""
    m = _SCOM_SUBJECT.match(msg.subject)
    if m is None:
        return None
    f = fields(msg.body)
    state = m.group(2).strip()
    phase: Phase
    low = state.lower()
    if low in ("closed", "255", "resolved"):
        phase = "recovery"
    elif low in ("acknowledged", "249"):
        phase = "acknowledgement"
    elif low in ("new", "0"):
        phase = "problem"
    else:
        phase = "info"
    host = f.get("path") or f.get("source") or "-"
    found = _SCOM_ID.search(msg.body[:MAX_SCAN])
    alert_id = found.group(1).lower() if found else None
    return Alert("scom", host, m.group(1).strip(), state.upper(), phase, alert_id=alert_id)


Recogniser = Callable[[ParsedMessage], Alert | None]

# Most specific first: Grafana before Alertmanager (same title), Icinga 2 before the others.
BUILT_IN: Final[tuple[tuple[str, Recogniser], ...]] = (
    ("nagios", nagios),
    ("icinga2", icinga2),
    ("zabbix", zabbix),
    ("checkmk", checkmk),
    ("grafana", grafana),
    ("alertmanager", alertmanager),
    ("monit", monit),
    ("uptime-kuma", uptime_kuma),
    ("scom", scom),
)


def custom(msg: ParsedMessage, r: CustomRecogniser) -> Alert | None:
    """A mailbox's own recogniser: each of its patterns must match; their named groups
    ``host``, ``service``, ``state`` and ``alert`` make the alert."""
    groups: dict[str, str] = {}
    for pattern, text in ((r.subject, msg.subject), (r.body, msg.body[:MAX_SCAN])):
        if pattern is None:
            continue
        m = pattern.search(text)
        if m is None:
            return None
        groups.update({k: v.strip() for k, v in m.groupdict().items() if v})
    host = groups.get("host")
    if not host:
        return None
    state = groups.get("state", "").upper()
    if state in r.acknowledgement:
        phase: Phase = "acknowledgement"
    else:
        phase = _phase(state, r.problem, r.recovery)
    return Alert(r.name, host, groups.get("service"), state or "-", phase, groups.get("alert"))


def recognise(msg: ParsedMessage, mine: tuple[CustomRecogniser, ...] = ()) -> Alert | None:
    """The alert ``msg`` carries: the mailbox's recognisers first, then the built-ins."""
    for r in mine:
        alert = custom(msg, r)
        if alert is not None:
            return alert
    for _, recogniser in BUILT_IN:
        alert = recogniser(msg)
        if alert is not None:
            return alert
    return None
