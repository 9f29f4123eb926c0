"""A test OAuth2 authorization server on 127.0.0.1, built on oauthlib's endpoints.

Why oauthlib: its framework-agnostic `Server` implements the grants, token, introspection
(RFC 7662) and revocation (RFC 7009) endpoints and, since 4.0, the device authorization
grant (RFC 8628) with the spec's validation rules and error codes; what is ours is only the
storage (a `RequestValidator` over a dict under a lock), the provider-shaped error bodies
and a small threaded HTTP(S) server. The same state is served over HTTP (for Dovecot's
introspection) and HTTPS (for clients that verify the test CA, such as msal).

    with OAuthServer(certificates=dovecot.certificates, access_token_lifetime=5) as server:
        server.add_client("app", secret="s3cret", username="box1", scopes=["mail"])
        token = server.issue_tokens("app", "box1", ["mail"]).access_token

Paths (any `{tenant}` is accepted; Entra-like paths answer with Entra-shaped errors):

- token: `/token` (Google), `/{tenant}/oauth2/v2.0/token` (Entra);
- device authorization: `/device/code` (Google), `/devicecode`,
  `/{tenant}/oauth2/v2.0/devicecode` (Entra); verification page `/device`, whose form
  POST approves or denies a user code (`approve_device` does that as a browser would);
- introspection `/introspect` (RFC 7662: `token=...`, no client authentication needed,
  which is how Dovecot calls it); revocation `/revoke` (RFC 7009);
- discovery: `/{tenant}/v2.0/.well-known/openid-configuration`,
  `/.well-known/openid-configuration` and `/.well-known/oauth-authorization-server`.

Grants: client credentials (a secret past its expiry is refused), refresh token with
rotation (a used refresh token is refused; the new one is in the answer), the device
code grant. Access tokens live `access_token_lifetime` seconds (changeable at run time);
a refresh token unused for `refresh_token_idle_lifetime` seconds expires (the provider's
inactivity expiry). Introspection answers `{"active": false}` for an unknown, expired or
revoked token and, when `introspection_scope` is set, for a token without that scope; each
answer is recorded in `introspections` with the reason, so a test can tell the cases apart.

Error bodies (`style`, default "rfc": oauthlib's own; "google"; Entra-like paths always
"entra"): Entra answers like `{"error": "invalid_grant", "error_description": "AADSTS700082:
The refresh token has expired due to inactivity. ...", "error_codes": [700082],
"timestamp": ..., "trace_id": ..., "correlation_id": ...}`; Google like `{"error":
"invalid_grant", "error_description": "Token has been expired or revoked."}` (and HTTP 428
for a pending device authorization).

msal (checked with msal 1.39 against this server over HTTPS with the test CA):

- `ConfidentialClientApplication(client_id, client_credential=secret,
  authority=server.authority(tenant), validate_authority=False, instance_discovery=False,
  verify=str(ca_file))` then `acquire_token_for_client(scopes)` works: discovery, token,
  msal's own cache (a second call is served from the cache until expiry), and the errors
  (an expired secret gives `error == "invalid_client"` with `AADSTS7000222` in the
  description and `7000222` in `error_codes`).
- `PublicClientApplication(...)` (same arguments), `initiate_device_flow(scopes)`,
  `approve_device(flow["user_code"], user)` and `acquire_token_by_device_flow(flow)`
  works; so do `get_accounts()` and `acquire_token_silent(scopes, account,
  force_refresh=True)` (a refresh with rotation, the new refresh token kept in msal's
  cache) and `acquire_token_by_refresh_token(rt, scopes)`. The answers carry an unsigned
  `id_token` and `client_info`, which msal only decodes (it validates neither).
- Not possible: instance discovery against this server (msal asks
  login.microsoftonline.com: pass `instance_discovery=False`), certificate credentials
  (a signed client assertion: this server accepts client secrets only), interactive
  and username/password flows, managed identity, the broker (WAM) and regional endpoints.
  `oidc_authority=` also works, against the root discovery document.

Command line (prints one JSON line with the URLs, serves until SIGTERM or Ctrl-C)::

    python -m tools.oauthserver [--certs DIR] [--lifetime S] [--client ID:SECRET:USER]...
        [--public-client ID]...
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.server
import json
import logging
import re
import secrets
import signal
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from oauthlib.common import Request  # type: ignore[import-untyped]
from oauthlib.oauth2 import OAuth2Error, RequestValidator, Server  # type: ignore[import-untyped]
from oauthlib.oauth2.rfc8628.endpoints import (  # type: ignore[import-untyped]
    DeviceAuthorizationEndpoint,
)
from oauthlib.oauth2.rfc8628.grant_types import DeviceCodeGrant  # type: ignore[import-untyped]

from tools.dovecot import Certificates, make_certificates

__all__ = [
    "DEVICE_GRANT",
    "RESERVED_SCOPES",
    "Client",
    "IntrospectionRecord",
    "OAuthServer",
    "TokenPair",
    "requests_session",
]

HOST = "127.0.0.1"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# OpenID Connect scopes that msal adds to every delegated request: always allowed, and
# never what a resource checks.
RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})

Style = Literal["rfc", "entra", "google"]

_MAX_BODY = 64 * 1024
_CONNECTION_TIMEOUT = 10.0
_ENTRA_PATH = re.compile(r"^/(?P<tenant>[^/]+)/oauth2/v2\.0/(?P<endpoint>token|devicecode)$")
_ENTRA_DISCOVERY = re.compile(r"^/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration$")
_USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"  # no vowels: no words, no 0/O or 1/I mix-ups


# --------------------------------------------------------------------------- records


@dataclass
class Client:
    """A registered client: confidential when it has a secret, public otherwise."""

    client_id: str
    secret: str | None = None
    secret_expires_at: float | None = None
    """Epoch seconds after which the secret is refused (provider: "secret expired")."""
    scopes: frozenset[str] = frozenset()
    """Scopes the client may ask for (besides RESERVED_SCOPES)."""
    username: str | None = None
    """The mailbox an app-only (client credentials) token acts for, as introspected."""
    grant_types: frozenset[str] = frozenset({"client_credentials", "refresh_token", DEVICE_GRANT})


@dataclass
class _Token:
    value: str
    kind: Literal["access_token", "refresh_token"]
    client_id: str
    username: str | None
    scopes: tuple[str, ...]
    issued_at: float
    expires_at: float | None
    family: str  # every token descending from one authorization shares it
    last_used: float = 0.0
    revoked: bool = False
    used: bool = False  # a refresh token that was exchanged (rotation)
    expired_by_test: bool = False


@dataclass
class _DeviceAuthorization:
    device_code: str
    user_code: str
    client_id: str
    scopes: tuple[str, ...]
    expires_at: float
    status: str = DeviceCodeGrant.DEVICE_CODE_PENDING
    username: str | None = None
    slow_down_once: bool = False
    redeemed: bool = False


@dataclass(frozen=True)
class TokenPair:
    """What a token endpoint answered with, or what `issue_tokens` made."""

    access_token: str
    refresh_token: str | None
    expires_in: int
    scope: str


@dataclass(frozen=True)
class IntrospectionRecord:
    """One answer of the introspection endpoint, for assertions.

    `reason` is "ok", "unknown", "expired", "revoked" or "insufficient_scope";
    `token_sha256` identifies the token without keeping it.
    """

    active: bool
    reason: str
    username: str | None
    token_sha256: str
    at: float


# --------------------------------------------------------------------------- errors

# reason -> (error, Entra code, Entra description, Google description, Google HTTP status)
# Descriptions are shaped after the providers' own answers; {client_id} and {tenant} are
# filled in.
_ERRORS: dict[str, tuple[str, int, str, str, int]] = {
    "invalid_client_secret": (
        "invalid_client",
        7000215,
        "Invalid client secret provided. Ensure the secret being sent in the request is "
        "the client secret value, not the client secret ID, for a secret added to app "
        "'{client_id}'.",
        "Unauthorized",
        401,
    ),
    "client_secret_expired": (
        "invalid_client",
        7000222,
        "The provided client secret keys for app '{client_id}' are expired. Visit the "
        "Azure portal to create new keys for your app, or consider using certificate "
        "credentials for added security.",
        "The OAuth client secret has expired.",
        401,
    ),
    "unknown_client": (
        "unauthorized_client",
        700016,
        "Application with identifier '{client_id}' was not found in the directory "
        "'{tenant}'. This can happen if the application has not been installed by the "
        "administrator of the tenant or consented to by any user in the tenant.",
        "The OAuth client was not found.",
        401,
    ),
    "refresh_expired": (
        "invalid_grant",
        700082,
        "The refresh token has expired due to inactivity. The token was issued on "
        "{issued} and was inactive for {idle}.",
        "Token has been expired or revoked.",
        400,
    ),
    "refresh_revoked": (
        "invalid_grant",
        50173,
        "The provided grant has expired due to it being revoked, a fresh auth token is "
        "needed. The user might have changed or reset their password.",
        "Token has been expired or revoked.",
        400,
    ),
    "refresh_used": (
        "invalid_grant",
        70000,
        "Provided grant is invalid or malformed. The refresh token was already redeemed.",
        "Token has been expired or revoked.",
        400,
    ),
    "refresh_unknown": (
        "invalid_grant",
        9002313,
        "Invalid request. Request is malformed or invalid.",
        "Bad Request",
        400,
    ),
    "invalid_scope": (
        "invalid_scope",
        70011,
        "The provided request must include a 'scope' input parameter. The provided value "
        "for the input parameter 'scope' is not valid. The scope '{scope}' is not valid.",
        "Some requested scopes were invalid. {{invalid=[{scope}]}}",
        400,
    ),
    "authorization_pending": (
        "authorization_pending",
        70016,
        "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
        "Precondition Required",
        428,
    ),
    "slow_down": (
        "slow_down",
        70016,
        "OAuth 2.0 device flow error. Polling too fast: slow down.",
        "Forbidden",
        403,
    ),
    "expired_token": (
        "expired_token",
        70019,
        "Verification code expired.",
        "Bad Request",
        400,
    ),
    "access_denied": (
        "authorization_declined",
        70000,
        "The user declined the authorization request.",
        "Forbidden",
        403,
    ),
    "bad_device_code": (
        "invalid_grant",
        70000,
        "Provided grant is invalid or malformed.",
        "Bad Request",
        400,
    ),
    "unsupported_grant_type": (
        "unsupported_grant_type",
        70003,
        "The app requested an unsupported grant type '{grant_type}'.",
        "Invalid grant_type: {grant_type}",
        400,
    ),
}

_OAUTHLIB_TO_REASON = {
    "authorization_pending": "authorization_pending",
    "slow_down": "slow_down",
    "expired_token": "expired_token",
    "access_denied": "access_denied",
    "invalid_scope": "invalid_scope",
    "unsupported_grant_type": "unsupported_grant_type",
}


def _shape_error(
    style: Style,
    status: int,
    body: dict[str, Any],
    reason: str | None,
    context: dict[str, str],
) -> tuple[int, dict[str, Any]]:
    """Rewrite oauthlib's error body in a provider's shape (status, body)."""
    reason = reason or _OAUTHLIB_TO_REASON.get(str(body.get("error")))
    if style == "rfc" or reason is None or reason not in _ERRORS:
        return status, body
    error, code, entra, google, google_status = _ERRORS[reason]
    values = {"client_id": "", "tenant": "common", "scope": "", "grant_type": "", **context}
    values.setdefault("issued", "")
    values.setdefault("idle", "")
    if style == "google":
        google_error = "access_denied" if reason == "access_denied" else error
        if reason == "unknown_client":
            google_error = "invalid_client"
        return google_status, {
            "error": google_error,
            "error_description": google.format(**values),
        }
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    now = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    description = f"AADSTS{code}: {entra.format(**values)} Trace ID: {trace} "
    description += f"Correlation ID: {correlation} Timestamp: {now}"
    entra_status = 401 if error == "invalid_client" else 400
    return entra_status, {
        "error": error,
        "error_description": description,
        "error_codes": [code],
        "timestamp": now,
        "trace_id": trace,
        "correlation_id": correlation,
    }


# --------------------------------------------------------------------------- state


class _Local(threading.local):
    """What one HTTP request carries from the validator back to the handler."""

    reason: str | None = None
    context: dict[str, str]
    endpoint: str = ""

    def __init__(self) -> None:
        self.context = {}


class _Validator(RequestValidator):  # type: ignore[misc]
    """oauthlib's storage hooks over the server's in-memory state."""

    def __init__(self, server: OAuthServer) -> None:
        super().__init__()
        self.server = server

    # -------------------------------------------------------------- helpers

    def _fail(self, reason: str, **context: str) -> bool:
        self.server._local.reason = reason
        self.server._local.context.update(context)
        return False

    def _credentials(self, request: Request) -> tuple[str | None, str | None]:
        """client_secret_basic (Authorization header) or client_secret_post."""
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                decoded = base64.b64decode(header[6:]).decode()
                user, _, password = decoded.partition(":")
                return urllib.parse.unquote(user), urllib.parse.unquote(password)
        return request.client_id, request.client_secret

    # -------------------------------------------------------------- clients

    def client_authentication_required(self, request: Request, *args: Any, **kw: Any) -> bool:
        if self.server._local.endpoint == "introspect":
            return False  # resource servers on loopback (Dovecot) send no credentials
        client_id, secret = self._credentials(request)
        client = self.server.clients.get(client_id or "")
        return bool(secret) or (client is not None and client.secret is not None)

    def authenticate_client(self, request: Request, *args: Any, **kw: Any) -> bool:
        client_id, secret = self._credentials(request)
        self.server._local.context["client_id"] = client_id or ""
        client = self.server.clients.get(client_id or "")
        if client is None:
            return self._fail("unknown_client")
        if client.secret is None or not secrets.compare_digest(
            (secret or "").encode(), client.secret.encode()
        ):
            return self._fail("invalid_client_secret")
        if client.secret_expires_at is not None and time.time() >= client.secret_expires_at:
            return self._fail("client_secret_expired")
        request.client = client
        request.client_id = client.client_id
        return True

    def authenticate_client_id(self, client_id: str, request: Request, *a: Any, **k: Any) -> bool:
        if self.server._local.endpoint == "introspect":
            return True
        self.server._local.context["client_id"] = client_id or ""
        client = self.server.clients.get(client_id or "")
        if client is None:
            return self._fail("unknown_client")
        request.client = client
        return True

    def validate_client_id(self, client_id: str, request: Request, *a: Any, **k: Any) -> bool:
        self.server._local.context["client_id"] = client_id or ""
        if client_id not in self.server.clients:
            return self._fail("unknown_client")
        return True

    def validate_grant_type(
        self, client_id: str, grant_type: str, client: Client, request: Request, *a: Any, **k: Any
    ) -> bool:
        self.server._local.context["grant_type"] = grant_type
        known = self.server.clients.get(client_id)
        if known is None or grant_type not in known.grant_types:
            return self._fail("unsupported_grant_type")
        return True

    # -------------------------------------------------------------- scopes

    def get_default_scopes(self, client_id: str, request: Request, *a: Any, **k: Any) -> list[str]:
        client = self.server.clients.get(client_id)
        return sorted(client.scopes) if client is not None else []

    def validate_scopes(
        self, client_id: str, scopes: list[str], client: Client, request: Request, *a: Any, **k: Any
    ) -> bool:
        known = self.server.clients.get(client_id)
        allowed = (known.scopes if known is not None else frozenset()) | RESERVED_SCOPES
        wrong = [scope for scope in scopes or [] if scope not in allowed]
        if wrong:
            return self._fail("invalid_scope", scope=" ".join(wrong))
        return True

    def get_original_scopes(
        self, refresh_token: str, request: Request, *a: Any, **k: Any
    ) -> list[str]:
        token = self.server._tokens.get(refresh_token)
        return list(token.scopes) if token is not None else []

    def is_within_original_scope(
        self, request_scopes: list[str], refresh_token: str, request: Request, *a: Any, **k: Any
    ) -> bool:
        # msal asks for "openid profile offline_access" again on every refresh.
        token = self.server._tokens.get(refresh_token)
        allowed = set(token.scopes if token is not None else ()) | RESERVED_SCOPES
        return all(scope in allowed for scope in request_scopes)

    # -------------------------------------------------------------- tokens

    def save_bearer_token(self, token: dict[str, Any], request: Request, *a: Any, **k: Any) -> None:
        client = request.client
        assert isinstance(client, Client)
        username = getattr(request, "user", None)
        if request.grant_type == "client_credentials":
            username = client.username
        scopes = tuple(s for s in (request.scopes or []) if s not in RESERVED_SCOPES)
        family = secrets.token_hex(8)
        old = self.server._tokens.get(request.refresh_token or "")
        if request.grant_type == "refresh_token" and old is not None:
            # Rotation: the used refresh token dies once its successor is stored.
            old.used = True
            family = old.family
        now = time.time()
        self.server._store(
            _Token(
                value=token["access_token"],
                kind="access_token",
                client_id=client.client_id,
                username=username,
                scopes=scopes,
                issued_at=now,
                expires_at=now + int(token["expires_in"]),
                family=family,
            )
        )
        if "refresh_token" in token:
            self.server._store(
                _Token(
                    value=token["refresh_token"],
                    kind="refresh_token",
                    client_id=client.client_id,
                    username=username,
                    scopes=scopes,
                    issued_at=now,
                    expires_at=None,
                    family=family,
                    last_used=now,
                )
            )

    def validate_refresh_token(
        self, refresh_token: str, client: Client, request: Request, *a: Any, **k: Any
    ) -> bool:
        token = self.server._tokens.get(refresh_token)
        if token is None or token.kind != "refresh_token" or token.client_id != client.client_id:
            return self._fail("refresh_unknown")
        if token.revoked:
            return self._fail("refresh_revoked")
        if token.used:
            return self._fail("refresh_used")
        idle = self.server.refresh_token_idle_lifetime
        if token.expired_by_test or (idle is not None and time.time() - token.last_used > idle):
            issued = time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime(token.issued_at))
            days = max(0, int((time.time() - token.last_used) // 86400))
            return self._fail("refresh_expired", issued=issued, idle=f"{days}.00:00:00")
        request.user = token.username
        return True

    def introspect_token(
        self, token: str, token_type_hint: str | None, request: Request, *a: Any, **k: Any
    ) -> dict[str, Any] | None:
        return self.server._introspect(token)

    def revoke_token(
        self, token: str, token_type_hint: str | None, request: Request, *a: Any, **k: Any
    ) -> None:
        found = self.server._tokens.get(token)
        client = getattr(request, "client", None)
        # RFC 7009 2.1: a client can only revoke its own tokens.
        if found is not None and isinstance(client, Client) and found.client_id == client.client_id:
            self.server.revoke(token)

    # -------------------------------------------------------------- device flow

    def validate_device_code(
        self, client_id: str, code: str, request: Request, *a: Any, **k: Any
    ) -> str | None:
        with self.server._lock:
            grant = self.server._devices.get(code)
            if grant is None or grant.client_id != client_id or grant.redeemed:
                self._fail("bad_device_code")
                return None
            if time.time() >= grant.expires_at:
                return DeviceCodeGrant.DEVICE_CODE_EXPIRED  # type: ignore[no-any-return]
            if grant.status == DeviceCodeGrant.DEVICE_CODE_PENDING and grant.slow_down_once:
                grant.slow_down_once = False
                return DeviceCodeGrant.DEVICE_CODE_SLOW_DOWN  # type: ignore[no-any-return]
            if grant.status != DeviceCodeGrant.DEVICE_CODE_AUTHORIZED:
                return grant.status
            grant.redeemed = True
            request.user = grant.username
            request.scopes = list(grant.scopes)
            return DeviceCodeGrant.DEVICE_CODE_AUTHORIZED  # type: ignore[no-any-return]

    # Grants this server does not offer: refused rather than half-implemented.
    def validate_user(self, *a: Any, **k: Any) -> bool:
        return False

    def validate_code(self, *a: Any, **k: Any) -> bool:
        return False

    def validate_response_type(self, *a: Any, **k: Any) -> bool:
        return False


# --------------------------------------------------------------------------- server


class OAuthServer:
    """The authorization server: construct, then use as a context manager (or start/stop).

    `certificates`: the TLS material of the HTTPS listener (pass Dovecot's so that one
    CA serves both); by default a fresh test CA in a temporary directory.
    """

    def __init__(
        self,
        *,
        certificates: Certificates | None = None,
        access_token_lifetime: int = 3600,
        refresh_token_idle_lifetime: float | None = None,
        device_code_lifetime: int = 900,
        device_poll_interval: int = 1,
        introspection_scope: str | None = None,
        style: Style = "rfc",
    ) -> None:
        self.access_token_lifetime = access_token_lifetime
        self.refresh_token_idle_lifetime = refresh_token_idle_lifetime
        self.device_code_lifetime = device_code_lifetime
        self.device_poll_interval = device_poll_interval
        self.introspection_scope = introspection_scope
        self.style: Style = style
        self.clients: dict[str, Client] = {}
        self.introspections: list[IntrospectionRecord] = []
        self.token_requests = 0
        self.errors: list[BaseException | None] = []
        """Unexpected failures while serving a request (none in a healthy run)."""
        self._certificates = certificates
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._tokens: dict[str, _Token] = {}
        self._devices: dict[str, _DeviceAuthorization] = {}
        self._user_codes: dict[str, str] = {}
        self._lock = threading.RLock()
        self._local = _Local()
        self._validator = _Validator(self)
        self._oauth = Server(
            self._validator, token_expires_in=lambda request: self.access_token_lifetime
        )
        self._http: http.server.ThreadingHTTPServer | None = None
        self._https: http.server.ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self.host = HOST
        self.http_port = 0
        self.https_port = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def certificates(self) -> Certificates:
        """The HTTPS listener's TLS material (its `ca_file` verifies the server)."""
        if self._certificates is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="oauthserver-")
            self._certificates = make_certificates(Path(self._tempdir.name))
        return self._certificates

    @property
    def ca_file(self) -> Path:
        """The CA a client trusts to verify the HTTPS listener."""
        return self.certificates.ca_file

    def start(self) -> OAuthServer:
        """Listen on 127.0.0.1 (HTTP and HTTPS, ephemeral ports) in background threads."""
        if self._http is not None:
            raise RuntimeError("already started")
        # oauthlib logs tokens at DEBUG: kept out of any test's captured logs, where the
        # engine's secret canaries look for them.
        oauthlib_logger = logging.getLogger("oauthlib")
        if oauthlib_logger.level == logging.NOTSET:
            oauthlib_logger.setLevel(logging.WARNING)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certificates.cert_file, self.certificates.key_file)
        self._http = self._listen(None)
        self._https = self._listen(context)
        self.http_port = self._http.server_address[1]
        self.https_port = self._https.server_address[1]
        return self

    def _listen(self, context: ssl.SSLContext | None) -> http.server.ThreadingHTTPServer:
        server = _HTTPServer((HOST, 0), _Handler, self, context)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"oauthserver-{'https' if context else 'http'}",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)
        return server

    def stop(self) -> None:
        """Stop both listeners (idempotent)."""
        for server in (self._http, self._https):
            if server is not None:
                server.shutdown()
                server.server_close()
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()
        self._http = self._https = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None
            self._certificates = None

    def __enter__(self) -> OAuthServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ URLs

    @property
    def http_url(self) -> str:
        """Base URL of the plain HTTP listener (for Dovecot's introspection)."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def https_url(self) -> str:
        """Base URL of the HTTPS listener; "localhost" and 127.0.0.1 both verify."""
        return f"https://{self.host}:{self.https_port}"

    @property
    def introspection_url(self) -> str:
        """What Dovecot's `introspection_url` points at (plain HTTP on loopback)."""
        return f"{self.http_url}/introspect"

    def token_url(self, tenant: str | None = None, *, tls: bool = True) -> str:
        """Token endpoint: Entra-like under `tenant`, else the root (Google-like) one."""
        base = self.https_url if tls else self.http_url
        return f"{base}/{tenant}/oauth2/v2.0/token" if tenant else f"{base}/token"

    def device_url(self, tenant: str | None = None, *, tls: bool = True) -> str:
        """Device authorization endpoint (Entra-like under `tenant`)."""
        base = self.https_url if tls else self.http_url
        return f"{base}/{tenant}/oauth2/v2.0/devicecode" if tenant else f"{base}/device/code"

    def authority(self, tenant: str = "test-tenant") -> str:
        """What msal takes as `authority` (over HTTPS with the test CA)."""
        return f"{self.https_url}/{tenant}"

    # ------------------------------------------------------------------ clients

    def add_client(
        self,
        client_id: str,
        secret: str | None = None,
        *,
        scopes: Iterable[str] = (),
        username: str | None = None,
        secret_expires_at: float | None = None,
        grant_types: Iterable[str] | None = None,
    ) -> Client:
        """Register (or replace) a client; without `secret` it is a public client."""
        client = Client(
            client_id=client_id,
            secret=secret,
            secret_expires_at=secret_expires_at,
            scopes=frozenset(scopes),
            username=username,
        )
        if grant_types is not None:
            client.grant_types = frozenset(grant_types)
        with self._lock:
            self.clients[client_id] = client
        return client

    def expire_client_secret(self, client_id: str) -> None:
        """Make the client's secret expired from now on (KeyError if unknown)."""
        with self._lock:
            self.clients[client_id].secret_expires_at = time.time() - 1

    # ------------------------------------------------------------------ tokens

    def _store(self, token: _Token) -> None:
        with self._lock:
            self._tokens[token.value] = token

    def issue_tokens(
        self, client_id: str, username: str, scopes: Iterable[str], *, refresh: bool = True
    ) -> TokenPair:
        """Tokens as if `username` had signed in to `client_id` (no HTTP involved)."""
        client = self.clients[client_id]
        now = time.time()
        family = secrets.token_hex(8)
        scope_list = tuple(s for s in scopes if s not in RESERVED_SCOPES)
        access = _Token(
            value=secrets.token_urlsafe(30),
            kind="access_token",
            client_id=client.client_id,
            username=username,
            scopes=scope_list,
            issued_at=now,
            expires_at=now + self.access_token_lifetime,
            family=family,
        )
        self._store(access)
        refresh_value = None
        if refresh:
            refresh_value = secrets.token_urlsafe(30)
            self._store(
                _Token(
                    value=refresh_value,
                    kind="refresh_token",
                    client_id=client.client_id,
                    username=username,
                    scopes=scope_list,
                    issued_at=now,
                    expires_at=None,
                    family=family,
                    last_used=now,
                )
            )
        return TokenPair(
            access.value, refresh_value, self.access_token_lifetime, " ".join(scope_list)
        )

    def revoke(self, token: str) -> bool:
        """Revoke a token; a refresh token takes its family's access tokens with it."""
        with self._lock:
            found = self._tokens.get(token)
            if found is None:
                return False
            found.revoked = True
            if found.kind == "refresh_token":
                for other in self._tokens.values():
                    if other.family == found.family:
                        other.revoked = True
            return True

    def expire_refresh_token(self, token: str) -> None:
        """Make a refresh token expired as if unused for too long (the provider's
        inactivity expiry); KeyError if unknown."""
        with self._lock:
            self._tokens[token].expired_by_test = True

    def active_tokens(self, username: str | None = None) -> int:
        """How many unexpired, unrevoked access tokens exist (of `username`)."""
        now = time.time()
        with self._lock:
            return sum(
                1
                for t in self._tokens.values()
                if t.kind == "access_token"
                and not t.revoked
                and (t.expires_at is None or t.expires_at > now)
                and (username is None or t.username == username)
            )

    def _introspect(self, value: str) -> dict[str, Any] | None:
        now = time.time()
        with self._lock:
            token = self._tokens.get(value)
            if token is None:
                reason = "unknown"
            elif token.revoked or (token.kind == "refresh_token" and token.used):
                reason = "revoked"
            elif token.expires_at is not None and token.expires_at <= now:
                reason = "expired"
            elif (
                token.kind == "access_token"
                and self.introspection_scope is not None
                and self.introspection_scope not in token.scopes
            ):
                reason = "insufficient_scope"
            else:
                reason = "ok"
            self.introspections.append(
                IntrospectionRecord(
                    active=reason == "ok",
                    reason=reason,
                    username=token.username if token is not None else None,
                    token_sha256=hashlib.sha256(value.encode()).hexdigest(),
                    at=now,
                )
            )
            if token is None or reason != "ok":
                return None
            claims: dict[str, Any] = {
                "client_id": token.client_id,
                "scope": " ".join(token.scopes),
                "token_type": "Bearer" if token.kind == "access_token" else "refresh_token",
                "iat": int(token.issued_at),
                "sub": token.username or token.client_id,
            }
            if token.username is not None:
                claims["username"] = token.username
            if token.expires_at is not None:
                claims["exp"] = int(token.expires_at)
            return claims

    # ------------------------------------------------------------------ device flow

    def _new_user_code(self) -> str:
        while True:
            raw = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(8))
            code = f"{raw[:4]}-{raw[4:]}"
            if code not in self._user_codes:
                return code

    def approve_device(self, user_code: str, username: str, *, deny: bool = False) -> None:
        """Approve (or deny) a user code as a browser would: a form POST to /device."""
        body = urllib.parse.urlencode(
            {"user_code": user_code, "username": username, "action": "deny" if deny else "approve"}
        ).encode()
        request = urllib.request.Request(f"{self.http_url}/device", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                raise RuntimeError(f"/device answered {response.status}")

    def slow_down(self, user_code: str) -> None:
        """Answer the next poll of this user code's device code with "slow_down"."""
        with self._lock:
            self._devices[self._user_codes[user_code]].slow_down_once = True

    def _decide_device(self, user_code: str, username: str, approve: bool) -> bool:
        with self._lock:
            device_code = self._user_codes.get(user_code.strip().upper())
            grant = self._devices.get(device_code or "")
            if grant is None or grant.status != DeviceCodeGrant.DEVICE_CODE_PENDING:
                return False
            if time.time() >= grant.expires_at:
                return False
            grant.username = username
            grant.status = (
                DeviceCodeGrant.DEVICE_CODE_AUTHORIZED
                if approve
                else DeviceCodeGrant.DEVICE_CODE_DENIED
            )
            return True

    # ------------------------------------------------------------------ HTTP dispatch

    def _discovery(self, base: str, tenant: str | None) -> dict[str, Any]:
        prefix = f"{base}/{tenant}" if tenant else base
        token = f"{prefix}/oauth2/v2.0/token" if tenant else f"{base}/token"
        device = f"{prefix}/oauth2/v2.0/devicecode" if tenant else f"{base}/device/code"
        return {
            "issuer": f"{prefix}/v2.0" if tenant else base,
            "authorization_endpoint": f"{prefix}/oauth2/v2.0/authorize",
            "token_endpoint": token,
            "device_authorization_endpoint": device,
            "introspection_endpoint": f"{base}/introspect",
            "revocation_endpoint": f"{base}/revoke",
            "grant_types_supported": ["client_credentials", "refresh_token", DEVICE_GRANT],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "response_types_supported": ["code"],
            "scopes_supported": sorted(
                RESERVED_SCOPES | {s for c in self.clients.values() for s in c.scopes}
            ),
            "tenant_region_scope": "EU" if tenant else None,
        }

    def _token_response(
        self, uri: str, body: str, headers: dict[str, str], style: Style, base: str, tenant: str
    ) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.token_requests += 1
        out_headers, out_body, status = self._oauth.create_token_response(
            uri, "POST", body, headers
        )
        data = json.loads(out_body) if out_body else {}
        if status != 200:
            return self._error(style, status, data)
        if style == "entra":
            data["ext_expires_in"] = data.get("expires_in")
            token = self._tokens.get(data.get("access_token", ""))
            grant = urllib.parse.parse_qs(body).get("grant_type", [""])[0]
            # Delegated grants only: an app-only token has no user to describe.
            if token is not None and token.username is not None and grant != "client_credentials":
                data.update(_entra_identity(token, base, tenant))
        return 200, {**out_headers, "Content-Type": "application/json"}, json.dumps(data).encode()

    def _device_response(
        self, uri: str, body: str, headers: dict[str, str], style: Style
    ) -> tuple[int, dict[str, str], bytes]:
        endpoint = DeviceAuthorizationEndpoint(
            self._validator,
            verification_uri=f"{self.http_url}/device",
            expires_in=self.device_code_lifetime,
            interval=self.device_poll_interval,
            user_code_generator=self._new_user_code,
        )
        with self._lock:
            _out_headers, out_body, status = endpoint.create_device_authorization_response(
                uri, "POST", body, headers
            )
            data = out_body if isinstance(out_body, dict) else json.loads(out_body or "{}")
            if status != 200:
                return self._error(style, status, data)
            client_id = urllib.parse.parse_qs(body).get("client_id", [""])[0]
            scopes = tuple(str(data.get("scope", "")).split())
            self._devices[data["device_code"]] = _DeviceAuthorization(
                device_code=data["device_code"],
                user_code=data["user_code"],
                client_id=client_id,
                scopes=scopes,
                expires_at=time.time() + self.device_code_lifetime,
            )
            self._user_codes[data["user_code"]] = data["device_code"]
        data.pop("scope", None)
        data["message"] = (
            f"To sign in, use a web browser to open the page {data['verification_uri']} "
            f"and enter the code {data['user_code']} to authenticate."
        )
        return 200, {"Content-Type": "application/json"}, json.dumps(data).encode()

    def _error(
        self, style: Style, status: int, data: dict[str, Any]
    ) -> tuple[int, dict[str, str], bytes]:
        status, shaped = _shape_error(
            style, status, data, self._local.reason, dict(self._local.context)
        )
        return (
            status,
            {"Content-Type": "application/json", "Cache-Control": "no-store"},
            (json.dumps(shaped).encode()),
        )

    def handle(
        self, method: str, path: str, body: str, headers: dict[str, str], base: str
    ) -> tuple[int, dict[str, str], bytes]:
        """Answer one HTTP request: (status, headers, body)."""
        try:
            return self._dispatch(method, path, body, headers, base)
        except OAuth2Error as exc:
            # Raised (not returned) by some of oauthlib's request checks.
            style: Style = (
                "entra" if _ENTRA_PATH.match(urllib.parse.urlsplit(path).path) else self.style
            )
            return self._error(style, exc.status_code, json.loads(exc.json))

    def _dispatch(
        self, method: str, path: str, body: str, headers: dict[str, str], base: str
    ) -> tuple[int, dict[str, str], bytes]:
        self._local.reason = None
        self._local.context = {}
        self._local.endpoint = ""
        uri = f"{base}{path}"
        route = urllib.parse.urlsplit(path).path
        entra = _ENTRA_PATH.match(route)
        style: Style = "entra" if entra else self.style
        tenant = entra.group("tenant") if entra else ""
        if tenant:
            self._local.context["tenant"] = tenant
        if method == "GET":
            return self._get(route, base)
        if method != "POST":
            return 405, {"Allow": "GET, POST"}, b""
        if route in ("/token",) or (entra and entra.group("endpoint") == "token"):
            return self._token_response(uri, body, headers, style, base, tenant)
        if route in ("/devicecode", "/device/code") or (
            entra and entra.group("endpoint") == "devicecode"
        ):
            return self._device_response(uri, body, headers, style)
        if route == "/introspect":
            self._local.endpoint = "introspect"
            out_headers, out_body, status = self._oauth.create_introspect_response(
                uri, "POST", body, headers
            )
            return status, dict(out_headers), out_body.encode()
        if route == "/revoke":
            out_headers, out_body, status = self._oauth.create_revocation_response(
                uri, "POST", body, headers
            )
            if status != 200:
                return self._error(style, status, json.loads(out_body or "{}"))
            return 200, {"Content-Type": "application/json"}, b"{}"
        if route == "/device":
            form = urllib.parse.parse_qs(body)
            ok = self._decide_device(
                form.get("user_code", [""])[0],
                form.get("username", [""])[0],
                form.get("action", ["approve"])[0] != "deny",
            )
            page = "<p id=result>{}</p>".format("done" if ok else "unknown or expired code")
            return (200 if ok else 400), {"Content-Type": "text/html"}, page.encode()
        return 404, {"Content-Type": "application/json"}, b'{"error":"not_found"}'

    def _get(self, route: str, base: str) -> tuple[int, dict[str, str], bytes]:
        discovery = _ENTRA_DISCOVERY.match(route)
        if discovery:
            config = self._discovery(base, discovery.group("tenant"))
        elif route in (
            "/.well-known/openid-configuration",
            "/.well-known/oauth-authorization-server",
        ):
            config = self._discovery(base, None)
            config.pop("tenant_region_scope")
        elif route == "/device":
            return 200, {"Content-Type": "text/html"}, _DEVICE_PAGE
        else:
            return 404, {"Content-Type": "application/json"}, b'{"error":"not_found"}'
        return 200, {"Content-Type": "application/json"}, json.dumps(config).encode()


_DEVICE_PAGE = b"""<!doctype html><title>Device sign-in</title>
<form method=post action=/device><label>Code <input name=user_code id=user_code></label>
<label>User <input name=username id=username></label>
<button name=action value=approve id=approve>Approve</button>
<button name=action value=deny id=deny>Deny</button></form>"""


def requests_session(ca_file: Path) -> Any:
    """A `requests.Session` that trusts only `ca_file`, for msal's `http_client=`.

    requests lets REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE override a session's `verify`
    (msal's own `verify=` sets exactly that), and our machines set both to the system
    bundle: without `trust_env = False` the test CA would be ignored.
    """
    import requests  # msal's dependency

    session = requests.Session()
    session.trust_env = False
    session.verify = str(ca_file)
    return session


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _entra_identity(token: _Token, base: str, tenant: str) -> dict[str, str]:
    """An unsigned id_token and client_info: what msal decodes to build its account."""
    uid = hashlib.sha256(f"{token.username}".encode()).hexdigest()[:32]
    claims = {
        "iss": f"{base}/{tenant}/v2.0",
        "aud": token.client_id,
        "sub": uid,
        "oid": uid,
        "tid": tenant,
        "preferred_username": token.username,
        "iat": int(token.issued_at),
        "exp": int(token.issued_at) + 3600,
    }
    header = _b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    id_token = f"{header}.{_b64url(json.dumps(claims).encode())}."
    client_info = _b64url(json.dumps({"uid": uid, "utid": tenant}).encode())
    return {"id_token": id_token, "client_info": client_info}


# --------------------------------------------------------------------------- HTTP layer


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[http.server.BaseHTTPRequestHandler],
        oauth: OAuthServer,
        context: ssl.SSLContext | None,
    ) -> None:
        self.oauth = oauth
        self.context = context
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that refuses our certificate or hangs up is ordinary in tests; anything
        # else is kept for the test to see instead of being printed.
        error = sys.exc_info()[1]
        if not isinstance(error, (ssl.SSLError, ConnectionError, TimeoutError)):
            with self.oauth._lock:
                self.oauth.errors.append(error)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self.context is not None:
            # The handshake happens in the connection's own thread (first read), so a
            # client that never finishes it cannot block the accept loop.
            sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = _CONNECTION_TIMEOUT
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # request lines can carry codes; the tests read state, not logs

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._send(413, {"Content-Type": "text/plain"}, b"too large")
            return
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        scheme = "https" if self.server.context is not None else "http"
        base = f"{scheme}://{HOST}:{self.server.server_address[1]}"
        headers = {k: v for k, v in self.headers.items()}
        status, out_headers, payload = self.server.oauth.handle(
            method, self.path, body, headers, base
        )
        self._send(status, out_headers, payload)

    def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m tools.oauthserver`."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.oauthserver", description="A test OAuth2 server on 127.0.0.1."
    )
    parser.add_argument("--certs", type=Path, help="directory of the TLS material (made if absent)")
    parser.add_argument("--lifetime", type=int, default=3600, help="access token lifetime, s")
    parser.add_argument("--style", choices=["rfc", "entra", "google"], default="rfc")
    parser.add_argument(
        "--client", action="append", default=[], metavar="ID:SECRET:USER",
        help="a confidential client whose app-only tokens act for USER (repeatable)",
    )  # fmt: skip
    parser.add_argument("--public-client", action="append", default=[], metavar="ID")
    parser.add_argument("--scope", action="append", default=[], help="scope clients may ask for")
    args = parser.parse_args(argv)

    certs = make_certificates(args.certs) if args.certs else None
    server = OAuthServer(certificates=certs, access_token_lifetime=args.lifetime, style=args.style)
    for spec in args.client:
        client_id, secret, username = ([*spec.split(":", 2), "", ""])[:3]
        server.add_client(client_id, secret, scopes=args.scope, username=username or None)
    for client_id in args.public_client:
        server.add_client(client_id, scopes=args.scope)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with server:
        print(
            json.dumps(
                {
                    "http_url": server.http_url,
                    "https_url": server.https_url,
                    "introspection_url": server.introspection_url,
                    "ca_file": str(server.ca_file),
                }
            ),
            flush=True,
        )
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
