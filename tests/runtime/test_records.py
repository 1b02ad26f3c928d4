"""A resumed section's cost: what the attempts cost together."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from icldistill.runtime.records import over_attempts


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e5), st.floats(0, 1e6)), min_size=1, max_size=5))
def test_a_cost_over_attempts_adds_the_times_and_keeps_the_largest_peak(attempts):
    """However a training is split by resumes, its record's cost is that of all its attempts together."""
    cost = None
    for wall, peak in attempts:
        cost = over_attempts(cost, wall, peak)
    assert cost["wall_time_s"] == pytest.approx(sum(w for w, _ in attempts))
    assert cost["peak_memory_mb"] == max(p for _, p in attempts)
