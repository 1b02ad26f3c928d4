"""Hyperparameter search with Optuna: a study over a tuning file's search space, on the dev split only.

A tuning file is an experiment file for one training method (``distill`` or ``pbft``) with a
``search:`` space (:mod:`icldistill.experiments.search`) instead of a ``grid:``, and a ``tune:``
block (trials, timeout, objective, sampler seed). Each trial is a run with the usual layout and
``results.json`` under ``trials/trial-NNNN``, trained on the first of the file's seeds and scored on
the dev split only (``dev_queries`` rows of the train split): the evaluation sets are never looked at
while tuning. Bad trials are pruned from their per-epoch dev metric (median pruner).

The study lives in Optuna's RDB storage, an SQLite file ``study.db`` in the output directory by
default (``--storage`` takes any database URL, e.g. PostgreSQL, for workers on several machines):
a killed ``tune`` resumes, and several ``icld tune`` processes share one study. Workers heart-beat
their running trial; a trial whose worker died is failed after a grace period and retried with the
same parameters (``RetryHeartbeatStaleTrialCallback``), in its own directory, resuming from its checkpoint.
A worker may die at any moment, also between a trial's creation and its first heartbeat (Optuna never
fails such a trial: :func:`_beat_orphans` gives it one) or between its creation and its parameter draw
(its retry draws them, seeded as the trial it retries: :func:`draw_index`).
A file lock around "count the trials, start one" makes the workers stop at exactly the requested
number of finished (complete or pruned) trials.

At the end :func:`finish` re-trains the best configuration and the untuned defaults with all the
file's seeds, evaluates both once on the evaluation sets, and writes the tuning report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icldistill.config import load_yaml, to_dict
from icldistill.errors import IcldError
from icldistill.experiments.grid import METHODS, ExperimentError, expand
from icldistill.experiments.search import SearchSpace, parse_search_space
from icldistill.methods.registry import METHODS as COMMANDS, TRAINED
from icldistill.runtime.records import atomic_write_json, read_json

logger = logging.getLogger(__name__)

# The trained methods of the registry that experiment grids can run (trials are expanded through the grid).
TUNABLE_METHODS = tuple(sorted(name for name in TRAINED if name in METHODS))
# objective name -> (optimisation direction, key of a dev history entry)
OBJECTIVES = {"dev_accuracy": ("maximize", "dev_accuracy"), "dev_loss": ("minimize", "dev_loss")}
STUDY_FILE = "study.db"
PLAN_FILE = "tune.json"
TRIALS_DIR = "trials"
LOCK_FILE = "tune.lock"
FINAL_RUNS = ("best", "defaults")  # directories of the final re-training, under the output directory
MAX_CONSECUTIVE_FAILURES = 3


@dataclass(frozen=True)
class TuneSettings:
    """The ``tune:`` block: how long to search and for what."""

    trials: int = 20
    timeout_s: float | None = None  # this worker starts no new trial after this many seconds
    objective: str = "dev_accuracy"
    seed: int = 0  # the TPE sampler's seed: the same study, the same trial parameters
    heartbeat_s: float = 10.0  # a running trial's heartbeat; its worker counts as dead after 3x this
    startup_trials: int = 5  # TPE's random start, and the trials the pruner waits for before pruning

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective][0]


@dataclass
class TuningPlan:
    """A checked tuning file: the method, its fixed options, the search space and the settings."""

    name: str
    source: str
    output_dir: Path
    method: str
    base: dict[str, Any]  # options every trial shares (parsed), without seeds / output_dir
    seeds: list[int]  # the final re-training's seeds; trials use seeds[0]
    space: SearchSpace
    settings: TuneSettings
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{self.output_dir / STUDY_FILE}"

    def options_class(self) -> type:
        return METHODS[self.method].options

    def config(self, params: Mapping[str, Any], output_dir: Path, seeds: list[int]) -> Any:
        """The options of one run: the fixed options, the given parameters, these seeds and directory."""
        from icldistill.config import build_config

        values = {**self.base, **params, "seeds": seeds, "output_dir": str(output_dir), "resume": True}
        return build_config(self.options_class(), values, source=f"{self.source} (trial)")


_TUNE_KEYS = {f.name for f in dataclasses.fields(TuneSettings)}


def load_tuning(path: str | Path, *, output_dir: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> TuningPlan:
    """Read and check a tuning file; every problem (search space, tune block, options) is listed at once."""
    path = Path(path)
    spec = load_yaml(path)
    return plan_from_spec(spec, source=str(path), default_name=path.stem, output_dir=output_dir, overrides=overrides)


def plan_from_spec(spec: Mapping[str, Any], *, source: str, default_name: str = "tune",
                   output_dir: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TuningPlan:
    problems: list[str] = []
    spec = dict(spec)
    search = spec.pop("search", None)
    tune_block = spec.pop("tune", None) or {}
    if "grid" in spec:
        problems.append("a tuning file has 'search:' instead of 'grid:' (use `icld sweep` for grids).")
        spec.pop("grid")
    method = spec.get("method")
    if isinstance(method, list):
        method = method[0] if len(method) == 1 else method
    if method not in TUNABLE_METHODS:
        problems.append(f"'method' must be one of {', '.join(TUNABLE_METHODS)} (the trained methods), got {method!r}.")
        method = "distill"
    spec["method"] = method
    settings = _settings(tune_block, overrides or {}, problems)
    space, space_problems = parse_search_space(search, METHODS[method].options, source=source)
    problems += space_problems
    for name in space.names:
        if name in spec:
            problems.append(f"'{name}' is both fixed at the top level and searched; keep one.")
    # The fixed options are checked the way a sweep checks them: one cell, the first seed.
    experiment = None
    try:
        experiment = expand({k: v for k, v in spec.items() if k not in space.names}, source=source,
                            default_name=default_name, output_dir=output_dir)
    except ExperimentError as exc:
        problems += exc.problems
    if experiment is not None and len(experiment.cells) != len(_seeds(spec)):
        problems.append("a tuning file fixes every option but the searched ones: no lists at the top level.")
    if problems:
        raise ExperimentError(source, problems)
    assert experiment is not None
    config = experiment.cells[0].config
    if getattr(config, "dev_queries", 0) < 1:
        raise ExperimentError(source, ["tuning needs a dev split: set 'dev_queries' (e.g. 64); the evaluation sets "
                                       "are never used to choose parameters."])
    base = {k: v for k, v in to_dict(config).items() if k not in ("seeds", "output_dir", "resume")}
    for name in space.names:
        base.pop(name, None)
    return TuningPlan(experiment.name, source, experiment.output_dir, method, base, _seeds(spec), space, settings,
                      dict(spec))


def _seeds(spec: Mapping[str, Any]) -> list[int]:
    seeds = spec.get("seeds", spec.get("seed", [0]))
    return [int(s) for s in (seeds if isinstance(seeds, list) else [seeds])]


def _settings(block: Any, overrides: Mapping[str, Any], problems: list[str]) -> TuneSettings:
    if not isinstance(block, Mapping):
        problems.append(f"'tune' must be a mapping (trials, timeout_s, objective, seed, ...), not {block!r}.")
        return TuneSettings()
    given = {**block, **{k: v for k, v in overrides.items() if v is not None}}
    values = {str(k).replace("-", "_"): v for k, v in given.items()}
    if "timeout" in values:
        values["timeout_s"] = values.pop("timeout")
    unknown = set(values) - _TUNE_KEYS
    if unknown:
        problems.append(f"'tune': unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_TUNE_KEYS))}.")
        return TuneSettings()
    try:
        settings = TuneSettings(**{k: _typed(k, v) for k, v in values.items()})
    except (TypeError, ValueError) as exc:
        problems.append(f"'tune': {exc}")
        return TuneSettings()
    if settings.objective not in OBJECTIVES:
        problems.append(f"'tune' objective {settings.objective!r}: choose {' or '.join(OBJECTIVES)}.")
    if settings.trials < 1:
        problems.append(f"'tune' trials must be >= 1, got {settings.trials}.")
    if settings.timeout_s is not None and settings.timeout_s <= 0:
        problems.append(f"'tune' timeout_s must be > 0 seconds, got {settings.timeout_s}.")
    if settings.heartbeat_s <= 0:
        problems.append(f"'tune' heartbeat_s must be > 0 seconds, got {settings.heartbeat_s}.")
    return settings


def _typed(key: str, value: Any) -> Any:
    kinds = {"trials": int, "seed": int, "startup_trials": int, "timeout_s": float, "heartbeat_s": float,
             "objective": str}
    if value is None and key == "timeout_s":
        return None
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number, not {value!r}")
    try:
        return kinds[key](value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be {kinds[key].__name__}, not {value!r}") from None


# ---------------------------------------------------------------------------------------------- the study


def _optuna():
    try:
        import optuna
    except ImportError:  # a core dependency; only a broken install lacks it
        raise IcldError("icld tune needs optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats and retries are marked experimental (since Optuna 2.8); they are what resuming relies on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_study(plan: TuningPlan, storage: str | None = None) -> Any:
    """The plan's study (created on first use), with heartbeats and retries of trials whose worker died."""
    optuna = _optuna()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    plan.output_dir.mkdir(parents=True, exist_ok=True)
    url = storage or plan.storage_url
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    pruner = optuna.pruners.MedianPruner(n_startup_trials=plan.settings.startup_trials, n_warmup_steps=0)
    # Workers starting together would race to create the storage's tables and the study.
    with _TrialSlot(plan.output_dir / LOCK_FILE):
        rdb = _storage(lambda: RDBStorage(url, engine_kwargs=engine,
                                          heartbeat_interval=max(1, int(plan.settings.heartbeat_s)),
                                          grace_period=max(3, int(3 * plan.settings.heartbeat_s)),
                                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2)))
        return optuna.create_study(study_name=plan.name, storage=rdb, sampler=sampler_for(plan, 0), pruner=pruner,
                                   direction=plan.settings.direction, load_if_exists=True)


