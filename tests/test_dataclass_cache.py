"""The dataclasses' methods kept between starts (engine.dataclass_cache).

Each check runs in a new interpreter: the cache is installed when the engine package is
first imported, before any of its dataclasses is made.
"""

from __future__ import annotations

import json
import marshal
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import LOGIN, LOGIN_PASSWORD, Mailbox, engine_argv, message, store_args

from engine import dataclass_cache

# Every dataclass of the engine, and a fingerprint of each method dataclasses generated for
# it (those compiled from its text: co_filename "<string>"), by class.
_METHODS = r"""
import dataclasses, hashlib, importlib, json, pkgutil, sys, types
import engine
from engine import dataclass_cache

for module in pkgutil.walk_packages(engine.__path__, "engine."):
    if not module.name.endswith("__main__"):
        importlib.import_module(module.name)

def fingerprint(code):
    parts = []
    for name in ("co_argcount", "co_posonlyargcount", "co_kwonlyargcount", "co_nlocals",
                 "co_stacksize", "co_flags", "co_code", "co_names", "co_varnames",
                 "co_freevars", "co_cellvars", "co_filename", "co_name", "co_qualname",
                 "co_firstlineno", "co_linetable", "co_exceptiontable"):
        parts.append(repr(getattr(code, name)))
    for const in code.co_consts:
        parts.append(fingerprint(const) if isinstance(const, types.CodeType) else repr(const))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

classes = {}
for name, module in list(sys.modules.items()):
    if not name.startswith("engine"):
        continue
    for value in vars(module).values():
        if isinstance(value, type) and dataclasses.is_dataclass(value):
            methods = {}
            for attr, fn in vars(value).items():
                code = getattr(fn, "__code__", None)
                if code is not None and code.co_filename == "<string>":
                    methods[attr] = fingerprint(code)
            classes[f"{value.__module__}.{value.__qualname__}"] = methods
print(json.dumps({"classes": classes, "compiled": dataclass_cache._CACHE.new,
                  "installed": getattr(dataclasses, "exec", None) is dataclass_cache._exec}))
"""


def run(script: str, cache: Path | None, *, answer: bool = True, **env: str) -> Any:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILINTEGRATION_")}
    environ.pop("PYTHONDONTWRITEBYTECODE", None)
    if cache is None:
        environ["MAILINTEGRATION_NO_DATACLASS_CACHE"] = "1"
    else:
        environ["MAILINTEGRATION_DATACLASS_CACHE"] = str(cache)
    environ.update(env)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if answer else done.stdout


def warm(cache: Path) -> None:
    run("from engine import dataclass_cache; dataclass_cache.warm()", cache, answer=False)


def test_every_method_made_from_the_kept_code_is_the_one_dataclasses_compiles(
    tmp_path: Path,
) -> None:
    """The property the cache rests on, for every dataclass of the engine: with the file
    written by one start and read by the next, which then compiles nothing, each generated
    method is the same code as without the cache at all."""
    cache = tmp_path / "methods.marshal"
    plain = run(_METHODS, None)
    assert not plain["installed"]
    warm(cache)
    kept = run(_METHODS, cache)
    assert kept["installed"]
    assert kept["compiled"] == 0  # every method came from the file
    assert kept["classes"] == plain["classes"]
    assert len(plain["classes"]) >= 60
    assert sum(len(m) for m in plain["classes"].values()) >= 300


def test_a_start_writes_what_it_compiled_and_the_next_compiles_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "methods.marshal"
    first = run(_METHODS + "dataclass_cache.save()\n", cache)
    assert first["compiled"] > 300
    assert cache.is_file()
    assert run(_METHODS, cache)["compiled"] == 0


def test_where_bytecode_is_not_written_only_precompile_writes_it(tmp_path: Path) -> None:
    """PYTHONDONTWRITEBYTECODE: a start leaves no file, as it leaves no .pyc; the set-up's
    ``python -m engine.precompile`` writes it, as compileall writes .pyc files."""
    cache = tmp_path / "methods.marshal"
    run(_METHODS + "dataclass_cache.save()\n", cache, PYTHONDONTWRITEBYTECODE="1")
    assert not cache.exists()
    said = run(
        "from engine.precompile import main; main()",
        cache,
        answer=False,
        PYTHONDONTWRITEBYTECODE="1",
    )
    assert str(cache) in said
    assert cache.is_file()
    assert run(_METHODS, cache, PYTHONDONTWRITEBYTECODE="1")["compiled"] == 0


