"""Token health: what ``oauth status``, the metrics and the warning events say about an
OAuth2 mailbox before anything fails (no peer warns: their users learn of an expired token
when mail has stopped for days).

Two expiries are known ahead: the client secret's (``clientSecretExpires``, from the app
registration), and a refresh token's inactivity expiry (the provider drops a refresh token
unused for long: Entra after 90 days, Google after six months). The engine uses its refresh
token at every refresh, so the second only nears when a mailbox stopped being read.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

from engine.config import OAuth2Config
from engine.oauth.store import TokenRecord

__all__ = ["INACTIVITY_DAYS", "Health", "health"]

# A refresh token unused this many days expires (the provider's documented inactivity rule).
INACTIVITY_DAYS = {"microsoft": 90, "google": 180, "generic": 90}
_DAY = 86400.0


@dataclass(frozen=True)
class Health:
    """One mailbox's token health. Times are epoch seconds (0: never / unknown)."""

    mailbox: str
    source: str
    mechanism: str
    last_refresh: float
    last_sign_in: float
    access_expires_at: float
    refresh_token: bool
    refresh_age_days: float | None
    refresh_idle_days: float | None
    secret_expires: str | None
    secret_days_left: float | None
    last_error: str
    warnings: tuple[tuple[str, str], ...]
    """(key, text): a key per expiry (stable, so a warning event is made once per expiry)."""

    def as_dict(self) -> dict[str, object]:
        out = dict(self.__dict__)
        out["warnings"] = [text for _, text in self.warnings]
        return out


def health(
    mailbox: str, cfg: OAuth2Config, record: TokenRecord, now: float | None = None
) -> Health:
    """The health of ``mailbox``'s tokens (``record``) under its settings ``cfg``."""
    now = time.time() if now is None else now
    has_rt = bool(record.refresh_token)
    age = (
        (now - record.refresh_obtained_at) / _DAY if has_rt and record.refresh_obtained_at else None
    )
    idle = (now - record.refresh_last_used) / _DAY if has_rt and record.refresh_last_used else None
    expires = cfg.client_secret_expires
    days_left = None
    if expires is not None:
        end = datetime.datetime.combine(expires, datetime.time(), datetime.UTC).timestamp()
        days_left = (end - now) / _DAY
    return Health(
        mailbox=mailbox,
        source=record.source,
        mechanism=record.mechanism,
        last_refresh=record.last_refresh,
        last_sign_in=record.last_sign_in,
        access_expires_at=record.expires_at,
        refresh_token=has_rt,
        refresh_age_days=age,
        refresh_idle_days=idle,
        secret_expires=None if expires is None else expires.isoformat(),
        secret_days_left=days_left,
        last_error=record.last_error,
        warnings=_warnings(cfg, days_left, idle, record),
    )


def _warnings(
    cfg: OAuth2Config, days_left: float | None, idle: float | None, record: TokenRecord
) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    if days_left is not None and days_left <= cfg.warn_days:
        when = "has expired" if days_left <= 0 else f"expires in {max(0, int(days_left))} day(s)"
        out.append(
            (
                f"secret:{cfg.client_secret_expires}",
                f"The client secret of app {cfg.client_id} {when} ({cfg.client_secret_expires}). "
                "Create a new secret in the app registration, put it in clientSecretFile / "
                "clientSecretEnv, and update clientSecretExpires.",
            )
        )
    limit = INACTIVITY_DAYS[cfg.provider]
    if idle is not None and idle >= limit - cfg.warn_days:
        out.append(
            (
                f"idle:{int(record.refresh_obtained_at)}",
                f"The refresh token has not been used for {int(idle)} day(s); {cfg.provider} "
                f"drops one unused for {limit} days. Let the engine read this mailbox, or run "
                "'mailintegration oauth login' again.",
            )
        )
    return tuple(out)
