"""The benchmark charts are drawn from the result tables as they are."""

from __future__ import annotations

from pathlib import Path

from benchmarks import charts

TABLE = """
Intro text.

| scenario | variant | verified | msgs/s | MB/s |
|---|---|---|---|---|
| big | ours | yes | 1,200 | 3.0 |
| big | peer | NO: timeout | 300 | 1.0 |
| small | ours | yes | 50.5 | 0.1 |
| small | peer | yes | - | 0.1 |

| other | table |
|---|---|
| a | b |
"""


def test_parse_tables_splits_tables_and_drops_rules() -> None:
    tables = charts.parse_tables(TABLE)
    assert len(tables) == 2
    assert tables[0][0] == ["scenario", "variant", "verified", "msgs/s", "MB/s"]
    assert len(tables[0]) == 5


def test_chart_uses_first_metric_groups_by_scenario_and_marks_unverified(tmp_path: Path) -> None:
    (tmp_path / "part.md").write_text(TABLE, encoding="utf-8")
    out = tmp_path / "out"
    written = charts.write_charts(out, results=tmp_path)
    assert written == [out / "part.svg"]
    svg = written[0].read_text(encoding="utf-8")
    assert svg.startswith("<svg")
    assert "msgs/s (higher is better)" in svg
    assert ">1,200<" in svg and ">50.5<" in svg
    assert "peer (not verified)" in svg
    assert svg.count("<rect") == 1 + 3  # background + three numeric bars ("-" is skipped)


def test_every_committed_result_file_has_a_chart(tmp_path: Path) -> None:
    results = Path(charts.RESULTS)
    written = {p.stem for p in charts.write_charts(tmp_path)}
    assert written == {p.stem for p in results.glob("*.md")}
