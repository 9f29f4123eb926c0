"""Issue 17, parts 3 to 5: priority, routing rules, foreign ticket numbers.

Pure tests over a directory of dictionaries, then each part end to end through Dovecot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import (
    Mailbox,
    cli,
    ledger,
    mailbox_xml,
    message,
    once,
    requests,
)

from engine.config import MailboxConfig, load_mailbox
from engine.errors import ConfigError
from engine.model import DirectoryView, ParsedMessage, RequestRef, Team, User
from engine.parse import parse_message
from engine.processors import AddActivity, Context, Ignore, NewRequest, Refuse, decide, describe
from engine.processors.rules import header_priority
from engine.supervisor import discover

TEAM = Team(id=1, number=1, name="IT", default_group="Service Desk")
JOHN = User(id=7, login="jdoe", email="john.doe@example.com", name="John Doe", site="Québec")
ONCALL = User(id=8, login="oncall", email="oncall@example.com", name="On call", site=None)
FALLBACK = User(id=9, login="unknown.user", email=None, name="Unknown", site="Montréal")
OPEN = RequestRef(number=31, team_id=1, type="incident", status="new", kind="mail")


def view(foreign: dict[str, RequestRef] | None = None) -> DirectoryView:
    users = (JOHN, ONCALL, FALLBACK)
    by_email = {u.email: u for u in users if u.email}
    by_login = {u.login: u for u in users}

    async def user_by_email(email: str) -> User | None:
        return by_email.get(email.casefold())

    async def user_by_login(login: str) -> User | None:
        return by_login.get(login)

    async def team(ref: str | int | None) -> Team | None:
        return TEAM

    async def request(number: int) -> RequestRef | None:
        return OPEN if number == OPEN.number else None

    async def none(_: object) -> None:
        return None

    async def by_foreign(refs: Sequence[str]) -> RequestRef | None:
        return next((foreign[r] for r in refs if r in (foreign or {})), None)

    return DirectoryView(
        user_by_email, user_by_login, team, request, none, request_by_foreign_number=by_foreign
    )


def config(tmp_path: Path, **elements: str) -> MailboxConfig:
    return load_mailbox(
        mailbox_xml(tmp_path / "box.xml", port=110, user="u", password="Canary-pw-9d", **elements)
    )


def parsed(subject: str = "Printer jammed", **kw: Any) -> ParsedMessage:
    return parse_message(message(subject, **kw))


def run(msg: ParsedMessage, cfg: MailboxConfig, directory: DirectoryView | None = None) -> Any:
    return anyio.run(decide, msg, Context(mailbox=cfg, team=TEAM), directory or view())


def line_of(path: Path, text: str) -> int:
    """The line of ``path`` where ``text`` first appears."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


# -- part 3: priority ----------------------------------------------------------------------


def test_incident_priority_sets_the_priority_of_new_requests(tmp_path: Path) -> None:
    d = run(parsed(), config(tmp_path, incidentPriority="Medium"))
    assert isinstance(d, NewRequest) and d.priority == "Medium"


@pytest.mark.parametrize(
    ("headers", "priority"),
    [
        ({"X-Priority": "1 (Highest)"}, "High"),
        ({"X-Priority": "2"}, "High"),
        ({"X-Priority": "3 (Normal)"}, None),
        ({"X-Priority": "5 (Lowest)"}, "Low"),
        ({"Importance": "High"}, "High"),
        ({"Importance": "low"}, "Low"),
        ({"Priority": "urgent"}, "High"),
        ({"Priority": "non-urgent"}, "Low"),
        ({}, None),
    ],
)
def test_priority_headers_map_to_the_directorys_priorities(
    tmp_path: Path, headers: dict[str, str], priority: str | None
) -> None:
    cfg = config(tmp_path)
    assert header_priority(parsed(headers=headers), cfg.processing.header_priorities) == priority


RULES_FROM_HEADERS = "<rule><priorityFromHeaders>true</priorityFromHeaders></rule>"


def test_the_header_mapping_is_a_rule_action(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        incidentPriority="Medium",
        rules=RULES_FROM_HEADERS,
        headerPriorities="<high>Critical</high><low>Low</low>",
    )
    d = run(parsed(headers={"Importance": "high"}), cfg)
    assert isinstance(d, NewRequest) and d.priority == "Critical"
    d = run(parsed(), cfg)
    assert isinstance(d, NewRequest) and d.priority == "Medium"  # unmarked: unchanged


# -- part 4: routing rules -----------------------------------------------------------------

