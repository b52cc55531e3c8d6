"""Small SVG charts drawn by pymta (the dashboard loads nothing from elsewhere)."""

from __future__ import annotations

from html import escape

COLOURS = ("#2b7bb9", "#e0a020", "#c8372d", "#3a9d5d", "#8a5cc2", "#6b6b6b", "#d35f9b", "#1aa3a3")


def line_chart(
    title: str,
    series: dict[str, list[tuple[int, float]]],
    since: int,
    until: int,
    width: int = 640,
    height: int = 180,
) -> str:
    """One polyline per series over [since, until); every point with a value > 0 is also a circle
    (class ``pt``, ``data-series``, ``data-v``) so a reader (or a test) can find the data drawn."""
    left, right, top, bottom = 48, 10, 22, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max((v for points in series.values() for _, v in points), default=0.0) or 1.0
    span = max(1, until - since)

    def xy(t: int, v: float) -> tuple[float, float]:
        return left + plot_w * (t - since) / span, top + plot_h * (1 - v / peak)

    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(title)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{left}" y="14" font-size="12" font-weight="bold">{escape(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#999"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#999"/>',
        f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end">{_num(peak)}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" font-size="10" text-anchor="end">0</text>',
    ]
    for i, (name, points) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(t, v) for t, v in points))
        if coords:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        for t, v in points:
            if v > 0:
                x, y = xy(t, v)
                parts.append(f'<circle class="pt" data-series="{escape(name)}" data-t="{t}" data-v="{_num(v)}" '
                             f'cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="{colour}"/>')  # fmt: skip
        parts.append(f'<text x="{left + 6 + 120 * i}" y="{height - 6}" font-size="10" fill="{colour}">'
                     f'{escape(name)}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def bar(value: float | None, threshold: float | None, width: int = 160, height: int = 12) -> str:
    """A rate as a bar against its threshold (red when over), the threshold as a vertical mark."""
    scale = max(value or 0.0, (threshold or 0.0) * 1.5, 1e-9)
    w = width * (value or 0.0) / scale
    over = threshold is not None and value is not None and value > threshold
    out = [f'<svg class="rate" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
           f'<rect width="{width}" height="{height}" fill="#eee"/>',
           f'<rect width="{w:.1f}" height="{height}" fill="{"#c8372d" if over else "#3a9d5d"}"/>']  # fmt: skip
    if threshold is not None:
        x = width * threshold / scale
        out.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height}" stroke="#000" stroke-width="1.5"/>')
    out.append("</svg>")
    return "".join(out)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.3g}"
