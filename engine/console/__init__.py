"""The web console: mailboxes, failed mail (download, replay), requests and the flow of
mail, as server-rendered pages for the agents who run the engine.

- :mod:`engine.console.app`: the Starlette app (routes, sessions, the replay's role check);
- :mod:`engine.console.security`: session key, CSRF, login throttle, headers, downloads;
- :mod:`engine.console.charts`: the Flow page's SVG geometry;
- :mod:`engine.console.replay`: replay through the ``ingest`` path;
- ``templates/`` (Jinja2, autoescaped) and ``static/`` (one stylesheet; no script).

It is off unless asked for (``run --console``, or the ``console`` command) and listens on
127.0.0.1 unless told otherwise. The README's "Console" section states the security model.
"""

from engine.console.app import REPLAY_ROLE, Console, Replay, ReplayResult, create_app

__all__ = ["REPLAY_ROLE", "Console", "Replay", "ReplayResult", "create_app"]
