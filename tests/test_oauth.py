"""OAuth2 sign-in (issue 14) against a real Dovecot whose oauth2 passdb introspects the tokens
of a real OAuth2 server on loopback (tools/oauthserver.py): SASL on POP3, token sources,
the token store, refresh, outages, and the secret canaries extended to tokens."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import http.server
import json
import os
import shutil
import ssl
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    LOGIN,
    LOGIN_PASSWORD,
    assert_exactly_once,
    cli,
    engine_argv,
    free_port,
    import_directory,
    message,
    once,
    requests,
    wait_for,
)
from test_secrets import leaks

from engine.config import OAuth2Config, load_mailbox, mailbox_copy, redact_config, secret_values
from engine.errors import OAUTH_REASONS, ConfigError
from engine.oauth import sasl
from engine.oauth.broker import TokenBroker
from engine.oauth.health import health
from engine.oauth.store import TokenRecord
from tools.dovecot import Dovecot, start_dovecot
from tools.oauthserver import OAuthServer

pytestmark = pytest.mark.dovecot

INCIDENT = (
    "Octopus.MailIntegration.Processors.EndUserIncidentMailMessageProcessor, "
    "Octopus.MailIntegration"
)
TENANT = "contoso-test"


def oauth_xml(
    path: Path,
    dovecot: Dovecot,
    user: str,
    oauth2: str,
    *,
    smtp: str = "",
    gateway: str = "pop3",
) -> Path:
    """A mailbox file that signs in to ``dovecot`` over POP3S (``gateway`` "imap": IMAPS)
    with ``<oauth2>oauth2</oauth2>``."""
    port = dovecot.imaps_port if gateway == "imap" else dovecot.pop3s_port
    path.write_text(
        f"""<?xml version="1.0" encoding="utf-8"?>
