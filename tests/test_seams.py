"""The seams between the engine's parts: who may import whom, read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

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
