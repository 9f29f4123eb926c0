"""The token broker: the one place a gateway (or the SMTP send) gets an access token from.

It refreshes ahead of expiry, under the account's lock (:meth:`TokenStore.locked`), so
that concurrent sessions of one account, and a ``check`` or ``oauth login`` in another
process, never race one refresh token against another (a rotated refresh token works once).
The new record is durable before the token is handed out. Every token it sees is
registered with the log scrubber before it can be used, and forgotten once it is long
replaced, so the scrubber stays bounded.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine import logs
from engine.config import OAuth2Config
from engine.errors import OAuthError
from engine.oauth.store import TokenRecord, TokenStore

if TYPE_CHECKING:
    # msal, authlib and requests load only when a token is needed: most mailboxes use
    # passwords, and every command start pays for what it imports.
    from engine.oauth import sources

__all__ = ["AccessToken", "TokenBroker", "refresh_margin"]

# Tokens per account kept in the scrubber: the current ones and those just replaced (a
# session that started with one may still be logging about it).
_SCRUB_KEPT = 6


@dataclass(frozen=True)
class AccessToken:
    """An access token to sign in with, its expiry (epoch seconds) and granted scopes;
    ``fresh`` when it was just obtained (not taken from the store)."""

    value: str = field(repr=False)
    expires_at: float
    scopes: frozenset[str]
    fresh: bool
    source: str


def refresh_margin(lifetime: float) -> float:
    """How long before its expiry a token is replaced: half its life, at most 5 minutes
    (a one-hour token is refreshed at 55 minutes, a five-second one at 2.5 s)."""
    return min(300.0, max(0.5, lifetime / 2))


def source_name(cfg: OAuth2Config) -> str:
    """The token source as ``oauth status`` and ``check`` name it."""
    how = (
        "certificate"
        if cfg.certificate_file is not None
        else "secret"
        if cfg.client_secret
        else "public client"
    )
    return f"{cfg.provider} {cfg.flow} ({how}) at {cfg.token_endpoint}"


class TokenBroker:
    """Access tokens for every OAuth2 account of one data directory."""

    def __init__(
        self, data_dir: Path, *, timeout: float = 30.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = TokenStore(data_dir / "oauth")
        self.timeout = timeout
        self.clock = clock
        self._scrub_lock = threading.Lock()
        self._registered: dict[str, collections.deque[str]] = {}

    def access_token(self, account: str, cfg: OAuth2Config, *, force: bool = False) -> AccessToken:
        """A token valid for a while yet: the stored one, else a new one from the source
        (``force``: a new one whatever the store holds). Raises OAuthError."""
        with self.store.locked(account):
            record = self.store.load(account)
            now = self.clock()
            self._remember(account, record.access_token, record.refresh_token)
            usable = now < record.expires_at - refresh_margin(record.lifetime)
            if record.access_token and usable and not force:
                return AccessToken(
                    record.access_token,
                    record.expires_at,
                    frozenset(record.scopes),
                    False,
                    record.source,
                )
            return self._obtain(account, cfg, record, now)

    def _obtain(
        self, account: str, cfg: OAuth2Config, record: TokenRecord, now: float
    ) -> AccessToken:
        from engine.oauth import sources

        record.source = source_name(cfg)
        try:
            if cfg.flow == "clientCredentials":
                grant = sources.client_credentials(cfg, self.timeout)
            elif not record.refresh_token:
                raise OAuthError(
                    "login-required",
                    "no refresh token is stored for this mailbox yet: nobody has signed in",
                )
            else:
                grant = sources.refresh(cfg, record.refresh_token, self.timeout)
        except OAuthError as exc:
            record.last_error = f"{exc.reason}: {logs.scrub(str(exc))}"[:500]
            record.last_error_at = now
            self.store.save(record)
            raise
        self.keep(record, grant, now)
        return AccessToken(grant.access_token, record.expires_at, grant.scopes, True, record.source)

    def keep(self, record: TokenRecord, grant: sources.Grant, now: float) -> None:
        """Store what a token endpoint gave (durably, before anyone uses it)."""
        self._remember(record.account, grant.access_token, grant.refresh_token or "")
        record.access_token = grant.access_token
        record.lifetime = grant.expires_in
        record.expires_at = now + grant.expires_in
        record.scopes = sorted(grant.scopes)
        record.last_refresh = now
        record.last_error = ""
        if record.refresh_token:
            record.refresh_last_used = now
        if grant.refresh_token and grant.refresh_token != record.refresh_token:
            if not record.refresh_token:
                record.refresh_obtained_at = now
            record.refresh_token = grant.refresh_token
            record.refresh_last_used = now
        self.store.save(record)

    def sign_in(
        self,
        account: str,
        cfg: OAuth2Config,
        mechanism: str,
        exchange: Callable[[AccessToken], None],
    ) -> None:
        """Sign in with ``exchange`` (one SASL exchange with a token; it raises the
        classified OAuthError when the server refuses). A stored token the server refuses is
        dropped and a fresh one tried, once; a refusal of a fresh one is the error. The same
        for every protocol: POP3, SMTP, and IMAP (``imap.authenticate`` in ``exchange``)."""
        for attempt in range(2):
            token = self.access_token(account, cfg, force=attempt > 0)
            try:
                exchange(token)
            except OAuthError as exc:
                self.refused(account, token, exc)
                if token.fresh or attempt > 0:
                    raise
                continue
            self.signed_in(account, mechanism)
            return

    def login(self, account: str, cfg: OAuth2Config, grant: sources.Grant) -> None:
        """Keep the tokens of a fresh sign-in (``oauth login``), replacing the old ones."""
        with self.store.locked(account):
            record = self.store.load(account)
            record.source = source_name(cfg)
            record.refresh_token = ""
            now = self.clock()
            record.refresh_obtained_at = now
            self.keep(record, grant, now)

    def signed_in(self, account: str, mechanism: str) -> None:
        """A server accepted a token: remember when, and with which mechanism."""
        with self.store.locked(account):
            record = self.store.load(account)
            record.last_sign_in = self.clock()
            record.mechanism = mechanism
            record.last_error = ""  # a refusal before it is over
            self.store.save(record)

    def refused(self, account: str, token: AccessToken, error: OAuthError) -> None:
        """A server refused ``token``: drop it, so the next session asks for a new one."""
        with self.store.locked(account):
            record = self.store.load(account)
            if record.access_token == token.value:
                record.access_token = ""
                record.expires_at = 0.0
            record.last_error = f"{error.reason}: {logs.scrub(str(error))}"[:500]
            record.last_error_at = self.clock()
            self.store.save(record)

    def _remember(self, account: str, *values: str) -> None:
        """Mask these tokens in every log and stored text from now on (bounded per account)."""
        with self._scrub_lock:
            kept = self._registered.setdefault(account, collections.deque())
            for value in values:
                if not value or value in kept:
                    continue
                logs.register_secret(value)
                kept.append(value)
                while len(kept) > _SCRUB_KEPT:
                    logs.forget_secret(kept.popleft())