@pytest.mark.parametrize(
    "content",
    [
        b"garbage",
        b"",
        # another build of Python: its code objects are not ours
        b"mailintegration dataclass methods 1\n2.7.18 (default)\n4\n" + marshal.dumps({}),
        # our header, then what is not a mapping of texts to marshalled code
        dataclass_cache._HEADER + marshal.dumps([1, 2, 3]),
        dataclass_cache._HEADER + marshal.dumps({"def f(): pass": 3}),
        dataclass_cache._HEADER + b"\xff\x00",
    ],
    ids=["garbage", "empty", "other-build", "not-a-dict", "not-code", "cut-short"],
)
def test_a_file_that_is_not_right_is_ignored_and_replaced(tmp_path: Path, content: bytes) -> None:
    cache = tmp_path / "methods.marshal"
    cache.write_bytes(content)
    result = run(_METHODS + "dataclass_cache.save()\n", cache)
    assert result["compiled"] > 300  # nothing taken from it
    assert run(_METHODS, cache)["compiled"] == 0  # and it was rewritten whole


def test_an_entry_that_is_not_code_is_compiled_again(tmp_path: Path) -> None:
    """The file is checked as a mapping when read; each entry when a class needs it."""
    cache = tmp_path / "methods.marshal"
    warm(cache)
    blobs = marshal.loads(cache.read_bytes()[len(dataclass_cache._HEADER) :])
    text = next(iter(blobs))
    blobs[text] = marshal.dumps(42)
    blobs[next(iter(list(blobs)[1:]))] = b"\xff"
    cache.write_bytes(dataclass_cache._HEADER + marshal.dumps(blobs))
    assert run(_METHODS, cache)["compiled"] == 2


def test_a_folder_it_cannot_write_is_no_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root writes through a read-only mode: a path under a file cannot be written
        cache = tmp_path / "a-file" / "methods.marshal"
        (tmp_path / "a-file").write_text("")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        cache = folder / "methods.marshal"
    result = run(_METHODS + "print(dataclass_cache.save(), file=__import__('sys').stderr)\n", cache)
    assert result["compiled"] > 300
    assert not cache.exists()


def test_the_cache_is_installed_before_the_engine_makes_a_dataclass() -> None:
    """engine/__init__ installs it: the first of the engine's modules to make one is
    imported after, whatever a caller imports first."""
    script = (
        "import dataclasses, sys\n"
        "from engine import model\n"
        "from engine import dataclass_cache\n"
        "assert dataclasses.exec is dataclass_cache._exec\n"
        "assert dataclass_cache._CACHE.used\n"  # the model's classes went through it
    )
    run(script, Path(os.devnull), answer=False)


def test_a_pass_of_the_engine_after_precompile_compiles_nothing(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    """The real thing: ``once`` over a mailbox with mail, a parsing process and the writer,
    after ``engine.precompile``. A start that compiled anything would rewrite the file at
    its end (bytecode may be written here); it is left as it was. (anyio's backend makes
    its dataclasses only once a loop runs: precompile runs one.)"""
    cache = tmp_path / "methods.marshal"
    run("from engine.precompile import main; main()", cache, answer=False)
    before = cache.read_bytes()
    mailbox.deliver(*[message(f"Warm {i}") for i in range(80)])  # enough for a process
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    environ["MAILINTEGRATION_DATACLASS_CACHE"] = str(cache)
    argv = engine_argv("once", "--config", mailbox.config, "--data-dir", mailbox.data)
    argv += ["--login", LOGIN, "--password", LOGIN_PASSWORD, *store_args()]
    done = subprocess.run(argv, env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    mailbox.assert_exactly_once()
    assert cache.read_bytes() == before
