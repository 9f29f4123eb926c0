"""Routing rules: conditions on a message, actions on the request it makes.

A pure step around the processors (:func:`engine.processors.decide`): :func:`matching`
picks the rules whose conditions all match, in order, up to the first matching rule that
stops (``stop``, ``ignore`` or ``refuse``); an ``ignore`` among them records the message in
the ledger and deletes it, whatever it is; otherwise the processor decides and
:func:`apply` changes a *new* request by the matched rules' actions (later rules override
earlier ones; tags add up). A reply to an existing request is not routed.

The names a rule gives (group, user, priority, source, team) are checked against the
directory before a mailbox is read (``Writer._check_rules``), with the rule's file and line.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any, Final

from engine.config_rules import Condition, HeaderPriorities, Rule
from engine.errors import DirectoryError
from engine.model import DirectoryView, ParsedMessage
from engine.parse import header_text
from engine.processors import Context, Decision, NewRequest, Refuse

MAX_BODY: Final = 65_536
"""The characters of the body a body condition reads."""


def _texts(msg: ParsedMessage, c: Condition) -> Iterable[str]:
    if c.what == "sender":
        return (msg.from_addr,)
    if c.what == "senderDomain":
        return (msg.from_addr.rpartition("@")[2],)
    if c.what == "to":
        return msg.to
    if c.what == "cc":
        return msg.cc
    if c.what == "subject":
        return (msg.subject,)
    if c.what == "body":
        return (msg.body[:MAX_BODY],)
    return (header_text(value) for name, value in msg.headers if name == c.header)


def matches(msg: ParsedMessage, rule: Rule) -> bool:
    """Whether every condition of ``rule`` holds for ``msg``."""
    return all(any(c.pattern.search(t) for t in _texts(msg, c)) for c in rule.conditions)


def matching(msg: ParsedMessage, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """The rules that match ``msg``, in order, up to the first that ends the evaluation."""
    out: list[Rule] = []
    for rule in rules:
        if matches(msg, rule):
            out.append(rule)
            if rule.stop or rule.ignore or rule.refuse:
                break
    return tuple(out)


_X_PRIORITY: Final = re.compile(r"^\s*([1-5])")
_WORDS: Final = {
    "high": "high",
    "urgent": "high",
    "normal": "normal",
    "low": "low",
    "non-urgent": "low",
}


def header_priority(msg: ParsedMessage, names: HeaderPriorities) -> str | None:
    """The directory's priority for what the sender marked: X-Priority (1-2 high, 3 normal,
    4-5 low), then Importance, then Priority; None if unmarked or mapped to nothing."""
    level = None
    x = _X_PRIORITY.match(header_text(msg.header("x-priority") or ""))
    if x is not None:
        level = {"1": "high", "2": "high", "3": "normal"}.get(x.group(1), "low")
    for field in ("importance", "priority"):
        if level is None:
            level = _WORDS.get(header_text(msg.header(field) or "").lower())
    return None if level is None else getattr(names, level)


async def apply(
    msg: ParsedMessage,
    ctx: Context,
    directory: DirectoryView,
    decision: Decision,
    matched: tuple[Rule, ...],
) -> Decision:
    """``decision`` changed by the actions of the ``matched`` rules (a new request only)."""
    if not matched:
        return decision
    names = tuple(r.name for r in matched)
    if not isinstance(decision, NewRequest):
        return dataclasses.replace(decision, matched_rules=names)
    changes: dict[str, Any] = {}
    tags = list(decision.tags)
    for rule in matched:
        if rule.refuse:
            return dataclasses.replace(_refuse(msg, ctx, rule), matched_rules=names)
        for attr in ("team", "group", "priority", "type", "source"):
            if getattr(rule, attr) is not None:
                changes[attr] = getattr(rule, attr)
        if rule.assignee is not None:
            changes["assignee"] = await _user(directory, rule)
        if rule.priority_from_headers:
            marked = header_priority(msg, ctx.mailbox.processing.header_priorities)
            if marked is not None:
                changes["priority"] = marked
        tags += rule.tags
    changes["tags"] = tuple(dict.fromkeys(tags))
    return dataclasses.replace(decision, matched_rules=names, **changes)


async def _user(directory: DirectoryView, rule: Rule) -> Any:
    assert rule.assignee is not None
    user = await directory.user_by_login(rule.assignee)
    if user is None:  # checked before the session; the directory changed since
        raise DirectoryError(
            f"rule {rule.name!r} ({rule.where}): user {rule.assignee!r} is unknown"
        )
    return user


def _refuse(msg: ParsedMessage, ctx: Context, rule: Rule) -> Refuse:
    """No request; the mailbox's reply template answers, unless it would answer a machine."""
    reason = f"refused by rule {rule.name!r} ({rule.where})"
    if msg.auto_submitted or not msg.from_addr:
        return Refuse(reason, reply=False, no_reply_because=msg.auto_reason or "no sender")
    if ctx.mailbox.smtp is None:
        return Refuse(reason, reply=False, no_reply_because="no smtp configured")
    return Refuse(reason, reply=True)


def describe_matched(rules: tuple[Rule, ...]) -> str:
    """For once --dry-run: the rules that matched, with where they are written."""
    return ", ".join(f"{r.name} ({r.where})" for r in rules) or "none"
