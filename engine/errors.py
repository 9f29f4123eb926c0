"""The one exception hierarchy of the engine.

Library exceptions (poplib, ssl, socket, sqlite3, xmlschema, email) are translated at the
boundary of the module that calls the library, with ``raise ... from exc``, so that the rest of
the engine only ever sees these classes. Every message here is safe to log and to store: no
class in this module ever carries a password.
"""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    """Root of every error the engine raises on purpose."""


class ConfigError(EngineError):
    """A configuration file (or the command line) is invalid.

    ``file``, ``line`` and ``element`` locate the problem when they are known; ``str()`` gives
    one sentence naming them and what would be valid.
    """

    cause = "config"
    hint = "Fix the mailbox's XML file; the engine reads it again on the next run."

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        line: int | None = None,
        element: str | None = None,
    ) -> None:
        self.reason = reason
        self.file = file
        self.line = line
        self.element = element
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.line:
            where.append(f"line {self.line}")
        if self.element:
            where.append(f"element <{self.element}>")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason


class FetchError(EngineError):
    """A mailbox could not be read. ``cause`` names the kind of outage (one event per cause).

    ``unfinished`` is set when the session lost step in the middle of a message it had
    already decided to cut off (see :class:`MessageKept`): the session records that message
    as left on the server before it aborts, so the next session skips it."""

    cause = "protocol"
    hint = "Check the mail server's log for this account."
    unfinished: Any = None


class ConnectError(FetchError):
    cause = "unreachable"
    hint = "Check serverName and port, DNS, firewalls, and that the mail server is running."


class FetchTimeout(FetchError):
    cause = "timeout"
    hint = "The server stopped answering; check its load and the network, or raise timeoutSeconds."


class TLSError(FetchError):
    cause = "tls"
    hint = (
        "The server's certificate was not trusted or names another host. Check serverName, "
        "install the CA with caFile, or (only on a trusted network) set tlsVerify to false."
    )


class AuthError(FetchError):
    cause = "authentication"
    hint = "Check userName and password (or passwordFile / passwordEnv) for this mailbox."


class OAuthError(FetchError):
    """Signing in with OAuth2 failed: the token endpoint refused (a revoked or expired
    refresh token, an expired client secret, a wrong scope), or the mail server refused the
    token. ``reason`` tells which (see :data:`OAUTH_REASONS`); the hint says what to do.
    Mail stays on the server; the outage closes on the first sign-in that works."""

    cause = "oauth"

    def __init__(self, reason: str, text: str) -> None:
        assert reason in OAUTH_REASONS, reason
        self.reason = reason
        self.hint = OAUTH_REASONS[reason]
        super().__init__(text)


OAUTH_REASONS: dict[str, str] = {
    "login-required": (
        "The refresh token was refused (revoked consent, a changed password, or unused for "
        "too long). Run 'mailintegration oauth login --config FILE' again to sign in."
    ),
    "secret-expired": (
        "The app's client secret has expired. Create a new secret for the app registration, "
        "put it in clientSecretFile / clientSecretEnv, and update clientSecretExpires."
    ),
    "client-refused": (
        "The token endpoint refused the app itself (unknown client id, wrong secret or "
        "certificate, wrong tenant). Check clientId, tenant and the secret or certificate."
    ),
    "insufficient-scope": (
        "The token lacks the scope the mail server needs. Check <scope> and the app's API "
        "permissions (POP.AccessAsApp / IMAP.AccessAsApp with admin consent for Microsoft)."
    ),
    "token-expired": (
        "The mail server found the access token expired; a new one is fetched for the next "
        "session. If this repeats, check the clock of this machine."
    ),
    "unknown-user": (
        "The mail server refused a valid token for this userName: the app or user has no "
        "access to this mailbox (Microsoft: the Exchange service principal and "
        "Add-MailboxPermission), or userName is not the mailbox the token is for."
    ),
    "token-endpoint": (
        "The token endpoint could not be reached or answered outside OAuth2. Check "
        "tokenEndpoint (or tenant), the network and caFile."
    ),
}


class MailboxLockedError(FetchError):
    cause = "mailbox-locked"
    hint = "Another client holds the mailbox ([IN-USE]); it clears when that session ends."


class ServerTempError(FetchError):
    cause = "server-temporary"
    hint = (
        "The server reported a temporary failure ([SYS/TEMP], [LOGIN-DELAY]); it retries by itself."
    )


class ProtocolError(FetchError):
    cause = "protocol"
    hint = "The server answered outside the POP3 protocol; check the mail server's log."


class DuplicateUidlError(ProtocolError):
    cause = "duplicate-uidl"
    hint = (
        "The server listed the same UIDL for two messages; the mailbox is quarantined and "
        "nothing is deleted until the server's index is repaired."
    )


class DirectoryError(EngineError):
    """The mailbox config names a user, site, group, source or team the directory lacks."""

    cause = "directory"
    hint = "Import the missing entry with 'mailintegration directory import' or fix the config."


class MessageError(EngineError):
    """One message cannot be turned into a request; it becomes a failure event instead."""

    cause = "unprocessable"
    hint = (
        "The original message is attached; fix the cause, then replay it with "
        "'mailintegration ingest'."
    )


class ParseError(MessageError):
    cause = "unparseable"


class LimitExceeded(MessageError):
    cause = "limit-exceeded"
    hint = (
        "The message is over a configured limit (size, MIME depth, parts or headers). The "
        "original is attached; raise the limit in the mailbox config if it is legitimate."
    )


class MessageKept(LimitExceeded):
    """A message the engine could not take whole: too large, larger than the server listed
    it, or with a line over the engine's limit. What was read of it (up to the limit) goes
    into a failure event; the message itself is left on the server and later sessions
    leave it alone, unless a raised ``maxMessageBytes`` now lets it in.

    ``reason`` is one of :data:`KEPT_REASONS`; ``needed`` the bytes the message needs (its
    size when it was read to its end, else more than was read)."""

    def __init__(self, reason: str, needed: int, text: str) -> None:
        assert reason in KEPT_REASONS
        self.reason = reason
        self.needed = needed
        super().__init__(text)
        if reason == "line-too-long":
            self.hint = (
                "The message has a line longer than the engine reads (1 MiB), so it was left "
                "on the server and is skipped from now on; what was read of it is attached. "
                "Fetch it with another client, then replay it with 'mailintegration ingest'."
            )
        else:
            self.hint = (
                "The message was left on the server and is skipped from now on; what was read "
                "of it is attached. If it is legitimate, raise maxMessageBytes: the next "
                "session then takes it and processes it."
            )


KEPT_REASONS = ("too-large", "larger-than-listed", "line-too-long")


class StoreError(EngineError):
    """The store could not be opened, migrated or written."""

    cause = "store"
    hint = "Check the data directory: free space, permissions, and the database file itself."


class AuthenticationFailed(EngineError):
    """The engine's own login (/Login, /Password) does not match a user of the store."""


def sole(group: BaseExceptionGroup) -> BaseException:
    """The one exception a task group wraps (the usual case), else the group itself.

    anyio's task groups wrap even a single failure in an exception group; callers that handle
    ``EngineError`` and cancellation by type unwrap it with this."""
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
    return group
