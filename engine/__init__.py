"""mailintegration: service-desk mailboxes to incidents, events and activities, exactly once."""

# Before any of the engine's dataclasses is made (see engine.dataclass_cache), and before
# anything imports engine.parse: the compiled parser, where `python -m engine.nativebuild`
# made one for these sources (see engine.native).
from engine import dataclass_cache as _dataclass_cache
from engine import native as _native

__version__ = "0.1.0"

_dataclass_cache.install()
_native.install(__path__)
