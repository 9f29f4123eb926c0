"""The log's formatters: the engine's lines are the standard library's, made faster."""

from __future__ import annotations

import json
import logging

from hypothesis import given
from hypothesis import strategies as st

from engine.logs import JsonFormatter, TextFormatter

# Seconds since the epoch, with their fractions; several records share a second, as in a
# busy writer's log.
CREATED = st.lists(
    st.tuples(st.integers(0, 4_000_000_000), st.floats(0, 0.999_999)), min_size=1, max_size=20
)


def _record(created: float) -> logging.LogRecord:
    record = logging.LogRecord(
        "engine.writer", logging.INFO, __file__, 1, "mailbox=%s uidl=%s", ("m", "u"), None
    )
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


@given(times=CREATED, datefmt=st.sampled_from([None, "%Y-%m-%dT%H:%M:%S%z", "%H:%M"]))
def test_time_formatted_once_a_second_is_the_standard_formatters(
    times: list[tuple[int, float]], datefmt: str | None
) -> None:
    """The time cached per second is the text logging.Formatter makes for every record."""
    fast, standard = TextFormatter(), logging.Formatter()
    for second, fraction in sorted(times) + times:  # in order, then any order
        record = _record(second + fraction)
        assert fast.formatTime(record, datefmt) == standard.formatTime(record, datefmt)


@given(times=CREATED)
def test_lines_are_the_standard_formatters(times: list[tuple[int, float]]) -> None:
    """A text line and a JSON line are what the standard library's formatting gives."""
    text = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for second, fraction in times:
        record = _record(second + fraction)
        assert TextFormatter().format(record) == text.format(record)
        line = json.loads(JsonFormatter().format(record))
        assert line == {
            "time": logging.Formatter().formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": "INFO",
            "logger": "engine.writer",
            "message": "mailbox=m uidl=u",
        }