<mailIntegration>
  <messageProcessorTypeName>{INCIDENT}</messageProcessorTypeName>
  <server>
    <protocol>{gateway}</protocol>
    <serverName>127.0.0.1</serverName>
    <port>{port}</port>
    <useSsl>true</useSsl>
    <caFile>{dovecot.ca_file}</caFile>
    <userName>{user}</userName>
    <timeoutSeconds>5</timeoutSeconds>
    <oauth2>{oauth2}</oauth2>
  </server>
  <team>1</team>
  <incidentFallbackSiteName>Montr&#233;al</incidentFallbackSiteName>
  <incidentFallbackUserLogon>unknown.user</incidentFallbackUserLogon>
  <incidentGroup>Service Desk</incidentGroup>
  <incidentSource>Email</incidentSource>
{smtp}</mailIntegration>
""",
        encoding="utf-8",
    )
    return path


def generic_cc(server: OAuthServer, secret_file: Path, scope: str = "mail") -> str:
    return (
        "<provider>generic</provider><flow>clientCredentials</flow>"
        f"<clientId>{secret_file.stem}</clientId><clientSecretFile>{secret_file}</clientSecretFile>"
        f"<tokenEndpoint>{server.token_url()}</tokenEndpoint><scope>{scope}</scope>"
        f"<caFile>{server.ca_file}</caFile>"
    )


@pytest.fixture
def box(oauth_dovecot: Dovecot) -> str:
    name = f"box-{uuid.uuid4().hex[:10]}"
    oauth_dovecot.add_user(name, uuid.uuid4().hex)
    return name


@pytest.fixture
def app(oauth_server: OAuthServer, box: str, tmp_path: Path) -> Iterator[Path]:
    """A confidential client acting for ``box``; its secret in a file named after its id."""
    client_id = f"app-{uuid.uuid4().hex[:8]}"
    secret = f"secret-{uuid.uuid4().hex}"
    oauth_server.add_client(client_id, secret, scopes=["mail", "calendar"], username=box)
    path = tmp_path / f"{client_id}.secret"
    path.write_text(secret + "\n")
    yield path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    return data


def token_record(data: Path) -> dict[str, object]:
    files = list((data / "oauth").glob("*.json"))
    assert len(files) == 1, files
    record: dict[str, object] = json.loads(files[0].read_text())
    return record


# --------------------------------------------------------------------------- SASL, pure


def test_initial_responses_follow_the_two_mechanisms() -> None:
    x = sasl.initial_response("XOAUTH2", "box@example.com", "tok", "h", 995)
    assert x == b"user=box@example.com\x01auth=Bearer tok\x01\x01"
    o = sasl.initial_response("OAUTHBEARER", "a,b=c", "tok", "mail.example", 995)
    assert o == b"n,a=a=2Cb=3Dc,\x01host=mail.example\x01port=995\x01auth=Bearer tok\x01\x01"
    assert sasl.choose(["PLAIN", "xoauth2"]) == "XOAUTH2"
    assert sasl.choose(["XOAUTH2", "OAUTHBEARER"]) == "OAUTHBEARER"
    assert sasl.choose(["PLAIN"]) is None


def test_refusals_are_classified_by_status_scope_and_expiry() -> None:
    granted = frozenset({"calendar"})
    xo = sasl.parse_refusal(b"eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=")
    assert xo == {"status": "401", "schemes": "bearer", "scope": "mail"}
    assert sasl.classify(xo, "XOAUTH2", 2e9, granted, now=1e9).reason == "insufficient-scope"
    ok_scope = frozenset({"mail"})
    assert sasl.classify(xo, "XOAUTH2", 1e9 - 1, ok_scope, now=1e9).reason == "token-expired"
    assert sasl.classify(xo, "XOAUTH2", 2e9, ok_scope, now=1e9).reason == "unknown-user"
    bearer = {"status": "insufficient_scope"}
    assert sasl.classify(bearer, "OAUTHBEARER", 2e9, ok_scope).reason == "insufficient-scope"
    assert sasl.parse_refusal(b"not json") == {}


# --------------------------------------------------------------------------- POP3 sign-in


def test_client_credentials_sign_in_over_pop3_fetches_and_keeps_tokens_private(
    oauth_server: OAuthServer,
    oauth_dovecot: Dovecot,
    box: str,
    app: Path,
    data: Path,
    tmp_path: Path,
) -> None:
    for i in range(2):
        oauth_dovecot.deliver(box, message(f"Printer {i} jammed"))
    cfg = oauth_xml(tmp_path / "m.xml", oauth_dovecot, box, generic_cc(oauth_server, app))
    assert once(data, cfg) == 0
    assert oauth_dovecot.count(box) == 0
    assert sorted(r["subject"] for r in requests(data)) == ["Printer 0 jammed", "Printer 1 jammed"]
    record = token_record(data)
    assert record["mechanism"] == "OAUTHBEARER"  # both offered: the standard one
    assert record["scopes"] == ["mail"]
    folder = data / "oauth"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # The server saw the token it issued, active, for this mailbox.
    assert any(r.active and r.username == box for r in oauth_server.introspections)
    # A second run reuses the stored token: no new request to the token endpoint.
    before = oauth_server.token_requests
    assert once(data, cfg) == 0
    assert oauth_server.token_requests == before


def one_mechanism_dovecot(base: Path, server: OAuthServer, mechanism: str) -> Dovecot:
    return start_dovecot(
        base,
        imap=False,
        oauth2_introspection_url=server.introspection_url,
        oauth2_mechanisms=(mechanism,),
        oauth2_scope="mail",
    )


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_a_server_offering_one_mechanism_is_signed_in_with_that_one(
    mechanism: str, oauth_server: OAuthServer, dovecot_dir: Path, data: Path, tmp_path: Path
) -> None:
    server = one_mechanism_dovecot(dovecot_dir, oauth_server, mechanism)
    try:
        user = f"box-{uuid.uuid4().hex[:8]}"
        server.add_user(user, uuid.uuid4().hex)
        oauth_server.add_client(
            "one-" + mechanism, "s3cret-" + mechanism, scopes=["mail"], username=user
        )
        secret = tmp_path / f"one-{mechanism}.secret"
        secret.write_text("s3cret-" + mechanism)
        server.deliver(user, message("Only one mechanism"))
        cfg = oauth_xml(tmp_path / "m.xml", server, user, generic_cc(oauth_server, secret))
        assert once(data, cfg) == 0
        assert server.count(user) == 0
        assert token_record(data)["mechanism"] == mechanism.upper()
    finally:
        server.stop()


def test_wrong_scope_and_wrong_user_are_classified_and_mail_stays(
    oauth_server: OAuthServer, dovecot_dir: Path, data: Path, tmp_path: Path
) -> None:
    server = one_mechanism_dovecot(dovecot_dir, oauth_server, "xoauth2")
    try:
        user = f"box-{uuid.uuid4().hex[:8]}"
        server.add_user(user, uuid.uuid4().hex)
        server.add_user("someone-else", uuid.uuid4().hex)
        oauth_server.add_client(
            "scoped", "scoped-secret", scopes=["mail", "calendar"], username=user
        )
        secret = tmp_path / "scoped.secret"
        secret.write_text("scoped-secret")
        server.deliver(user, message("Stays on the server"))
        # A token for "calendar" only: Dovecot wants "mail".
        cfg = oauth_xml(
            tmp_path / "m.xml", server, user, generic_cc(oauth_server, secret, scope="calendar")
        )
        code, out = cli("check", "--config", cfg, "--data-dir", data)
        assert code == 1
        assert "insufficient-scope" in out and "calendar" in out, out
        # The right scope, but the token is for another mailbox than userName.
        other = oauth_xml(
            tmp_path / "o.xml", server, "someone-else", generic_cc(oauth_server, secret)
        )
        code, out = cli("check", "--config", other, "--data-dir", tmp_path / "d2")
        assert code == 1
        assert "unknown-user" in out, out
        assert once(data, cfg) == 1
        assert server.count(user) == 1
        events = [r for r in requests(data) if "oauth" in r["subject"]]
        assert len(events) == 1, [r["subject"] for r in requests(data)]
    finally:
        server.stop()


# --------------------------------------------------------------------------- SMTP


class OAuthSmtp:
    """An aiosmtpd handler that signs in with XOAUTH2 only, checking the token with the
    authorization server's introspection (as Dovecot does), and keeps what it receives."""

    def __init__(self, server: OAuthServer) -> None:
        self.server = server
        self.received: list[tuple[str, bytes]] = []
        self.logins: list[str] = []

    async def auth_XOAUTH2(self, smtp: Any, args: list[str]) -> Any:
        from aiosmtpd.smtp import AuthResult

        blob = base64.b64decode(args[1]) if len(args) > 1 else await smtp.challenge_auth("")
        fields = dict(part.split("=", 1) for part in blob.decode().split("\x01") if "=" in part)
        token = fields.get("auth", "").removeprefix("Bearer ")
        claims = await asyncio.to_thread(self._introspect, token)
        if claims.get("active") and claims.get("username") == fields.get("user"):
            self.logins.append(fields["user"])
            return AuthResult(success=True, auth_data=fields["user"])
        await smtp.challenge_auth(json.dumps({"status": "401", "schemes": "bearer"}))
        return AuthResult(success=False)

    def _introspect(self, token: str) -> dict[str, Any]:
        body = urllib.parse.urlencode({"token": token}).encode()
        with urllib.request.urlopen(self.server.introspection_url, body, timeout=10) as r:
            claims: dict[str, Any] = json.loads(r.read())
        return claims

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, envelope.content))
        return "250 OK"


