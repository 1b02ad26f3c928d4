"""The one bootstrap (scoring.bootstrap) gives, for the same inputs and seed, the intervals its two users gave
before they shared it: generation_metrics.mean_interval (one run's mean) and compare.paired_bootstrap (two runs'
paired difference), whatever the chunking of its resamples."""

from __future__ import annotations

from unittest import mock

import numpy as np
from hypothesis import given, settings, strategies as st

from icldistill.experiments.compare import paired_bootstrap
from icldistill.scoring import bootstrap
from icldistill.scoring.generation_metrics import mean_interval


def _mean_interval_before(values, *, resamples=2000, seed=0):
    """generation_metrics.mean_interval as it was (6164f16), verbatim."""
    array = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, array.size, (resamples, array.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _paired_interval_before(a, b, *, strata=None, resamples, seed):
    """compare.paired_bootstrap's interval as it was (6164f16), verbatim."""
    rng = np.random.default_rng(seed)
    n_seeds, n_queries = a.shape
    diff = a.astype(np.float64) - b.astype(np.float64)
    groups = [np.arange(n_queries)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    stats = np.empty(resamples)
    chunk = max(1, 2_000_000 // max(1, n_seeds * n_queries))
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        rows = rng.integers(0, n_seeds, (r, n_seeds)) if n_seeds > 1 else np.zeros((r, 1), dtype=np.int64)
        per_group = []
        for members in groups:
            cols = members[rng.integers(0, len(members), (r, len(members)))]
            per_group.append(diff[rows[:, :, None], cols[:, None, :]].mean(axis=(1, 2)))
        stats[start:start + r] = np.mean(per_group, axis=0)
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


# As shipped, and small enough to split the resamples into chunks (as 2,000 resamples of over 1,000 queries
# are): one seed's draws are one stream however they are chunked; mean_interval drew them unchunked.
cells = st.sampled_from([bootstrap.MAX_CELLS, 7, 1])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.integers(0, 2**32 - 1), st.integers(1, 300), cells)
def test_mean_interval_is_what_it_was(values, seed, resamples, max_cells):
    with mock.patch.object(bootstrap, "MAX_CELLS", max_cells):
        got = mean_interval(values, resamples=resamples, seed=seed)
    assert got == _mean_interval_before(values, resamples=resamples, seed=seed)


@st.composite
def paired(draw):
    seeds, queries = draw(st.integers(1, 4)), draw(st.integers(1, 30))
    grid = st.lists(st.lists(st.integers(0, 1), min_size=queries, max_size=queries), min_size=seeds, max_size=seeds)
    a, b = np.array(draw(grid)), np.array(draw(grid))
    strata = draw(st.none() | st.lists(st.integers(0, 2), min_size=queries, max_size=queries).map(np.array))
    return a, b, strata


@settings(max_examples=60, deadline=None)
@given(paired(), st.integers(0, 2**32 - 1), st.integers(1, 300))
def test_paired_bootstrap_is_what_it_was(case, seed, resamples):
    a, b, strata = case
    _, low, high = paired_bootstrap(a, b, strata=strata, resamples=resamples, seed=seed)
    assert (low, high) == _paired_interval_before(a, b, strata=strata, resamples=resamples, seed=seed)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 1), min_size=1, max_size=30), st.integers(0, 2**32 - 1))
def test_one_runs_interval_is_the_paired_interval_against_a_run_that_is_always_wrong(correct, seed):
    """The two uses are one question: a run's mean is its paired difference with an all-wrong run."""
    a = np.array([correct])
    _, low, high = paired_bootstrap(a, np.zeros_like(a), resamples=200, seed=seed)
    assert mean_interval(correct, resamples=200, seed=seed) == (low, high)
