"""The dataclasses' generated methods, compiled once and kept, as .pyc files keep modules.

``@dataclass`` writes each method it adds (``__init__``, ``__repr__``, ``__eq__``,
``__hash__``, and ``__setattr__``/``__delattr__`` when frozen) as source text, and compiles
the text with ``exec``, at every start. On CPython 3.11 that was the largest single cost of
a start: for the engine's dataclasses (61 of its 90 are made by ``once``) and anyio's,
parsing and compiling that text took 268 M of the 788 M instructions of ``once`` over an
empty mailbox, the password check apart (callgrind). The text is the same at every start.

So the code objects are kept in ``engine/__pycache__/dataclass-methods.<tag>.marshal``, keyed
by the text itself, and given to ``exec`` in the text's stead. The dataclasses module gets an
``exec`` of its own (a module global shadows the builtin): nothing else of it changes, and
a code object compiled from the same text with the same flags is the same code, so the
methods are the very ones it would make (tests/test_dataclass_cache.py holds them equal for
every dataclass of the engine). A dataclasses without ``_create_fn``, the function that
compiles each method apart (later Pythons compile a class's methods at once), is left
alone. Measured: 1,179 M -> 967 M instructions for that ``once``, and 182 -> 156 ms median
wall (21 starts each, alternated).

The file is trusted as the .pyc files beside it are: whoever may write the one may write
the other. It is read whole (bounded), checked (the Python build, the types), and ignored
if anything is off; it is written, atomically, by :func:`save` when this process compiled
something new, unless the environment says not to write bytecode
(``PYTHONDONTWRITEBYTECODE``). ``python -m engine.precompile`` writes it anyway, with the
.pyc files, as ``compileall`` does: the image and the set-up run it.
``MAILINTEGRATION_DATACLASS_CACHE`` names another file; ``MAILINTEGRATION_NO_DATACLASS_CACHE``
turns it off.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import marshal
import os
import sys
from collections.abc import Mapping
from types import CodeType
from typing import Any, Final

# What the file must start with: a build of Python whose code objects are the same.
_HEADER: Final = f"mailintegration dataclass methods 1\n{sys.version}\n{marshal.version}\n".encode()
_MAX_FILE_BYTES: Final = 16 << 20
# Kept only while they are used: texts of classes that changed or went accumulate otherwise.
_MAX_ENTRIES: Final = 4096


class _Cache:
    def __init__(self) -> None:
        # Each text's code object, marshalled as the file holds it until a class needs it:
        # unmarshalling the ~600 of them all at each start would cost ~2 ms.
        self.codes: dict[str, bytes | CodeType] = {}
        self.used: set[str] = set()
        self.new = 0  # texts compiled by this process
        self.path: str | None = None


_CACHE: Final = _Cache()


def _exec(
    source: Any,
    globals: dict[str, Any] | None = None,
    locals: Mapping[str, Any] | None = None,
    /,
    **kwargs: Any,
) -> None:
    """``exec`` as dataclasses calls it, a text compiled through the cache. ``exec(text)``
    compiles with the calling module's future flags; the dataclasses module has none, hence
    ``dont_inherit`` (this module has some)."""
    if type(source) is str and not kwargs:
        code = _CACHE.codes.get(source)
        if type(code) is bytes:
            try:
                code = marshal.loads(code)
            except (EOFError, ValueError, TypeError):
                code = None
        if type(code) is not CodeType:
            code = compile(source, "<string>", "exec", dont_inherit=True)
            _CACHE.codes[source] = code
            _CACHE.new += 1
        _CACHE.used.add(source)
        source = code
    builtins.exec(source, globals, locals, **kwargs)


def install() -> None:
    """Give dataclasses the caching ``exec``, with what the file holds; idempotent."""
    if not hasattr(dataclasses, "_create_fn") or getattr(dataclasses, "exec", None) is _exec:
        return
    if os.environ.get("MAILINTEGRATION_NO_DATACLASS_CACHE"):
        return
    _CACHE.path = _location()
    if _CACHE.path is not None:
        _CACHE.codes.update(_load(_CACHE.path))
    dataclasses.exec = _exec  # type: ignore[attr-defined]


def save(*, force: bool = False) -> bool:
    """Write the file if this process compiled something new (``force``: even where bytecode
    is not to be written). Whether it was written; failing to write is no error."""
    path = _CACHE.path
    if path is None or not _CACHE.new or (sys.dont_write_bytecode and not force):
        return False
    codes = _CACHE.codes
    keep = len(codes) <= _MAX_ENTRIES
    blobs = {
        text: code if type(code) is bytes else marshal.dumps(code)
        for text, code in codes.items()
        if keep or text in _CACHE.used
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(_HEADER + marshal.dumps(blobs))
        os.replace(tmp, path)
    except OSError:  # a read-only install: every start compiles, as before
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
    _CACHE.new = 0
    return True


def path() -> str | None:
    """Where the file is kept (None: nowhere, see :func:`_location`)."""
    return _CACHE.path


def _location() -> str | None:
    """The file: ``MAILINTEGRATION_DATACLASS_CACHE`` (for an install that cannot write its
    own folder, and for the tests), else in this package's __pycache__; None where .pyc
    files go elsewhere."""
    if chosen := os.environ.get("MAILINTEGRATION_DATACLASS_CACHE"):
        return chosen
    tag = sys.implementation.cache_tag
    if tag is None or sys.pycache_prefix is not None:
        return None
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    return os.path.join(folder, f"dataclass-methods.{tag}.marshal")


def _load(path: str) -> dict[str, bytes | CodeType]:
    """What the file holds, or nothing if it is missing, too large, of another build or not
    a mapping of texts to marshalled code (each checked when a class needs it)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_FILE_BYTES + 1)
    except OSError:
        return {}
    if len(data) > _MAX_FILE_BYTES or not data.startswith(_HEADER):
        return {}
    try:
        codes = marshal.loads(memoryview(data)[len(_HEADER) :])
    except (EOFError, ValueError, TypeError):
        return {}
    if not isinstance(codes, dict) or not all(
        type(text) is str and type(blob) is bytes for text, blob in codes.items()
    ):
        return {}
    return codes


def warm() -> int:
    """Import every engine module, so that every dataclass is made, and write the file."""
    import importlib
    import pkgutil

    import engine

    for module in pkgutil.walk_packages(engine.__path__, "engine."):
        if module.name.endswith("__main__"):
            continue
        importlib.import_module(module.name)
    # anyio imports its event loop's backend, and the dataclasses there, when a loop runs.
    import anyio

    anyio.run(anyio.sleep, 0)
    save(force=True)
    return len(_CACHE.used)
