"""``python -m engine.precompile``: what a start would otherwise compile, compiled now.

The engine's .pyc files (``compileall``) and its dataclasses' methods
(:mod:`engine.dataclass_cache`), written even where ``PYTHONDONTWRITEBYTECODE`` is set, as
``compileall`` writes them: run it where the engine is installed (the image does), so that
no start compiles, every start the same.
"""

from __future__ import annotations

import compileall
import os
import sys

from engine import dataclass_cache


def main() -> int:
    folder = os.path.dirname(os.path.abspath(__file__))
    if not compileall.compile_dir(folder, quiet=1):
        return 1
    count = dataclass_cache.warm()
    print(f"engine compiled; {count} dataclass methods kept in {dataclass_cache.path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
