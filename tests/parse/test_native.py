"""The compiled parser (engine.native, engine.nativebuild) gives what the interpreted one gives.

The interpreted parser runs in the engine's own parsing process (engine.parsers.Worker), started
with MAILINTEGRATION_NO_NATIVE; the compiled one in this process, on the same bytes: every
corpus, both bench mixes, and generated messages.
Then: when a build is used, and when it is not (a source edited since, another Python's build,
a bad manifest, the switch).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from samples import raw_fuzz, raw_message
from test_mime import large_message

from engine import native
from engine.errors import MessageError
from engine.model import ParsedMessage
from engine.parse import parse_raw, with_raw
from engine.parsers import Worker

REPO = Path(__file__).resolve().parents[2]
MAX_BYTES = 50 * 1024 * 1024


def _comparable(result: ParsedMessage | MessageError) -> object:
    # An exception is equal only to itself: compare its class and its words.
    if isinstance(result, MessageError):
        return (type(result).__name__, str(result))
    return result


@pytest.fixture(scope="module")
def interpreted() -> Iterator[Worker]:
    # Only the switch skips these tests: scripts/setup.sh builds the compiled parser (and
    # installs the compiler it needs), so a missing or stale build is a failure to see.
    if os.environ.get("MAILINTEGRATION_NO_NATIVE"):
        pytest.skip("MAILINTEGRATION_NO_NATIVE is set: no compiled parser to compare")
    if not native.active:
        pytest.fail(
            f"the compiled parser is not in use ({native.usable()}): run "
            "python -m engine.nativebuild (scripts/setup.sh does), or set "
            "MAILINTEGRATION_NO_NATIVE=1 where no C compiler can be had"
        )
    # The interpreted parser in the engine's own parsing process (engine.parsers.Worker),
    # started with the switch set.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MAILINTEGRATION_NO_NATIVE", "1")
        worker = Worker()
    try:
        assert worker.call([b"Subject: x\r\n\r\nwarm\r\n"], MAX_BYTES)
        maps = Path(f"/proc/{worker.process.pid}/maps").read_text()
        assert "_native" not in maps, "the parsing process must run the interpreted parser"
        yield worker
    finally:
        worker.close()


def _assert_same(worker: Worker, raws: list[bytes]) -> int:
    # Windows of 48, as the engine sends them; the process leaves the raw bytes out of its
    # answers, and the engine puts them back (with_raw), as here.
    windows = [raws[i : i + 48] for i in range(0, len(raws), 48)]
    answers = [(worker.call(w, MAX_BYTES), w) for w in windows]
    theirs = [with_raw(r, raw) for rs, w in answers for r, raw in zip(rs, w, strict=True)]
    ours = [parse_raw(raw, MAX_BYTES) for raw in raws]
    assert len(theirs) == len(ours) == len(raws)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert _comparable(a) == _comparable(b), f"message {i} of {len(raws)}: {raws[i][:300]!r}"
    return sum(isinstance(r, ParsedMessage) for r in ours)


def _corpus(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.rglob("*.eml"))]


def test_the_compiled_parser_is_the_one_in_use(interpreted: Worker) -> None:
    import engine.parse
    import engine.parse.mime

    for module in (engine.parse, engine.parse.mime):
        assert module.__file__ is not None
        assert Path(module.__file__).suffix == ".so", module.__file__
        assert str(native.FOLDER) in module.__file__


@pytest.mark.parametrize("folder", ["corpus", "corpus/realworld2"])
def test_every_corpus_message_parses_the_same_compiled(interpreted: Worker, folder: str) -> None:
    raws = _corpus(REPO / "tests" / folder)
    assert len(raws) >= 40
    assert _assert_same(interpreted, raws) >= len(raws) // 2


@pytest.mark.parametrize("mix", ["bench", "realistic"])
def test_both_bench_mixes_parse_the_same_compiled(interpreted: Worker, mix: str) -> None:
    from bench.corpus import make_corpus, stamp

    raws = [stamp(t, f"n{i}.{mix}@bench.invalid") for i, t in enumerate(make_corpus(600, mix=mix))]
    assert _assert_same(interpreted, raws) == len(raws)


@raw_fuzz(150)
@given(raw=raw_message())
def test_property_generated_messages_parse_the_same_compiled(
    interpreted: Worker, raw: bytes
) -> None:
    _assert_same(interpreted, [raw])


@raw_fuzz(20)
@given(raw=large_message())
def test_property_large_messages_parse_the_same_compiled(interpreted: Worker, raw: bytes) -> None:
    _assert_same(interpreted, [raw])


def test_refusals_are_the_same_compiled(interpreted: Worker) -> None:
    from engine.errors import ParseError
    from engine.parse import parse_message

    for bad in ("Subject: x\r\n\r\n", 7, None):
        with pytest.raises(ParseError, match="must be bytes"):
            parse_message(bad)
    raw = b"Subject: x\r\n\r\nbody\r\n"
    assert parse_message(bytearray(raw)) == parse_message(memoryview(raw)) == parse_message(raw)


# ------------------------------------------------------------------ when a build is used


def _copy_with_build(tmp_path: Path) -> Path:
    if os.environ.get("MAILINTEGRATION_NO_NATIVE"):
        pytest.skip("MAILINTEGRATION_NO_NATIVE is set: no compiled parser to copy")
    if (why := native.usable()) is not None:
        pytest.fail(f"no usable build to copy ({why}): python -m engine.nativebuild")
    shutil.copytree(
        native.PACKAGE, tmp_path / "engine", ignore=shutil.ignore_patterns("__pycache__")
    )
    return tmp_path / "engine"


def _loaded(root: Path, **env: str) -> tuple[bool, str]:
    probe = "import engine.native as n, engine.parse as p; print(n.active, p.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=root,
        env={
            **{k: v for k, v in os.environ.items() if k != "MAILINTEGRATION_NO_NATIVE"},
            "PYTHONPATH": str(root),
            "PYTHONDONTWRITEBYTECODE": "1",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    active, where = done.stdout.split()
    assert where.startswith(str(root)), where  # the copy, not the checkout
    return active == "True", where


def test_a_build_is_used_only_while_it_matches_the_sources_and_the_python(
    tmp_path: Path,
) -> None:
    package = _copy_with_build(tmp_path)
    active, where = _loaded(tmp_path)
    assert active and where.endswith(native.suffix())

    assert _loaded(tmp_path, MAILINTEGRATION_NO_NATIVE="1")[0] is False

    # Another Python's build.
    manifest_path = package / "_native" / native.MANIFEST
    good = manifest_path.read_bytes()
    manifest = json.loads(good)
    manifest["suffix"] = ".cpython-399-x86_64-linux-gnu.so"
    manifest_path.write_text(json.dumps(manifest))
    active, where = _loaded(tmp_path)
    assert not active and where.endswith("parse/__init__.py")

    # A manifest that is not one, or too big to be one.
    for bad in (b"", b"[1, 2]", b"{not json", b" " * (70 * 1024) + b"{}"):
        manifest_path.write_bytes(bad)
        assert _loaded(tmp_path)[0] is False, bad[:20]
    manifest_path.write_bytes(good)
    assert _loaded(tmp_path)[0] is True

    # A source edited after the build: the edit is what runs.
    mime = package / "parse" / "mime.py"
    mime.write_bytes(mime.read_bytes() + b"\nEDITED = True\n")
    active, where = _loaded(tmp_path)
    assert not active and where.endswith("parse/__init__.py")
    mime.write_bytes(mime.read_bytes().removesuffix(b"\nEDITED = True\n"))
    assert _loaded(tmp_path)[0] is True

    # A module the compiled code reads types from, edited: and an engine started so says.
    model = package / "model.py"
    model.write_bytes(model.read_bytes() + b"\n")
    assert _loaded(tmp_path)[0] is False
    once = ["once", "--config-dir", str(tmp_path / "none"), "--data-dir", str(tmp_path / "d")]
    started = subprocess.run(
        [sys.executable, "-m", "engine", *once],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "the compiled parser is not used (a source changed since the build)" in (
        started.stderr
    ), started.stderr[-2000:]

    # No build at all.
    model.write_bytes(model.read_bytes()[:-1])
    shutil.rmtree(package / "_native")
    assert _loaded(tmp_path)[0] is False
