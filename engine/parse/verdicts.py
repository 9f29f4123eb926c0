"""Loop safety: is a message automatic (an auto-reply, a list, a bounce), and why.

The rules of RFC 3834 and of the peers (Auto-Submitted other than ``no``, X-Autoreply,
X-Auto-Response-Suppress, Precedence, List-Id/List-Unsubscribe, a null sender, a system
sender such as mailer-daemon), and delivery status notifications as bounces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

from engine.parse.charsets import decode_8bit
from engine.parse.headers import Param, first_field, one_line, param_text

_SYSTEM_LOCAL_PARTS: Final = frozenset(
    {"mailer-daemon", "postmaster", "noreply", "no-reply", "do-not-reply", "donotreply"}
)
_COMMENT_RE: Final = re.compile(r"\([^()]*\)")


def _token(value: str) -> str:
    return one_line(_COMMENT_RE.sub("", decode_8bit(value)).split(";", 1)[0]).lower()


def _reason_text(value: str) -> str:
    """A header value fit for a short reason string: decoded, one line, 40 characters."""
    return one_line(decode_8bit(value))[:40]


def loop_verdict(
    headers: dict[str, list[str]],
    top_type: str,
    top_params: Mapping[str, Param],
    has_dsn_part: bool,
    senders: Iterable[str],
    null_sender: bool,
) -> tuple[bool, str | None, bool]:
    """(auto_submitted, reason, is_bounce) for the loop-safety rules."""
    report_type = param_text(top_params.get("report-type"))
    report_type = (report_type or "").strip().lower()
    if has_dsn_part or (top_type == "multipart/report" and report_type == "delivery-status"):
        return True, "delivery status notification", True
    if top_type == "multipart/report":
        return True, f"report: {_reason_text(report_type) or 'unknown'}", False
    auto = first_field(headers, "auto-submitted")
    if auto is not None and _token(auto) != "no":
        return True, f"Auto-Submitted: {_reason_text(_token(auto))}", False
    for name in ("x-autoreply", "x-autorespond"):
        if name in headers:
            return True, f"{name.title()} header", False
    suppress = first_field(headers, "x-auto-response-suppress")
    if suppress is not None:
        tokens = {t.strip().lower() for t in decode_8bit(suppress).split(",")}
        if tokens & {"all", "autoreply", "oof"}:
            return True, "X-Auto-Response-Suppress: " + _reason_text(suppress), False
    precedence = first_field(headers, "precedence")
    if precedence is not None and _token(precedence) in ("bulk", "junk", "list", "auto_reply"):
        return True, f"Precedence: {_reason_text(_token(precedence))}", False
    for name, label in (("list-id", "List-Id"), ("list-unsubscribe", "List-Unsubscribe")):
        if name in headers:
            return True, f"mailing list ({label})", False
    if null_sender:
        return True, "null sender", False
    for address in senders:
        local = address.rpartition("@")[0].lower() if "@" in address else address.lower()
        if local in _SYSTEM_LOCAL_PARTS:
            return True, f"system sender {local}", False
    return False, None, False
