"""The engine's architecture, read from its source: who may import whom, and how large a
function may grow.

The pipeline is supervisor -> session -> gateway, parse -> queue -> writer -> store. Each
stage reaches the next only through the shared vocabulary (engine.items, engine.model) and
the interfaces (engine.gateways, engine.store.base); the edges below would let a stage reach
past its neighbour, and each once existed or was one refactoring away. A failure names the
module and the forbidden import."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
from radon.complexity import cc_visit

ENGINE = Path(__file__).resolve().parent.parent / "engine"


def imports_of(path: Path) -> set[str]:
    """Every engine module ``path`` imports, at any depth of its code (lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from engine import commands` imports the module engine.commands.
            found.update(
                f"{node.module}.{alias.name}"
                for alias in node.names
                if is_module(f"{node.module}.{alias.name}")
            )
    return {name for name in found if name == "engine" or name.startswith("engine.")}


def is_module(name: str) -> bool:
    path = ENGINE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ENGINE.rglob("*.py")):
        parts = path.relative_to(ENGINE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def test_commands_never_import_the_command_line() -> None:
    assert not {"engine.cli"} & imports_of(ENGINE / "commands.py")


def test_only_the_command_line_reaches_the_commands() -> None:
    """cli dispatches to commands through its table; nothing else in the engine imports
    cli or commands (the entry point imports cli)."""
    importers = {
        name: sorted(imports_of(path) & {"engine.cli", "engine.commands"})
        for name, path in modules().items()
        if imports_of(path) & {"engine.cli", "engine.commands"}
    }
    assert importers == {"engine.__main__": ["engine.cli"], "engine.cli": ["engine.commands"]}


def test_processors_never_import_the_store() -> None:
    """Processors read the directory through the view they are given; they cannot write."""
    for name, path in modules().items():
        if name.startswith("engine.processors"):
            assert not [m for m in imports_of(path) if m.startswith("engine.store")], name


def test_the_shared_vocabulary_imports_no_pipeline_stage() -> None:
    """items and model are what the stages share: plain dataclasses and enums."""
    assert imports_of(ENGINE / "model.py") == set()
    assert imports_of(ENGINE / "items.py") <= {"engine.config", "engine.errors", "engine.model"}


def test_the_writer_reaches_the_store_through_its_interface_only() -> None:
    """So that a PostgreSQL store can take SQLite's place."""
    store = {m for m in imports_of(ENGINE / "writer.py") if m.startswith("engine.store")}
    assert store == {"engine.store.base"}


# (importer prefix, forbidden import prefix, why). A prefix matches the module itself and
# every module below it.
FORBIDDEN = [
    ("engine.session", "engine.store", "the session hands items to the writer; only it writes"),
    ("engine.plan", "engine.store", "planning is pure, over the ledger rows it is given"),
    ("engine.budget", "engine.store", "the byte budget is between session and writer"),
    ("engine.parsers", "engine.store", "parsing processes see bytes, never the store"),
    ("engine.gateways", "engine.store", "gateways speak to mail servers only"),
    ("engine.session", "engine.writer", "the queue's items are the only contract"),
    ("engine.gateways", "engine.writer", "gateways speak to mail servers only"),
    ("engine.processors", "engine.store", "processors decide over a read-only view"),
    ("engine.parse", "engine.store", "parsing is a pure function of the bytes"),
    ("engine.store", "engine.gateways", "the store knows nothing of mail servers"),
    ("engine.writer", "engine.gateways", "the writer never talks to a mail server"),
    ("engine.writer", "engine.session", "the writer answers items, whoever sent them"),
    ("engine.tls", "engine.store", "TLS contexts are built from the config alone"),
]


@pytest.mark.parametrize(("importer", "forbidden", "why"), FORBIDDEN)
def test_no_forbidden_import_edge(importer: str, forbidden: str, why: str) -> None:
    bad = {
        name: sorted(m for m in imports_of(path) if m == forbidden or m.startswith(forbidden + "."))
        for name, path in modules().items()
        if name == importer or name.startswith(importer + ".")
    }
    bad = {name: found for name, found in bad.items() if found}
    assert bad == {}, f"{why}: {bad}"


def test_every_forbidden_edge_names_modules_that_exist() -> None:
    """A rule about a module that was renamed away would pass for ever."""
    names = set(modules())
    for importer, forbidden, _ in FORBIDDEN:
        for prefix in (importer, forbidden):
            assert any(n == prefix or n.startswith(prefix + ".") for n in names), prefix


def test_the_rules_catch_an_edge(tmp_path: Path) -> None:
    """The import reader sees lazy imports inside functions and `from engine import x`."""
    code = tmp_path / "x.py"
    code.write_text(
        "def f():\n    from engine.store import sqlite\n    from engine import writer\n",
        encoding="utf-8",
    )
    assert {"engine.store", "engine.store.sqlite", "engine.writer"} <= imports_of(code)


# Issue 13: no function of the engine over 60 lines or above cyclomatic complexity 15
# (radon's measure). The longest today is gateways/pop3.py's read_answer, the one streaming
# loop that keeps a message's bytes, its terminator split across chunks and its line length
# in step on the hottest path.
MAX_LINES, MAX_COMPLEXITY = 60, 15


def test_no_function_of_the_engine_is_too_long() -> None:
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_no_function_of_the_engine_is_too_complex() -> None:
    tangled = [
        f"{name}:{block.lineno} {block.fullname} ({block.complexity})"
        for name, path in modules().items()
        for block in cc_visit(path.read_text(encoding="utf-8"))
        if block.complexity > MAX_COMPLEXITY
    ]
    assert tangled == []


# Issue 13: the tests' shared helpers live once, in tests/support.py and tests/conftest.py.
TESTS = Path(__file__).resolve().parent
SHARED = {TESTS / "support.py", TESTS / "conftest.py"}


def free_port_copies(path: Path) -> list[str]:
    """The functions of ``path`` that bind port 0 only to learn a port number: a ``bind`` to
    ``(host, 0)`` with no ``listen`` in the same function. A real listener on port 0 (a
    scripted server) binds and listens, and is not a copy of ``support.free_port``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    scopes: list[ast.AST] = [tree]
    scopes += [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    found = []
    for scope in scopes:
        calls = [n for n in own_nodes(scope) if isinstance(n, ast.Call)]
        called = {c.func.attr for c in calls if isinstance(c.func, ast.Attribute)}
        if "listen" not in called and any(binds_port_zero(c) for c in calls):
            found.append(getattr(scope, "name", "<module>"))
    return found


def own_nodes(scope: ast.AST) -> Iterator[ast.AST]:
    """The nodes of ``scope``, without those of the functions defined inside it."""
    for child in ast.iter_child_nodes(scope):
        if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield child
            yield from own_nodes(child)


def binds_port_zero(call: ast.Call) -> bool:
    if not (isinstance(call.func, ast.Attribute) and call.func.attr == "bind" and call.args):
        return False
    address = call.args[0]
    return (
        isinstance(address, ast.Tuple)
        and len(address.elts) == 2
        and isinstance(port := address.elts[1], ast.Constant)
        and port.value == 0
    )


def test_no_test_module_has_its_own_free_port_helper() -> None:
    """support.free_port is the one way to learn a free loopback port."""
    copies = [
        f"{path.relative_to(TESTS)}:{name}"
        for path in sorted(TESTS.rglob("*.py"))
        if path not in SHARED
        for name in free_port_copies(path)
    ]
    assert copies == [], "use support.free_port()"


def test_the_free_port_rule_catches_a_copy(tmp_path: Path) -> None:
    code = tmp_path / "x.py"
    code.write_text(
        "import socket\n"
        "def port():\n    with socket.socket() as s:\n"
        "        s.bind(('127.0.0.1', 0))\n        return s.getsockname()[1]\n"
        "def server():\n    s = socket.socket()\n    s.bind(('127.0.0.1', 0))\n    s.listen(1)\n",
        encoding="utf-8",
    )
    assert free_port_copies(code) == ["port"]