RULES = r"""
    <rule>
      <name>spam</name>
      <header>X-Spam-Flag: ^yes$</header>
      <ignore>true</ignore>
    </rule>
    <rule>
      <name>network vendor</name>
      <senderDomain>netvendor\.example$</senderDomain>
      <subject>outage</subject>
      <setGroup>Infrastructure</setGroup>
      <setAssignee>oncall</setAssignee>
      <setPriority>High</setPriority>
      <addTag>network, vendor</addTag>
      <stop>true</stop>
    </rule>
    <rule>
      <name>never after stop</name>
      <subject>outage</subject>
      <setGroup>Service Desk</setGroup>
    </rule>
    <rule>
      <name>facilities</name>
      <cc>facilities@example\.com</cc>
      <setTeam>2</setTeam>
      <setType>Service Request</setType>
      <setSource>SCOM</setSource>
      <addTag>building</addTag>
    </rule>
    <rule>
      <name>strict</name>
      <body>URGENT</body>
      <caseSensitive>true</caseSensitive>
      <addTag>shouting</addTag>
    </rule>
    <rule>
      <name>no thanks</name>
      <sender>^marketing@</sender>
      <refuse>true</refuse>
    </rule>
"""


@pytest.fixture
def routed(tmp_path: Path) -> MailboxConfig:
    return config(tmp_path, rules=RULES)


def test_rules_apply_in_order_and_the_first_stop_ends_them(routed: MailboxConfig) -> None:
    msg = parsed("Planned OUTAGE tonight", sender="Ops <ops@NetVendor.example>")
    d = run(msg, routed)
    assert isinstance(d, NewRequest)
    assert (d.group, d.assignee, d.priority) == ("Infrastructure", ONCALL, "High")
    assert d.tags == ("network", "vendor")
    assert d.matched_rules == ("network vendor",)
    assert "rules matched: network vendor" in describe(d)


def test_team_type_source_and_tags_from_a_cc_rule(routed: MailboxConfig) -> None:
    raw = message("Broken chair", headers={"Cc": "Facilities <facilities@example.com>"})
    d = run(parse_message(raw), routed)
    assert isinstance(d, NewRequest)
    assert (d.team, d.type, d.source, d.tags) == ("2", "service request", "SCOM", ("building",))


def test_patterns_ignore_case_unless_told(routed: MailboxConfig) -> None:
    d = run(parsed(body="this is urgent"), routed)
    assert isinstance(d, NewRequest) and "shouting" not in d.tags
    d = run(parsed(body="this is URGENT"), routed)
    assert isinstance(d, NewRequest) and d.tags == ("shouting",)


def test_ignore_records_any_message_without_a_request(routed: MailboxConfig) -> None:
    d = run(parsed(headers={"X-Spam-Flag": "YES"}), routed)
    assert isinstance(d, Ignore) and d.reason.startswith("rule 'spam' (")
    reply = parsed("RE: [Incident] #31 still broken", headers={"X-Spam-Flag": "yes"})
    assert isinstance(run(reply, routed), Ignore)


def test_refuse_makes_no_request(routed: MailboxConfig) -> None:
    d = run(parsed(sender="marketing@example.com"), routed)
    assert isinstance(d, Refuse) and "no thanks" in d.reason
    assert not d.reply and d.no_reply_because == "no smtp configured"


def test_a_reply_to_a_request_is_not_routed(routed: MailboxConfig) -> None:
    msg = parsed("RE: [Incident] #31 OUTAGE", sender="ops@netvendor.example")
    assert isinstance(run(msg, routed), AddActivity)


def test_a_bad_rule_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    bad = "\n<rule><setType>memo</setType></rule>"
    with pytest.raises(ConfigError) as info:
        config(tmp_path, rules=bad)
    assert "unknown request type 'memo'" in info.value.reason
    assert info.value.line == line_of(tmp_path / "box.xml", "<setType>memo")
    with pytest.raises(ConfigError) as info:
        config(tmp_path, rules="<rule><header>no colon here</header></rule>")
    assert "Field-Name: pattern" in info.value.reason
    with pytest.raises(ConfigError) as info:
        config(tmp_path, rules="<rule><subject>(unclosed</subject></rule>")
    assert "not a valid regular expression" in info.value.reason


def test_a_team_folder_rules_file_applies_after_the_mailbox_rules(tmp_path: Path) -> None:
    team = tmp_path / "mailboxes.d" / "IT"
    team.mkdir(parents=True)
    mailbox_xml(team / "support.xml", port=110, user="u", password="Canary-pw-9d", team=None)
    (team / "_rules.xml").write_text(
        "<Rules>\n  <Rule><Subject>printer</Subject><SetGroup>Infrastructure</SetGroup></Rule>\n"
        "</Rules>\n",
        encoding="utf-8",
    )
    [src] = discover(tmp_path / "mailboxes.d")
    assert src.name == "IT/support" and src.rules == team / "_rules.xml"
    cfg = load_mailbox(src.path, default_team="IT", team_rules=src.rules)
    [rule] = cfg.processing.rules
    assert rule.where == f"{team / '_rules.xml'}, line 2"
    d = run(parsed("Printer jammed"), cfg)
    assert isinstance(d, NewRequest) and d.group == "Infrastructure"


