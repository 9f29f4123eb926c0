"""The settings of what a message means, read from a mailbox file already validated by the
XSD: alert correlation, service requests, priority, routing rules and foreign ticket numbers.

Kept apart from :mod:`engine.config` (which reads the file and the server settings) so that
each stays small; :func:`build` is called by it with the validated root element. Every
problem is a :class:`~engine.errors.ConfigError` naming the file, the line and the element.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from lxml import etree

from engine.errors import ConfigError

Flapping = Literal["reopen", "activity"]
RequestType = Literal["incident", "event", "service request"]
ErrorAt = Callable[[str, etree._Element | None], ConfigError]

# The rule conditions, element name -> what they read (see engine.processors.rules).
CONDITIONS: Final = ("sender", "senderDomain", "to", "cc", "subject", "body", "header")
REQUEST_TYPES: Final[dict[str, RequestType]] = {
    "incident": "incident",
    "event": "event",
    "service request": "service request",
    "servicerequest": "service request",
}


@dataclass(frozen=True)
class CustomRecogniser:
    """A mailbox's own alert format: named groups ``host``, ``service``, ``state`` and
    ``alert`` in its patterns, and the states that mean problem, recovery, acknowledgement
    (upper-cased)."""

    name: str
    subject: re.Pattern[str] | None
    body: re.Pattern[str] | None
    problem: frozenset[str]
    recovery: frozenset[str]
    acknowledgement: frozenset[str]


@dataclass(frozen=True)
class Correlation:
    """Alert correlation of the event processor (on by default)."""

    enabled: bool = True
    flapping: Flapping = "reopen"
    flapping_minutes: int = 30
    recognisers: tuple[CustomRecogniser, ...] = ()


@dataclass(frozen=True)
class ServiceRequests:
    """``EndUserNewSRMailMessageProcessor``: the marker around the form (``CreateSR``), the
    field naming the form and the mailbox's default form."""

    token: str = "CreateSR"
    form_field: str = "Form"
    default_form: str | None = None


@dataclass(frozen=True)
class HeaderPriorities:
    """The directory's priority for mail marked high, normal or low (X-Priority,
    Importance, Priority headers); None keeps the request's priority."""

    high: str | None = "High"
    normal: str | None = None
    low: str | None = "Low"


@dataclass(frozen=True)
class Condition:
    """``what`` (one of :data:`CONDITIONS`) matches ``pattern`` (searched, not anchored);
    ``header`` names the field for a header condition."""

    what: str
    pattern: re.Pattern[str]
    header: str | None = None


@dataclass(frozen=True)
class Rule:
    """A routing rule: every condition must match; then its actions apply, in order."""

    name: str
    file: str
    line: int | None
    conditions: tuple[Condition, ...]
    team: str | None = None
    group: str | None = None
    assignee: str | None = None
    priority: str | None = None
    type: RequestType | None = None
    source: str | None = None
    tags: tuple[str, ...] = ()
    priority_from_headers: bool = False
    ignore: bool = False
    refuse: bool = False
    stop: bool = False

    @property
    def where(self) -> str:
        return f"{self.file}, line {self.line}" if self.line else self.file


@dataclass(frozen=True)
class ForeignPattern:
    """A foreign system's ticket numbers (ServiceNow ``INC0012345``, Jira ``ABC-123``)."""

    system: str
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class Processing:
    """Everything of a mailbox that says what its messages mean beyond the processor."""

    correlation: Correlation = field(default_factory=Correlation)
    service_requests: ServiceRequests = field(default_factory=ServiceRequests)
    priority: str | None = None
    header_priorities: HeaderPriorities = field(default_factory=HeaderPriorities)
    rules: tuple[Rule, ...] = ()
    foreign_patterns: tuple[ForeignPattern, ...] = ()


# -- reading -------------------------------------------------------------------------------


def _text(parent: etree._Element, name: str) -> str | None:
    el = parent.find(name)
    if el is None:
        return None
    return " ".join((el.text or "").split()) or None


def _flag(parent: etree._Element, name: str, default: bool = False) -> bool:
    value = _text(parent, name)
    return default if value is None else value.lower() in ("true", "1")


def _states(parent: etree._Element, name: str) -> frozenset[str]:
    return frozenset(s.strip().upper() for s in (_text(parent, name) or "").split(",") if s.strip())


def _regex(
    el: etree._Element, error: ErrorAt, *, ignore_case: bool = False, text: str | None = None
) -> re.Pattern[str]:
    """The element's text (or ``text``) as a regular expression."""
    try:
        source = (el.text or "") if text is None else text
        return re.compile(source.strip(), re.IGNORECASE if ignore_case else 0)
    except re.error as exc:
        where = f" at position {exc.pos}" if exc.pos is not None else ""
        raise error(f"not a valid regular expression: {exc.msg}{where}", el) from None


