"""mailintegration: service-desk mailboxes to incidents, events and activities, exactly once."""

__version__ = "0.1.0"

# Before any of the engine's dataclasses is made (see engine.dataclass_cache).
from engine import dataclass_cache as _dataclass_cache

_dataclass_cache.install()