def test_replies_are_sent_over_smtp_signed_in_with_the_mailbox_token(
    oauth_server: OAuthServer,
    oauth_dovecot: Dovecot,
    box: str,
    app: Path,
    data: Path,
    tmp_path: Path,
) -> None:
    from aiosmtpd.controller import Controller

    handler = OAuthSmtp(oauth_server)
    certs = oauth_server.certificates
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert_file, certs.key_file)
    port = free_port()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        auth_exclude_mechanism=["LOGIN", "PLAIN"],
    )
    controller.start()
    try:
        oauth_dovecot.deliver(box, message("Please register me"))
        smtp = (
            f"<smtp><serverName>127.0.0.1</serverName><port>{port}</port><startTls>true</startTls>"
            f"<caFile>{oauth_server.ca_file}</caFile><useOAuth2>true</useOAuth2>"
            "<from>Desk &lt;desk@example.com&gt;</from><timeoutSeconds>5</timeoutSeconds></smtp>"
            "<createNewRequests>false</createNewRequests>"
            "<replyTemplate><subject>Not registered: {subject}</subject>"
            "<body>Dear {sender}, this mailbox takes no new requests.</body></replyTemplate>"
        )
        cfg = oauth_xml(
            tmp_path / "m.xml", oauth_dovecot, box, generic_cc(oauth_server, app), smtp=smtp
        )
        assert once(data, cfg) == 0
        assert handler.logins == [box]
        assert len(handler.received) == 1
        assert handler.received[0][0] == "<>"  # MAIL FROM:<>
        assert b"Not registered: Please register me" in handler.received[0][1]
    finally:
        controller.stop()


# --------------------------------------------------------------------------- token sources


def delegated(server: OAuthServer, provider: str, client_id: str, extra: str = "") -> str:
    """A refreshToken mailbox: Microsoft through msal (Entra-like paths), or generic
    (Google-like root endpoints) through authlib."""
    if provider == "microsoft":
        endpoints = f"<tokenEndpoint>{server.token_url(TENANT)}</tokenEndpoint>"
    else:
        endpoints = (
            f"<tokenEndpoint>{server.token_url()}</tokenEndpoint>"
            f"<deviceEndpoint>{server.device_url()}</deviceEndpoint>"
        )
    return (
        f"<provider>{provider}</provider><flow>refreshToken</flow><clientId>{client_id}</clientId>"
        f"{endpoints}<scope>mail offline_access</scope><caFile>{server.ca_file}</caFile>{extra}"
    )


