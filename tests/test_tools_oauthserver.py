"""The test OAuth2 authorization server (tools/oauthserver.py), with plain HTTP and with msal."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msal  # type: ignore[import-untyped]
import pytest

from tools.oauthserver import DEVICE_GRANT, OAuthServer, requests_session

ROOT = Path(__file__).resolve().parent.parent
TENANT = "contoso-test"


@pytest.fixture
def server() -> Iterator[OAuthServer]:
    """A fresh server with a confidential app ("app", acting for box1) and a public one."""
    with OAuthServer() as oauth:
        oauth.add_client("app", "app-secret", scopes=["mail", "calendar"], username="box1")
        oauth.add_client("public", scopes=["mail"])
        yield oauth


def post(
    server: OAuthServer, url: str, data: dict[str, str], *, basic: tuple[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """A form POST (HTTPS verified with the test CA when the URL says https)."""
    request = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode(), method="POST")
    if basic is not None:
        credentials = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {credentials}")
    context = ssl.create_default_context(cafile=str(server.ca_file))
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            body = response.read()
            return response.status, json.loads(body) if body else {}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def get(server: OAuthServer, url: str) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(server.ca_file))
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def client_credentials(
    server: OAuthServer, tenant: str | None = None, secret: str = "app-secret", scope: str = "mail"
) -> tuple[int, dict[str, Any]]:
    return post(
        server,
        server.token_url(tenant),
        {
            "grant_type": "client_credentials",
            "client_id": "app",
            "client_secret": secret,
            "scope": scope,
        },
    )


def refresh(
    server: OAuthServer, refresh_token: str, tenant: str | None = None
) -> tuple[int, dict[str, Any]]:
    """The refresh grant for the public client."""
    data = {"grant_type": "refresh_token", "client_id": "public", "refresh_token": refresh_token}
    return post(server, server.token_url(tenant), data)


def revoke(server: OAuthServer, token: str) -> int:
    """An RFC 7009 revocation request by the public client; the HTTP status."""
    return post(server, f"{server.https_url}/revoke", {"client_id": "public", "token": token})[0]


def introspect(server: OAuthServer, token: str) -> dict[str, Any]:
    status, body = post(server, server.introspection_url, {"token": token})
    assert status == 200
    return body


def device_login(server: OAuthServer, username: str, tenant: str | None = None) -> dict[str, Any]:
    """The device flow done by hand: device code, approval, token."""
    status, device = post(
        server, server.device_url(tenant), {"client_id": "public", "scope": "mail offline_access"}
    )
    assert status == 200, device
    server.approve_device(device["user_code"], username)
    status, token = post(
        server,
        server.token_url(tenant),
        {"grant_type": DEVICE_GRANT, "client_id": "public", "device_code": device["device_code"]},
    )
    assert status == 200, token
    return token


def msal_app(server: OAuthServer, cls: Any, **kwargs: Any) -> Any:
    """An msal application pointed at the server as an Entra-like custom authority."""
    return cls(
        authority=server.authority(TENANT),
        validate_authority=False,
        instance_discovery=False,
        http_client=requests_session(server.ca_file),
        **kwargs,
    )


# --------------------------------------------------------------------------- grants


def test_client_credentials_token_is_introspected_as_the_apps_mailbox(
    server: OAuthServer,
) -> None:
    status, token = client_credentials(server)
    assert status == 200
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] == 3600
    assert token["scope"] == "mail"
    assert "refresh_token" not in token  # app-only: nothing to refresh
    claims = introspect(server, token["access_token"])
    assert claims["active"] is True
    assert claims["username"] == "box1"
    assert claims["client_id"] == "app"
    assert claims["scope"] == "mail"
    assert claims["exp"] - claims["iat"] == 3600
    # client_secret_basic works as well as client_secret_post.
    status, token = post(
        server,
        server.token_url(),
        {"grant_type": "client_credentials", "scope": "mail"},
        basic=("app", "app-secret"),
    )
    assert status == 200


def test_access_token_lifetime_is_configurable(server: OAuthServer) -> None:
    server.access_token_lifetime = 1
    status, token = client_credentials(server)
    assert (status, token["expires_in"]) == (200, 1)
    assert introspect(server, token["access_token"])["active"] is True
    time.sleep(1.2)
    assert introspect(server, token["access_token"]) == {"active": False}
    assert [r.reason for r in server.introspections] == ["ok", "expired"]


@pytest.mark.parametrize(
    ("style", "tenant", "status", "body"),
    [
        ("rfc", None, 401, {"error": "invalid_client"}),
        (
            "google",
            None,
            401,
            {
                "error": "invalid_client",
                "error_description": "The OAuth client secret has expired.",
            },
        ),
        ("rfc", TENANT, 401, {"error": "invalid_client", "error_codes": [7000222]}),
    ],
)
def test_expired_client_secret_is_refused_like_the_provider(
    server: OAuthServer, style: Any, tenant: str | None, status: int, body: dict[str, Any]
) -> None:
    server.style = style
    assert client_credentials(server, tenant)[0] == 200
    server.expire_client_secret("app")
    got_status, got = client_credentials(server, tenant)
    assert got_status == status
    assert body.items() <= got.items()
    if tenant is not None:  # Entra-like paths answer like Entra ID, whatever the style
        assert got["error_description"].startswith("AADSTS7000222: The provided client secret")
        assert {"timestamp", "trace_id", "correlation_id"} <= got.keys()


def test_wrong_secret_unknown_client_and_wrong_scope(server: OAuthServer) -> None:
    status, body = client_credentials(server, TENANT, secret="wrong")
    assert (status, body["error"], body["error_codes"]) == (401, "invalid_client", [7000215])
    status, body = post(
        server,
        server.token_url(TENANT),
        {"grant_type": "client_credentials", "client_id": "nobody", "client_secret": "x"},
    )
    assert (body["error"], body["error_codes"]) == ("unauthorized_client", [700016])
    assert "'nobody'" in body["error_description"]
    status, body = client_credentials(server, TENANT, scope="mail files")
    assert (status, body["error"], body["error_codes"]) == (400, "invalid_scope", [70011])
    assert "'files'" in body["error_description"]
    server.style = "google"
    status, body = client_credentials(server, scope="files")
    assert (status, body["error"]) == (400, "invalid_scope")


def test_refresh_token_rotation(server: OAuthServer) -> None:
    first = device_login(server, "box2")
    status, second = refresh(server, first["refresh_token"])
    assert status == 200
    assert second["refresh_token"] != first["refresh_token"]
    assert second["scope"] == "mail"
    assert introspect(server, second["access_token"])["username"] == "box2"
    # The used refresh token is dead; the one it was rotated into works.
    server.style = "google"
    status, body = refresh(server, first["refresh_token"])
    assert (status, body) == (
        400,
        {"error": "invalid_grant", "error_description": "Token has been expired or revoked."},
    )
    server.style = "rfc"
    status, body = refresh(server, first["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    _, body = refresh(server, first["refresh_token"], TENANT)
    assert body["error_codes"] == [70000]
    status, _ = refresh(server, second["refresh_token"])
    assert status == 200


def test_refresh_token_expires_from_inactivity(server: OAuthServer) -> None:
    pair = server.issue_tokens("public", "box3", ["mail"])
    assert pair.refresh_token is not None
    server.expire_refresh_token(pair.refresh_token)
    status, body = refresh(server, pair.refresh_token, TENANT)
    assert (status, body["error"], body["error_codes"]) == (400, "invalid_grant", [700082])
    assert "expired due to inactivity" in body["error_description"]

    server.refresh_token_idle_lifetime = 0.5
    pair = server.issue_tokens("public", "box3", ["mail"])
    assert pair.refresh_token is not None
    time.sleep(0.7)
    status, body = refresh(server, pair.refresh_token, TENANT)
    assert body["error_codes"] == [700082]


def test_device_authorization_grant(server: OAuthServer) -> None:
    status, device = post(
        server, server.device_url(TENANT), {"client_id": "public", "scope": "mail"}
    )
    assert status == 200
    assert {
        "device_code",
        "user_code",
        "verification_uri",
        "expires_in",
        "interval",
        "message",
    } <= (device.keys())
    assert device["verification_uri"] == f"{server.http_url}/device"
    assert device["user_code"] in device["message"]
    poll = {"grant_type": DEVICE_GRANT, "client_id": "public", "device_code": device["device_code"]}
    status, body = post(server, server.token_url(TENANT), poll)
    assert (status, body["error"], body["error_codes"]) == (400, "authorization_pending", [70016])
    server.style = "google"
    status, body = post(server, server.token_url(), poll)
    assert (status, body["error"]) == (428, "authorization_pending")
    server.slow_down(device["user_code"])
    status, body = post(server, server.token_url(), poll)
    assert (status, body["error"]) == (403, "slow_down")

    server.approve_device(device["user_code"], "box4")  # the browser's form POST
    status, token = post(server, server.token_url(TENANT), poll)
    assert status == 200
    assert {"access_token", "refresh_token", "id_token", "client_info"} <= token.keys()
    assert introspect(server, token["access_token"])["username"] == "box4"
    status, body = post(server, server.token_url(), poll)  # a device code is redeemed once
    assert (status, body["error"]) == (400, "invalid_grant")
    with pytest.raises(urllib.error.HTTPError):
        server.approve_device(device["user_code"], "box4")  # no longer pending


def test_device_authorization_denied_and_expired(server: OAuthServer) -> None:
    _, denied = post(server, server.device_url(TENANT), {"client_id": "public", "scope": "mail"})
    server.approve_device(denied["user_code"], "box5", deny=True)
    poll = {"grant_type": DEVICE_GRANT, "client_id": "public", "device_code": denied["device_code"]}
    _, body = post(server, server.token_url(TENANT), poll)
    assert body["error"] == "authorization_declined"  # what Entra ID answers
    server.style = "rfc"
    _, body = post(server, server.token_url(), poll)
    assert body["error"] == "access_denied"  # RFC 8628

    server.device_code_lifetime = 1
    _, late = post(server, server.device_url(), {"client_id": "public", "scope": "mail"})
    time.sleep(1.2)
    poll["device_code"] = late["device_code"]
    _, body = post(server, server.token_url(TENANT), poll)
    assert (body["error"], body["error_codes"]) == ("expired_token", [70019])


def test_revocation_of_access_and_refresh_tokens(server: OAuthServer) -> None:
    tokens = device_login(server, "box6")
    status, _ = post(
        server,
        f"{server.https_url}/revoke",
        {"client_id": "public", "token": tokens["access_token"], "token_type_hint": "access_token"},
    )
    assert status == 200
    assert introspect(server, tokens["access_token"]) == {"active": False}
    status, refreshed = refresh(server, tokens["refresh_token"])
    assert status == 200  # revoking the access token left the refresh token alone
    # Revoking a refresh token takes the access tokens issued from it along.
    assert revoke(server, refreshed["refresh_token"]) == 200
    assert introspect(server, refreshed["access_token"]) == {"active": False}
    status, body = refresh(server, refreshed["refresh_token"], TENANT)
    assert (body["error"], body["error_codes"]) == ("invalid_grant", [50173])
    assert server.introspections[-1].reason == "revoked"
    # RFC 7009: a client cannot revoke another client's token.
    _, app_token = client_credentials(server)
    assert revoke(server, app_token["access_token"]) == 200  # answered, not done
    assert introspect(server, app_token["access_token"])["active"] is True


def test_introspection_refuses_a_token_without_the_resource_scope(server: OAuthServer) -> None:
    server.introspection_scope = "mail"
    _, calendar = client_credentials(server, scope="calendar")
    _, mail = client_credentials(server, scope="mail")
    assert introspect(server, calendar["access_token"]) == {"active": False}
    assert introspect(server, mail["access_token"])["active"] is True
    assert [r.reason for r in server.introspections] == ["insufficient_scope", "ok"]
    assert introspect(server, "never-issued") == {"active": False}
    assert server.introspections[-1].reason == "unknown"


def test_discovery_documents_and_tls(server: OAuthServer) -> None:
    entra = get(server, f"{server.https_url}/{TENANT}/v2.0/.well-known/openid-configuration")
    assert entra["token_endpoint"] == server.token_url(TENANT)
    assert entra["device_authorization_endpoint"] == server.device_url(TENANT)
    assert entra["issuer"] == f"{server.https_url}/{TENANT}/v2.0"
    root = get(server, f"{server.https_url}/.well-known/openid-configuration")
    assert root["token_endpoint"] == server.token_url()
    assert root["introspection_endpoint"] == f"{server.https_url}/introspect"
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(
            f"{server.https_url}/.well-known/openid-configuration",
            timeout=10,
            context=ssl.create_default_context(),
        )
    assert server.errors == []


# --------------------------------------------------------------------------- msal


def test_msal_client_credentials(server: OAuthServer) -> None:
    app = msal_app(
        server, msal.ConfidentialClientApplication, client_id="app", client_credential="app-secret"
    )
    first = app.acquire_token_for_client(["mail"])
    assert first["token_source"] == "identity_provider"
    assert introspect(server, first["access_token"])["username"] == "box1"
    second = app.acquire_token_for_client(["mail"])
    assert second["token_source"] == "cache"
    assert second["access_token"] == first["access_token"]

    server.expire_client_secret("app")
    expired = msal_app(
        server, msal.ConfidentialClientApplication, client_id="app", client_credential="app-secret"
    ).acquire_token_for_client(["mail"])
    assert expired["error"] == "invalid_client"
    assert expired["error_codes"] == [7000222]
    assert "AADSTS7000222" in expired["error_description"]


def test_msal_device_flow_then_silent_refresh_with_rotation(server: OAuthServer) -> None:
    app = msal_app(server, msal.PublicClientApplication, client_id="public")
    flow = app.initiate_device_flow(["mail"])
    assert flow["verification_uri"] == f"{server.http_url}/device"
    approver = threading.Timer(0.3, server.approve_device, (flow["user_code"], "box7"))
    approver.start()
    deadline = time.monotonic() + 20
    result = app.acquire_token_by_device_flow(
        flow, exit_condition=lambda _: time.monotonic() > deadline
    )
    approver.join(5)
    assert "access_token" in result, result
    assert introspect(server, result["access_token"])["username"] == "box7"
    [account] = app.get_accounts()
    assert account["username"] == "box7"

    refreshed = app.acquire_token_silent(["mail"], account, force_refresh=True)
    assert refreshed is not None and "access_token" in refreshed, refreshed
    assert refreshed["access_token"] != result["access_token"]
    assert refreshed["refresh_token"] != result["refresh_token"]
    # The old refresh token was rotated away; msal kept the new one and uses it again.
    again = app.acquire_token_silent(["mail"], account, force_refresh=True)
    assert again is not None and "access_token" in again, again
    assert app.acquire_token_by_refresh_token(result["refresh_token"], ["mail"])["error_codes"] == [
        70000
    ]


def test_msal_refresh_token_refused_after_revocation(server: OAuthServer) -> None:
    pair = server.issue_tokens("public", "box8", ["mail"])
    assert pair.refresh_token is not None
    app = msal_app(server, msal.PublicClientApplication, client_id="public")
    fresh = app.acquire_token_by_refresh_token(pair.refresh_token, ["mail"])
    assert "access_token" in fresh, fresh
    server.revoke(fresh["refresh_token"])
    refused = app.acquire_token_by_refresh_token(fresh["refresh_token"], ["mail"])
    assert refused["error"] == "invalid_grant"
    assert refused["error_codes"] == [50173]


# --------------------------------------------------------------------------- CLI


def test_command_line_server(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "tools.oauthserver", "--certs", str(tmp_path),
        "--client", "cli-app:cli-secret:cli-box", "--scope", "mail", "--style", "entra",
    ]  # fmt: skip
    with subprocess.Popen(
        command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    ) as process:
        try:
            assert process.stdout is not None
            info = json.loads(process.stdout.readline())
            assert Path(info["ca_file"]) == tmp_path / "ca.pem"
            data = urllib.parse.urlencode(
                {"grant_type": "client_credentials", "client_id": "cli-app",
                 "client_secret": "cli-secret", "scope": "mail"}
            ).encode()  # fmt: skip
            context = ssl.create_default_context(cafile=info["ca_file"])
            with urllib.request.urlopen(
                f"{info['https_url']}/token", data=data, timeout=10, context=context
            ) as response:
                token = json.loads(response.read())
            body = urllib.parse.urlencode({"token": token["access_token"]}).encode()
            with urllib.request.urlopen(
                info["introspection_url"], data=body, timeout=10
            ) as response:
                assert json.loads(response.read())["username"] == "cli-box"
        finally:
            process.terminate()
        assert process.wait(10) == 0
