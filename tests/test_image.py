"""The image without Docker (issue 21 item 5): the lock file in step with pyproject.toml,
the Dockerfile installing from it, and the entrypoint's validation before `run`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support import mailbox_xml

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "scripts" / "entrypoint.sh"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$")


def locked() -> dict[str, tuple[Version, int]]:
    """requirements.lock: name -> (version, number of hashes)."""
    pins: dict[str, tuple[Version, int]] = {}
    current = None
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = _PIN.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            assert current not in pins, f"{current} is pinned twice"
            pins[current] = (Version(m.group(2)), 0)
        elif line.strip().startswith("--hash=sha256:") and current is not None:
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
        elif line and not line.startswith((" ", "#")):
            pytest.fail(f"a line of requirements.lock that is not a hashed pin: {line!r}")
    return pins


def test_the_lock_pins_every_dependency_of_pyproject_within_its_specifier() -> None:
    """Every dependency of the project (and its build backend, which the image builds with)
    is pinned, with hashes, at a version its specifier allows: scripts/lock.sh refreshes it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [Requirement(r) for r in project["project"]["dependencies"]]
    wanted += [Requirement(r) for r in project["build-system"]["requires"]]
    pins = locked()
    assert all(hashes > 0 for _, hashes in pins.values()), "a pin without --hash"
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in requirements.lock: run scripts/lock.sh"
        version, _ = pins[name]
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={version}, outside {req}: run scripts/lock.sh"
        )


def test_the_dockerfile_installs_from_the_lock_and_validates_before_run() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes -r requirements.lock" in text
    assert "--no-deps --no-build-isolation ." in text  # nothing unlocked comes in after
    assert 'ENTRYPOINT ["mailintegration-entrypoint"]' in text
    assert "COPY scripts/entrypoint.sh /usr/local/bin/mailintegration-entrypoint" in text
    # The image sets PYTHONDONTWRITEBYTECODE: no start would keep its dataclasses' methods
    # (engine.dataclass_cache). Run from /, so that the installed engine is the one warmed,
    # not /app's copy of the sources.
    assert "PYTHONDONTWRITEBYTECODE=1" in text
    assert "&& cd / && python -m engine.precompile" in text


@pytest.fixture
def fake(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for the command: records each call, fails `config validate` when told."""
    calls = tmp_path / "calls"
    script = tmp_path / "mailintegration"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'if [ "$1" = config ]; then exit "${FAKE_VALIDATE_STATUS:-0}"; fi\n'
        "exit 7\n"
    )
    script.chmod(0o755)
    return script, calls


def entrypoint(fake: tuple[Path, Path], *args: str, **env: str) -> tuple[int, list[str], str]:
    script, calls = fake
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        env={**os.environ, "MAILINTEGRATION_BIN": str(script), **env},
        capture_output=True,
        text=True,
        check=False,
    )
    lines = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return result.returncode, lines, result.stderr


def test_the_entrypoint_validates_the_config_dir_of_run_then_execs_it(
    fake: tuple[Path, Path],
) -> None:
    run = ["run", "--config-dir", "/app/mailboxes.d", "--log-format", "json"]
    code, calls, _ = entrypoint(fake, *run)
    assert code == 7  # the command's own status: exec'd, not wrapped
    assert calls == ["config validate --quiet --config-dir /app/mailboxes.d", " ".join(run)]
    code, calls, _ = entrypoint(fake, "run", "--config-dir=/etc/boxes")
    assert calls[0] == "config validate --quiet --config-dir /etc/boxes"
    code, calls, _ = entrypoint(fake, "directory", "import", "/app/demo/directory.json")
    assert calls == ["directory import /app/demo/directory.json"]  # only run is validated


def test_a_failed_validation_starts_run_anyway_unless_strict(fake: tuple[Path, Path]) -> None:
    """One broken file never stops the other mailboxes (the daemon makes it an outage
    event); MAILINTEGRATION_VALIDATE=strict refuses to start instead."""
    code, calls, err = entrypoint(fake, "run", FAKE_VALIDATE_STATUS="1")
    assert code == 7 and calls == ["config validate --quiet --config-dir mailboxes.d", "run"]
    assert "starting anyway" in err
    code, calls, err = entrypoint(
        fake, "run", FAKE_VALIDATE_STATUS="1", MAILINTEGRATION_VALIDATE="strict"
    )
    assert code == 1 and calls == ["config validate --quiet --config-dir mailboxes.d"]
    assert "not starting" in err
    code, calls, _ = entrypoint(fake, "run", MAILINTEGRATION_VALIDATE="off")
    assert calls == ["run"]
    code, calls, err = entrypoint(fake, "run", MAILINTEGRATION_VALIDATE="maybe")
    assert code == 2 and calls == [] and "report, strict or off" in err


def test_the_entrypoint_with_the_real_command_reports_a_broken_file(tmp_path: Path) -> None:
    """The real `config validate` behind the script: strict mode stops on a broken file and
    its report names it; `run` itself is replaced by a stand-in that must not be reached."""
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    mailbox_xml(boxes / "ok.xml", port=110, user="u", password="p")
    (boxes / "broken.xml").write_text("<mailIntegration>\n<server/>\n</mailIntegration>\n")
    wrapper = tmp_path / "mailintegration"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = run ]; then echo REACHED-RUN; exit 0; fi\n'
        f'PYTHONPATH={ROOT} exec {sys.executable} -m engine "$@"\n'
    )
    wrapper.chmod(0o755)
    env = {**os.environ, "MAILINTEGRATION_BIN": str(wrapper), "MAILINTEGRATION_VALIDATE": "strict"}
    env.pop("MAILINTEGRATION_DATA_DIR", None)
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), "run", "--config-dir", str(boxes)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1, result
    assert f"{boxes}/broken.xml:2:" in result.stdout and "ok.xml" not in result.stdout
    assert "REACHED-RUN" not in result.stdout
    (boxes / "broken.xml").unlink()
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), "run", "--config-dir", str(boxes)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "REACHED-RUN" in result.stdout
    assert "1 file(s): 1 ok, 0 with problems, 0 would not load" in result.stdout