# -- part 5: foreign ticket numbers --------------------------------------------------------

FOREIGN = r"""
    <foreignTicketNumber><system>ServiceNow</system><pattern>\bINC[0-9]{7}\b</pattern></foreignTicketNumber>
    <foreignTicketNumber><system>Jira</system><pattern>\b[A-Z]{2,10}-[0-9]{1,6}\b</pattern></foreignTicketNumber>
"""


def test_foreign_numbers_are_stored_on_a_new_request(tmp_path: Path) -> None:
    cfg = config(tmp_path, foreignTicketNumbers=FOREIGN)
    d = run(parsed("INC0012345 / OPS-42: VPN down"), cfg)
    assert isinstance(d, NewRequest)
    assert d.foreign_numbers == ("ServiceNow:INC0012345", "Jira:OPS-42")


def test_a_later_mail_with_the_same_foreign_number_is_an_activity(tmp_path: Path) -> None:
    cfg = config(tmp_path, foreignTicketNumbers=FOREIGN)
    d = run(parsed("Update on INC0012345"), cfg, view({"ServiceNow:INC0012345": OPEN}))
    assert isinstance(d, AddActivity) and d.request == OPEN and d.via == "foreign number"


# -- end to end ----------------------------------------------------------------------------


@pytest.mark.dovecot
def test_rules_priority_and_foreign_numbers_end_to_end(tmp_path: Path, mailbox: Mailbox) -> None:
    raws = [
        message("Planned outage", sender="ops@netvendor.example", headers={"X-Priority": "1"}),
        message("Cheap pills", headers={"X-Spam-Flag": "YES"}),
        message("INC0012345: printer on fire", headers={"Importance": "low"}),
        message("Re: INC0012345 still burning", body="More smoke.\n"),
    ]
    mailbox.configure(
        rules=RULES + RULES_FROM_HEADERS, incidentPriority="Medium", foreignTicketNumbers=FOREIGN
    )
    mailbox.deliver(*raws)
    data, cfg = mailbox.data, mailbox.config
    code, out = cli(
        "once", "--config", cfg, "--data-dir", data, "--dry-run", "--login", "system",
        "--password", "octo-Pa55",
    )  # fmt: skip
    assert code == 0, out
    assert "rules matched: network vendor" in out and "ignored: rule 'spam'" in out
    assert requests(data) == []
    assert once(data, cfg) == 0
    vendor, printer = requests(data)
    assert (vendor["group"], vendor["assignee"], vendor["priority"]) == (
        "Infrastructure",
        "oncall",
        "High",
    )
    assert vendor["tags"] == ["network", "vendor"]
    assert printer["priority"] == "Low"  # the later priorityFromHeaders rule
    assert printer["foreign_numbers"] == ["ServiceNow:INC0012345"]
    [activity] = printer["activities"]
    assert "More smoke." in activity["body"]
    assert sorted(r["outcome"] for r in ledger(data)) == [
        "activity",
        "created",
        "created",
        f"ignored: rule 'spam' ({cfg}, line {line_of(cfg, '<rule>')})",
    ]
    assert mailbox.left() == 0


