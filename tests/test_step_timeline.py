"""experiments/step_timeline.py's summary of one step's spans: busy time is the union of a
category's spans, gaps are what its stream left idle between them."""
from __future__ import annotations

import pytest

from experiments.step_timeline import merged, summarize


def test_merged_is_the_union_of_overlapping_and_touching_spans():
    assert merged([(5.0, 7.0), (0.0, 2.0), (1.0, 3.0), (3.0, 4.0), (9.0, 9.5)]) == [(0.0, 4.0), (5.0, 7.0), (9.0, 9.5)]


def test_summary_busy_time_and_largest_gaps():
    spans = [("compute", 10.0, 12.0), ("compute", 11.0, 13.0), ("compute", 20.0, 21.0), ("compute", 21.5, 22.0),
             ("weight_io", 10.5, 18.0)]
    report = summarize(spans, top=2)
    assert report["step_ms"] == pytest.approx(12.0)
    comp = report["categories"]["compute"]
    assert comp["busy_ms"] == pytest.approx(3.0 + 1.0 + 0.5)
    assert comp["spans"] == 4
    assert comp["largest_gaps_ms"] == [(3.0, 7.0), (11.0, 0.5)]  # (start from the step's first span, length)
    w = report["categories"]["weight_io"]
    assert (w["busy_ms"], w["first_ms"], w["last_ms"], w["largest_gaps_ms"]) == (7.5, 0.5, 8.0, [])
