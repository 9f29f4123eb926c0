"""``mailintegration config validate``: what every mailbox file resolves to, without connecting.

The files are found by the daemon's own discovery and read by its own loader, so a file
this reports as loading is one the daemon loads. Per file: the effective values (defaults
filled in), the team, the directory entries it needs, where its secrets come from (never
their values) and every problem as ``file:line: what``. The same account in two files is a
problem of both (two sessions would share one server mailbox).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import MailboxConfig, directory_needs, load_mailbox
from engine.errors import ConfigError
from engine.supervisor import MailboxSource, discover

__all__ = ["FileReport", "Need", "render", "reports"]

# Fields never shown, whatever their value: the secrets themselves.
_SECRET_FIELDS = frozenset({"password", "client_secret"})


@dataclass
class Need:
    """A directory entry a file needs; ``exists`` is None when no store was given."""

    element: str
    kind: str
    name: str | None
    exists: bool | None = None
    missing: str = ""
    line: int = 1


@dataclass
class FileReport:
    file: str
    mailbox: str
    team: str | None
    loaded: bool
    values: dict[str, Any] = field(default_factory=dict)
    needs: list[Need] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    account: str | None = None


def reports(
    config_dir: Path, *, default_team: str | None, follow_symlinks: bool
) -> tuple[list[FileReport], list[MailboxConfig | None]]:
    """One report per file discovery finds (refused ones included), and its config."""
    found: list[FileReport] = []
    configs: list[MailboxConfig | None] = []
    for src in discover(config_dir, follow_symlinks=follow_symlinks):
        report, cfg = _one(src, default_team)
        found.append(report)
        configs.append(cfg)
    _duplicates(found)
    return found, configs


def _one(src: MailboxSource, default_team: str | None) -> tuple[FileReport, MailboxConfig | None]:
    team = src.team or default_team
    report = FileReport(str(src.path), src.name, team, loaded=False)
    if src.refused is not None:
        report.problems.append(f"{src.path}: {src.refused}")
        return report, None
    try:
        cfg = load_mailbox(src.path, default_team=team, name=src.name, team_rules=src.rules)
    except ConfigError as exc:
        where = f"{exc.file or src.path}:{exc.line}" if exc.line else f"{exc.file or src.path}"
        element = f" (element <{exc.element}>)" if exc.element else ""
        report.problems.append(f"{where}: {exc.reason}{element}")
        return report, None
    report.loaded = True
    report.team = cfg.team
    report.account = cfg.account
    report.values = _flatten(cfg)
    report.secrets = _secret_sources(cfg)
    report.needs = [
        Need(n.label, n.table, n.name, missing=n.missing, line=_line_of(src.path, n.label))
        for n in directory_needs(cfg)
    ]
    return report, cfg


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A config's fields as ``server.port: 995``; nested settings dotted, secrets left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(value):
        if f.name in _SECRET_FIELDS or (f.name in {"path", "name"} and not prefix):
            continue
        v = getattr(value, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out.update(_flatten(v, f"{key}."))
        elif isinstance(v, tuple) and v and dataclasses.is_dataclass(v[0]):
            out[key] = f"{len(v)} defined"
        else:
            out[key] = _plain(v)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, re.Pattern):
        return v.pattern
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple | frozenset | list):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def _secret_sources(cfg: MailboxConfig) -> dict[str, str]:
    """Where each secret comes from: a file, a variable of the environment, the token
    store, or (discouraged) the file itself. Never a value."""
    s = cfg.server
    out: dict[str, str] = {}
    if s.oauth2 is not None:
        o = s.oauth2
        out["server sign-in"] = f"OAuth2 {o.provider} {o.flow}, tokens in the data directory"
        if o.client_secret_file:
            out["client secret"] = f"file {o.client_secret_file}"
        elif o.client_secret_env:
            out["client secret"] = f"environment variable {o.client_secret_env}"
        elif o.certificate_file:
            out["client secret"] = f"certificate {o.certificate_file}"
        else:
            out["client secret"] = "none"
    else:
        out["server password"] = _password_source(s.password_file, s.password_env)
    if cfg.smtp is not None and cfg.smtp.user_name:
        m = cfg.smtp
        out["smtp password"] = (
            "the mailbox's OAuth2 token"
            if m.oauth2 is not None
            else _password_source(m.password_file, m.password_env)
        )
    return out


def _password_source(file: str | None, env: str | None) -> str:
    if file:
        return f"file {file}"
    if env:
        return f"environment variable {env}"
    return "written in the mailbox file (prefer passwordFile or passwordEnv)"


def _duplicates(found: list[FileReport]) -> None:
    by_account: dict[str, list[FileReport]] = defaultdict(list)
    for r in found:
        if r.account is not None:
            by_account[r.account].append(r)
    for account, same in by_account.items():
        if len(same) < 2:
            continue
        for r in same:
            others = ", ".join(o.file for o in same if o is not r)
            r.problems.append(
                f"{r.file}:{_line_of(Path(r.file), 'userName')}: the same mailbox "
                f"({account}) is read by {others}"
            )


def _line_of(path: Path, element: str) -> int:
    """The line of the first ``<element>`` in ``path`` (1 if not found)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return 1
    if not element.isidentifier():  # a rule's setting: the rules file says where
        return 1
    tag = f"<{element.lower()}>"
    return next((i for i, line in enumerate(lines, 1) if tag in line.lower()), 1)


def render(found: list[FileReport], total: list[FileReport] | None = None) -> str:
    """The text report of ``found``; the summary counts ``total`` (default: ``found``)."""
    lines: list[str] = []
    for r in found:
        lines += _render_one(r)
    every = found if total is None else total
    bad = sum(1 for r in every if r.problems)
    broken = sum(1 for r in every if not r.loaded)
    lines.append(
        f"{len(every)} file(s): {len(every) - bad} ok, {bad} with problems, {broken} would not load"
    )
    return "\n".join(lines)


def _render_one(r: FileReport) -> list[str]:
    lines = [
        f"{r.file}: {'ok' if not r.problems else 'PROBLEMS'}",
        f"  mailbox: {r.mailbox}",
        f"  team: {r.team or '-'}",
    ]
    if not r.loaded:
        lines.append("  would not load")
    if r.values:
        lines.append("  values:")
        lines += [f"    {k}: {_show(v)}" for k, v in r.values.items()]
    if r.needs:
        lines.append("  directory:")
        for n in r.needs:
            state = {None: "unknown", True: "exists", False: "MISSING"}[n.exists]
            lines.append(f"    {n.element}: {n.name or '(the only team)'} ({n.kind}): {state}")
    if r.secrets:
        lines.append("  secrets:")
        lines += [f"    {k}: {v}" for k, v in r.secrets.items()]
    if r.problems:
        lines.append("  problems:")
        lines += [f"    {p}" for p in r.problems]
    return lines


def _show(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return ", ".join(str(x) for x in v) or "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
