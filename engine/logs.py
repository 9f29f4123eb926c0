"""Logging configuration, in one place.

Named loggers per subsystem (``engine.session``, ``engine.writer``…), %-style arguments, and a
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
import math
import re
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import ahocorasick_rs

_SECRETS: set[str] = set()
_MASK = "********"
# Below this many forms a search per form is cheaper than an automaton's pass (~1.5 us per
# form and ~10 us a pass, on a 2 KiB text here).
_AUTOMATON_FROM = 8


@dataclass(frozen=True)
class _Scrubber:
    """Every form to mask, longest first (so that a secret holding another is masked whole),
    and, for many forms, one Aho-Corasick automaton over them all. Replaced whole when a
    secret is added, so a scrub running meanwhile in another thread sees one or the other."""

    needles: tuple[str, ...] = ()
    automaton: ahocorasick_rs.AhoCorasick | None = None


_STATE = _Scrubber()


def register_secret(value: str | None) -> None:
    """Mask ``value`` from now on in logs and in everything the store writes.

    Passwords shorter than 4 characters would blank out ordinary words; they are rare.
    Besides the value as it is, the forms a server or a library may echo it in are masked:
    Python's repr (our errors quote a server's line with ``!r``), JSON, XML/HTML escaping,
    percent-encoding (servers and proxies that log URLs or form bodies) and base64 (what SMTP
    AUTH LOGIN sends, so what a server may quote back). A form only counts when it differs
    from the value: an alphanumeric password adds its base64 alone.
    """
    global _STATE
    if not value or len(value) < 4 or value in _SECRETS:
        return
    _SECRETS.add(value)
    forms = set(_STATE.needles) | {value, *_variants(value)}
    needles = tuple(sorted((f for f in forms if len(f) >= 4), key=len, reverse=True))
    automaton = None
    if len(needles) >= _AUTOMATON_FROM:
        automaton = ahocorasick_rs.AhoCorasick(
            needles, matchkind=ahocorasick_rs.MatchKind.LeftmostLongest
        )
    _STATE = _Scrubber(needles, automaton)


def forget_secret(value: str) -> None:
    """Stop masking ``value`` (a token long replaced): the scrubber stays bounded however
    many tokens a long-running engine sees. Forms shared with a kept secret stay."""
    global _STATE
    if value not in _SECRETS:
        return
    _SECRETS.discard(value)
    forms = {f for s in _SECRETS for f in (s, *_variants(s))}
    needles = tuple(sorted((f for f in forms if len(f) >= 4), key=len, reverse=True))
    automaton = None
    if len(needles) >= _AUTOMATON_FROM:
        automaton = ahocorasick_rs.AhoCorasick(
            needles, matchkind=ahocorasick_rs.MatchKind.LeftmostLongest
        )
    _STATE = _Scrubber(needles, automaton)


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
    """``text`` with every registered secret, in each of its forms, replaced by ``********``.

    It runs on every text the store writes, so its cost per message matters: with one
    mailbox, a search per form (~2.5 us a message of 2 KiB here); with 51 secrets (102
    forms), one automaton pass (18-27 us, against ~100 us for a search per form).
    """
    state = _STATE
    if state.automaton is None:
        for needle in state.needles:
            if needle in text:
                text = text.replace(needle, _MASK)
        return text
    found = state.automaton.find_matches_as_indexes(text)
    if not found:
        return text
    parts: list[str] = []
    last = 0
    for _, start, end in found:  # leftmost-longest, never overlapping
        parts += [text[last:start], _MASK]
        last = end
    parts.append(text[last:])
    return "".join(parts)


class SecretFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            record.msg = scrub(record.getMessage())
            record.args = None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class _SecondFormatter(logging.Formatter):
    """``logging.Formatter`` with the time formatted once per second, not once per line: the
    writer logs a line per message, and ``localtime`` + ``strftime`` were a fifth of one.
    The same text as the base class's (a property test holds the two equal)."""

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt)
        self._second: tuple[int, str | None, str] = (-1, None, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = math.floor(record.created)  # as localtime() rounds it
        cached = self._second
        if cached[0] != second or cached[1] != datefmt:
            stamp = time.strftime(datefmt or self.default_time_format, self.converter(second))
            self._second = cached = (second, datefmt, stamp)
        if datefmt or not self.default_msec_format:
            return cached[2]
        return self.default_msec_format % (cached[2], record.msecs)


class TextFormatter(_SecondFormatter):
    """The text lines: time, level, logger, message."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")


class JsonFormatter(_SecondFormatter):
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


_PER_MESSAGE = re.compile(r"mailbox=\S+ uidl=\S+ ")


class PerMessageFilter(logging.Filter):
    """Leaves out the writer's INFO line per committed message (``mailbox=... uidl=...``):
    on a terminal, progress bars and one summary per mailbox say it (engine.progress).
    Warnings about a message stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        # The message as rendered: the SecretFilter before this one has already scrubbed
        # and formatted it.
        return not (
            record.name == "engine.writer"
            and record.levelno == logging.INFO
            and _PER_MESSAGE.match(record.getMessage()) is not None
        )


def configure(
    *, level: int = logging.INFO, log_file: Path | None = None, fmt: str = "text"
) -> None:
    """Log to stderr, and to ``log_file`` when given (the original's /LogFilePath)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(formatter)
        h.addFilter(SecretFilter())
        root.addHandler(h)
    root.setLevel(level)
    # What our formats never show, and each record would otherwise find out (the logging
    # HOWTO's "Optimization"): the caller's file, line and function (a walk up the stack),
    # the thread, the process. ~4 us of a line's ~13 here.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # aiosqlite logs every call at DEBUG; that drowns /Debug output.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    # tnefparse warns on every malformed winmail.dat; parse.py already falls back safely.
    logging.getLogger("tnefparse").setLevel(logging.ERROR)
