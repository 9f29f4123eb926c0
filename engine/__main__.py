"""``python -m engine`` is the ``mailintegration`` command."""

import sys

from engine.cli import main

sys.exit(main())
