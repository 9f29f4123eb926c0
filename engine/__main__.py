"""``python -m engine`` is the ``mailintegration`` command."""

# Guarded, import included: a parsing worker process (anyio.to_process) runs this file as
# __mp_main__, and needs neither the command line nor what it imports.
if __name__ == "__main__":
    from engine.cli import run

    run()