def device_login(server: OAuthServer, cfg: Path, data: Path, user: str) -> str:
    """Run `oauth login` as a process, approve its code as the user would; its output."""
    proc = subprocess.Popen(
        engine_argv("oauth", "login", "--config", cfg, "--data-dir", data),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for _ in range(20):
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("Code: ") or not line:
                break
        assert lines[-1].startswith("Code: "), lines
        server.approve_device(lines[-1].split()[1], user)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    return "".join(lines) + rest


@pytest.mark.parametrize("provider", ["microsoft", "generic"])
def test_device_login_then_the_refresh_token_flow_signs_in_and_rotates(
    provider: str,
    oauth_server: OAuthServer,
    oauth_dovecot: Dovecot,
    box: str,
    data: Path,
    tmp_path: Path,
) -> None:
    client_id = f"public-{provider}-{uuid.uuid4().hex[:6]}"
    oauth_server.add_client(client_id, scopes=["mail"])
    cfg = oauth_xml(
        tmp_path / "m.xml", oauth_dovecot, box, delegated(oauth_server, provider, client_id)
    )
    # Before anyone signed in: an oauth outage that says to run oauth login; mail stays.
    oauth_dovecot.deliver(box, message("Waiting for sign-in"))
    assert once(data, cfg) == 1
    assert oauth_dovecot.count(box) == 1
    out = device_login(oauth_server, cfg, data, box)
    assert "/device" in out and "OK: signed in" in out
    first = token_record(data)["refresh_token"]
    # The login's access token is used at once; a forced refresh rotates the refresh token.
    assert once(data, cfg) == 0
    assert oauth_dovecot.count(box) == 0
    broker = TokenBroker(data)
    loaded = load_mailbox(cfg)
    assert loaded.server.oauth2 is not None
    token = broker.access_token(loaded.account, loaded.server.oauth2, force=True)
    assert token.fresh
    second = token_record(data)["refresh_token"]
    assert second and second != first
    events = [r for r in requests(data) if "oauth" in r["subject"]]
    assert len(events) == 1, events
    assert events[0]["status"] == "processed"  # closed by the first sign-in that worked


def test_microsoft_client_credentials_through_msal(
    oauth_server: OAuthServer,
    oauth_dovecot: Dovecot,
    box: str,
    app: Path,
    data: Path,
    tmp_path: Path,
) -> None:
    oauth2 = (
        f"<provider>microsoft</provider><flow>clientCredentials</flow><tenant>{TENANT}</tenant>"
        f"<clientId>{app.stem}</clientId><clientSecretFile>{app}</clientSecretFile>"
        f"<tokenEndpoint>{oauth_server.token_url(TENANT)}</tokenEndpoint><scope>mail</scope>"
        f"<caFile>{oauth_server.ca_file}</caFile>"
    )
    cfg = oauth_xml(tmp_path / "m.xml", oauth_dovecot, box, oauth2)
    oauth_dovecot.deliver(box, message("From Entra"))
    code, out = cli("check", "--config", cfg, "--data-dir", data)
    assert code == 0, out
    assert "OAUTHBEARER" in out and "microsoft clientCredentials (secret)" in out
    assert once(data, cfg) == 0
    assert oauth_dovecot.count(box) == 0


# --------------------------------------------------------------------------- refresh, outages


def outages(data: Path) -> list[dict[str, Any]]:
    return [r for r in requests(data) if r["kind"] == "outage"]


def test_a_revoked_refresh_token_opens_one_outage_and_a_new_login_closes_it(
    oauth_server: OAuthServer,
    oauth_dovecot: Dovecot,
    box: str,
    data: Path,
    tmp_path: Path,
) -> None:
    client_id = f"public-revoked-{uuid.uuid4().hex[:6]}"
    oauth_server.add_client(client_id, scopes=["mail"])
    cfg = oauth_xml(
        tmp_path / "m.xml", oauth_dovecot, box, delegated(oauth_server, "generic", client_id)
    )
    device_login(oauth_server, cfg, data, box)
    assert once(data, cfg) == 0
    record = token_record(data)
    assert oauth_server.revoke(str(record["refresh_token"]))  # its access tokens go with it
    oauth_dovecot.deliver(box, message("Arrives while consent is revoked"))
    for _ in range(2):
        assert once(data, cfg) == 1
    assert oauth_dovecot.count(box) == 1  # mail stays on the server
    [outage] = outages(data)
    assert outage["cause"] == "oauth"
    assert "oauth login" in outage["description"]
    assert outage["status"] != "processed"
    device_login(oauth_server, cfg, data, box)
    assert once(data, cfg) == 0
    assert oauth_dovecot.count(box) == 0
    [outage] = outages(data)
    assert outage["status"] == "processed"
    # No token of this client in the event, its activities, or any file but the store.
    store = set((data / "oauth").glob("*.json"))
    for canary in issued_tokens(oauth_server, client_id):
        assert canary not in json.dumps(outage)
        assert leaks(tmp_path, canary, allowed=store) == []


def test_an_expired_client_secret_opens_an_outage_that_says_to_renew_it(
    oauth_server: OAuthServer,
    oauth_dovecot: Dovecot,
    box: str,
    app: Path,
    data: Path,
    tmp_path: Path,
) -> None:
    oauth2 = (
        f"<provider>microsoft</provider><flow>clientCredentials</flow><tenant>{TENANT}</tenant>"
        f"<clientId>{app.stem}</clientId><clientSecretFile>{app}</clientSecretFile>"
        f"<tokenEndpoint>{oauth_server.token_url(TENANT)}</tokenEndpoint><scope>mail</scope>"
        f"<caFile>{oauth_server.ca_file}</caFile>"
    )
    cfg = oauth_xml(tmp_path / "m.xml", oauth_dovecot, box, oauth2)
    assert once(data, cfg) == 0
    oauth_server.expire_client_secret(app.stem)
    # The stored token has expired: the next session must go to the token endpoint.
    store = TokenBroker(data).store
    loaded = load_mailbox(cfg)
    with store.locked(loaded.account):
        record = store.load(loaded.account)
        record.expires_at = 0
        store.save(record)
    oauth_dovecot.deliver(box, message("Waits for a new secret"))
    assert once(data, cfg) == 1
    assert oauth_dovecot.count(box) == 1
    [outage] = outages(data)
    assert outage["cause"] == "oauth"
    assert "client secret has expired" in outage["description"]
    code, out = cli("oauth", "status", "--config", cfg, "--data-dir", data)
    assert code == 1
    assert "last error: secret-expired" in out, out


def issued_tokens(server: OAuthServer, client_id: str) -> list[str]:
    """Every token the server issued to ``client_id`` (access and refresh)."""
    with server._lock:
        return [t.value for t in server._tokens.values() if t.client_id == client_id]


def test_five_second_tokens_refresh_through_a_30_s_daemon_run_without_a_failed_session(
    oauth_server: OAuthServer,
    oauth_dovecot: Dovecot,
    box: str,
    app: Path,
    data: Path,
    tmp_path: Path,
) -> None:
    """Also the token canaries: with --debug, no token issued during the run (nor the client
    secret) is in the logs, the output, /metrics, the database or any other file but the
    token store."""
    conf = tmp_path / "mailboxes.d"
    conf.mkdir()
    oauth_xml(conf / "box.xml", oauth_dovecot, box, generic_cc(oauth_server, app))
    log_file = tmp_path / "logs" / "engine.log"
    log_file.parent.mkdir()
    port = free_port()
    argv = engine_argv(
        "run", "--config-dir", conf, "--data-dir", data, "--poll-interval", "1",
        "--log-file", log_file, "--debug", "--http-port", port,
    )  # fmt: skip
    env = {**os.environ, "MAILINTEGRATION_LOGIN": LOGIN, "MAILINTEGRATION_PASSWORD": LOGIN_PASSWORD}
    oauth_server.access_token_lifetime = 5
    before = oauth_server.token_requests
    sent = 0
    metrics = ""
    try:
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            started = time.monotonic()
            for _ in range(60):  # bounded: 30 s of running, a message every 3 s
                if time.monotonic() - started >= 30:
                    break
                if time.monotonic() - started >= sent * 3:
                    oauth_dovecot.deliver(box, message(f"Message {sent}"))
                    sent += 1
                time.sleep(0.5)
                assert proc.poll() is None, "the daemon exited"
            wait_for(lambda: oauth_dovecot.count(box) == 0, 15, "the last messages")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                metrics = r.read().decode()
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=60)
    finally:
        oauth_server.access_token_lifetime = 3600
    assert proc.returncode == 0, err[-2000:]
    refreshes = oauth_server.token_requests - before
    assert refreshes >= 5, refreshes  # 5 s tokens over 30 s, refreshed at half their life
    assert len(requests(data)) == sent >= 10
    assert outages(data) == []
    mine = [r for r in oauth_server.introspections if r.username == box]
    assert mine and all(r.active for r in mine)  # no token was ever refused
    assert b"cannot be read" not in err
    # The canaries: every token of the run, and the client secret.
    tokens = issued_tokens(oauth_server, app.stem)
    assert len(tokens) >= refreshes
    secret = app.read_text().strip()
    store = set((data / "oauth").glob("*.json"))
    outputs = out.decode(errors="replace") + err.decode(errors="replace") + metrics
    gauges = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("mailintegration_oauth_") and 'mailbox="box"' in line
    }
    assert gauges["mailintegration_oauth_access_token_expiry_timestamp_seconds"] > time.time() - 10
    assert gauges["mailintegration_oauth_last_refresh_timestamp_seconds"] > time.time() - 10
    assert gauges["mailintegration_oauth_refresh_token_age_seconds"] == -1  # app-only
    assert gauges["mailintegration_oauth_client_secret_expiry_timestamp_seconds"] == -1
    assert gauges["mailintegration_oauth_warnings"] == 0
    for canary in [*tokens, secret]:
        assert canary not in outputs
        assert leaks(tmp_path, canary, allowed=store | {app}) == []


