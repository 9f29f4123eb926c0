"""mailintegration: service-desk mailboxes to incidents, events and activities, exactly once."""

__version__ = "0.1.0"