def _storage(make: Callable[[], Any], attempts: int = 5) -> Any:
    """``make()`` an RDB storage, again if another process was creating the same database's tables.

    The workers of one study take the study lock for this, but a reader does not (``icld results`` on a
    running study, a test polling it, optuna-dashboard): opening a storage whose schema is half made
    fails in one of the two with a unique-constraint or locked-database error, and succeeds once the
    other has finished."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(attempts - 1):
        try:
            return make()
        except (IntegrityError, OperationalError):
            time.sleep(0.5 * (attempt + 1))
    return make()  # the last attempt's error is the caller's


def load_study(directory: str | Path) -> Any:
    """The study of the tuning directory ``directory``, for reading (results, reports)."""
    meta = read_json(Path(directory) / PLAN_FILE)
    optuna = _optuna()
    from optuna.storages import RDBStorage

    storage = _storage(lambda: RDBStorage(meta["storage"]))
    return optuna.load_study(study_name=meta["name"], storage=storage)


def sampler_for(plan: TuningPlan, draw: int) -> Any:
    """The TPE sampler of the study's ``draw``-th parameter draw (:func:`draw_index`), seeded by (seed, draw).

    A sampler seeded once per process would repeat its random start after a resume or in a second
    worker (each would draw trial 0's parameters again); seeding per draw keeps a study's parameters
    a function of its seed and its history, whoever runs the trial."""
    optuna = _optuna()
    return optuna.samplers.TPESampler(seed=plan.settings.seed * 1_000_003 + draw,
                                      n_startup_trials=plan.settings.startup_trials)


def draw_index(trials: list[Any], number: int) -> int:
    """Which draw of the study trial ``number`` makes: the count of first attempts (trials that retry none)
    numbered before its first attempt.

    A retry draws as the trial it retries (the one that died before its draw, or part-way through it,
    drew nothing that another trial drew), and retries are not counted, so a kill neither gives two
    trials one seed nor shifts the seeds of the trials after it: in the random start, a killed and
    resumed study draws the parameters of the uninterrupted one. Seeding by the trial's own number
    did both: the retry of trial n, numbered m, drew with seed m, and so did the next new trial m."""
    first = _first_attempt(trials, number)
    return sum(1 for t in trials if t.number < first and _retried(t) is None)


HEARTBEAT_MARK = "icldistill:heartbeat"  # system attr: the number of the trial whose heartbeat is recorded


def _beat(storage: Any, trial: Any) -> None:
    """Record ``trial``'s heartbeat now and mark it as recorded (the mark holds the trial's number, as a
    retry inherits its failed trial's system attributes)."""
    storage.record_heartbeat(trial._trial_id)
    storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_MARK, trial.number)