def test_concurrent_sessions_of_one_account_share_one_refresh(
    oauth_server: OAuthServer, box: str, app: Path, tmp_path: Path
) -> None:
    """Eight threads ask for a token at once with an empty store: the per-account lock makes
    the first one fetch it and the others find it stored (one request to the endpoint)."""
    nowhere = _NoDovecot(oauth_server.ca_file)
    cfg = load_mailbox(oauth_xml(tmp_path / "m.xml", nowhere, box, generic_cc(oauth_server, app)))
    assert cfg.server.oauth2 is not None
    broker = TokenBroker(tmp_path / "data")
    before = oauth_server.token_requests
    barrier = threading.Barrier(8)
    got: list[str] = []

    def ask() -> None:
        barrier.wait(10)
        assert cfg.server.oauth2 is not None
        got.append(broker.access_token(cfg.account, cfg.server.oauth2).value)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 8 and len(set(got)) == 1
    assert oauth_server.token_requests == before + 1


class _NoDovecot:
    """Where a mailbox file needs a server but the test signs in nowhere."""

    pop3s_port = 995
    imaps_port = 993

    def __init__(self, ca_file: Path) -> None:
        self.ca_file = ca_file


# --------------------------------------------------------------------------- token health


def test_a_secret_expiring_within_warn_days_raises_one_warning_event_and_status_shows_it(
    oauth_server: OAuthServer,
    oauth_dovecot: Dovecot,
    box: str,
    app: Path,
    data: Path,
    tmp_path: Path,
) -> None:
    soon = (datetime.date.today() + datetime.timedelta(days=10)).isoformat()
    oauth2 = generic_cc(oauth_server, app) + f"<clientSecretExpires>{soon}</clientSecretExpires>"
    cfg = oauth_xml(tmp_path / "m.xml", oauth_dovecot, box, oauth2)
    for _ in range(2):
        assert once(data, cfg) == 0  # mail is still read
    [warning] = outages(data)
    assert warning["cause"] == f"warning:secret:{soon}"
    assert (
        "expires in" in warning["description"] and "clientSecretExpires" in warning["description"]
    )
    assert warning["status"] != "processed"  # a working session does not close a warning
    code, out = cli("oauth", "status", "--config", cfg, "--data-dir", data)
    assert code == 1
    assert f"client secret expires {soon}" in out and "WARNING" in out
    assert "mechanism: OAUTHBEARER" in out
    code, out = cli("oauth", "status", "--config", cfg, "--data-dir", data, "--json")
    [entry] = json.loads(out)
    assert entry["secret_expires"] == soon and entry["access_expires_at"] > 0
    assert str(token_record(data)["access_token"]) not in out


def test_an_unused_refresh_token_warns_before_the_providers_inactivity_expiry() -> None:
    cfg = OAuth2Config(
        provider="microsoft",
        flow="refreshToken",
        client_id="c",
        token_endpoint="https://login.microsoftonline.com/t/oauth2/v2.0/token",
        device_endpoint=None,
        scopes=("s",),
    )
    now = 1e9
    record = TokenRecord(account="a", refresh_token="rt", refresh_obtained_at=now - 100 * 86400)
    record.refresh_last_used = now - 70 * 86400
    assert health("m", cfg, record, now).warnings == ()
    record.refresh_last_used = now - 80 * 86400  # 90 days for Entra, warned 14 days ahead
    [(key, text)] = health("m", cfg, record, now).warnings
    assert key.startswith("idle:") and "80 day(s)" in text and "oauth login" in text


# --------------------------------------------------------------------------- configuration


def _xml(tmp_path: Path, oauth2: str, server_extra: str = "", tls: bool = True) -> Path:
    path = tmp_path / "c.xml"
    path.write_text(
        f"""<mailIntegration>
  <messageProcessorTypeName>{INCIDENT}</messageProcessorTypeName>
  <server><gatewayTypeName>pop3</gatewayTypeName><serverName>outlook.office365.com</serverName>
    <useSsl>{"true" if tls else "false"}</useSsl><userName>desk@contoso.com</userName>
    {server_extra}<oauth2>{oauth2}</oauth2></server>
</mailIntegration>"""
    )
    return path


