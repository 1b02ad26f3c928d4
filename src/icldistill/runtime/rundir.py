"""A run directory and its records: the typed records, the run's identity, and the one writer.

A run directory holds ``results.json`` (:class:`RunRecord`), ``predictions.jsonl`` (:class:`PredictionRow`
per line) and, for a trained method, ``seed-N/seed_result.json`` (:class:`SeedRecord`) beside the seed's
artefacts. :class:`RunDir` owns these names: every write goes through it (only rank 0 writes, atomically)
and every read comes back typed, with records of the previous format migrated (:func:`migrate_run`).

A run's identity is a hash of the options that shape its numbers (:func:`run_identity`). It is recorded
when the run claims its directory (:meth:`RunDir.claim`: status ``running`` and the seeds it will hold),
in each seed record, and checked on every resume and by every reader, so a directory never mixes runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypedDict

from icldistill.errors import ConfigError, IcldError
from icldistill.runtime import distributed
from icldistill.runtime.paths import PREDICTIONS_FILE
from icldistill.runtime.records import atomic_write_json, atomic_write_jsonl, read_json

RESULTS_FILE = "results.json"
SEED_RESULT_FILE = "seed_result.json"
SEED_DIR_PREFIX = "seed-"
JOURNAL_DIR = "journal"  # answers of finished decode batches while a generation run is unfinished
JOURNAL_SUFFIX = ".journal.jsonl"  # scoring/answer_journal: one finished batch a line after a key line
LOCK_SUFFIX = ".lock"  # runtime/locks: held beside a generation teacher pass's cache entry while it is computed
RECORD_VERSION = 1  # 0: records written before identities (ca96d28 and earlier); see migrate_run
FINISHED = ("complete", "skipped")  # a "skipped" run (context too long) would end the same way again

# Options that say where files are, how a run is kept or how it spends memory, not what it computes: left out
# of the identity (gradient checkpointing recomputes the same activations, so a resume may switch it).
NOT_IDENTITY = frozenset({"output_dir", "resume", "overwrite", "data_dir", "cache_dir", "seeds", "eval_limit",
                          "save_every_epoch", "report_to", "gradient_checkpointing"})


class PredictionRow(TypedDict, total=False):
    """One line of ``predictions.jsonl``: one query of one evaluation set under one seed (every method)."""

    seed: int
    eval: str
    id: str
    gold: int
    pred: int
    label_logprobs: list[float]


def run_identity(method: str, config: Mapping[str, Any]) -> str:
    """A short hash of the method and the options that shape the numbers (``config`` as recorded)."""
    shaping = {k: v for k, v in sorted(config.items()) if k not in NOT_IDENTITY}
    text = json.dumps({"method": method, "config": shaping}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def identity_of(method: str, config: Any) -> str:
    """:func:`run_identity` of an options dataclass (recorded JSON-normalised, as results.json holds it)."""
    from icldistill.config import to_dict

    return run_identity(method, json.loads(json.dumps(to_dict(config), default=str)))


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 4) -> str:
    """The identity-relevant options that differ, as ``lr: 0.01 -> 0.05; epochs: 3 -> 6``."""
    keys = [k for k in dict.fromkeys([*new, *old]) if k not in NOT_IDENTITY and old.get(k) != new.get(k)]
    shown = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:limit]]
    return "; ".join(shown + ([f"{len(keys) - limit} more"] if len(keys) > limit else [])) or "method or version"


# ---------------------------------------------------------------------------------------------- records


def _artefact_path(seed_dir: Path, recorded: str) -> Path:
    """A recorded artefact path, read against its seed directory, never the working directory.

    Records of version 1 hold paths relative to the seed directory. Version 0 held the path as the run
    saw it (``runs/latest/seed-0/adapter``, relative to where the command ran, or absolute): what follows
    the ``seed-N`` component is the artefact inside the seed directory, wherever the run now lives.
    """
    path = PurePosixPath(recorded.replace("\\", "/"))
    if not path.is_absolute() and not any(p.startswith(SEED_DIR_PREFIX) for p in path.parts):
        return seed_dir / path
    parts = path.parts
    at = max((i for i, p in enumerate(parts) if p == seed_dir.name), default=None)
    if at is None:
        at = max((i for i, p in enumerate(parts) if p.startswith(SEED_DIR_PREFIX)), default=len(parts) - 2)
    return seed_dir.joinpath(*parts[at + 1:])


@dataclass
class SeedRecord:
    """``seed-N/seed_result.json``: one trained seed (its metrics, artefacts, history and costs)."""

    seed: int
    method: str
    status: str
    identity: str | None
    eval: dict[str, dict[str, Any]]
    artefacts: dict[str, str]  # relative to the seed directory
    fields: dict[str, Any] = field(default_factory=dict)  # history, resources, trainable, student, ...
    directory: Path | None = None

    def artefact(self, name: str) -> Path | None:
        """Where artefact ``name`` (adapter, trainable, merged) is, or None when the seed has none."""
        if name not in self.artefacts or self.directory is None:
            return None
        return _artefact_path(self.directory, self.artefacts[name])

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "method": self.method, "status": self.status, "identity": self.identity,
                **self.fields, "eval": self.eval, "artefacts": self.artefacts}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], directory: Path | None = None) -> SeedRecord:
        known = ("seed", "method", "status", "identity", "eval", "artefacts")
        return cls(int(data["seed"]), str(data.get("method", "")), str(data.get("status", "complete")),
                   data.get("identity"), dict(data.get("eval") or {}), dict(data.get("artefacts") or {}),
                   {k: v for k, v in data.items() if k not in known}, directory)


@dataclass
class RunRecord:
    """``results.json``: what ran (method, options, identity), its seeds, their aggregate and its costs."""

    method: str
    status: str
    identity: str | None
    config: dict[str, Any]
    seeds: dict[str, dict[str, Any]]  # seed -> its entry (a trained seed's is its SeedRecord as a dict)
    planned_seeds: list[int]
    aggregate: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)  # task, pattern, classes, data, environment, model...
    version: int = RECORD_VERSION
    directory: Path | None = None

    def seed_record(self, seed: int | str) -> SeedRecord:
        """The seed's record as this run wrote it, located in its seed directory."""
        entry = self.seeds[str(seed)]
        where = self.directory / f"{SEED_DIR_PREFIX}{seed}" if self.directory is not None else None
        return SeedRecord.from_dict({"seed": int(seed), "method": self.method, "identity": self.identity, **entry},
                                    where)

    def finished_seeds(self) -> list[str]:
        """The seeds this run holds results for, in its order (never a seed directory left by another run)."""
        return [s for s, e in self.seeds.items() if e.get("eval") and e.get("status", "complete") == "complete"]

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "method": self.method, "status": self.status, "identity": self.identity,
                "planned_seeds": self.planned_seeds, "config": self.config, **self.fields, "seeds": self.seeds,
                "aggregate": self.aggregate, "resources": self.resources}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], directory: Path | None = None) -> RunRecord:
        data = migrate_run(data)
        known = ("version", "method", "status", "identity", "planned_seeds", "config", "seeds", "aggregate",
                 "resources")
        return cls(data["method"], data["status"], data["identity"], dict(data["config"]), dict(data["seeds"]),
                   list(data["planned_seeds"]), dict(data.get("aggregate") or {}), dict(data.get("resources") or {}),
                   {k: v for k, v in data.items() if k not in known}, int(data["version"]), directory)


