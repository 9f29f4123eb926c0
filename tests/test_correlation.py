"""Issue 17, part 1: alert correlation in the event processor.

The samples in tests/corpus/alerts/ are written from each monitoring system's documented
default mail template. The recognisers and the correlation decisions are pure (a directory
of dictionaries); one test runs the whole thing through a real Dovecot."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import EVENT, Mailbox, cli, ledger, mailbox_xml, once, requests

from engine.config import MailboxConfig, load_mailbox
from engine.model import CorrelatedEvent, DirectoryView, ParsedMessage, RequestRef, Team
from engine.parse import parse_message
from engine.processors import AddActivity, Context, Ignore, NewRequest, decide, describe
from engine.processors.alerts import recognise

ALERTS = Path(__file__).parent / "corpus" / "alerts"
TEAM = Team(id=1, number=1, name="IT", default_group="Service Desk")
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def sample(name: str) -> ParsedMessage:
    return parse_message((ALERTS / f"{name}.eml").read_bytes())


# (sample, source, host, service or None, phase)
RECOGNISED = [
    ("nagios-service-problem", "nagios", "web01", "Current Load", "problem"),
    ("nagios-service-ack", "nagios", "web01", "Current Load", "acknowledgement"),
    ("nagios-service-recovery", "nagios", "web01", "Current Load", "recovery"),
    ("nagios-host-problem", "nagios", "db02", None, "problem"),
    ("nagios-host-recovery", "nagios", "db02", None, "recovery"),
    ("icinga1-service-problem", "icinga", "web01", "HTTP", "problem"),
    ("icinga2-service-problem", "icinga2", "web01", "disk-var", "problem"),
    ("icinga2-service-recovery", "icinga2", "web01", "disk-var", "recovery"),
    ("icinga2-host-problem", "icinga2", "web01", None, "problem"),
    ("zabbix-problem", "zabbix", "app03", "High CPU utilization (over 90% for 5m)", "problem"),
    (
        "zabbix-update",
        "zabbix",
        "app03",
        "High CPU utilization (over 90% for 5m)",
        "acknowledgement",
    ),
    ("zabbix-recovery", "zabbix", "app03", "High CPU utilization (over 90% for 5m)", "recovery"),
    ("checkmk-service-problem", "checkmk", "fs01", "Filesystem /srv", "problem"),
    ("checkmk-service-ack", "checkmk", "fs01", "Filesystem /srv", "acknowledgement"),
    ("checkmk-service-recovery", "checkmk", "fs01", "Filesystem /srv", "recovery"),
    ("checkmk-host-problem", "checkmk", "fs01", None, "problem"),
    ("alertmanager-firing", "alertmanager", "node7:9100", "InstanceDown", "problem"),
    ("alertmanager-resolved", "alertmanager", "node7:9100", "InstanceDown", "recovery"),
    ("grafana-firing", "grafana", "cache02", "HighMemory", "problem"),
    ("grafana-resolved", "grafana", "cache02", "HighMemory", "recovery"),
    ("monit-problem", "monit", "proxy01", "nginx", "problem"),
    ("monit-recovery", "monit", "proxy01", "nginx", "recovery"),
    ("uptime-kuma-down", "uptime-kuma", "Company website", None, "problem"),
    ("uptime-kuma-up", "uptime-kuma", "Company website", None, "recovery"),
    ("scom-new", "scom", "sql01.corp.example.com", "Logical Disk Free Space is low", "problem"),
    ("scom-closed", "scom", "sql01.corp.example.com", "Logical Disk Free Space is low", "recovery"),
]


def test_every_sample_is_tested() -> None:
    assert {p.stem for p in ALERTS.glob("*.eml")} == {r[0] for r in RECOGNISED}


@pytest.mark.parametrize(("name", "source", "host", "service", "phase"), RECOGNISED)
def test_each_format_is_recognised_from_its_default_template(
    name: str, source: str, host: str, service: str | None, phase: str
) -> None:
    alert = recognise(sample(name))
    assert alert is not None, name
    assert (alert.source, alert.host, alert.service, alert.phase) == (source, host, service, phase)


@pytest.mark.parametrize(
    ("problem", "recovery"),
    [
        ("nagios-service-problem", "nagios-service-recovery"),
        ("nagios-host-problem", "nagios-host-recovery"),
        ("icinga2-service-problem", "icinga2-service-recovery"),
        ("zabbix-problem", "zabbix-recovery"),
        ("checkmk-service-problem", "checkmk-service-recovery"),
        ("alertmanager-firing", "alertmanager-resolved"),
        ("grafana-firing", "grafana-resolved"),
        ("monit-problem", "monit-recovery"),
        ("uptime-kuma-down", "uptime-kuma-up"),
        ("scom-new", "scom-closed"),
    ],
)
def test_a_problem_and_its_recovery_share_one_key(problem: str, recovery: str) -> None:
    a, b = recognise(sample(problem)), recognise(sample(recovery))
    assert a is not None and b is not None
    assert a.key == b.key


def test_a_service_and_its_host_have_different_keys() -> None:
    svc, host = (
        recognise(sample("nagios-service-problem")),
        recognise(sample("nagios-host-problem")),
    )
    assert svc is not None and host is not None and svc.key != host.key


def test_ordinary_mail_is_no_alert() -> None:
    msg = dataclasses.replace(sample("nagios-service-problem"), subject="Printer jammed")
    assert recognise(msg) is None
    msg = dataclasses.replace(sample("scom-new"), subject="[FIRING] something", body="hello")
    assert recognise(msg) is None


# -- correlation decisions over a directory of dictionaries --------------------------------


def directory(events: dict[str, CorrelatedEvent]) -> DirectoryView:
    async def none(_: object) -> None:
        return None

    async def team(ref: str | int | None) -> Team | None:
        return TEAM

    async def correlated(key: str) -> CorrelatedEvent | None:
        return events.get(key)

    return DirectoryView(none, none, team, none, none, correlated_event=correlated)


def event(status: str = "new", closed: datetime | None = None, team: int = 1) -> CorrelatedEvent:
    return CorrelatedEvent(RequestRef(40, team, "event", status, "mail"), "CRITICAL", closed)


@pytest.fixture
def cfg(tmp_path: Path) -> MailboxConfig:
    return config(tmp_path)


def config(tmp_path: Path, correlation: str | None = None) -> MailboxConfig:
    path = mailbox_xml(
        tmp_path / "events.xml",
        port=110,
        user="u",
        password="Canary-pw-77a1",
        processor=EVENT,
        correlation=correlation,
    )
    return load_mailbox(path)


def run(msg: ParsedMessage, cfg: MailboxConfig, events: dict[str, CorrelatedEvent]) -> Any:
    ctx = Context(mailbox=cfg, team=TEAM, now=NOW)
    return anyio.run(decide, msg, ctx, directory(events))


KEY = "nagios|web01|current load"


def test_a_first_problem_opens_an_event_with_its_key_and_state(cfg: MailboxConfig) -> None:
    d = run(sample("nagios-service-problem"), cfg, {})
    assert isinstance(d, NewRequest)
    assert (d.type, d.correlation_key, d.alert_state) == ("event", KEY, "CRITICAL")
    assert f"key {KEY} (CRITICAL)" in describe(d)


def test_a_repeated_problem_adds_an_activity_to_the_open_event(cfg: MailboxConfig) -> None:
    d = run(sample("nagios-service-problem"), cfg, {KEY: event()})
    assert isinstance(d, AddActivity)
    assert d.request.number == 40 and d.close is None and not d.reopen
    assert d.body.startswith("Still a problem: nagios: Current Load on web01 is CRITICAL")


def test_a_recovery_closes_the_open_event_saying_so(cfg: MailboxConfig) -> None:
    d = run(sample("nagios-service-recovery"), cfg, {KEY: event()})
    assert isinstance(d, AddActivity)
    assert d.close == "Recovered: nagios: Current Load on web01 is OK."
    assert d.state == "OK" and d.body.startswith("Recovered:")


def test_a_recovery_with_nothing_open_is_recorded_and_opens_nothing(cfg: MailboxConfig) -> None:
    d = run(sample("nagios-service-recovery"), cfg, {})
    assert d == Ignore(f"recovery with no open event ({KEY})")
    closed = event("processed", NOW - timedelta(hours=5))
    assert isinstance(run(sample("nagios-service-recovery"), cfg, {KEY: closed}), Ignore)


def test_an_acknowledgement_adds_an_activity(cfg: MailboxConfig) -> None:
    d = run(sample("nagios-service-ack"), cfg, {KEY: event()})
    assert isinstance(d, AddActivity) and d.body.startswith("Acknowledged:")
    assert isinstance(run(sample("nagios-service-ack"), cfg, {}), Ignore)


def test_a_problem_soon_after_a_recovery_reopens_the_event(cfg: MailboxConfig) -> None:
    recent = event("processed", NOW - timedelta(minutes=10))
    d = run(sample("nagios-service-problem"), cfg, {KEY: recent})
    assert isinstance(d, AddActivity) and d.reopen and d.request.number == 40
    assert "reopen" in describe(d)


def test_a_problem_long_after_a_recovery_opens_a_new_event(cfg: MailboxConfig) -> None:
    old = event("processed", NOW - timedelta(minutes=31))
    assert isinstance(run(sample("nagios-service-problem"), cfg, {KEY: old}), NewRequest)


def test_flapping_activity_mode_keeps_the_event_closed(tmp_path: Path) -> None:
    cfg = config(tmp_path, "<flapping>Activity</flapping><flappingMinutes>60</flappingMinutes>")
    recent = event("processed", NOW - timedelta(minutes=45))
    d = run(sample("nagios-service-problem"), cfg, {KEY: recent})
    assert isinstance(d, AddActivity) and not d.reopen and d.close is None


def test_another_teams_event_is_left_alone(cfg: MailboxConfig) -> None:
    d = run(sample("nagios-service-problem"), cfg, {KEY: event(team=2)})
    assert isinstance(d, NewRequest)


def test_correlation_can_be_turned_off(tmp_path: Path) -> None:
    cfg = config(tmp_path, "<enabled>false</enabled>")
    d = run(sample("nagios-service-recovery"), cfg, {KEY: event()})
    assert isinstance(d, NewRequest) and d.correlation_key is None


CUSTOM = r"""<recognisers><recogniser>
  <name>ups</name>
  <subject>^UPS (?P&lt;host&gt;\S+): (?P&lt;service&gt;\w+) (?P&lt;state&gt;\w+)$</subject>
  <problemStates>LOW, FAILED</problemStates>
  <recoveryStates>normal</recoveryStates>
  <acknowledgementStates>ACKED</acknowledgementStates>