def test_provider_defaults_secret_sources_and_a_copy_without_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DESK_OAUTH_SECRET", "env-Secret-4711")
    cfg = load_mailbox(
        _xml(
            tmp_path,
            "<provider>microsoft</provider><flow>clientCredentials</flow>"
            "<tenant>contoso.onmicrosoft.com</tenant><clientId>11111111-2222</clientId>"
            "<clientSecretEnv>DESK_OAUTH_SECRET</clientSecretEnv>"
            "<clientSecretExpires>2027-05-01</clientSecretExpires>",
        )
    )
    o = cfg.server.oauth2
    assert o is not None and o.client_secret == "env-Secret-4711"
    assert o.token_endpoint == (
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    )
    assert o.scopes == ("https://outlook.office365.com/.default",)
    assert not o.custom_authority and o.warn_days == 14
    assert cfg.server.password == ""
    assert "env-Secret-4711" in secret_values(cfg)
    copy = mailbox_copy(cfg).decode()
    assert "env-Secret-4711" not in copy and "<clientSecretEnv>DESK_OAUTH_SECRET<" in copy
    assert "<password>" not in copy
    # The copy loads again as the same settings.
    (tmp_path / "copy.xml").write_text(copy)
    assert load_mailbox(tmp_path / "copy.xml").server.oauth2 == o
    # Names of secrets' sources stay readable in a redacted file; a secret element does not.
    text = _xml(
        tmp_path, "<clientSecretFile>s.txt</clientSecretFile><clientSecret>x1y2z3</clientSecret>"
    )
    redacted = redact_config(text.read_bytes()).decode()
    assert "<clientSecretFile>s.txt</clientSecretFile>" in redacted and "x1y2z3" not in redacted
    google = load_mailbox(
        _xml(tmp_path, "<provider>google</provider><flow>refreshToken</flow><clientId>g</clientId>")
    ).server.oauth2
    assert google is not None
    assert google.token_endpoint == "https://oauth2.googleapis.com/token"
    assert google.device_endpoint == "https://oauth2.googleapis.com/device/code"
    assert google.scopes == ("https://mail.google.com/",)