def _beat_orphans(study: Any) -> None:
    """Give one heartbeat to each running trial that has none on record, so that it can go stale.

    Optuna records a trial's first heartbeat from a thread started after the trial is created, and
    never fails a running trial without one: a worker killed in between would leave a trial running
    for ever (the study then waits for it, one trial short). Every worker marks its own trial as soon
    as its objective starts; an unmarked one is either dead (it goes stale one grace period after this
    heartbeat, and is retried) or alive (its own thread keeps beating; this one costs nothing)."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.system_attrs.get(HEARTBEAT_MARK) != trial.number:
            _beat(study._storage, trial)


@dataclass
class TuneEvent:
    """Progress of a study, for the CLI: a trial started or ended, with the study's state then."""

    kind: str  # "start", "trial_start", "trial_end", "wait"
    trial: int | None
    finished: int
    total: int
    value: float | None = None
    state: str = ""
    best_value: float | None = None
    best_trial: int | None = None
    elapsed_s: float = 0.0
    remaining_s: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def trial_dir(plan: TuningPlan, number: int) -> Path:
    return plan.output_dir / TRIALS_DIR / f"trial-{number:04d}"


def objective_value(record: Mapping[str, Any], plan: TuningPlan) -> tuple[float, list[tuple[int, float]]]:
    """A trial's objective (the selected state's dev metric) and its per-evaluation curve (step, value)."""
    key = OBJECTIVES[plan.settings.objective][1]
    seed_record = next(iter(record["seeds"].values()))
    value = selected_dev_value(seed_record, key)
    if value is None:
        raise IcldError(f"trial record has no '{key}' in its history: is the dev split empty?")
    history = [h for h in seed_record.get("history", []) if h.get(key) is not None]
    return value, [(int(h["step"]), float(h[key])) for h in history]