@pytest.mark.dovecot
def test_a_rule_naming_an_unknown_group_stops_the_mailbox_with_file_and_line(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    rules = "\n<rule><name>lost</name><setGroup>Nowhere</setGroup></rule>"
    mailbox.configure(rules=rules)
    mailbox.deliver(message("Hi"))
    data, cfg = mailbox.data, mailbox.config
    line = line_of(cfg, "<rule><name>lost")
    assert once(data, cfg) == 1
    [outage] = requests(data)
    assert outage["kind"] == "outage"
    assert (
        f"rule 'lost' ({cfg}, line {line}) setGroup: 'Nowhere' is not in the directory"
        in (outage["description"])
    )
    assert mailbox.left() == 1  # nothing was read


def test_the_readme_examples_of_issue_17_load(tmp_path: Path) -> None:
    """Each XML example of the README's section on correlation, service requests, priority,
    rules and foreign numbers is a valid part of a mailbox file."""
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What messages mean", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```xml\n(.*?)```", section, re.S)
    assert len(blocks) == 5
    loaded = []
    for i, block in enumerate(blocks):
        processor = re.search(r"<messageProcessorTypeName>(.*?)</", block)
        inner = re.sub(r"</?mailIntegration>|<messageProcessorTypeName>.*?</[^>]+>", "", block)
        path = mailbox_xml(
            tmp_path / f"readme{i}.xml",
            port=110,
            user="u",
            password="Canary-pw-9d",
            server_extra="",
            **({"processor": processor.group(1)} if processor else {}),  # type: ignore[arg-type]
        )
        text = path.read_text(encoding="utf-8").replace(
            "</mailIntegration>", inner + "</mailIntegration>"
        )
        path.write_text(text, encoding="utf-8")
        loaded.append(load_mailbox(path))
    correlation, sr, priority, routing, foreign = loaded
    assert correlation.processor == "event"
    assert correlation.processing.correlation.recognisers[0].name == "ups"
    assert sr.processor == "service-request"
    assert sr.processing.service_requests.default_form == "General request"
    assert priority.processing.priority == "Medium"
    assert priority.processing.header_priorities.normal is None
    assert [r.name for r in routing.processing.rules] == ["spam", "network vendor", "facilities"]
    assert [p.system for p in foreign.processing.foreign_patterns] == ["ServiceNow", "Jira"]


def test_a_header_condition_reads_the_decoded_value(tmp_path: Path) -> None:
    cfg = config(
        tmp_path, rules="<rule><header>X-Site: ^montréal$</header><addTag>mtl</addTag></rule>"
    )
    raw = message("Hi").replace(
        b"Subject: Hi\r\n", b"Subject: Hi\r\nX-Site: =?utf-8?q?Montr=C3=A9al?=\r\n"
    )
    d = run(parse_message(raw), cfg)
    assert isinstance(d, NewRequest) and d.tags == ("mtl",)


def test_a_message_keeps_a_bounded_number_of_header_fields() -> None:
    from engine.parse import MAX_KEPT_HEADERS

    fields = b"".join(b"X-Noise-%d: n\r\n" % i for i in range(MAX_KEPT_HEADERS + 300))
    msg = parse_message(message("Hi").replace(b"Subject: Hi\r\n", b"Subject: Hi\r\n" + fields))
    assert len(msg.headers) == MAX_KEPT_HEADERS


@pytest.mark.dovecot
def test_a_team_folder_rules_file_routes_its_mailboxes_end_to_end(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    mailbox.configure(team=None)
    mailbox.deliver(message("Printer jammed"), message("Hello"))
    data, cfg = mailbox.data, mailbox.config
    team = tmp_path / "mailboxes.d" / "IT"
    team.mkdir(parents=True)
    cfg.rename(team / "support.xml")
    (team / "_rules.xml").write_text(
        "<rules>\n  <rule><subject>printer</subject><setGroup>Infrastructure</setGroup>"
        "<addTag>hardware</addTag></rule>\n</rules>\n",
        encoding="utf-8",
    )
    assert once(data, tmp_path / "mailboxes.d") == 0
    printer, hello = requests(data)
    assert (printer["group"], printer["tags"]) == ("Infrastructure", ["hardware"])
    assert (hello["group"], hello["tags"]) == ("Service Desk", [])
    assert {r["mailbox"] for r in ledger(data)} == {"IT/support"}


def test_a_rules_file_is_never_a_mailbox_and_a_linked_one_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mailboxes.d"
    (folder / "IT").mkdir(parents=True)
    mailbox_xml(folder / "top.xml", port=110, user="u", password="Canary-pw-9d")
    mailbox_xml(folder / "IT" / "desk.xml", port=110, user="u", password="Canary-pw-9d")
    (folder / "_rules.xml").write_text("<rules/>\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere.xml"
    elsewhere.write_text("<rules/>\n", encoding="utf-8")
    (folder / "IT" / "_rules.xml").symlink_to(elsewhere)
    desk, top = sorted(discover(folder), key=lambda s: s.name)
    assert (top.name, top.rules, top.refused) == ("top", folder / "_rules.xml", None)
    assert desk.name == "IT/desk" and desk.rules is None
    assert desk.refused is not None and desk.refused.startswith("its folder's _rules.xml")


def test_dry_run_names_the_rules_that_matched_a_reply_too(routed: MailboxConfig) -> None:
    msg = parsed("RE: [Incident] #31 OUTAGE", sender="ops@netvendor.example")
    d = run(msg, routed)
    assert isinstance(d, AddActivity) and d.matched_rules == ("network vendor",)
    assert describe(d).endswith("; rules matched: network vendor")
    d = run(parsed(sender="marketing@example.com"), routed)
    assert describe(d).endswith("rules matched: no thanks")
