"""Server-side SVG for the dashboard: messages per day over the last days, stacked by action.

Presentation attributes only (no style attribute, no script): the page's CSP stays strict.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from html import escape

COLOURS = {"accept": "#4caf50", "tag": "#ffb300", "quarantine": "#fb8c00", "reject": "#e53935",
           "tempfail": "#9e9e9e"}
LABELS = {"accept": "acceptés", "tag": "marqués suspects", "quarantine": "en quarantaine",
          "reject": "refusés", "tempfail": "refus temporaires"}


def tick_step(peak: int, most: int = 5) -> int:
    """A whole step of 1, 2 or 5 times a power of ten giving at most `most` intervals up to
    `peak`: gridlines on whole numbers of messages."""
    magnitude = 1
    while True:
        for m in (1, 2, 5):
            if -(-peak // (m * magnitude)) <= most:
                return m * magnitude
        magnitude *= 10


def daily_bars(rows: Iterable[tuple[str, str, str, str, int]], *, days: int = 30,
               now: float | None = None) -> str:
    now = time.time() if now is None else now
    day_keys = [time.strftime("%Y-%m-%d", time.localtime(now - (days - 1 - i) * 86400))
                for i in range(days)]
    per_day: dict[str, dict[str, int]] = {d: {} for d in day_keys}
    for day, _direction, action, _reason, n in rows:
        if day in per_day:
            per_day[day][action] = per_day[day].get(action, 0) + n
    peak = max((sum(v.values()) for v in per_day.values()), default=0) or 1
    step = tick_step(peak)
    top_value = -(-peak // step) * step  # the axis ends on a gridline at or above the peak
    width, height, left, bottom, top = 720, 220, 40, 30, 10
    bar = (width - left - 10) / days
    plot = height - bottom - top
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height + 30}" '
           f'role="img" aria-label="Messages par jour sur {days} jours" class="chart">']
    for value in range(0, top_value + 1, step):  # each label on its own gridline
        y = top + plot * (1 - value / top_value)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" '
                   f'stroke="#ddd"/><text x="{left - 6}" y="{y + 4:.1f}" font-size="11" '
                   f'text-anchor="end" fill="#555">{value}</text>')
    for i, day in enumerate(day_keys):
        x = left + i * bar
        y = top + plot
        counts = per_day[day]
        for action in COLOURS:
            n = counts.get(action, 0)
            if not n:
                continue
            h = plot * n / top_value
            y -= h
            out.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
                       f'fill="{COLOURS[action]}"><title>{escape(day)} : {n} '
                       f'{LABELS[action]}</title></rect>')
        if i % 5 == 0 or i == days - 1:
            out.append(f'<text x="{x + bar / 2:.1f}" y="{height - bottom + 16}" font-size="11" '
                       f'text-anchor="middle" fill="#555">{escape(day[8:10] + "/" + day[5:7])}'
                       f'</text>')
    lx = left
    for action, colour in COLOURS.items():
        out.append(f'<rect x="{lx}" y="{height + 8}" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{lx + 16}" y="{height + 18}" font-size="12" fill="#333">'
                   f'{LABELS[action]}</text>')
        lx += 20 + 8 * len(LABELS[action])
    out.append("</svg>")
    return "".join(out)
