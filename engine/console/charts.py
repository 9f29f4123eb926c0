"""The Flow page's charts as plain numbers for an SVG template: no script, no chart library.

Pure functions of the store's counts; the template (templates/flow.html) draws what these
compute, and Jinja2 escapes every label (a mailbox name or a cause is text from a file or a
server, so it is treated as hostile).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

WIDTH, HEIGHT, LEFT, BOTTOM = 720, 160, 40, 20
BUCKET_MINUTES = 10  # 24 h in 144 bars: a per-minute bar would be under a pixel wide


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str  # the bar's tooltip: its time and count


@dataclass(frozen=True)
class Series:
    mailbox: str
    total: int
    peak_per_minute: int
    bars: list[Bar]
    ticks: list[tuple[float, str]]  # x and hour label


def flow_series(rows: list[tuple[str, str, int]], now: datetime, hours: int = 24) -> list[Series]:
    """Per mailbox: messages per minute over the last ``hours``, summed in buckets of
    :data:`BUCKET_MINUTES` (the bar's height is the bucket's mean per minute)."""
    # The window ends with the current minute, included.
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - timedelta(hours=hours)
    buckets = hours * 60 // BUCKET_MINUTES
    per_box: dict[str, list[int]] = {}
    peaks: dict[str, int] = {}
    for mailbox, minute, count in rows:
        try:
            at = datetime.fromisoformat(minute + ":00+00:00")
        except ValueError:
            continue
        index = int((at - start).total_seconds() // 60) // BUCKET_MINUTES
        if 0 <= index < buckets:
            per_box.setdefault(mailbox, [0] * buckets)[index] += count
            peaks[mailbox] = max(peaks.get(mailbox, 0), count)
    plot_w, plot_h = WIDTH - LEFT, HEIGHT - BOTTOM
    width = plot_w / buckets
    ticks = []
    for h in range(0, hours + 1, 6):
        at = start + timedelta(hours=h)
        ticks.append((LEFT + h * 60 / BUCKET_MINUTES * width, at.strftime("%H:%M")))
    out = []
    for mailbox, counts in sorted(per_box.items()):
        top = max(counts) or 1
        bars = []
        for i, c in enumerate(counts):
            if not c:
                continue
            height = plot_h * c / top
            at = start + timedelta(minutes=i * BUCKET_MINUTES)
            label = f"{at:%H:%M} UTC: {c} message(s) in {BUCKET_MINUTES} min"
            bars.append(Bar(LEFT + i * width, plot_h - height, max(width - 1, 1), height, label))
        out.append(Series(mailbox, sum(counts), peaks[mailbox], bars, ticks))
    return out


def cause_bars(causes: dict[str, int]) -> list[Bar]:
    """Failures by cause as horizontal bars, the most frequent first."""
    top = max(causes.values(), default=0) or 1
    ordered = sorted(causes.items(), key=lambda kv: (-kv[1], kv[0]))
    row, label_w = 24, 220
    return [
        Bar(label_w, i * row + 4, (WIDTH - label_w - 60) * n / top, row - 8, f"{cause}: {n}")
        for i, (cause, n) in enumerate(ordered)
    ]
