"""Logging configuration, in one place.

Named loggers per subsystem (``engine.fetcher``, ``engine.writer``…), %-style arguments, and a
filter on every handler that replaces any configured password with ``********``: a secret that
slips into an exception text from a library still never reaches a log line. The same
:func:`scrub` guards every text the store writes (see ``engine.store.sqlite``), /healthz and
what the command line prints: one list of secrets, one scrubber.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import sys
import urllib.parse
from pathlib import Path

_SECRETS: set[str] = set()
# Every form to mask, longest first so that a secret holding another is masked whole.
_NEEDLES: tuple[str, ...] = ()
_MASK = "********"


def register_secret(value: str | None) -> None:
    """Mask ``value`` from now on in logs and in everything the store writes.

    Passwords shorter than 4 characters would blank out ordinary words; they are rare.
    Besides the value as it is, the forms a server or a library may echo it in are masked:
    Python's repr (our errors quote a server's line with ``!r``), JSON, XML/HTML escaping,
    percent-encoding (servers and proxies that log URLs or form bodies) and base64 (what SMTP
    AUTH LOGIN sends, so what a server may quote back). Each form only costs a search when it
    differs from the value: an alphanumeric password adds its base64 alone.
    """
    global _NEEDLES
    if not value or len(value) < 4 or value in _SECRETS:
        return
    _SECRETS.add(value)
    forms = set(_NEEDLES) | {value, *_variants(value)}
    _NEEDLES = tuple(sorted((f for f in forms if len(f) >= 4), key=len, reverse=True))


def _variants(value: str) -> set[str]:
    return {
        repr(value)[1:-1],
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        html.escape(value),
        html.escape(value, quote=False),
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value, safe=""),
        base64.b64encode(value.encode()).decode().rstrip("="),
    }


def scrub(text: str) -> str:
    """``text`` with every registered secret, in each of its forms, replaced by ``********``."""
    for needle in _NEEDLES:
        if needle in text:
            text = text.replace(needle, _MASK)
    return text


class SecretFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            record.msg = scrub(record.getMessage())
            record.args = None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:
            out["exception"] = record.exc_text
        elif record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(
    *, level: int = logging.INFO, log_file: Path | None = None, fmt: str = "text"
) -> None:
    """Log to stderr, and to ``log_file`` when given (the original's /LogFilePath)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    formatter: logging.Formatter = (
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(formatter)
        h.addFilter(SecretFilter())
        root.addHandler(h)
    root.setLevel(level)
    # aiosqlite logs every call at DEBUG; that drowns /Debug output.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    # tnefparse warns on every malformed winmail.dat; parse.py already falls back safely.
    logging.getLogger("tnefparse").setLevel(logging.ERROR)