def selected_dev_value(seed_record: Mapping[str, Any], key: str) -> float | None:
    """A seed's dev metric ``key`` at the state it kept (``selected``), else at its last dev evaluation."""
    history = [h for h in seed_record.get("history", []) if h.get(key) is not None]
    if not history:
        return None
    selected = seed_record.get("selected") or {}
    chosen = next((h for h in history if h.get("step") == selected.get("step")), history[-1])
    return float(chosen[key])


def run_trial_config(method: str, config: Any, *, on_evaluate: Callable[[int, Mapping[str, Any]], None] | None,
                     score_eval_sets: bool, progress: bool) -> dict[str, Any]:
    """One run of the tuned method; trials score only the dev split (``score_eval_sets=False``)."""
    return COMMANDS[method](config, progress=progress, on_evaluate=on_evaluate, score_eval_sets=score_eval_sets)


def _one_trial(plan: TuningPlan, slot: _TrialSlot, ran: dict[str, Any], emit: Callable[[TuneEvent], None],
               done: int, total: int, progress: bool) -> Callable[[Any], float]:
    """Optuna's objective for this worker's next trial, bound to this pass of the loop: it frees the slot
    once the trial exists, and leaves the trial's number (and error, if it fails) in ``ran``."""

    def objective(trial: Any) -> float:
        _beat(trial.storage, trial)  # before the slot opens, so that no unmarked trial of a live worker is seen
        slot.release()  # the trial exists (RUNNING) now, so the other workers count it
        ran["number"] = trial.number
        try:
            return _objective(plan, trial, emit, done, total, progress)
        except IcldError as exc:
            ran["error"] = str(exc)
            raise

    return objective


