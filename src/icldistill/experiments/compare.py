"""Paired comparison of two runs on the queries both scored: accuracy difference, bootstrap interval, McNemar.

Two methods evaluated on the same queries are compared query by query, not by their means: a paired
bootstrap (queries resampled together for both runs, and seeds resampled in pairs when there are
several) gives a 95% interval for the difference, and McNemar's exact test asks whether the queries
only one of them got right split evenly. This is what keeps a five-seed study from over-claiming
(issue 11). Reads ``predictions.jsonl`` files; numpy only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icldistill.config import DEFAULT_RESAMPLES  # the option's default, defined once (icld compare --resamples)
from icldistill.errors import IcldError
from icldistill.runtime.paths import PREDICTIONS_FILE
from icldistill.runtime.rundir import RunDir
from icldistill.scoring.bootstrap import bootstrap_interval

OOD_HEURISTIC = "lexical_overlap"


# ---------------------------------------------------------------------------------------------- statistics


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: under H0 the ``a_only + b_only`` discordant queries split 50/50.

    ``p = min(1, 2 * P(X <= min(a_only, b_only)))`` with ``X ~ Binomial(a_only + b_only, 1/2)``;
    1.0 when there is no discordant query.
    """
    if a_only < 0 or b_only < 0:
        raise ValueError("counts must be >= 0")
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))
    return min(1.0, 2.0 * tail / 2.0**n)


def _statistic(a: np.ndarray, b: np.ndarray, strata: np.ndarray | None) -> float:
    """Mean over seeds of the accuracy difference; with ``strata``, of the mean per-stratum difference.

    a, b (seeds, queries) 0/1; strata (queries,) class index of each query (balanced accuracy, as HANS's OOD).
    """
    diff = a.astype(np.float64) - b.astype(np.float64)
    if strata is None:
        return float(diff.mean())
    return float(np.mean([diff[:, strata == s].mean() for s in np.unique(strata)]))


