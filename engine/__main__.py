"""``python -m engine`` is the ``mailintegration`` command."""

# Guarded, import included: a process that loads this file as its parent's main module
# (multiprocessing's, anyio's workers) needs neither the command line nor what it imports.
if __name__ == "__main__":
    from engine.cli import run

    run()