def build(root: etree._Element, error: ErrorAt, file: str) -> Processing:
    """The processing settings of a validated mailbox root element."""
    return Processing(
        correlation=_correlation(root.find("correlation"), error),
        service_requests=ServiceRequests(
            token=_text(root, "newSRBodyEnclosingToken") or "CreateSR",
            form_field=_text(root, "serviceRequestFormField") or "Form",
            default_form=_text(root, "serviceRequestForm"),
        ),
        priority=_text(root, "incidentPriority"),
        header_priorities=_header_priorities(root.find("headerPriorities")),
        rules=rules_of(root.find("rules"), error, file),
        foreign_patterns=_foreign(root.find("foreignTicketNumbers"), error),
    )


def _correlation(el: etree._Element | None, error: ErrorAt) -> Correlation:
    if el is None:
        return Correlation()
    listed = el.find("recognisers")
    recognisers = () if listed is None else listed.iterfind("recogniser")
    mode = (_text(el, "flapping") or "reopen").lower()
    minutes = _text(el, "flappingMinutes")
    return Correlation(
        enabled=_flag(el, "enabled", True),
        flapping="activity" if mode == "activity" else "reopen",
        flapping_minutes=30 if minutes is None else int(minutes),
        recognisers=tuple(_recogniser(r, error) for r in recognisers),
    )


def _recogniser(r: etree._Element, error: ErrorAt) -> CustomRecogniser:
    subject_el, body_el = r.find("subject"), r.find("body")
    if subject_el is None and body_el is None:
        raise error("a recogniser needs a <subject> or <body> pattern", r)
    subject = _regex(subject_el, error) if subject_el is not None else None
    body = _regex(body_el, error) if body_el is not None else None
    if not any(p is not None and "host" in p.groupindex for p in (subject, body)):
        raise error('a recogniser needs a group named "host", such as (?P<host>\\S+)', r)
    return CustomRecogniser(
        name=_text(r, "name") or "custom",
        subject=subject,
        body=body,
        problem=_states(r, "problemStates"),
        recovery=_states(r, "recoveryStates"),
        acknowledgement=_states(r, "acknowledgementStates"),
    )


def _header_priorities(el: etree._Element | None) -> HeaderPriorities:
    if el is None:
        return HeaderPriorities()
    return HeaderPriorities(
        high=_text(el, "high"), normal=_text(el, "normal"), low=_text(el, "low")
    )


def _foreign(el: etree._Element | None, error: ErrorAt) -> tuple[ForeignPattern, ...]:
    if el is None:
        return ()
    out = []
    for f in el.iterfind("foreignTicketNumber"):
        pattern_el = f.find("pattern")
        assert pattern_el is not None  # required by the schema
        out.append(ForeignPattern(_text(f, "system") or "foreign", _regex(pattern_el, error)))
    return tuple(out)


def rules_of(el: etree._Element | None, error: ErrorAt, file: str) -> tuple[Rule, ...]:
    """The ``<rule>`` elements of a ``<rules>`` element, in order."""
    if el is None:
        return ()
    return tuple(_rule(r, i, error, file) for i, r in enumerate(el.iterfind("rule"), 1))


def _rule(el: etree._Element, index: int, error: ErrorAt, file: str) -> Rule:
    ignore_case = not _flag(el, "caseSensitive")
    conditions = []
    for what in CONDITIONS:
        c = el.find(what)
        if c is None:
            continue
        header, rest = None, ""
        if what == "header":
            # "Name: regex": the field's name, then the pattern its value must match.
            name, colon, rest = (c.text or "").partition(":")
            if not colon or not re.fullmatch(r"[!-9;-~]{1,76}", name.strip()):
                raise error('a header condition is written "Field-Name: pattern"', c)
            header = name.strip().lower()
        text = rest if header is not None else None
        pattern = _regex(c, error, ignore_case=ignore_case, text=text)
        conditions.append(Condition(what, pattern, header))
    kind = _text(el, "setType")
    type_ = None
    if kind is not None:
        type_ = REQUEST_TYPES.get(kind.lower())
        if type_ is None:
            raise error(
                f"unknown request type {kind!r}; valid: incident, event, service request",
                el.find("setType"),
            )
    tags = tuple(t.strip() for t in (_text(el, "addTag") or "").split(",") if t.strip())
    return Rule(
        name=_text(el, "name") or f"rule {index}",
        file=file,
        line=el.sourceline if isinstance(el.sourceline, int) else None,
        conditions=tuple(conditions),
        team=_text(el, "setTeam"),
        group=_text(el, "setGroup"),
        assignee=_text(el, "setAssignee"),
        priority=_text(el, "setPriority"),
        type=type_,
        source=_text(el, "setSource"),
        tags=tags,
        priority_from_headers=_flag(el, "priorityFromHeaders"),
        ignore=_flag(el, "ignore"),
        refuse=_flag(el, "refuse"),
        stop=_flag(el, "stop"),
    )
