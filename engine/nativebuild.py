"""``python -m engine.nativebuild``: compile :mod:`engine.parse` with mypyc (see
:mod:`engine.native`, which decides at each start whether the build is used).

``--check`` only says whether the build in place is used, and exits 1 if it is not. The
build needs mypy (which brings mypyc), setuptools, a C compiler and the Python headers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from engine.native import (
    COMPILED,
    FOLDER,
    MANIFEST,
    PACKAGE,
    compiled,
    digest,
    sources,
    suffix,
    usable,
)


def build(folder: Path = FOLDER) -> None:
    """Compile :mod:`engine.parse` into ``folder``, replacing what is there only once the new
    build is complete (a failed build leaves the last good one, or none)."""
    from mypyc.build import mypycify  # the build's tools: only ever imported here
    from setuptools import Distribution  # type: ignore[import-untyped]  # no stubs

    files = sources()
    before = digest(files)
    root = PACKAGE.parent
    with tempfile.TemporaryDirectory(prefix="native-", dir=folder.parent) as tmp:
        staging = Path(tmp) / "out"
        cwd = os.getcwd()
        os.chdir(root)  # mypyc names each module by its path from here
        try:
            extensions = mypycify(
                [str(p.relative_to(root)) for p in compiled()],
                group_name=f"engine.{COMPILED}",
                target_dir=str(Path(tmp) / "c"),
                opt_level="3",
                debug_level="0",
            )
            dist = Distribution({"name": "mailintegration-native", "ext_modules": extensions})
            command = dist.get_command_obj("build_ext")
            command.build_lib = str(staging)
            command.build_temp = str(Path(tmp) / "o")
            dist.run_command("build_ext")
        finally:
            os.chdir(cwd)
        if digest(files) != before:
            raise RuntimeError("a source changed during the build; build again")
        manifest = {"suffix": suffix(), "sources": before, "python": sys.version}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        old = Path(tmp) / "old"
        if folder.exists():
            folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--check"]:
        why = (
            "MAILINTEGRATION_NO_NATIVE is set"
            if os.environ.get("MAILINTEGRATION_NO_NATIVE")
            else usable()
        )
        print(f"engine.nativebuild: {why or 'the compiled parser is used'}")
        return 0 if why is None else 1
    if args:
        print("usage: python -m engine.nativebuild [--check]", file=sys.stderr)
        return 2
    build()
    print(f"engine.nativebuild: engine.{COMPILED} compiled into {FOLDER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
