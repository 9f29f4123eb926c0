"""The parser compiled to C with mypyc, where it was built; the same source interpreted where not.

``python -m engine.nativebuild`` compiles :mod:`engine.parse` (the code every message goes
through in the parsing process, and the engine's first windows) with mypyc, the compiler that
ships with mypy: the same typed source, already ``mypy --strict`` clean, as C extension
modules. On both corpus mixes the parsing process spends about a fifth less CPU per message
(BENCHMARKS.md, "Issue 18, seventh step"). Nothing else is compiled: the writer and the
store are asynchronous generators and context managers that this mypyc does not compile, and
classes meant to be subclassed (the processors, the stores) cannot be once compiled.

The build goes to ``engine/_native/`` (not in git) with a manifest naming the interpreter's
extension suffix and the SHA-256 of every source the compiled code was made from. At each
start :func:`install` checks both and only then puts the folder first on ``engine.__path__``,
so that ``engine.parse`` and its modules are the compiled ones. A source edited since the
build, another Python, a missing or unreadable manifest, or ``MAILINTEGRATION_NO_NATIVE``
set: the interpreted modules are used, which are always there and give the same results
(``tests/parse/test_native.py`` holds the two equal on every corpus and on generated mail).
Checking costs one read and one hash of ~230 KB per start, about 0.2 ms.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
FOLDER = PACKAGE / "_native"
MANIFEST = "manifest.json"
_MANIFEST_MAX = 64 * 1024  # a manifest is ~2 KB; anything bigger is not ours
# What is compiled, and what else its code was made from: mypyc reads the types (and may
# fold the constants) of the engine modules the parser imports.
COMPILED = "parse"
ALSO_READ = ("model.py", "errors.py")

# Set by install(): whether this process runs the compiled parser, and, where a build is
# there but may not be used, why not (the engine logs it: a start after an upgrade that
# forgot the build runs slower, and should say so).
active = False
skipped: str | None = None


def compiled() -> list[Path]:
    """The modules compiled, in a fixed order."""
    return sorted((PACKAGE / COMPILED).glob("*.py"))


def sources() -> list[Path]:
    """The files the compiled modules were made from: themselves and what mypyc read."""
    return compiled() + [PACKAGE / name for name in ALSO_READ]


def digest(files: list[Path]) -> dict[str, str]:
    """File name (relative to the package) -> SHA-256 of its bytes."""
    return {str(f.relative_to(PACKAGE)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def suffix() -> str:
    return importlib.machinery.EXTENSION_SUFFIXES[0]


def usable(folder: Path = FOLDER) -> str | None:
    """None if the build in ``folder`` matches this interpreter and these sources, else why
    not (for ``python -m engine.nativebuild --check`` and the tests)."""
    try:
        with open(folder / MANIFEST, "rb") as f:
            manifest = json.loads(f.read(_MANIFEST_MAX + 1)[:_MANIFEST_MAX])
    except FileNotFoundError:
        return "not built"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest: {exc}"
    if not isinstance(manifest, dict):
        return "unreadable manifest"
    if manifest.get("suffix") != suffix():
        return f"built for {manifest.get('suffix')!r}, this Python loads {suffix()!r}"
    try:
        now = digest(sources())
    except OSError as exc:
        return f"a source cannot be read: {exc}"
    if manifest.get("sources") != now:
        return "a source changed since the build"
    return None


def install(package_path: list[str]) -> bool:
    """Put the compiled modules first on the engine package's path, if they may be used."""
    global active, skipped
    if os.environ.get("MAILINTEGRATION_NO_NATIVE") or not FOLDER.is_dir():
        return False
    skipped = usable()
    if skipped is not None:
        return False
    package_path.insert(0, str(FOLDER / "engine"))
    active = True
    return True
