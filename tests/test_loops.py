"""Mail loops: two engines that auto-reply to each other, through a real SMTP server that
delivers every reply into the other engine's real Dovecot mailbox, go quiet at once."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import import_directory, ledger, mailbox_xml, message, once, requests, smtp_server

from tools.dovecot import Dovecot

pytestmark = pytest.mark.dovecot

ROUNDS = 10
MAX_REPLIES = 2


@dataclass
class Relay:
    """An SMTP server that delivers to Dovecot mailboxes, the way an MTA and MDA would."""

    dovecot: Dovecot
    routes: dict[str, str] = field(default_factory=dict)  # address -> Dovecot user
    return_path: bool = True
    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    undeliverable: list[str] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = bytes(envelope.content)
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), content))
        for rcpt in envelope.rcpt_tos:
            user = self.routes.get(rcpt.lower())
            if user is None:
                self.undeliverable.append(rcpt)
                continue
            head = f"Return-Path: <{envelope.mail_from}>\r\n".encode() if self.return_path else b""
            self.dovecot.deliver(user, head + content)
        return "250 OK"


@pytest.fixture
def relay(dovecot: Dovecot) -> Iterator[tuple[Relay, int]]:
    handler = Relay(dovecot)
    with smtp_server(handler) as port:
        yield handler, port


@dataclass
class Desk:
    address: str
    user: str
    data: Path
    cfg: Path


def desk(tmp_path: Path, dovecot: Dovecot, name: str, smtp_port: int, relay: Relay) -> Desk:
    tag = uuid.uuid4().hex[:8]
    address = f"{name}-{tag}@example.com"
    user, password = f"loop-{name}-{tag}", f"pw-{tag}"
    dovecot.add_user(user, password)
    relay.routes[address] = user
    data = tmp_path / name / "data"
    data.parent.mkdir()
    import_directory(data, data.parent)
    cfg = mailbox_xml(
        data.parent / f"{name}.xml",
        port=dovecot.pop3_port,
        user=user,
        password=password,
        createNewRequests="false",
        smtp=f"<serverName>127.0.0.1</serverName><port>{smtp_port}</port>"
        f"<from>Desk {name} &lt;{address}&gt;</from>",
    )
    return Desk(address, user, data, cfg)


def play(relay: Relay, desks: list[Desk]) -> list[int]:
    """Run every engine once per round, ROUNDS rounds; the replies sent in each round."""
    per_round = []
    for _ in range(ROUNDS):
        before = len(relay.received)
        for d in desks:
            assert once(d.data, d.cfg) == 0
        per_round.append(len(relay.received) - before)
    return per_round


def assert_quiet(per_round: list[int]) -> None:
    total = sum(per_round)
    assert 1 <= total <= MAX_REPLIES, per_round
    # Once it stops it stays stopped: after the last round that sent anything, only zeros.
    last = max(i for i, n in enumerate(per_round) if n)
    assert last <= 1, per_round
    assert per_round[last + 1 :] == [0] * (ROUNDS - last - 1)


@pytest.mark.parametrize("return_path", [True, False], ids=["mda-return-path", "no-return-path"])
def test_two_auto_replying_engines_do_not_loop(
    tmp_path: Path, dovecot: Dovecot, relay: tuple[Relay, int], return_path: bool
) -> None:
    handler, port = relay
    handler.return_path = return_path
    a = desk(tmp_path, dovecot, "a", port, handler)
    b = desk(tmp_path, dovecot, "b", port, handler)
    # One message from A's address into B's mailbox: B refuses it and auto-replies to A ...
    dovecot.deliver(b.user, message("Hello from desk A", sender=f"Desk A <{a.address}>"))
    per_round = play(handler, [a, b])
    assert_quiet(per_round)
    [(mail_from, rcpts, _)] = handler.received[:1]
    assert mail_from in ("", "<>") and rcpts == [a.address]
    assert handler.undeliverable == []
    # ... and A, receiving an automatic reply, answers nothing.
    assert [r["outcome"] for r in ledger(b.data)] == ["refused: replied"]
    assert len(ledger(a.data)) == 1
    assert not ledger(a.data)[0]["outcome"].endswith("replied")
    assert requests(a.data) == [] and requests(b.data) == []
    assert dovecot.count(a.user) == 0 and dovecot.count(b.user) == 0


def test_an_engine_replying_to_its_own_address_does_not_loop(
    tmp_path: Path, dovecot: Dovecot, relay: tuple[Relay, int]
) -> None:
    handler, port = relay
    handler.return_path = False
    b = desk(tmp_path, dovecot, "self", port, handler)
    # Someone forged the desk's own address as the sender.
    dovecot.deliver(b.user, message("Who am I", sender=f"Desk <{b.address}>"))
    per_round = play(handler, [b])
    assert sum(per_round) <= 1, per_round
    assert per_round[1:] == [0] * (ROUNDS - 1)
    assert dovecot.count(b.user) == 0


def test_mirror_that_strips_auto_submitted_is_stopped_by_the_rate_limit(
    tmp_path: Path, dovecot: Dovecot, relay: tuple[Relay, int]
) -> None:
    """Worst case: the other side is a human-looking echo (a mail system that rewrites the
    reply into a fresh message from A, no automatic headers, new Message-ID). The per-sender
    limit still bounds the replies to five a day, and the mailbox ends empty."""
    handler, port = relay
    b = desk(tmp_path, dovecot, "echo", port, handler)
    echo_address = f"echo-{uuid.uuid4().hex[:8]}@example.com"
    per_round = []
    dovecot.deliver(b.user, message("Ping", sender=f"Echo <{echo_address}>"))
    for i in range(ROUNDS):
        before = len(handler.received)
        assert once(b.data, b.cfg) == 0
        sent = len(handler.received) - before
        per_round.append(sent)
        for _ in range(sent):
            # The echo answers each reply with a brand-new, human-looking message.
            dovecot.deliver(b.user, message(f"Ping {i}", sender=f"Echo <{echo_address}>"))
    assert sum(per_round) <= 5, per_round
    assert per_round[-3:] == [0, 0, 0]
    assert dovecot.count(b.user) == 0