def paired_bootstrap(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    *,
    strata: np.ndarray | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(difference, low, high): accuracy of A minus B and its 95% percentile interval.

    correct_a, correct_b: (seeds, queries) 0/1 arrays over the same queries, seeds paired by row.
    Each resample draws queries with replacement (the same draw for both runs and every seed; within
    each stratum when ``strata`` is given, so that a balanced accuracy keeps its class sizes) and,
    with more than one seed, seeds with replacement (pairs kept): the one bootstrap of
    :mod:`icldistill.scoring.bootstrap` on the per-query differences. Seeded: the same inputs and seed
    give the same interval.
    """
    a, b = np.atleast_2d(np.asarray(correct_a)), np.atleast_2d(np.asarray(correct_b))
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two non-empty arrays of one shape, got {a.shape} and {b.shape}")
    observed = _statistic(a, b, strata)
    diff = a.astype(np.float64) - b.astype(np.float64)
    low, high = bootstrap_interval(diff, strata=strata, resamples=resamples, seed=seed)
    return observed, low, high


# ---------------------------------------------------------------------------------------------- predictions


@dataclass
class Predictions:
    """One run's per-query answers: ``rows[(seed, eval set)][query id] = (gold, pred, row)``."""

    source: str
    rows: dict[tuple[int, str], dict[str, tuple[int, int, dict[str, Any]]]] = field(default_factory=dict)

    def eval_sets(self) -> list[str]:
        return sorted({name for _, name in self.rows})

    def seeds(self, eval_set: str) -> list[int]:
        return sorted(seed for seed, name in self.rows if name == eval_set)

    def standing_for(self, seeds: Iterable[int]) -> Predictions:
        """These answers, each set's first seed standing for every seed of ``seeds`` it lacks. Right only for
        a run whose answers do not depend on the seed: a zero-shot run (no demonstrations are drawn, every
        seed scores the same queries, greedy), so that a trained run's seeds all pair with it."""
        out = Predictions(self.source, dict(self.rows))
        wanted = list(seeds)
        for name in self.eval_sets():
            first = self.rows[(self.seeds(name)[0], name)]
            for seed in wanted:
                out.rows.setdefault((seed, name), first)
        return out


def _held_seeds(path: Path) -> set[int] | None:
    """The seeds a run directory's record holds (None for a bare file or a directory without a record)."""
    if not path.is_dir():
        return None
    record = RunDir(path).read()
    return None if record is None else {int(s) for s in record.seeds}


def _answer_of(row: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """(gold, pred, row) of a prediction row. A generation row (``exact_match``, no classes) counts as one
    class whose answer is right or wrong: gold 1, pred 1 when the extracted answer matched, so that accuracy
    is exact match and the paired bootstrap and McNemar test compare exact matches query by query."""
    if "gold" not in row and "exact_match" in row:
        return 1, int(float(row["exact_match"]) == 1.0), row
    return int(row["gold"]), int(row["pred"]), row


def read_predictions(paths: Iterable[str | Path], source: str | None = None) -> Predictions:
    """The rows of one or more ``predictions.jsonl`` files (a run directory or the file itself) as one run.

    Several files (the cells of a sweep that differ only in their seed) merge into one run; a
    (seed, evaluation set, query id) given twice is an error.
    """
    paths = [Path(p) for p in paths]
    out = Predictions(source or ", ".join(str(p) for p in paths))
    for path in paths:
        file = path / PREDICTIONS_FILE if path.is_dir() else path
        held = _held_seeds(path)
        if not file.is_file():
            raise IcldError(f"{file} does not exist: {path} is not a run with per-query predictions "
                            "(icld icl, pbft, distill and eval write predictions.jsonl; re-run older runs).")
        for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key, qid = (int(row.get("seed", 0)), str(row["eval"])), str(row["id"])
                answer = _answer_of(row)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise IcldError(f"{file}:{lineno}: not a prediction row ({exc}); each row needs seed, eval, id, "
                                "and gold and pred (classification) or exact_match (generation).") from None
            if held is not None and key[0] not in held:
                continue  # a seed the run's record does not hold (left by another run in the directory)
            per_set = out.rows.setdefault(key, {})
            if qid in per_set:
                raise IcldError(f"{file}:{lineno}: query {qid!r} of {key[1]} seed {key[0]} appears twice.")
            per_set[qid] = answer
    return out


# ---------------------------------------------------------------------------------------------- comparison


@dataclass
class PairedResult:
    """The paired comparison of runs A and B on one evaluation set (``metric``: accuracy, ood_accuracy or token_f1)."""

    eval: str
    metric: str
    seeds: list[int]
    queries: int
    accuracy_a: float
    accuracy_b: float
    difference: float
    ci95_low: float
    ci95_high: float
    a_only: int
    b_only: int
    mcnemar_p: float
    per_seed: list[dict[str, Any]]

    @property
    def distinguishable(self) -> bool:
        """False where the 95% interval covers 0."""
        return not (self.ci95_low <= 0.0 <= self.ci95_high)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "distinguishable": self.distinguishable}

    def sentence(self, digits: int = 3) -> str:
        """E.g. '+0.052 [95% CI +0.010, +0.094], McNemar p=0.02' or '... not distinguishable from 0'."""
        text = (f"{self.difference:+.{digits}f} [95% CI {self.ci95_low:+.{digits}f}, {self.ci95_high:+.{digits}f}; "
                f"paired over {self.queries} queries x {len(self.seeds)} seed{'s' * (len(self.seeds) != 1)}]")
        if not self.distinguishable:
            text += ", not distinguishable from 0"
        return text


def _common_queries(a: Predictions, b: Predictions, eval_set: str, seeds: Sequence[int],
                    ood: bool) -> list[str]:
    """Query ids every paired seed of both runs scored (HANS OOD: the lexical-overlap rows only)."""
    common: set[str] | None = None
    for seed in seeds:
        ids = set(a.rows[(seed, eval_set)]) & set(b.rows[(seed, eval_set)])
        common = ids if common is None else common & ids
    kept = sorted(common or ())
    if ood:
        first = a.rows[(seeds[0], eval_set)]
        kept = [q for q in kept if first[q][2].get("heuristic", OOD_HEURISTIC) == OOD_HEURISTIC]
    return kept


METRICS = ("accuracy", "ood_accuracy", "token_f1")


def _per_query(p: Predictions, eval_set: str, seeds: Sequence[int], ids: Sequence[str], metric: str) -> np.ndarray:
    """(seeds, queries): 0/1 correctness, or each generation row's token F1 for ``metric='token_f1'``."""
    if metric != "token_f1":
        return np.array([[p.rows[(s, eval_set)][q][1] == p.rows[(s, eval_set)][q][0] for q in ids] for s in seeds])
    try:
        return np.array([[float(p.rows[(s, eval_set)][q][2]["token_f1"]) for q in ids] for s in seeds])
    except (KeyError, TypeError, ValueError):
        raise IcldError(f"{p.source}: the predictions of {eval_set} have no token_f1 (only generation runs "
                        "score it).") from None


def compare_predictions(
    a: Predictions,
    b: Predictions,
    eval_set: str,
    *,
    metric: str = "accuracy",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PairedResult:
    """Compare A and B on ``eval_set`` over the seeds both have and the queries both scored.

    ``metric='ood_accuracy'`` is the mean of the per-label accuracies (on HANS: of the lexical-overlap
    rows), bootstrapped within each gold label; ``'accuracy'`` is plain accuracy (exact match for
    generation rows); ``'token_f1'`` (generation rows) the mean token F1, its discordant counts the queries
    where one run's F1 is higher, and its "McNemar" p the exact sign test on them (McNemar's test is the
    sign test of the discordant pairs).
    """
    if metric not in METRICS:
        raise IcldError(f"cannot compare on {metric!r}: choose one of {', '.join(METRICS)}.")
    seeds = sorted(set(a.seeds(eval_set)) & set(b.seeds(eval_set)))
    if not seeds:
        raise IcldError(f"{a.source} and {b.source} share no seed with predictions on {eval_set} "
                        f"(A: {a.eval_sets()} seeds {a.seeds(eval_set)}; "
                        f"B: {b.eval_sets()} seeds {b.seeds(eval_set)}).")
    ood = metric == "ood_accuracy"
    ids = _common_queries(a, b, eval_set, seeds, ood and eval_set.startswith("hans"))
    if not ids:
        raise IcldError(f"{a.source} and {b.source} scored no common query on {eval_set}.")
    ca, cb = (_per_query(p, eval_set, seeds, ids, metric) for p in (a, b))
    strata = np.array([a.rows[(seeds[0], eval_set)][q][0] for q in ids]) if ood else None
    diff, low, high = paired_bootstrap(ca, cb, strata=strata, resamples=resamples, seed=seed)

    def score(c: np.ndarray) -> float:
        return _statistic(c, np.zeros_like(c), strata)

    per_seed = []
    for i, s in enumerate(seeds):
        a_only, b_only = int((ca[i] > cb[i]).sum()), int((cb[i] > ca[i]).sum())
        per_seed.append({"seed": s, "accuracy_a": score(ca[i:i + 1]), "accuracy_b": score(cb[i:i + 1]),
                         "a_only": a_only, "b_only": b_only, "mcnemar_p": mcnemar_exact(a_only, b_only)})
    # Pooled over seeds: the discordant pairs of every seed (the same queries recur, so read it as a summary).
    a_only, b_only = sum(p["a_only"] for p in per_seed), sum(p["b_only"] for p in per_seed)
    return PairedResult(eval_set, metric, seeds, len(ids), score(ca), score(cb), diff, low, high,
                        a_only, b_only, mcnemar_exact(a_only, b_only), per_seed)


def _scores_f1(p: Predictions, eval_set: str) -> bool:
    """Whether every row of ``eval_set`` carries a token F1 (a generation run's rows do)."""
    return all("token_f1" in row for (_, name), per_set in p.rows.items() if name == eval_set
               for _, _, row in per_set.values())


def compare_runs(
    run_a: str | Path | Sequence[str | Path],
    run_b: str | Path | Sequence[str | Path],
    eval_sets: Sequence[str] | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> list[PairedResult]:
    """``icld compare``: each evaluation set both runs have (or ``eval_sets``), accuracy and, on HANS, OOD accuracy;
    for generation runs exact match and token F1."""
    def load(run: Any) -> Predictions:
        paths = [run] if isinstance(run, (str, Path)) else list(run)
        return read_predictions(paths, source=", ".join(str(p) for p in paths))

    a, b = load(run_a), load(run_b)
    names = list(eval_sets) if eval_sets else [n for n in a.eval_sets() if n in b.eval_sets()]
    if not names:
        raise IcldError(f"{a.source} ({', '.join(a.eval_sets()) or 'none'}) and {b.source} "
                        f"({', '.join(b.eval_sets()) or 'none'}) share no evaluation set.")
    results = []
    for name in names:
        results.append(compare_predictions(a, b, name, resamples=resamples, seed=seed))
        if _scores_f1(a, name) and _scores_f1(b, name):  # generation: exact match, then token F1
            results.append(compare_predictions(a, b, name, metric="token_f1", resamples=resamples, seed=seed))
        if name.startswith("hans"):
            results.append(compare_predictions(a, b, name, metric="ood_accuracy", resamples=resamples, seed=seed))
    return results


# ---------------------------------------------------------------------------------------------- sweeps

# What makes two runs one configuration (seeds aside): the pairing here and the rows of the report's table.
CONFIG_KEYS = ("task", "method", "model", "teacher", "student", "shots", "alpha", "peft", "pattern", "ce_target",
               "kl_space")
BASELINES = ("icl-student", "pbft", "pbft-teacher")
REPORT_RESAMPLES = 2_000  # per claim; the report makes several, and 2,000 pins a 95% interval to ~0.005


def config_key(row: Mapping[str, Any]) -> str:
    """One configuration (a row of the comparison table, or of ``collect``'s table without its seed) as text."""
    def plain(value: Any) -> Any:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return value.item() if hasattr(value, "item") else value

    return json.dumps([plain(row.get(k)) for k in CONFIG_KEYS])


def _cell_prediction_files(cell_dir: Path) -> list[Path]:
    """A cell's final evaluation and the sets evaluated later (``eval-<set>/``, see experiments.evaluate)."""
    files = [cell_dir / PREDICTIONS_FILE] + sorted(cell_dir.glob(f"eval-*/{PREDICTIONS_FILE}"))
    return [f for f in files if f.is_file()]


def sweep_paired(sweep_dir: str | Path, runs: Any, *, resamples: int = REPORT_RESAMPLES, seed: int = 0) -> Any:
    """Paired comparisons of each CD configuration with its baselines (ICL student, PBFT) at the same k.

    ``runs`` is :func:`icldistill.experiments.results.collect`'s table of the sweep. A baseline runs on
    the CD student's model and task; seeds pair by seed, queries by id. Returns a DataFrame, one row per
    (CD configuration, baseline configuration, evaluation set, metric): ``cd_key``, ``baseline_key``
    (:func:`config_key`), ``eval``, ``metric``, ``difference``, ``ci95_low``, ``ci95_high``, ``queries``,
    ``n_seeds``, ``a_only``, ``b_only``, ``mcnemar_p``, ``sentence``. Configurations without per-query
    predictions are left out.
    """
    import pandas as pd

    columns = ["cd_key", "baseline_key", "eval", "metric", "difference", "ci95_low", "ci95_high", "queries", "n_seeds",
               "a_only", "b_only", "mcnemar_p", "sentence"]
    done = runs[runs["status"] == "complete"] if len(runs) else runs
    cells: dict[str, list[Path]] = {}
    described: dict[str, dict[str, Any]] = {}
    for row in done.to_dict(orient="records"):
        key = config_key(row)
        cell = Path(sweep_dir) / "cells" / str(row["cell"])
        if cell not in cells.setdefault(key, []):
            cells[key].append(cell)
        described[key] = row
    loaded: dict[str, Predictions] = {}

    def predictions(key: str) -> Predictions | None:
        if key not in loaded:
            files = [f for c in cells[key] for f in _cell_prediction_files(c)]
            loaded[key] = read_predictions(files, source=key) if files else None
        return loaded[key]

    out = []
    for cd_key, cd in described.items():
        if cd["method"] != "distill":
            continue
        for base_key, base in described.items():
            on = cd["teacher"] if base["method"] == "pbft-teacher" else cd["student"]  # PBFT of the teacher's model
            if base["method"] not in BASELINES or base["task"] != cd["task"] or base["shots"] != cd["shots"] \
                    or base["model"] != on:
                continue
            a, b = predictions(cd_key), predictions(base_key)
            if a is None or b is None:
                continue
            for name in [n for n in a.eval_sets() if n in b.eval_sets()]:
                for metric in ("accuracy", "ood_accuracy") if name.startswith("hans") else ("accuracy",):
                    try:
                        r = compare_predictions(a, b, name, metric=metric, resamples=resamples, seed=seed)
                    except IcldError:  # no common seed or query: nothing to pair
                        continue
                    out.append([cd_key, base_key, name, metric, r.difference, r.ci95_low, r.ci95_high, r.queries,
                                len(r.seeds), r.a_only, r.b_only, r.mcnemar_p, r.sentence()])
    return pd.DataFrame(out, columns=columns)


def paired_lookup(paired: Any, cd_row: Mapping[str, Any], baseline_row: Mapping[str, Any], eval_set: str | None,
                  metric: str) -> dict[str, Any] | None:
    """The row of :func:`sweep_paired`'s table for two comparison-table rows, or None."""
    if paired is None or not len(paired) or not eval_set:
        return None
    hit = paired[(paired["cd_key"] == config_key(cd_row)) & (paired["baseline_key"] == config_key(baseline_row))
                 & (paired["eval"] == eval_set) & (paired["metric"] == metric)]
    return None if hit.empty else hit.iloc[0].to_dict()
