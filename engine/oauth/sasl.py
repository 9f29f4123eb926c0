"""SASL XOAUTH2 and OAUTHBEARER (RFC 7628): what a client says, and what a refusal means.

Protocol-neutral, for every gateway and for SMTP: the POP3 gateway drives the exchange
itself (``AUTH``, RFC 5034), while :class:`SaslClient` is the ``authobject`` that smtplib's
``SMTP.auth`` and imaplib's ``IMAP4.authenticate`` call. The token comes from the broker's
``sign_in`` (engine.oauth.broker), which replaces a refused stored token once. The IMAP
gateway (``engine.gateways.imap``, which also keeps a NO naming a temporary failure as the
server's) signs in, in short, with::

    mechanism = choose(c[5:] for c in imap.capabilities if c.startswith("AUTH="))

    def exchange(token: AccessToken) -> None:
        client = SaslClient(mechanism, user, token.value, host, port)
        try:
            imap.authenticate(mechanism, client)
        except imaplib.IMAP4.error:
            raise client.refused(token.expires_at, token.scopes) from None

    tokens.sign_in(account_key(user, host, account_id), server.oauth2, mechanism, exchange)

The exchange, either mechanism: the client sends its initial response; the server answers
OK, or, for a refused token, an error challenge holding JSON (``{"status": "401",
"schemes": "bearer", "scope": "..."}`` for XOAUTH2, ``{"status": "invalid_token"}`` for
OAUTHBEARER). The client must answer that challenge with an empty response; the server then
says no (POP3 ``-ERR``, IMAP ``NO``, SMTP 535). :meth:`SaslClient.refused` classifies it:
the JSON alone often cannot tell an expired token from a missing scope (Dovecot sends the
same JSON for both), so the token's own expiry and granted scopes decide where it does not.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import time
from collections.abc import Iterable

from engine.errors import OAuthError

__all__ = ["MECHANISMS", "SaslClient", "choose", "classify", "initial_response", "parse_refusal"]

# In order of preference: OAUTHBEARER is the standard (RFC 7628); XOAUTH2 is what Microsoft
# 365 offers, and Google both.
MECHANISMS = ("OAUTHBEARER", "XOAUTH2")
# An error challenge is a short JSON object; anything longer is not read as one.
MAX_CHALLENGE = 4096
# A token whose expiry is this close is taken as expired when the server refuses it (clocks).
CLOCK_SKEW_SECONDS = 5.0


def choose(offered: Iterable[str]) -> str | None:
    """The mechanism to use among those the server ``offered`` (CAPA's SASL line, the
    AUTH= capabilities, EHLO's AUTH line); None when it offers neither."""
    names = {name.upper() for name in offered}
    return next((m for m in MECHANISMS if m in names), None)


def initial_response(mechanism: str, user: str, token: str, host: str, port: int) -> bytes:
    """The client's first message for ``mechanism``, not yet base64-encoded."""
    if any(ord(c) < 0x20 for c in user + token + host):
        raise ValueError("a control character in the user name, host or token")
    if mechanism == "XOAUTH2":
        return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    if mechanism == "OAUTHBEARER":
        # RFC 7628 section 3.1: the GS2 header names the user, "," and "=" escaped (RFC 5801).
        authzid = user.replace("=", "=3D").replace(",", "=2C")
        return (
            f"n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01".encode()
        )
    raise ValueError(f"unknown SASL mechanism {mechanism!r}")


def parse_refusal(challenge: bytes) -> dict[str, str]:
    """The fields of an error challenge (decoded from base64 already, or not: both are
    tried); an empty dict when it is not a JSON object. Only short text values are kept:
    the server's words are quoted in errors."""
    data = challenge.strip()[:MAX_CHALLENGE]
    candidates = [data]
    with contextlib.suppress(binascii.Error, ValueError):
        candidates.insert(0, base64.b64decode(data, validate=True))
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(value, dict):
            return {
                str(k)[:40]: str(v)[:200]
                for k, v in value.items()
                if isinstance(v, str | int | float)
            }
    return {}


def classify(
    refusal: dict[str, str],
    mechanism: str,
    expires_at: float,
    scopes: frozenset[str],
    *,
    now: float | None = None,
) -> OAuthError:
    """What a refused sign-in means: ``insufficient-scope``, ``token-expired`` or
    ``unknown-user``. The server's status decides when it names a scope problem; otherwise a
    scope the server asks for (XOAUTH2's ``scope``) that the token was not granted; otherwise
    the token's expiry; otherwise the token was good and the account refused it."""
    now = time.time() if now is None else now
    status = refusal.get("status", "").lower()
    wanted = set(refusal.get("scope", "").split())
    said = f"{mechanism} refused" + (f" (status {status})" if status else "")
    if status in ("insufficient_scope", "403"):
        return OAuthError("insufficient-scope", f"{said}: the token lacks a required scope")
    if wanted and scopes and not wanted <= scopes:
        missing = " ".join(sorted(wanted - scopes))
        return OAuthError(
            "insufficient-scope",
            f"{said}: the server asks for scope {missing!r}, which the token was not granted "
            f"(granted: {' '.join(sorted(scopes))!r})",
        )
    if expires_at <= now + CLOCK_SKEW_SECONDS:
        return OAuthError("token-expired", f"{said}: the access token had expired")
    unnamed = "" if wanted else " (or it lacks a scope the server did not name)"
    return OAuthError(
        "unknown-user",
        f"{said}: a valid, unexpired token was refused for this user{unnamed}",
    )


class SaslClient:
    """One XOAUTH2 / OAUTHBEARER exchange, as the ``authobject`` of smtplib and imaplib:
    called first for the initial response, then with each challenge; a challenge after the
    initial response is an error, recorded (:attr:`refusal`) and answered empty."""

    def __init__(self, mechanism: str, user: str, token: str, host: str, port: int) -> None:
        self.mechanism = mechanism
        self._initial = initial_response(mechanism, user, token, host, port).decode()
        self._sent = False
        self.refusal: dict[str, str] = {}

    def __call__(self, challenge: bytes | None = None) -> str:
        if not self._sent:
            self._sent = True
            return self._initial
        self.refusal = parse_refusal(challenge or b"")
        return ""

    def refused(self, expires_at: float, scopes: frozenset[str]) -> OAuthError:
        """The error for the refusal the server gave (see :func:`classify`)."""
        return classify(self.refusal, self.mechanism, expires_at, scopes)