</recogniser></recognisers>"""


def test_a_custom_recogniser_reads_named_groups_and_state_lists(tmp_path: Path) -> None:
    cfg = config(tmp_path, CUSTOM)
    base = sample("nagios-service-problem")
    low = dataclasses.replace(base, subject="UPS ups-7: battery LOW")
    d = run(low, cfg, {})
    assert isinstance(d, NewRequest) and d.correlation_key == "ups|ups-7|battery"
    ok = dataclasses.replace(base, subject="UPS ups-7: battery Normal")
    d = run(ok, cfg, {"ups|ups-7|battery": event()})
    assert isinstance(d, AddActivity) and d.close is not None


def test_a_custom_recogniser_without_a_host_group_is_a_config_error(tmp_path: Path) -> None:
    from engine.errors import ConfigError

    bad = "<recognisers><recogniser><subject>^UPS (\\S+)</subject></recogniser></recognisers>"
    with pytest.raises(ConfigError) as info:
        config(tmp_path, bad)
    assert 'group named "host"' in info.value.reason and info.value.line is not None


# -- end to end: a real Dovecot, the real command line ------------------------------------


@pytest.mark.dovecot
def test_alerts_correlate_end_to_end(tmp_path: Path, mailbox: Mailbox) -> None:
    """Problem, repeat, recovery, then a recovery of something never seen, then the same
    problem again (flapping: the closed event reopens)."""
    raws = [
        (ALERTS / f"{n}.eml").read_bytes()
        for n in ("nagios-service-problem", "nagios-service-ack", "nagios-service-recovery")
    ]
    repeat = raws[0].replace(b"nagios-service-problem@", b"repeat@")
    unseen = (ALERTS / "scom-closed.eml").read_bytes()
    mailbox.configure(processor=EVENT, incidentGroup="Monitoring")
    mailbox.deliver(raws[0], repeat, raws[1], raws[2], unseen)
    data, cfg = mailbox.data, mailbox.config
    assert once(data, cfg) == 0
    [ev] = requests(data)
    assert (ev["status"], ev["correlation_key"], ev["alert_state"]) == ("processed", KEY, "OK")
    bodies = [a["body"].split(":")[0] for a in ev["activities"]]
    assert bodies == ["Still a problem", "Acknowledged", "Recovered"]
    assert any("Recovered: nagios" in h["text"] for h in ev["history"])
    outcomes = sorted(r["outcome"] for r in ledger(data))
    assert outcomes[-1].startswith("ignored: recovery with no open event (scom|")
    code, out = cli("requests", "show", str(ev["number"]), "--json", "--data-dir", data)
    shown = json.loads(out)
    assert code == 0 and shown["correlation_key"] == KEY and shown["alert_state"] == "OK"

    again = raws[0].replace(b"nagios-service-problem@", b"flap@")
    mailbox.deliver(again)
    assert once(data, cfg) == 0
    [ev] = requests(data)
    assert ev["status"] == "new" and ev["alert_state"] == "CRITICAL"
    assert mailbox.left() == 0


def test_a_key_holds_nothing_unprintable(cfg: MailboxConfig) -> None:
    msg = sample("nagios-host-problem")
    msg = dataclasses.replace(
        msg, subject="** PROBLEM Host Alert: db\x1b[2J02 is DOWN **", body="no fields"
    )
    alert = recognise(msg)
    assert alert is not None and alert.key == "nagios|db[2j02|-"
