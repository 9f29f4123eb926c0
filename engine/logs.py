"""Logging configuration, in one place.

Named loggers per subsystem (``engine.fetcher``, ``engine.writer``…), %-style arguments, and a
filter on every handler that replaces any configured password with ``********``: a secret that
slips into an exception text from a library still never reaches a log line.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

_SECRETS: set[str] = set()


def register_secret(value: str | None) -> None:
    """Passwords shorter than 4 characters would blank out ordinary words; they are rare."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def scrub(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "********")
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