@pytest.mark.parametrize(
    ("oauth2", "extra", "tls", "says"),
    [
        ("<provider>generic</provider><flow>refreshToken</flow><clientId>c</clientId>"
         "<scope>s</scope>", "", True, "needs <tokenEndpoint>"),
        ("<provider>generic</provider><flow>refreshToken</flow><clientId>c</clientId>"
         "<tokenEndpoint>http://idp/token</tokenEndpoint><scope>s</scope>", "", True, "https://"),
        ("<provider>microsoft</provider><flow>clientCredentials</flow><clientId>c</clientId>"
         "<clientSecretEnv>X</clientSecretEnv>", "", True, "needs <tenant>"),
        ("<provider>microsoft</provider><flow>clientCredentials</flow><tenant>t</tenant>"
         "<clientId>c</clientId>", "", True, "needs one of <clientSecretFile>"),
        ("<provider>google</provider><flow>refreshToken</flow><clientId>c</clientId>",
         "<password>pw-1234</password>", True, "either <oauth2> or <password>"),
        ("<provider>google</provider><flow>refreshToken</flow><clientId>c</clientId>",
         "", False, "needs useSsl or startTls"),
    ],
)  # fmt: skip
def test_invalid_oauth2_settings_are_refused_by_name(
    oauth2: str, extra: str, tls: bool, says: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        load_mailbox(_xml(tmp_path, oauth2, extra, tls))
    assert says in str(info.value)
    assert "pw-1234" not in str(info.value)


def test_a_certificate_credential_names_the_certificate_by_its_thumbprint(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from engine.oauth.sources import _msal_credential
    from tools.dovecot import make_certificates

    certs = make_certificates(tmp_path / "tls")
    pem = tmp_path / "app.pem"
    pem.write_text(certs.key_file.read_text() + certs.cert_file.read_text())
    cfg = load_mailbox(
        _xml(
            tmp_path,
            "<provider>microsoft</provider><flow>clientCredentials</flow><tenant>t</tenant>"
            f"<clientId>c</clientId><certificateFile>{pem}</certificateFile>",
        )
    ).server.oauth2
    assert cfg is not None and cfg.certificate_file == pem
    credential = _msal_credential(cfg)
    assert isinstance(credential, dict)
    cert = x509.load_pem_x509_certificate(certs.cert_file.read_bytes())
    assert credential["thumbprint"] == cert.fingerprint(hashes.SHA1()).hex()
    assert "PRIVATE KEY" in credential["private_key"]
    assert "CERTIFICATE" not in credential["private_key"]


# --------------------------------------------------------------------------- crash harness


def test_kill_9_harness_over_oauth2_mailboxes_loses_and_duplicates_nothing(
    oauth_server: OAuthServer, oauth_dovecot: Dovecot, tmp_path: Path
) -> None:
    """tools/crash.py with every mailbox signing in with client-credentials tokens (one app
    per mailbox): SIGKILL at each dangerous point and at random, then a run to the end."""
    from tools import crash
    from tools.crashpoints import POINTS

    def write(path: Path, *, user: str, password: str, **_: object) -> None:
        client_id = f"crash-{uuid.uuid4().hex[:8]}"
        oauth_server.add_client(client_id, password, scopes=["mail"], username=user)
        secret = path.with_suffix(".secret")
        secret.write_text(password)
        (path.parent.parent / "secrets").mkdir(exist_ok=True)
        moved = path.parent.parent / "secrets" / f"{client_id}.secret"
        secret.rename(moved)
        oauth_xml(path, oauth_dovecot, user, generic_cc(oauth_server, moved))

    base = Path(tempfile.mkdtemp(prefix="mailintegration-crash-oauth-"))
    launcher = crash.ExecLauncher()
    forced = [[f"{point}:1"] for point in POINTS] + [["random", "random"]]
    try:
        figures = crash.run_iterations(
            oauth_dovecot, base, 6, launcher=launcher, seed=14, workers=2, forced_modes=forced,
            write=write,
        )  # fmt: skip
        assert figures.failed == [], figures.as_dict()
        assert figures.iterations == 6
        assert figures.losses == 0 and figures.duplicates == 0
        assert sum(figures.kills.values()) >= 4, figures.as_dict()
    finally:
        launcher.close()
        shutil.rmtree(base, ignore_errors=True)


def test_a_refresh_token_obtained_elsewhere_is_imported_then_used(
    oauth_server: OAuthServer,
    oauth_dovecot: Dovecot,
    box: str,
    data: Path,
    tmp_path: Path,
) -> None:
    """Google's device flow does not grant the mail scope: its refresh token comes from
    another client, and `oauth login --refresh-token-file` keeps it after one refresh."""
    client_id = f"public-import-{uuid.uuid4().hex[:6]}"
    oauth_server.add_client(client_id, scopes=["mail"])
    given = oauth_server.issue_tokens(client_id, box, ["mail"]).refresh_token
    assert given is not None
    token_file = tmp_path / "rt.txt"
    token_file.write_text(given + "\n")
    cfg = oauth_xml(
        tmp_path / "m.xml", oauth_dovecot, box, delegated(oauth_server, "generic", client_id)
    )
    code, out = cli(
        "oauth", "login", "--config", cfg, "--data-dir", data, "--refresh-token-file", token_file
    )
    assert code == 0, out
    assert given not in out
    oauth_dovecot.deliver(box, message("After the import"))
    assert once(data, cfg) == 0
    assert oauth_dovecot.count(box) == 0
    assert token_record(data)["refresh_token"] not in ("", given)  # rotated at the import


def test_an_endless_token_endpoint_answer_is_cut_off_as_a_token_endpoint_outage(
    oauth_server: OAuthServer, oauth_dovecot: Dovecot, box: str, app: Path, tmp_path: Path
) -> None:
    """A token endpoint answering 64 MiB of JSON: read up to 256 KiB, then refused."""

    class Flood(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(b'{"access_token": "' + b"A" * (64 * 1024 * 1024))

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flood)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certs = oauth_server.certificates
    context.load_cert_chain(certs.cert_file, certs.key_file)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{httpd.server_address[1]}/token"
        oauth2 = generic_cc(oauth_server, app).replace(oauth_server.token_url(), url)
        cfg = oauth_xml(tmp_path / "m.xml", oauth_dovecot, box, oauth2)
        code, out = cli("check", "--config", cfg, "--data-dir", tmp_path / "data")
        assert code == 1
        assert "FAILED (oauth, token-endpoint)" in out and "262144 bytes" in out, out
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_scrubber_keeps_a_bounded_number_of_tokens_per_account(tmp_path: Path) -> None:
    """Tokens are masked from the moment they are seen; a long-replaced one is forgotten, so
    a daemon that refreshes every hour for a year does not grow the scrubber."""
    from engine import logs

    broker = TokenBroker(tmp_path)
    values = [f"tok-{i:04d}-{uuid.uuid4().hex}" for i in range(40)]
    for value in values:
        broker._remember("acct", value)
    assert logs.scrub(values[-1]) == "********"
    assert logs.scrub(values[0]) == values[0]
    assert sum(v in logs._SECRETS for v in values) <= 6


def test_a_stored_token_the_server_refuses_is_replaced_within_the_same_session(
    oauth_server: OAuthServer,
    oauth_dovecot: Dovecot,
    box: str,
    app: Path,
    data: Path,
    tmp_path: Path,
) -> None:
    """The stored access token is revoked (not expired): the server refuses it, the broker
    drops it and signs in again with a new one, in the same session: no outage."""
    cfg = oauth_xml(tmp_path / "m.xml", oauth_dovecot, box, generic_cc(oauth_server, app))
    assert once(data, cfg) == 0
    stored = str(token_record(data)["access_token"])
    assert oauth_server.revoke(stored)
    oauth_dovecot.deliver(box, message("After a revoked access token"))
    before = oauth_server.token_requests
    assert once(data, cfg) == 0
    assert oauth_dovecot.count(box) == 0
    assert oauth_server.token_requests == before + 1
    assert token_record(data)["access_token"] != stored
    assert outages(data) == []


# --------------------------------------------------------------------------- IMAP sign-in


def test_client_credentials_sign_in_over_imap_reads_each_message_once(
    oauth_server: OAuthServer,
    oauth_dovecot: Dovecot,
    box: str,
    app: Path,
    data: Path,
    tmp_path: Path,
) -> None:
    """IMAPS with AUTHENTICATE OAUTHBEARER (Dovecot announces both mechanisms) and a
    client-credentials token: every message read once, the token reused by the next run;
    `check` says how it signed in."""
    raws = [message(f"Over IMAP {i}") for i in range(3)]
    for raw in raws:
        oauth_dovecot.deliver(box, raw)
    cfg = oauth_xml(
        tmp_path / "m.xml", oauth_dovecot, box, generic_cc(oauth_server, app), gateway="imap"
    )
    assert once(data, cfg) == 0
    before = oauth_server.token_requests
    assert once(data, cfg) == 0  # nothing left, nothing twice; the stored token reused
    assert oauth_server.token_requests == before
    assert_exactly_once(data, raws, oauth_dovecot, user=box)
    assert token_record(data)["mechanism"] == "OAUTHBEARER"
    assert any(r.active and r.username == box for r in oauth_server.introspections)
    code, out = cli("check", "--config", cfg, "--data-dir", data)
    assert code == 0, out
    assert "IMAPS" in out and "with OAuth2 OAUTHBEARER" in out, out


def test_a_stored_token_the_imap_server_refuses_is_replaced_within_the_session(
    oauth_server: OAuthServer,
    oauth_dovecot: Dovecot,
    box: str,
    app: Path,
    data: Path,
    tmp_path: Path,
) -> None:
    """As over POP3: the revoked stored token is refused (error challenge answered empty,
    then NO), dropped, and a new one signs in, in the same session: no outage."""
    cfg = oauth_xml(
        tmp_path / "m.xml", oauth_dovecot, box, generic_cc(oauth_server, app), gateway="imap"
    )
    assert once(data, cfg) == 0
    stored = str(token_record(data)["access_token"])
    assert oauth_server.revoke(stored)
    raw = message("After a revoked access token, over IMAP")
    oauth_dovecot.deliver(box, raw)
    before = oauth_server.token_requests
    assert once(data, cfg) == 0
    assert oauth_server.token_requests == before + 1
    assert token_record(data)["access_token"] != stored
    assert outages(data) == []
    assert_exactly_once(data, [raw], oauth_dovecot, user=box)


def test_imap_with_xoauth2_only_classifies_a_wrong_scope_as_pop3_does(
    oauth_server: OAuthServer, dovecot_dir: Path, tmp_path: Path
) -> None:
    """A Dovecot offering only AUTH=XOAUTH2 over IMAP and wanting scope "mail": a token
    without it is refused, classified insufficient-scope, and opens the same oauth outage
    as POP3 does with the same token; the mail stays. The right scope then reads it."""
    server = start_dovecot(
        dovecot_dir,
        imap=True,
        oauth2_introspection_url=oauth_server.introspection_url,
        oauth2_mechanisms=("xoauth2",),
        oauth2_scope="mail",
    )
    try:
        user = f"box-{uuid.uuid4().hex[:8]}"
        server.add_user(user, uuid.uuid4().hex)
        client_id = f"imap-{uuid.uuid4().hex[:8]}"
        oauth_server.add_client(
            client_id, "imap-secret", scopes=["mail", "calendar"], username=user
        )
        secret = tmp_path / f"{client_id}.secret"
        secret.write_text("imap-secret")
        raw = message("Stays on the IMAP server")
        server.deliver(user, raw)
        wrong = generic_cc(oauth_server, secret, scope="calendar")
        found: dict[str, dict[str, Any]] = {}
        for gateway in ("imap", "pop3"):
            data = tmp_path / f"data-{gateway}"
            import_directory(data, tmp_path)
            cfg = oauth_xml(tmp_path / f"{gateway}.xml", server, user, wrong, gateway=gateway)
            code, out = cli("check", "--config", cfg, "--data-dir", data)
            assert code == 1 and "insufficient-scope" in out and "calendar" in out, out
            assert once(data, cfg) == 1
            assert server.count(user) == 1
            events = outages(data)
            assert len(events) == 1, [r["subject"] for r in requests(data)]
            found[gateway] = events[0]
            assert "insufficient-scope" in str(token_record(data)["last_error"])
        hint = OAUTH_REASONS["insufficient-scope"][:60]
        for event in found.values():
            assert event["cause"] == "oauth" and hint in " ".join(event["description"].split())
        # The right scope: XOAUTH2 (the one offered) signs in, the outage closes.
        data = tmp_path / "data-imap"
        right = oauth_xml(
            tmp_path / "imap.xml", server, user, generic_cc(oauth_server, secret), gateway="imap"
        )
        assert once(data, right) == 0
        assert server.count(user) == 0
        assert token_record(data)["mechanism"] == "XOAUTH2"
        [outage] = outages(data)
        assert outage["status"] == "processed"  # closed by the first sign-in that worked
    finally:
        server.stop()


def test_an_imap_oauth2_mailbox_asks_for_the_imap_scope_and_copies_whole(
    oauth_server: OAuthServer, tmp_path: Path
) -> None:
    """Microsoft's delegated tokens are per protocol: the default scope of an IMAP mailbox
    is IMAP.AccessAsUser.All, of a POP3 one POP.AccessAsUser.All. The outage copy of an IMAP
    OAuth2 mailbox keeps both <oauth2> and the IMAP elements, and loads as the same."""
    nowhere = _NoDovecot(oauth_server.ca_file)
    oauth2 = "<provider>microsoft</provider><flow>refreshToken</flow><clientId>app-1</clientId>"
    scopes: dict[str, tuple[str, ...]] = {}
    for gateway in ("pop3", "imap"):
        path = oauth_xml(tmp_path / f"{gateway}.xml", nowhere, "box", oauth2, gateway=gateway)
        cfg = load_mailbox(path)
        assert cfg.server.oauth2 is not None
        scopes[gateway] = cfg.server.oauth2.scopes
    assert "https://outlook.office.com/IMAP.AccessAsUser.All" in scopes["imap"]
    assert "https://outlook.office.com/POP.AccessAsUser.All" in scopes["pop3"]
    assert not any("POP." in s for s in scopes["imap"])
    copy = mailbox_copy(cfg).decode()
    assert "<oauth2>" in copy and "<folders>" in copy, copy
    (tmp_path / "copy.xml").write_text(copy)
    again = load_mailbox(tmp_path / "copy.xml").server
    assert again.gateway == "imap" and again.oauth2 == cfg.server.oauth2
    assert again.folders == cfg.server.folders


def test_the_daemons_idle_connection_signs_in_with_the_mailbox_token(
    oauth_server: OAuthServer,
    oauth_dovecot: Dovecot,
    box: str,
    app: Path,
    tmp_path: Path,
) -> None:
    """The IDLE watcher (engine.push) opens its own IMAP connection: with the broker the
    supervisor hands it, an OAuth2 mailbox's watcher signs in and selects its folder."""
    from engine.gateways.imap import IdleWatcher

    cfg = oauth_xml(
        tmp_path / "m.xml", oauth_dovecot, box, generic_cc(oauth_server, app), gateway="imap"
    )
    watcher = IdleWatcher(load_mailbox(cfg).server, TokenBroker(tmp_path / "data"))
    try:
        assert watcher.open() is True  # Dovecot has IDLE
        assert watcher.gateway.mechanism == "OAUTHBEARER"
        assert watcher.gateway.selected == "INBOX"
    finally:
        watcher.close()
