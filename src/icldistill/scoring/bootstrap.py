"""The percentile bootstrap behind every interval icld reports (numpy only).

One function for both of its uses: the interval of one run's mean (exact match, token F1 over queries:
:func:`icldistill.scoring.generation_metrics.mean_interval`) and of two runs' paired difference
(``experiments.compare.paired_bootstrap`` passes the per-query differences). Resampling queries, and seeds
when there are several, is the same question in both.
"""

from __future__ import annotations

import numpy as np

# Values gathered per vectorised step (bounds memory). Part of the results: with several seeds or strata
# the chunks interleave the draws of seeds and queries, so another value gives other intervals. With one
# seed and no strata the draws are one stream however they are chunked (mean_interval drew them unchunked).
MAX_CELLS = 2_000_000


def bootstrap_interval(values: np.ndarray, *, resamples: int, seed: int,
                       strata: np.ndarray | None = None) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values``, by resampling its queries (and seeds).

    values: (seeds, queries), or (queries,) for one seed. Each resample draws queries with replacement
    (one draw for every seed; within each stratum when ``strata``, (queries,), is given, the statistic
    then being the mean of the per-stratum means, so that a balanced accuracy keeps its class sizes)
    and, with more than one seed, seeds with replacement. Seeded: the same inputs and seed give the same
    interval.
    """
    data = np.atleast_2d(np.asarray(values, dtype=np.float64))
    if data.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    n_seeds, n_queries = data.shape
    groups = [np.arange(n_queries)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    stats = np.empty(resamples)
    chunk = max(1, MAX_CELLS // max(1, n_seeds * n_queries))  # resamples per vectorised step
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        rows = rng.integers(0, n_seeds, (r, n_seeds)) if n_seeds > 1 else np.zeros((r, 1), dtype=np.int64)
        per_group = []
        for members in groups:
            cols = members[rng.integers(0, len(members), (r, len(members)))]
            per_group.append(data[rows[:, :, None], cols[:, None, :]].mean(axis=(1, 2)))
        stats[start:start + r] = np.mean(per_group, axis=0)
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)
