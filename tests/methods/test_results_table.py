"""The CLI's per-set table (issue 23 item 12): the HANS-LO column only where a set has it, and the majority rate."""

from __future__ import annotations

from icldistill.report.console import results_table


def _agg(mean, **extra):
    return {"accuracy": {"mean": mean, "std": 0.0, "n_seeds": 1}, "n": 30, "majority_rate": {"mean": 0.4, "n_seeds": 1},
            **extra}


def test_the_ood_column_appears_only_with_a_hans_set_and_the_majority_rate_always():
    plain = results_table({"aggregate": {"test": _agg(0.5)}})
    assert "ood(HANS-LO)" not in plain and "majority" in plain and "0.400" in plain
    with_hans = results_table({"aggregate": {"test": _agg(0.5), "hans-lo": _agg(0.6, ood_accuracy={"mean": 0.55})}})
    assert "ood(HANS-LO)" in with_hans and "0.550" in with_hans
