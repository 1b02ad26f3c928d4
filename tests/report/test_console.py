"""One number format for every table (issue 19: three copies disagreed on the missing-value mark)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from icldistill.report.console import MISSING, fmt, format_table, results_table


@pytest.mark.parametrize("missing", [None, float("nan"), np.float32("nan"), {"mean": None}, {"mean": float("nan")}])
def test_every_kind_of_missing_value_has_the_one_mark(missing):
    assert fmt(missing) == MISSING and fmt(missing, 2) == MISSING


@pytest.mark.parametrize(("value", "digits", "text"), [
    (0.81234, 3, "0.812"), (1234.5, 0, "1,234"), (1e-05, None, "1e-05"), (0.8125, None, "0.8125"),
    (12.34, None, "12.3"), (1234.5, None, "1,234"), (7, None, "7"), ("lora", None, "lora"), (True, None, "True"),
    ({"mean": 0.5, "std": 0.1, "n_seeds": 2}, None, "0.500±0.100"),
    ({"mean": 0.5, "std": 0.0, "n_seeds": 1}, 2, "0.50"),
])
def test_values(value, digits, text):
    assert fmt(value, digits) == text


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12), st.integers(0, 6))
def test_fixed_digits_round_trip(value, digits):
    """With digits the cell reads back as the value rounded to them (thousands separators aside)."""
    shown = fmt(value, digits)
    assert math.isclose(float(shown.replace(",", "")), round(value, digits), abs_tol=10 ** -digits)


@given(st.floats(min_value=1e-9, max_value=9.99, allow_nan=False))
def test_small_values_keep_four_significant_digits(value):
    """A learning rate of 3e-06 must not read 0.00 in the tuning report."""
    assert float(fmt(value)) == pytest.approx(value, rel=1e-3)


def test_tables_align_and_a_run_table_shows_missing_metrics():
    table = format_table([["a", "bb"], ["ccc", "d"]]).splitlines()
    assert table == ["a    bb", "---  --", "ccc  d "]
    record = {"aggregate": {"mnli-m": {"n": {"mean": 200.0, "std": 0.0, "n_seeds": 2},
                                       "accuracy": {"mean": 0.71, "std": 0.02, "n_seeds": 2}}}}
    row = results_table(record).splitlines()[2].split()
    assert row[:2] == ["mnli-m", "200±0"] and "0.710±0.020" in row and row.count(MISSING) == 6
