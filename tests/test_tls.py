"""TLS: verified by default, over POP3S and STLS; an untrusted or misnamed certificate, or a
server that does not offer STLS, refuses the session before the password is ever sent."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from support import ledger, mailbox_xml, message, once, requests

from engine.config import SmtpConfig, load_mailbox
from engine.errors import TLSError
from engine.gateways.pop3 import Pop3Gateway
from engine.reply import Delivery
from tools.dovecot import Dovecot
from tools.fakepop3 import FakePOP3Server, Script

CANARY = "Canary-TLS-9c41d0e7"
OFF_WARNING = "TLS certificate verification is OFF"


@pytest.fixture(scope="module")
def trusted_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(trusted_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("ca") / "trusted-ca.pem"
    trusted_ca.cert_pem.write_to_path(str(path))
    yield path


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


def untrusted_context() -> ssl.SSLContext:
    """A certificate for the right names, from a CA nobody trusts (self-made)."""
    return server_context(trustme.CA().issue_cert("127.0.0.1", "localhost"))


def config(
    tmp_path: Path,
    port: int,
    *,
    mode: str,
    host: str = "127.0.0.1",
    ca: Path | None = None,
    verify: bool | None = None,
    password: str = CANARY,
    user: str = "u",
    name: str = "box",
) -> Path:
    extra = "    <startTls>true</startTls>\n" if mode == "stls" else ""
    if ca is not None:
        extra += f"    <caFile>{ca}</caFile>\n"
    if verify is not None:
        extra += f"    <tlsVerify>{'true' if verify else 'false'}</tlsVerify>\n"
    return mailbox_xml(
        tmp_path / f"{name}.xml",
        port=port,
        user=user,
        password=password,
        host=host,
        use_ssl=mode == "pop3s",
        server_extra=extra,
    )


def assert_refused_before_login(data: Path, fake: FakePOP3Server) -> None:
    fake.wait_idle()
    assert CANARY.encode() not in bytes(fake.received)
    assert CANARY.encode() not in bytes(fake.received_plain)
    assert not any(c.upper().startswith(("USER", "PASS", "AUTH", "APOP")) for c in fake.commands)
    assert fake.deleted == [] and fake.remaining == [1]
    assert ledger(data) == []
    assert [(r["kind"], r["cause"]) for r in requests(data)] == [("outage", "tls")]


def script(ctx: ssl.SSLContext | None, mode: str, **kwargs: Any) -> Script:
    return Script(
        messages=[message("Never fetched")], ssl_context=ctx, implicit_tls=mode == "pop3s", **kwargs
    )


@pytest.mark.parametrize("mode", ["pop3s", "stls"])
@pytest.mark.parametrize("with_ca_file", [False, True], ids=["system-cas", "other-ca-file"])
def test_untrusted_certificate_is_refused_before_the_password(
    tmp_path: Path, data: Path, ca_file: Path, mode: str, with_ca_file: bool
) -> None:
    with FakePOP3Server(script(untrusted_context(), mode)) as fake:
        cfg = config(tmp_path, fake.port, mode=mode, ca=ca_file if with_ca_file else None)
        assert once(data, cfg) == 1
        assert_refused_before_login(data, fake)
    [outage] = requests(data)
    assert "not trusted" in outage["description"] or "certificate" in outage["description"]


@pytest.mark.parametrize("mode", ["pop3s", "stls"])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_trusted_certificate_for_another_host_is_refused(
    tmp_path: Path, data: Path, trusted_ca: trustme.CA, ca_file: Path, mode: str, host: str
) -> None:
    ctx = server_context(trusted_ca.issue_cert("other.example"))
    with FakePOP3Server(script(ctx, mode)) as fake:
        cfg = config(tmp_path, fake.port, mode=mode, host=host, ca=ca_file)
        assert once(data, cfg) == 1
        assert_refused_before_login(data, fake)


@pytest.mark.parametrize("mode", ["pop3s", "stls"])
def test_ca_file_trusts_the_right_certificate(
    tmp_path: Path, data: Path, trusted_ca: trustme.CA, ca_file: Path, mode: str
) -> None:
    """The control case: the same setup with the right name works, over TLS."""
    ctx = server_context(trusted_ca.issue_cert("127.0.0.1", "localhost"))
    with FakePOP3Server(script(ctx, mode)) as fake:
        cfg = config(tmp_path, fake.port, mode=mode, ca=ca_file)
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert fake.deleted == [1]
        # The password went through TLS only, never in clear.
        assert f"PASS {CANARY}".encode() in bytes(fake.received)
        assert CANARY.encode() not in bytes(fake.received_plain)
    assert [r["subject"] for r in requests(data)] == ["Never fetched"]


def test_starttls_not_offered_fails_closed(tmp_path: Path, data: Path) -> None:
    with FakePOP3Server(script(None, "stls", capabilities=["USER", "UIDL", "TOP"])) as fake:
        cfg = config(tmp_path, fake.port, mode="stls")
        assert once(data, cfg) == 1
        assert_refused_before_login(data, fake)
    [outage] = requests(data)
    assert "does not offer STLS" in outage["description"]


def test_starttls_offered_then_refused_fails_closed(tmp_path: Path, data: Path) -> None:
    # CAPA lists STLS, but the command itself answers -ERR (no TLS configured on the server).
    caps = ["USER", "UIDL", "STLS"]
    with FakePOP3Server(script(None, "stls", capabilities=caps)) as fake:
        cfg = config(tmp_path, fake.port, mode="stls")
        assert once(data, cfg) == 1
        assert "STLS" in fake.commands
        assert_refused_before_login(data, fake)
    [outage] = requests(data)
    assert "refused STLS" in outage["description"]


def test_starttls_when_capa_fails_closed(tmp_path: Path, data: Path) -> None:
    # A server without CAPA at all (RFC 1939 only): no STLS to be had.
    caps: list[str] = []
    with FakePOP3Server(script(None, "stls", capabilities=caps)) as fake:
        cfg = config(tmp_path, fake.port, mode="stls")
        assert once(data, cfg) == 1
        assert_refused_before_login(data, fake)


@pytest.mark.parametrize("mode", ["pop3s", "stls"])
def test_tls_verify_false_connects_and_warns_on_every_session(
    tmp_path: Path, data: Path, mode: str
) -> None:
    log = tmp_path / "engine.log"
    with FakePOP3Server(script(untrusted_context(), mode)) as fake:
        cfg = config(tmp_path, fake.port, mode=mode, verify=False)
        assert once(data, cfg, "--log-file", log) == 0
        assert log.read_text().count(OFF_WARNING) == 1
        assert once(data, cfg, "--log-file", log) == 0
        fake.wait_idle()
        assert fake.deleted == [1]
    text = log.read_text()
    assert text.count(OFF_WARNING) == 2
    assert all(" WARNING " in line for line in text.splitlines() if OFF_WARNING in line)
    assert [r["subject"] for r in requests(data)] == ["Never fetched"]
    assert CANARY not in text


@pytest.mark.dovecot
@pytest.mark.parametrize("mode", ["pop3s", "stls"])
def test_dovecot_with_ca_file_over_pop3s_and_starttls(
    tmp_path: Path, data: Path, dovecot: Dovecot, pop3_user: tuple[str, str], mode: str
) -> None:
    user, password = pop3_user
    port = dovecot.pop3s_port if mode == "pop3s" else dovecot.pop3_port
    cfg = config(
        tmp_path,
        port,
        mode=mode,
        host="localhost",
        ca=dovecot.ca_file,
        user=user,
        password=password,
    )
    dovecot.deliver(user, message(f"Over {mode}"))
    assert once(data, cfg) == 0
    assert [r["subject"] for r in requests(data)] == [f"Over {mode}"]
    assert dovecot.count(user) == 0


@pytest.mark.dovecot
def test_dovecot_starttls_without_ca_file_is_refused(
    tmp_path: Path, data: Path, dovecot: Dovecot, pop3_user: tuple[str, str]
) -> None:
    user, password = pop3_user
    cfg = config(
        tmp_path, dovecot.pop3_port, mode="stls", host="localhost", user=user, password=password
    )
    dovecot.deliver(user, message("Stays"))
    assert once(data, cfg) == 1
    assert dovecot.count(user) == 1
    assert [(r["kind"], r["cause"]) for r in requests(data)] == [("outage", "tls")]


@pytest.mark.parametrize("mode", ["pop3s", "stls"])
def test_a_ca_file_without_certificates_is_one_tls_error_for_pop3_and_smtp(
    tmp_path: Path, data: Path, mode: str
) -> None:
    """POP3 and SMTP build their TLS context in one place (engine.tls): a caFile that holds
    no certificate (the config checks only that it exists) is the same TLSError for both,
    before the password goes anywhere. The SMTP send let ssl.SSLError through before."""
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("not a certificate\n", encoding="utf-8")
    with FakePOP3Server(script(untrusted_context(), mode)) as fake:
        cfg = config(tmp_path, fake.port, mode=mode, ca=bad)
        with pytest.raises(TLSError) as pop3:
            Pop3Gateway(load_mailbox(cfg).server).open()
        assert once(data, cfg) == 1
        assert_refused_before_login(data, fake)
    smtp = SmtpConfig(
        host="127.0.0.1",
        port=1,
        sender="desk@example.com",
        use_ssl=mode == "pop3s",
        starttls=mode == "stls",
        user_name="desk",
        password=CANARY,
        ca_file=bad,
    )
    with pytest.raises(TLSError) as sent:
        Delivery(smtp, "john.doe@example.com", b"Subject: x\r\n\r\nx\r\n").run()
    assert str(sent.value) == str(pop3.value)
    assert str(pop3.value).startswith(f"cannot load caFile {bad}: [X509: NO_CERTIFICATE")