def migrate_run(data: Mapping[str, Any]) -> dict[str, Any]:
    """A ``results.json`` of any earlier version as the current version (a copy; the file is not touched).

    Version 0 had no ``version``, ``identity`` or ``planned_seeds``: the identity is computed from the
    recorded options (the same function a new run uses, so a v0 run resumes as the same run), the planned
    seeds are the recorded ones. Artefact paths are migrated when read (:meth:`SeedRecord.artefact`).
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("seeds", {}), Mapping):
        raise ValueError("not a run record (a JSON object with 'method', 'config' and 'seeds')")
    out = dict(data)
    if not isinstance(out.get("method"), str):  # a hand-made or foreign record: readable, its identity unknown
        out.update(method="", version=out.get("version", 0), identity=None)
    out.setdefault("status", "incomplete")
    out["config"] = dict(out.get("config") or {})
    out["seeds"] = {str(k): v for k, v in (out.get("seeds") or {}).items()}
    if out.get("version") is None:
        out["version"] = 0
        out["identity"] = run_identity(out["method"], out["config"])
        out["planned_seeds"] = [int(s) for s in out["seeds"]]
    out.setdefault("identity", None)
    out.setdefault("planned_seeds", [int(s) for s in out["seeds"]])
    return out


# ---------------------------------------------------------------------------------------------- the writer


def probe_writable(path: str | Path, option: str) -> Path:
    """Make ``path`` a writable directory now, before any expensive work; else one line naming ``option``."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        raise IcldError(f"{option} {path} is not a writable directory ({exc.strerror or exc}); "
                        f"choose another {option}.") from None
    return path


