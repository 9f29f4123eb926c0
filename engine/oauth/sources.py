"""Token sources: where an access token comes from, per provider and flow. Blocking HTTP:
run them in a worker thread (the gateway's ``open`` already is one).

- ``microsoft``: msal, Microsoft's own library. It knows Entra's authority and discovery
  rules, signs certificate assertions, and speaks the device-code flow as Entra does; our
  own HTTP would drift from it.
- ``google`` and ``generic``: authlib's OAuth2 client on requests (client credentials,
  refresh token; the device grant is one POST plus the token grant, RFC 8628). A
  well-kept library with the RFC 6749 error handling we would otherwise rewrite.

Every failure is an :class:`~engine.errors.OAuthError` whose ``reason`` says what to do
(:func:`refusal_reason` reads the provider's error code). Tokens and secrets never enter a
message: only the provider's error code and its description, which name neither.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from engine.config import OAuth2Config
from engine.errors import OAuthError

__all__ = [
    "DEVICE_GRANT",
    "DeviceFlow",
    "Grant",
    "client_credentials",
    "device_finish",
    "device_start",
    "refresh",
    "refusal_reason",
]

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# A device sign-in waits at most this long, and polls at least this often, whatever the
# server says (RFC 8628 suggests 15 minutes and 5 seconds).
MAX_DEVICE_SECONDS = 1800.0
MAX_POLL_SECONDS = 60.0
# The longest answer read from a token, device or discovery endpoint.
MAX_ANSWER_BYTES = 256 * 1024
# OpenID Connect scopes msal adds by itself and refuses to be given.
_MSAL_RESERVED = frozenset({"openid", "profile", "offline_access"})
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.DOTALL)


@dataclass(frozen=True)
class Grant:
    """What a token endpoint gave: an access token, its life, its scopes, and a refresh
    token when it gave one (a rotated one replaces the old)."""

    access_token: str = field(repr=False)
    expires_in: float
    scopes: frozenset[str]
    refresh_token: str | None = field(default=None, repr=False)


@dataclass
class DeviceFlow:
    """A started device-code sign-in: show ``message`` (the URL and the code), then wait."""

    message: str
    user_code: str
    verification_uri: str
    expires_at: float
    interval: float
    state: dict[str, Any] = field(repr=False, default_factory=dict)


class TooLarge(requests.RequestException):
    """An answer of a token or device endpoint over :data:`MAX_ANSWER_BYTES`."""


class PinnedSession(requests.Session):
    """A requests session that trusts only ``ca_file`` when one is configured, and reads
    no answer over :data:`MAX_ANSWER_BYTES` (an OAuth2 answer is a few KiB).

    requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's ``verify``; a
    configured caFile must win, while the environment's proxies still apply."""

    def __init__(self, ca_file: str | None) -> None:
        super().__init__()
        self.pinned = ca_file

    def send(self, request: Any, **kwargs: Any) -> Any:
        kwargs["stream"] = True  # read below, bounded, instead of whole by requests
        response = super().send(request, **kwargs)
        try:
            body = response.raw.read(MAX_ANSWER_BYTES + 1, decode_content=True)
        except Exception:
            response.close()
            raise
        if len(body) > MAX_ANSWER_BYTES:
            response.close()
            raise TooLarge(f"the answer of {request.url} is over {MAX_ANSWER_BYTES} bytes")
        response._content = body
        response._content_consumed = True
        response.close()
        return response

    def merge_environment_settings(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(*args, **kwargs)
        if self.pinned is not None:
            settings["verify"] = self.pinned
        return settings


def refusal_reason(error: str, description: str, codes: list[int] | None = None) -> str:
    """The :data:`~engine.errors.OAUTH_REASONS` key for a token endpoint's error."""
    error = error.lower()
    text = description.lower()
    if error == "invalid_client" and (7000222 in (codes or []) or "expired" in text):
        return "secret-expired"
    if error in ("invalid_client", "unauthorized_client"):
        return "client-refused"
    if error == "invalid_scope":
        return "insufficient-scope"
    if error in ("invalid_grant", "interaction_required", "consent_required"):
        return "login-required"
    return "token-endpoint"


def _refused(
    cfg: OAuth2Config, error: str, description: str, codes: list[int] | None = None
) -> OAuthError:
    reason = refusal_reason(error, description, codes)
    expires = cfg.client_secret_expires
    if reason == "client-refused" and expires is not None and expires <= datetime.date.today():
        # An RFC 6749 server says invalid_client for a wrong and an expired secret alike;
        # the configured expiry tells them apart.
        reason = "secret-expired"
    # The description is the provider's words (Entra's AADSTS text), never a token; cut short.
    text = f"the token endpoint refused: {error}" + (
        f" ({description[:300]})" if description else ""
    )
    return OAuthError(reason, text)


def _unreachable(cfg: OAuth2Config, exc: BaseException) -> OAuthError:
    if isinstance(exc, TooLarge):
        return OAuthError("token-endpoint", str(exc))
    return OAuthError(
        "token-endpoint",
        f"cannot reach the token endpoint {cfg.token_endpoint}: {type(exc).__name__}",
    )


# ------------------------------------------------------------------------- microsoft


def _msal_app(cfg: OAuth2Config, timeout: float, *, confidential: bool) -> Any:
    import msal  # type: ignore[import-untyped]

    kwargs: dict[str, Any] = {
        "authority": cfg.authority,
        "http_client": PinnedSession(str(cfg.ca_file) if cfg.ca_file else None),
        "timeout": timeout,
    }
    if cfg.custom_authority:
        # Not login.microsoftonline.com: msal would ask it to validate this authority.
        kwargs.update(validate_authority=False, instance_discovery=False)
    if confidential:
        return msal.ConfidentialClientApplication(
            cfg.client_id, client_credential=_msal_credential(cfg), **kwargs
        )
    return msal.PublicClientApplication(cfg.client_id, **kwargs)


def _msal_credential(cfg: OAuth2Config) -> str | dict[str, str]:
    """The client secret, or a certificate credential: msal signs the client assertion
    with the private key and names the certificate by its SHA-1 thumbprint."""
    if cfg.certificate_file is None:
        assert cfg.client_secret is not None
        return cfg.client_secret
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    pem = cfg.certificate_file.read_text(encoding="ascii", errors="replace")
    blocks = {m.group(1): m.group(0) for m in _PEM_BLOCK.finditer(pem)}
    key = next((v for k, v in blocks.items() if k.endswith("PRIVATE KEY")), None)
    cert = blocks.get("CERTIFICATE")
    if key is None or cert is None:
        raise OAuthError(
            "client-refused",
            f"{cfg.certificate_file} must hold a PEM private key and its certificate",
        )
    thumbprint = x509.load_pem_x509_certificate(cert.encode()).fingerprint(hashes.SHA1())
    return {"private_key": key, "thumbprint": thumbprint.hex(), "public_certificate": cert}


def _msal_call(cfg: OAuth2Config, call: Callable[[], Any]) -> Grant:
    try:
        result = call()
    except (requests.RequestException, OSError) as exc:
        raise _unreachable(cfg, exc) from None
    except ValueError as exc:  # msal: a discovery document it cannot use
        raise OAuthError("token-endpoint", f"msal: {str(exc)[:300]}") from None
    if not isinstance(result, dict) or "access_token" not in result:
        result = result if isinstance(result, dict) else {}
        raise _refused(
            cfg,
            str(result.get("error", "no_token")),
            str(result.get("error_description", "")),
            [c for c in result.get("error_codes", []) if isinstance(c, int)],
        )
    return _grant(result, cfg)


def _grant(result: dict[str, Any], cfg: OAuth2Config) -> Grant:
    scope = result.get("scope")
    scopes = str(scope).split() if scope else list(cfg.scopes)
    return Grant(
        access_token=str(result["access_token"]),
        expires_in=float(result.get("expires_in") or 3600),
        scopes=frozenset(scopes),
        refresh_token=str(result["refresh_token"]) if result.get("refresh_token") else None,
    )


def _msal_scopes(cfg: OAuth2Config) -> list[str]:
    return [s for s in cfg.scopes if s not in _MSAL_RESERVED]


# ------------------------------------------------------------------------- generic


def _session(cfg: OAuth2Config) -> Any:
    from authlib.integrations.requests_client import OAuth2Session  # type: ignore[import-untyped]

    class Session(PinnedSession, OAuth2Session):  # type: ignore[misc]
        def __init__(self) -> None:
            OAuth2Session.__init__(
                self,
                client_id=cfg.client_id,
                client_secret=cfg.client_secret,
                scope=" ".join(cfg.scopes),
                token_endpoint_auth_method=("client_secret_post" if cfg.client_secret else "none"),
            )
            self.pinned = str(cfg.ca_file) if cfg.ca_file else None

    return Session()


def _authlib_call(cfg: OAuth2Config, call: Callable[[Any], Any]) -> Grant:
    from authlib.common.errors import AuthlibBaseError  # type: ignore[import-untyped]

    session = _session(cfg)
    try:
        token = call(session)
    except AuthlibBaseError as exc:
        raise _refused(cfg, str(exc.error or "error"), str(exc.description or "")) from None
    except (requests.RequestException, OSError) as exc:
        raise _unreachable(cfg, exc) from None
    except ValueError:
        raise OAuthError(
            "token-endpoint", f"the token endpoint {cfg.token_endpoint} did not answer JSON"
        ) from None
    finally:
        session.close()
    if not isinstance(token, dict) or "access_token" not in token:
        raise OAuthError("token-endpoint", "the token endpoint gave no access token")
    return _grant(dict(token), cfg)


# ------------------------------------------------------------------------- the flows


def client_credentials(cfg: OAuth2Config, timeout: float) -> Grant:
    """An app-only access token (client secret or certificate)."""
    if cfg.provider == "microsoft":
        app = _msal_app(cfg, timeout, confidential=True)
        return _msal_call(cfg, lambda: app.acquire_token_for_client(scopes=_msal_scopes(cfg)))
    return _authlib_call(
        cfg,
        lambda s: s.fetch_token(
            cfg.token_endpoint, grant_type="client_credentials", timeout=timeout
        ),
    )


def refresh(cfg: OAuth2Config, refresh_token: str, timeout: float) -> Grant:
    """A new access token (and, where the provider rotates it, a new refresh token)."""
    if cfg.provider == "microsoft":
        app = _msal_app(cfg, timeout, confidential=cfg.client_secret is not None)
        return _msal_call(
            cfg,
            lambda: app.acquire_token_by_refresh_token(refresh_token, scopes=_msal_scopes(cfg)),
        )
    return _authlib_call(
        cfg,
        lambda s: s.refresh_token(cfg.token_endpoint, refresh_token=refresh_token, timeout=timeout),
    )


def device_start(cfg: OAuth2Config, timeout: float) -> DeviceFlow:
    """Ask for a device code (RFC 8628): the user opens the URL and types the code."""
    if cfg.provider == "microsoft":
        app = _msal_app(cfg, timeout, confidential=False)
        try:
            flow = app.initiate_device_flow(scopes=_msal_scopes(cfg))
        except (requests.RequestException, OSError) as exc:
            raise _unreachable(cfg, exc) from None
        if "user_code" not in flow:
            raise _refused(
                cfg, str(flow.get("error", "error")), str(flow.get("error_description", ""))
            )
        return DeviceFlow(
            message=str(flow.get("message", "")),
            user_code=str(flow["user_code"]),
            verification_uri=str(flow.get("verification_uri", "")),
            expires_at=_device_deadline(flow, float(flow.get("expires_in", 900))),
            interval=min(MAX_POLL_SECONDS, float(flow.get("interval", 5))),
            state={"msal": flow, "app": app},
        )
    return _generic_device_start(cfg, timeout)


def _generic_device_start(cfg: OAuth2Config, timeout: float) -> DeviceFlow:
    if cfg.device_endpoint is None:
        raise OAuthError("token-endpoint", "no <deviceEndpoint> for the device-code sign-in")
    session = _session(cfg)
    try:
        data = {"client_id": cfg.client_id, "scope": " ".join(cfg.scopes)}
        if cfg.client_secret:
            data["client_secret"] = cfg.client_secret
        response = session.post(
            cfg.device_endpoint, data=data, timeout=timeout, withhold_token=True
        )
        body = response.json()
    except (requests.RequestException, OSError) as exc:
        raise _unreachable(cfg, exc) from None
    except ValueError:
        raise OAuthError("token-endpoint", "the device endpoint did not answer JSON") from None
    finally:
        session.close()
    if not isinstance(body, dict) or "device_code" not in body:
        body = body if isinstance(body, dict) else {}
        raise _refused(cfg, str(body.get("error", "error")), str(body.get("error_description", "")))
    uri = str(body.get("verification_uri") or body.get("verification_url") or "")
    return DeviceFlow(
        message=f"To sign in, open {uri} and enter the code {body['user_code']}",
        user_code=str(body["user_code"]),
        verification_uri=uri,
        expires_at=_device_deadline({}, float(body.get("expires_in", 900))),
        interval=min(MAX_POLL_SECONDS, float(body.get("interval", 5))),
        state={"device_code": str(body["device_code"])},
    )


def _device_deadline(flow: dict[str, Any], expires_in: float) -> float:
    """When a device sign-in gives up: as the server says, at most :data:`MAX_DEVICE_SECONDS`
    from now (msal polls until its flow's ``expires_at``: bounded there too)."""
    deadline = time.time() + min(max(expires_in, 1.0), MAX_DEVICE_SECONDS)
    if "expires_at" in flow:
        flow["expires_at"] = min(float(flow["expires_at"]), deadline)
    return deadline


def device_finish(cfg: OAuth2Config, flow: DeviceFlow, timeout: float) -> Grant:
    """Wait (polling as the server asks) until the user approved, declined, or the code
    expired; the grant holds the refresh token to keep."""
    if "msal" in flow.state:
        app = flow.state["app"]
        return _msal_call(cfg, lambda: app.acquire_token_by_device_flow(flow.state["msal"]))
    interval = flow.interval
    while time.time() < flow.expires_at:
        try:
            return _authlib_call(
                cfg,
                lambda s: s.fetch_token(
                    cfg.token_endpoint,
                    grant_type=DEVICE_GRANT,
                    device_code=flow.state["device_code"],
                    timeout=timeout,
                ),
            )
        except OAuthError as exc:
            if "authorization_pending" not in str(exc) and "slow_down" not in str(exc):
                raise
            if "slow_down" in str(exc):
                interval = min(MAX_POLL_SECONDS, interval + 5)  # RFC 8628 section 3.5
        time.sleep(max(0.0, min(interval, flow.expires_at - time.time())))
    raise OAuthError("login-required", "the device code expired before it was approved")
