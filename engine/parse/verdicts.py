"""Loop safety: is a message automatic (an auto-reply, a list, a bounce), and why.

The rules of RFC 3834 and of the peers (Auto-Submitted other than ``no``, X-Autoreply,
X-Auto-Response-Suppress, Precedence, List-Id/List-Unsubscribe, a null sender, a system
sender such as mailer-daemon), and delivery status notifications as bounces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, NamedTuple

from engine.parse.charsets import decode_8bit
from engine.parse.headers import first_field, one_line, param_text, parse_params

_SYSTEM_LOCAL_PARTS: Final = frozenset(
    {"mailer-daemon", "postmaster", "noreply", "no-reply", "do-not-reply", "donotreply"}
)
_COMMENT_RE: Final = re.compile(r"\([^()]*\)")


def _token(value: str) -> str:
    return one_line(_COMMENT_RE.sub("", decode_8bit(value)).split(";", 1)[0]).lower()


def _reason_text(value: str) -> str:
    """A header value fit for a short reason string: decoded, one line, 40 characters."""
    return one_line(decode_8bit(value))[:40]


class Verdict(NamedTuple):
    """Whether a message is automatic, why (for people), and whether it is a bounce."""

    auto_submitted: bool
    reason: str | None
    is_bounce: bool


_HUMAN: Final = Verdict(False, None, False)


def loop_verdict(
    headers: dict[str, list[str]], has_dsn_part: bool, senders: Iterable[str]
) -> Verdict:
    """The loop-safety verdict on a message: the first rule that holds decides.

    ``headers`` are the message's header fields (see :func:`~engine.parse.headers.header_map`),
    ``has_dsn_part`` says a part is a ``message/delivery-status``, ``senders`` are the
    addresses of From and Return-Path. Reports come first (a delivery status notification is a
    bounce), then the headers that mark automatic mail, then the sender.
    """
    top_type, top_params = parse_params(first_field(headers, "content-type") or "")
    report_type = (param_text(top_params.get("report-type")) or "").strip().lower()
    if has_dsn_part or (top_type == "multipart/report" and report_type == "delivery-status"):
        return Verdict(True, "delivery status notification", True)
    if top_type == "multipart/report":
        return Verdict(True, f"report: {_reason_text(report_type) or 'unknown'}", False)
    return _automatic_header(headers) or _automatic_sender(headers, senders) or _HUMAN


def _automatic_header(headers: dict[str, list[str]]) -> Verdict | None:
    """Auto-Submitted other than "no" (RFC 3834), X-Autoreply and the like, then bulk, junk
    and list mail (Precedence, List-Id, List-Unsubscribe)."""
    auto = first_field(headers, "auto-submitted")
    if auto is not None and _token(auto) != "no":
        return Verdict(True, f"Auto-Submitted: {_reason_text(_token(auto))}", False)
    for name in ("x-autoreply", "x-autorespond"):
        if name in headers:
            return Verdict(True, f"{name.title()} header", False)
    suppress = first_field(headers, "x-auto-response-suppress")
    if suppress is not None:
        tokens = {t.strip().lower() for t in decode_8bit(suppress).split(",")}
        if tokens & {"all", "autoreply", "oof"}:
            return Verdict(True, "X-Auto-Response-Suppress: " + _reason_text(suppress), False)
    precedence = first_field(headers, "precedence")
    if precedence is not None and _token(precedence) in ("bulk", "junk", "list", "auto_reply"):
        return Verdict(True, f"Precedence: {_reason_text(_token(precedence))}", False)
    for name, label in (("list-id", "List-Id"), ("list-unsubscribe", "List-Unsubscribe")):
        if name in headers:
            return Verdict(True, f"mailing list ({label})", False)
    return None


def _automatic_sender(headers: dict[str, list[str]], senders: Iterable[str]) -> Verdict | None:
    """A null sender (``Return-Path: <>``, an empty From) or a system one (mailer-daemon)."""
    return_path = first_field(headers, "return-path")
    from_value = first_field(headers, "from")
    if (return_path is not None and return_path.strip() == "<>") or (
        from_value is None or from_value.strip() in ("", "<>")
    ):
        return Verdict(True, "null sender", False)
    for address in senders:
        local = address.rpartition("@")[0].lower() if "@" in address else address.lower()
        if local in _SYSTEM_LOCAL_PARTS:
            return Verdict(True, f"system sender {local}", False)
    return None
