"""The demo: a real Dovecot on loopback, a demo mailbox, the engine run twice, the result shown.

    python -m tools.demo [WORKDIR]

Round 1 delivers a new incident, mail from an unknown sender and a message with attachments;
round 2 delivers a reply carrying request #1's number. Each round is one ``mailintegration
once`` (the real console command, as cron would run it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.dovecot import start_dovecot

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"

MAILBOX_XML = """<?xml version="1.0" encoding="utf-8"?>
<mailIntegration>
  <messageProcessorTypeName>Octopus.MailIntegration.Processors.EndUserIncidentMailMessageProcessor, Octopus.MailIntegration</messageProcessorTypeName>
  <server>
    <gatewayTypeName>Octopus.MailIntegration.Gateways.SidePopMailboxGateway, Octopus.MailIntegration</gatewayTypeName>
    <serverName>localhost</serverName>
    <port>{port}</port>
    <useSsl>TRUE</useSsl>
    <userName>support</userName>
    <password>demo-secret</password>
    <caFile>{ca}</caFile>
  </server>
  <team>1</team>
  <incidentFallbackSiteName>Montr&eacute;al</incidentFallbackSiteName>
  <incidentFallbackUserLogon>unknown.user</incidentFallbackUserLogon>
  <incidentGroup>Service Desk</incidentGroup>
  <incidentSource>Email</incidentSource>
  <ignoredAttachments>image001.png</ignoredAttachments>
  <createNewRequests>true</createNewRequests>
  <includeRawMessageAsAttachment>false</includeRawMessageAsAttachment>
  <mailHandling>
    <!-- The address the demo's mail is written to (the sign-in name is "support"). -->
    <ownAddresses>support@example.com</ownAddresses>
  </mailHandling>
</mailIntegration>
"""


def run(*args: str, env: dict[str, str]) -> None:
    print(f"\n$ mailintegration {' '.join(args)}", flush=True)
    cmd = [sys.executable, "-m", "engine", *args]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def main() -> int:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="mi-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)  # Dovecot's unprivileged processes must traverse it
    dovecot = start_dovecot(work / "dovecot")
    try:
        dovecot.add_user("support", "demo-secret")
        config = work / "support.xml"
        config.write_text(
            MAILBOX_XML.format(port=dovecot.pop3s_port, ca=dovecot.ca_file), encoding="utf-8"
        )
        env = dict(os.environ)
        env.update(
            MAILINTEGRATION_DATA_DIR=str(work / "data"),
            MAILINTEGRATION_LOGIN="system",
            MAILINTEGRATION_PASSWORD="octo",
        )
        run("directory", "import", str(DEMO / "directory.json"), env=env)
        messages = sorted((DEMO / "messages").glob("*.eml"))
        for m in messages[:-1]:
            dovecot.deliver("support", m.read_bytes())
        print(f"\nround 1: {len(messages) - 1} messages delivered to the demo mailbox")
        run("once", "--config", str(config), env=env)
        dovecot.deliver("support", messages[-1].read_bytes())
        print("\nround 2: a reply carrying request #1's number delivered")
        run("once", "--config", str(config), env=env)
        print(f"\nmessages left on the server: {dovecot.count('support')}")
        run("requests", "list", env=env)
        run("requests", "show", "1", env=env)
        run("requests", "show", "3", env=env)
        command = Path(sys.executable).parent / "mailintegration"
        print(
            f"\nThe store is in {work / 'data'}; try: {command} requests show 3 --json "
            f"--data-dir {work / 'data'}"
        )
    finally:
        dovecot.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