class RunDir:
    """One run's output directory: the names of its files, its claim, and every write (rank 0 only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.started = time.perf_counter()

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def predictions_path(self) -> Path:
        return self.path / PREDICTIONS_FILE

    def seed_dir(self, seed: int | str) -> Path:
        return self.path / f"{SEED_DIR_PREFIX}{seed}"

    def seed_result_path(self, seed: int | str) -> Path:
        return self.seed_dir(seed) / SEED_RESULT_FILE

    def elapsed_s(self) -> float:
        """Seconds since this process opened the run (the run's whole wall time, not training alone)."""
        return time.perf_counter() - self.started

    # ------------------------------------------------------------------ reading

    def read(self) -> RunRecord | None:
        """The run's record (migrated), None when there is none; an unreadable one is an error naming it."""
        if not self.results_path.is_file():
            return None
        try:
            return RunRecord.from_dict(read_json(self.results_path), self.path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IcldError(f"{self.results_path} cannot be read ({exc}); delete it or rerun with "
                            "--overwrite.") from None

    def read_seed(self, seed: int | str) -> SeedRecord | None:
        path = self.seed_result_path(seed)
        if not path.is_file():
            return None
        try:
            return SeedRecord.from_dict(read_json(path), path.parent)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IcldError(f"{path} cannot be read ({exc}); it was truncated or corrupted. Delete it and run again "
                            "with --resume (the seed's checkpoint resumes), or delete "
                            f"{path.parent} to train the seed from the start.") from None

    def finished_seed(self, seed: int, identity: str) -> dict[str, Any] | None:
        """A resumed seed's record when this run (same identity) completed it; rank 0 reads for all ranks."""
        entry: Any = None
        if distributed.is_main():
            try:
                found = self.read_seed(seed)
                entry = None if found is None else (found.identity, found.to_dict())
            except IcldError as exc:
                entry = ("error", str(exc))
        entry = distributed.broadcast(entry)  # every rank skips the seed, trains it, or raises alike
        if entry is None:
            return None
        if entry[0] == "error":
            raise IcldError(entry[1])
        if entry[0] not in (None, identity):
            raise ConfigError(f"{self.seed_result_path(seed)} was written by another run (identity {entry[0]}, "
                              f"this run is {identity}); rerun with --overwrite to replace it, or choose another "
                              "--output-dir.")
        return entry[1]

    # ------------------------------------------------------------------ claiming

    def claim(self, record: Mapping[str, Any], *, overwrite: bool = False) -> None:
        """Claim the directory for ``record``'s run before any expensive work: status ``running``, its seeds.

        ``record`` is the new run's ``results.json`` (method, config, identity, planned_seeds, ...). A
        directory holding another run (other method or options, or seed directories no record accounts
        for) is refused unless ``overwrite``, which deletes that run's results, predictions and seeds.
        """
        seeds = [int(s) for s in record["planned_seeds"]]
        duplicated = sorted({s for s in seeds if seeds.count(s) > 1})
        if duplicated:
            raise ConfigError(f"--seeds {','.join(map(str, seeds))} names seed {duplicated[0]} more than once; "
                              "give each seed once.")
        problem = None
        if distributed.is_main():  # rank 0 looks (and clears); every rank raises the same error, none waits
            try:
                probe_writable(self.path, "--output-dir")
                self._check_or_clear(record["method"], record["config"], record["identity"], overwrite)
            except IcldError as exc:
                problem = (isinstance(exc, ConfigError), str(exc))
        problem = distributed.broadcast(problem)
        if problem is not None:
            raise (ConfigError if problem[0] else IcldError)(problem[1])
        self.write({**record, "status": "running", "seeds": {}})

    def held_seeds(self, record: RunRecord) -> list[SeedRecord]:
        """The trained seeds this run holds: those its record lists, and (while it runs) planned seeds it has
        finished with its identity; never a seed directory left by another run."""
        held = []
        for seed in dict.fromkeys([*record.finished_seeds(), *map(str, record.planned_seeds)]):
            if seed not in record.seeds and record.status != "running":
                continue
            found = self.read_seed(seed)
            if found is not None and found.identity in (None, record.identity):
                held.append(found)
        return held

    def _check_or_clear(self, method: str, config: Mapping[str, Any], identity: str, overwrite: bool) -> None:
        """Refuse (or with ``overwrite`` delete) another run's record and seeds found in the directory."""
        try:
            existing = self.read()
        except IcldError:
            if not overwrite:
                raise
            existing = None
        other_seeds = [p.name for p in sorted(self.path.glob(f"{SEED_DIR_PREFIX}*")) if p.is_dir()
                       and self._seed_identity(p) not in (None, identity)]
        other_run = existing is not None and (existing.method != method or existing.identity not in (None, identity))
        if not other_run and not other_seeds:
            return
        if not overwrite:
            article = "an" if existing is not None and existing.method[:1] in "aeiou" else "a"
            what = (f"{article} {existing.method} run with other options ({config_changes(existing.config, config)})"
                    if other_run and existing is not None else f"seeds of another run ({', '.join(other_seeds)})")
            raise ConfigError(f"{self.path} holds {what}. Choose another --output-dir, or rerun with --overwrite "
                              "to delete that run and start this one.")
        # The replaced run's seeds, and its later evaluations (``icld eval`` writes RUN/eval-SETS beside them).
        for child in [*self.path.glob(f"{SEED_DIR_PREFIX}*"), *self.path.glob("eval-*"), self.path / JOURNAL_DIR]:
            if child.is_dir():
                shutil.rmtree(child)
        self.results_path.unlink(missing_ok=True)
        self.predictions_path.unlink(missing_ok=True)

    @staticmethod
    def _seed_identity(seed_dir: Path) -> str | None:
        """The identity a seed directory's record names (None: no record, or one written before identities)."""
        try:
            return read_json(seed_dir / SEED_RESULT_FILE).get("identity")
        except (OSError, ValueError, AttributeError):
            return None

    # ------------------------------------------------------------------ decode journals

    def journal_path(self, seed: int | str, eval_name: str) -> Path:
        """Where one seed's answers to one evaluation set are journalled while the run is unfinished."""
        return self.path / JOURNAL_DIR / f"{SEED_DIR_PREFIX}{seed}-{eval_name}{JOURNAL_SUFFIX}"

    def clear_journals(self, seed: int | str | None = None) -> None:
        """Drop the journals (one seed's, or all) once the answers they hold are in the run's own files."""
        if not distributed.is_main():
            return
        pattern = f"{SEED_DIR_PREFIX}{seed}-*" if seed is not None else "*"
        for path in (self.path / JOURNAL_DIR).glob(pattern):
            path.unlink(missing_ok=True)
        if (self.path / JOURNAL_DIR).is_dir() and not any((self.path / JOURNAL_DIR).iterdir()):
            (self.path / JOURNAL_DIR).rmdir()

    # ------------------------------------------------------------------ writing (rank 0)

    def write(self, record: RunRecord | Mapping[str, Any]) -> None:
        """Write ``results.json`` (artefact paths relative to the seed directories); other ranks return."""
        data = record.to_dict() if isinstance(record, RunRecord) else dict(record)
        data.setdefault("version", RECORD_VERSION)
        data["seeds"] = {s: self._relative(s, e) for s, e in (data.get("seeds") or {}).items()}
        if distributed.is_main():
            atomic_write_json(self.results_path, data)

    def write_seed(self, seed: int, record: Mapping[str, Any]) -> None:
        """Write ``seed-N/seed_result.json``."""
        if distributed.is_main():
            atomic_write_json(self.seed_result_path(seed), self._relative(str(seed), record))

    def write_predictions(self, rows: Iterable[PredictionRow], seed: int | None = None) -> None:
        """Write the run's ``predictions.jsonl`` (or a seed's, with ``seed``)."""
        if distributed.is_main():
            path = self.predictions_path if seed is None else self.seed_dir(seed) / PREDICTIONS_FILE
            atomic_write_jsonl(path, rows)

    def gather_seed_predictions(self, seeds: Iterable[str]) -> list[PredictionRow]:
        """The seeds' own ``predictions.jsonl`` rows, in seed order (the run's file is their concatenation)."""
        rows: list[Any] = []
        for seed in seeds:
            path = self.seed_dir(seed) / PREDICTIONS_FILE
            if path.is_file():
                rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return rows

    def _relative(self, seed: str, entry: Any) -> Any:
        """``entry`` with its artefact paths relative to its seed directory (so the run can be moved)."""
        if not isinstance(entry, Mapping) or not isinstance(entry.get("artefacts"), Mapping):
            return entry
        seed_dir = self.seed_dir(seed)
        artefacts = {name: _artefact_path(seed_dir, str(path)).relative_to(seed_dir).as_posix()
                     for name, path in entry["artefacts"].items()}
        return {**entry, "artefacts": artefacts}


def load_run(path: str | Path) -> RunRecord:
    """The record of the run in ``path``; a directory without one is an error naming it."""
    record = RunDir(path).read()
    if record is None:
        raise IcldError(f"{Path(path) / RESULTS_FILE} does not exist: give a run's output directory.")
    return record