def run_study(plan: TuningPlan, *, storage: str | None = None, on_event: Callable[[TuneEvent], None] | None = None,
              progress: bool = False) -> Any:
    """Run trials until the study holds ``plan.settings.trials`` finished ones (or this worker's timeout)."""
    optuna = _optuna()
    from optuna.trial import TrialState

    plan.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan.output_dir / PLAN_FILE, {
        "name": plan.name, "source": plan.source, "method": plan.method, "seeds": plan.seeds,
        "search": [d.describe() for d in plan.space.dimensions], "settings": dataclasses.asdict(plan.settings),
        "storage": storage or plan.storage_url, "spec": plan.spec})
    study = open_study(plan, storage)
    total = plan.settings.trials
    emit = on_event or (lambda event: None)
    started = time.monotonic()
    durations: list[float] = []
    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)

    def counts() -> tuple[int, int]:
        trials = study.get_trials(deepcopy=False)
        return (sum(t.state in finished_states for t in trials), sum(t.state == TrialState.RUNNING for t in trials))

    emit(TuneEvent("start", None, counts()[0], total))
    failures = 0
    while plan.settings.timeout_s is None or time.monotonic() - started < plan.settings.timeout_s:
        ran: dict[str, Any] = {}
        with _TrialSlot(plan.output_dir / LOCK_FILE) as slot:
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed now, retried by the callback
            _beat_orphans(study)  # a worker killed before its trial's first heartbeat: failed later
            done, running = counts()
            if done >= total:
                break
            if done + running >= total:  # the rest run elsewhere: wait for them (or for them to go stale)
                slot.release()
                emit(TuneEvent("wait", None, done, total))
                time.sleep(max(1.0, plan.settings.heartbeat_s))
                continue
            t0 = time.monotonic()
            objective = _one_trial(plan, slot, ran, emit, done, total, progress)
            study.optimize(objective, n_trials=1, catch=(IcldError,))
        durations.append(time.monotonic() - t0)
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == ran.get("number")), None)
        if trial is None:
            continue
        failures = failures + 1 if trial.state == TrialState.FAIL else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            raise IcldError(f"{failures} trials in a row failed; the last, trial {trial.number}: {ran.get('error')} "
                            "Fix the tuning file and run `icld tune` again: finished trials are kept.")
        done_now = counts()[0]
        best_value, best_number = _best(study)
        emit(TuneEvent("trial_end", trial.number, done_now, total, trial.value, trial.state.name.lower(), best_value,
                       best_number, durations[-1], sum(durations) / len(durations) * max(total - done_now, 0),
                       dict(trial.params), ran.get("error")))
    else:
        logger.info("tune: this worker's timeout of %.0f s is reached; it starts no new trial", plan.settings.timeout_s)
    return study


def _best(study: Any) -> tuple[float | None, int | None]:
    try:
        return study.best_value, study.best_trial.number
    except ValueError:  # no complete trial yet
        return None, None


class _TrialSlot:
    """An exclusive lock around "count the trials, start one", released as soon as the trial exists.

    With it, workers sharing a study (and its output directory) never start more trials than asked
    for; an ``fcntl`` lock, so on several machines the output directory must be on a shared file
    system that supports it (with a remote database and no shared directory, a study can overshoot
    by at most one trial per extra worker)."""

    def __init__(self, path: Path):
        self.path, self.handle = path, None

    def __enter__(self) -> _TrialSlot:
        self.handle = open(self.path, "a+")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _objective(plan: TuningPlan, trial: Any, emit: Callable[[TuneEvent], None], done: int, total: int,
               progress: bool) -> float:
    optuna = _optuna()
    # A retry of a trial whose worker died continues in the first attempt's directory, from its checkpoint,
    # and draws what that attempt had not drawn yet with that attempt's seed.
    trials = trial.study.get_trials(deepcopy=False)
    trial.study.sampler = sampler_for(plan, draw_index(trials, trial.number))
    params = plan.space.suggest(trial)
    directory = trial_dir(plan, _first_attempt(trials, trial.number))
    trial.set_user_attr("directory", str(directory))
    emit(TuneEvent("trial_start", trial.number, done, total, params=params))
    config = plan.config(params, directory, [plan.seeds[0]])
    pruned = {"at": None}

    def on_evaluate(epoch: int, metrics: Mapping[str, Any]) -> None:
        from icldistill.training.loop import StopTraining

        key = "accuracy" if plan.settings.objective == "dev_accuracy" else "loss"
        value = metrics.get(key)
        if value is None:
            return
        trial.report(float(value), epoch)
        if trial.should_prune():
            pruned["at"] = epoch
            raise StopTraining(f"pruned after epoch {epoch}")

    record = run_trial_config(plan.method, config, on_evaluate=on_evaluate, score_eval_sets=False, progress=progress)
    if pruned["at"] is not None:
        raise optuna.TrialPruned(f"dev {plan.settings.objective} below the median after epoch {pruned['at']}")
    value, _curve = objective_value(record, plan)
    return value


