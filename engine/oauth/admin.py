"""What ``mailintegration oauth login`` and ``oauth status`` do (blocking: run in a thread).

``login`` runs the device-code flow (RFC 8628): it prints the provider's URL and code,
waits while the user approves in any browser, and keeps the refresh token in the token
store (replacing the old one), so the engine can refresh from then on. ``status`` shows
each mailbox's token health (:mod:`engine.oauth.health`) without asking any server.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine import logs
from engine.config import MailboxConfig, OAuth2Config, load_mailbox, secret_values
from engine.errors import ConfigError, OAuthError
from engine.oauth.broker import TokenBroker
from engine.oauth.health import Health, health

if TYPE_CHECKING:
    from engine.oauth.sources import Grant

__all__ = ["login", "status"]


def _oauth_mailbox(path: Path) -> MailboxConfig:
    cfg = load_mailbox(path)
    if cfg.server.oauth2 is None:
        raise ConfigError("this mailbox signs in with a password, not <oauth2>", file=str(path))
    for secret in secret_values(cfg):
        logs.register_secret(secret)
    return cfg


def login(path: Path, data_dir: Path, token_file: Path | None = None, timeout: float = 30.0) -> int:
    """Sign in once with a device code, or keep the refresh token in ``token_file`` (for
    providers whose device flow does not grant mail scopes, such as Google), after one
    refresh proves it works. 0 when done, 1 if refused."""
    cfg = _oauth_mailbox(path)
    oauth2 = cfg.server.oauth2
    assert oauth2 is not None
    if oauth2.flow != "refreshToken":
        raise ConfigError(
            "oauth login is for the refreshToken flow; clientCredentials needs no sign-in",
            file=str(path),
        )
    try:
        grant = (
            _device_grant(oauth2, timeout)
            if token_file is None
            else _imported(oauth2, token_file, timeout)
        )
    except OAuthError as exc:
        print(f"FAILED ({exc.reason}): {logs.scrub(str(exc))}")
        print(f"What to do: {exc.hint}")
        return 1
    TokenBroker(data_dir, timeout=timeout).login(cfg.account, oauth2, grant)
    print(f"OK: signed in; the refresh token for {cfg.server.user_name} is kept in {data_dir}.")
    return 0


def _device_grant(oauth2: OAuth2Config, timeout: float) -> Grant:
    from engine.oauth import sources

    flow = sources.device_start(oauth2, timeout)
    print(flow.message or f"Open {flow.verification_uri} and enter {flow.user_code}")
    print(f"Code: {flow.user_code}", flush=True)
    grant = sources.device_finish(oauth2, flow, timeout)
    if not grant.refresh_token:
        raise OAuthError(
            "login-required", "the sign-in gave no refresh token: add offline_access to <scope>"
        )
    return grant


def _imported(oauth2: OAuth2Config, token_file: Path, timeout: float) -> Grant:
    from engine.oauth import sources

    try:
        token = token_file.read_text(encoding="utf-8-sig").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {token_file}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"{token_file} is empty")
    logs.register_secret(token)
    grant = sources.refresh(oauth2, token, timeout)
    if grant.refresh_token is None:  # not rotated: the one given stays the one to use
        grant = dataclasses.replace(grant, refresh_token=token)
    return grant


def status(paths: list[Path], data_dir: Path, as_json: bool) -> int:
    """Each OAuth2 mailbox's token health; 1 when one has an error or a warning."""
    broker = TokenBroker(data_dir)
    found: list[Health] = []
    for path in paths:
        cfg = load_mailbox(path)
        if cfg.server.oauth2 is None:
            continue
        record = broker.store.load(cfg.account)
        found.append(health(cfg.name, cfg.server.oauth2, record))
    if as_json:
        json.dump([h.as_dict() for h in found], sys.stdout, indent=2)
        print()
    else:
        for h in found:
            print(_describe(h))
    return 1 if any(h.warnings or h.last_error for h in found) else 0


def _when(epoch: float) -> str:
    if not epoch:
        return "never"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe(h: Health) -> str:
    lines = [
        f"{h.mailbox}: {h.source or 'no token yet'}",
        f"  mechanism: {h.mechanism or 'not signed in yet'}; last sign-in {_when(h.last_sign_in)}",
        f"  last refresh: {_when(h.last_refresh)}; access token expires "
        f"{_when(h.access_expires_at)}",
    ]
    if h.refresh_token:
        lines.append(
            f"  refresh token: {h.refresh_age_days or 0:.1f} day(s) old, unused for "
            f"{h.refresh_idle_days or 0:.1f} day(s)"
        )
    if h.secret_expires:
        lines.append(
            f"  client secret expires {h.secret_expires} ({h.secret_days_left or 0:.0f} day(s))"
        )
    if h.last_error:
        lines.append(f"  last error: {h.last_error}")
    lines.extend(f"  WARNING: {text}" for _, text in h.warnings)
    return "\n".join(lines)
