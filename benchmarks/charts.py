"""Draw bar charts (SVG) from the result tables in ``benchmarks/results/*.md``.

``python -m benchmarks.charts OUT_DIR`` writes one ``<part>.svg`` per results file
that has a table with a ``variant`` column and a metric column (msgs/s, MB/s,
server CPU, time). The docs build calls :func:`write_charts` so the benchmarks page
always shows the committed numbers; nothing here runs a benchmark.
"""

from __future__ import annotations

import html
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Chart", "parse_tables", "render_svg", "write_charts"]

RESULTS = Path(__file__).resolve().parent / "results"

#: Metric columns, in order of preference, and whether more is better.
METRICS: tuple[tuple[str, bool], ...] = (
    ("msgs/s", True),
    ("MB/s", True),
    ("server CPU s (hold)", False),
    ("time ms", False),
    ("detection max s", False),
)

_NUMBER = re.compile(r"^-?[\d,]*\.?\d+$")


@dataclass
class Chart:
    """One chart: a metric, and per group (scenario) the (variant, value) bars."""

    title: str
    metric: str
    higher_is_better: bool
    groups: dict[str, list[tuple[str, float]]]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in ``text`` as a list of rows (header first) of cells."""
    tables: list[list[list[str]]] = []
    rows: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            cells = _cells(line)
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def _chart_of(title: str, table: list[list[str]]) -> Chart | None:
    header = table[0]
    if "variant" not in header:
        return None
    found = next(((m, h) for m, h in METRICS if m in header), None)
    if found is None:
        return None
    metric, higher = found
    vi, mi = header.index("variant"), header.index(metric)
    groups: dict[str, list[tuple[str, float]]] = {}
    for row in table[1:]:
        if len(row) != len(header):
            continue
        value = row[mi].replace(",", "")
        if not _NUMBER.match(value):
            continue
        verified = row[header.index("verified")] if "verified" in header else "yes"
        label = row[vi] + ("" if verified == "yes" else " (not verified)")
        group = " · ".join(
            f"{h} {c}" if h in {"processes", "clients"} else c
            for h, c in zip(header[:vi], row[:vi], strict=True)
        )
        groups.setdefault(group or metric, []).append((label, float(value)))
    return Chart(title, metric, higher, groups) if groups else None


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def render_svg(chart: Chart, width: int = 760) -> str:
    """A self-contained SVG of horizontal bars, one block per group, ours highlighted."""
    bar, gap, label_w = 16, 4, 230
    y = 34
    parts: list[str] = []
    for group, bars in chart.groups.items():
        parts.append(f'<text x="4" y="{y}" font-weight="bold">{html.escape(group)}</text>')
        y += 8
        top = max(v for _, v in bars) or 1.0
        for label, value in bars:
            w = max(1.0, (width - label_w - 110) * value / top)
            ours = label.startswith(("ours", "longconn"))
            fill = "#d9480f" if ours else "#868e96"
            parts.append(
                f'<text x="{label_w - 6}" y="{y + bar - 4}" text-anchor="end">{html.escape(label)}</text>'
                f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar}" fill="{fill}"/>'
                f'<text x="{label_w + w + 6:.1f}" y="{y + bar - 4}">{_fmt(value)}</text>'
            )
            y += bar + gap
        y += 18
    better = "higher is better" if chart.higher_is_better else "lower is better"
    head = f"{html.escape(chart.title)} — {html.escape(chart.metric)} ({better})"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" '
        f'font-family="sans-serif" font-size="12">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<text x="4" y="16" font-size="14" font-weight="bold">{head}</text>'
        + "".join(parts)
        + "</svg>\n"
    )


def write_charts(out_dir: Path, results: Path = RESULTS) -> list[Path]:
    """Write ``<part>.svg`` for every results file with a chartable table; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for md in sorted(results.glob("*.md")):
        for table in parse_tables(md.read_text(encoding="utf-8")):
            chart = _chart_of(md.stem, table)
            if chart is not None:
                path = out_dir / f"{md.stem}.svg"
                path.write_text(render_svg(chart), encoding="utf-8")
                written.append(path)
                break
    return written


if __name__ == "__main__":
    for p in write_charts(Path(sys.argv[1] if len(sys.argv) > 1 else "charts")):
        print(p)