def _retried(trial: Any) -> int | None:
    """The number of the trial that ``trial`` retries (None for a first attempt)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def _first_attempt(trials: list[Any], number: int) -> int:
    """Follow a chain of retries back to the first attempt's number (its directory holds the checkpoint)."""
    by_number = {t.number: t for t in trials}
    while number in by_number:
        earlier = _retried(by_number[number])
        if earlier is None:
            break
        number = earlier
    return number


# ---------------------------------------------------------------------------------------------- results


def trials_table(directory: str | Path) -> list[dict[str, Any]]:
    """The trials of the study in ``directory``, best first (finished ones by objective, then the others).

    ``value`` is a complete trial's objective, and a pruned trial's dev value at the epoch it was stopped
    (what the pruner judged); a failed or running trial has none (its reports are of a run that did not
    finish), so that no table or figure shows it as if it had a result.
    """
    directory = Path(directory)
    meta = read_json(directory / PLAN_FILE)
    study = load_study(directory)
    maximize = meta["settings"]["objective"] == "dev_accuracy"
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = ((t.datetime_complete - t.datetime_start).total_seconds()
                    if t.datetime_complete and t.datetime_start else None)
        state = t.state.name.lower()
        value = t.value if state == "complete" else None
        if state == "pruned" and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        rows.append({"trial": t.number, "state": state, "value": value, "params": dict(t.params),
                     "duration_s": duration, "directory": t.user_attrs.get("directory")})
    order = {"complete": 0, "pruned": 1}
    rows.sort(key=lambda r: (order.get(r["state"], 2),
                             -(r["value"] or 0) if maximize else (r["value"] or float("inf"))))
    return rows


def is_study_dir(directory: str | Path) -> bool:
    return (Path(directory) / PLAN_FILE).is_file()


@contextlib.contextmanager
def _final_run_lock(directory: Path, poll_s: float = 2.0) -> Iterator[None]:
    """Hold the final run's lock (``sweep.CellLock``); while another worker holds it, wait for it to finish.

    The waiting worker then runs the same configuration with ``--resume``: its seeds are complete, so it
    reads them back instead of training them again (and the identity check refuses a changed tuning file).
    """
    from icldistill.experiments.sweep import CellLock

    directory.mkdir(parents=True, exist_ok=True)
    lock = CellLock(directory)
    while not lock.acquire():
        time.sleep(poll_s)
    try:
        yield
    finally:
        lock.release()


def finish(plan: TuningPlan, *, storage: str | None = None, progress: bool = False) -> dict[str, dict[str, Any]]:
    """Re-train the best trial's parameters and the untuned defaults with all the plan's seeds; score each once
    on the evaluation sets. Returns ``{"best": record, "defaults": record}`` (each also in its directory)."""
    study = open_study(plan, storage)
    try:
        best_params = dict(study.best_params)
    except ValueError:
        raise IcldError(f"the study in {plan.output_dir} has no complete trial yet: run `icld tune` first.") from None
    records = {}
    for name, params in (("best", best_params), ("defaults", {})):
        config = plan.config(params, plan.output_dir / name, plan.seeds)
        with _final_run_lock(plan.output_dir / name):  # two workers finishing at once train each run once
            records[name] = run_trial_config(plan.method, config, on_evaluate=None, score_eval_sets=True,
                                             progress=progress)
    atomic_write_json(plan.output_dir / "final.json", {
        "best_trial": study.best_trial.number, "best_params": best_params, "best_dev_value": study.best_value,
        "objective": plan.settings.objective, "seeds": plan.seeds,
        "runs": {name: str(plan.output_dir / name) for name in FINAL_RUNS}})
    return records
