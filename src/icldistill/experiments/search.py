"""A tuning file's search space: which options an Optuna study varies, and over what.

The ``search:`` mapping of a tuning file names options of the tuned method (any field of its
options dataclass that can sensibly vary) and gives each either a range or a list of choices:

```yaml
search:
  alpha: {low: 0.0, high: 1.0}                # float option -> suggest_float
  lr: {low: 1.0e-5, high: 1.0e-3, log: true}  # log-uniform
  epochs: {low: 2, high: 6}                   # int option -> suggest_int (step, log allowed)
  lora_r: [4, 8, 16]                          # a list -> suggest_categorical, values parsed as the option's type
  peft: [lora, bitfit]
```

Everything is checked before any trial runs (unknown option, low > high, a log range that
includes 0, a choice that does not parse), each problem naming its key. Imports no optuna:
:meth:`SearchSpace.suggest` takes the trial object.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from icldistill.config import _base_type, field_types, parse_value, validate
from icldistill.errors import ConfigError, did_you_mean

# Options that define what is measured or where, not how it is trained: tuning them would change the
# question (the task, the evaluation sets, the data seeds, the models) or nothing at all.
NOT_SEARCHABLE = frozenset({
    "task", "eval", "seeds", "output_dir", "data_dir", "data_source", "cache_dir", "resume", "device",
    "model", "teacher", "student", "limit", "save_every_epoch", "merge", "prefix_cache",
    "dev_queries", "select", "report_to",
})
_RANGE_KEYS = frozenset({"low", "high", "log", "step"})


@dataclass(frozen=True)
class Dimension:
    """One searched option: a numeric range (``kind`` 'float' or 'int') or a list of choices."""

    name: str
    kind: str  # "float", "int" or "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name} in {list(self.choices)}"
        scale = ", log" if self.log else ""
        step = f", step {self.step:g}" if self.step else ""
        return f"{self.name} in [{self.low:g}, {self.high:g}]{scale}{step} ({self.kind})"


@dataclass(frozen=True)
class SearchSpace:
    """The searched options of one method, checked against its options dataclass."""

    dimensions: tuple[Dimension, ...]

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask an Optuna trial for one value per dimension (in the file's order, for reproducible TPE draws)."""
        values: dict[str, Any] = {}
        for d in self.dimensions:
            if d.kind == "float":
                values[d.name] = trial.suggest_float(d.name, d.low, d.high, log=d.log, step=d.step)
            elif d.kind == "int":
                values[d.name] = trial.suggest_int(d.name, int(d.low), int(d.high), log=d.log, step=int(d.step or 1))
            else:
                # Optuna stores categorical choices as given; None, bool, int, float and str are all accepted.
                values[d.name] = trial.suggest_categorical(d.name, list(d.choices))
        return values


def parse_search_space(spec: Any, options_class: type, *, source: str) -> tuple[SearchSpace, list[str]]:
    """The search space of ``spec`` (the ``search:`` mapping) for ``options_class``, and its problems.

    Problems are returned, not raised, so that a tuning file's every mistake is reported at once.
    """
    problems: list[str] = []
    if not isinstance(spec, Mapping) or not spec:
        problems.append("'search' must map option names to a range {low: .., high: ..} or a list of choices, "
                        "e.g. 'search: {alpha: {low: 0.0, high: 1.0}, lora_r: [4, 8, 16]}'.")
        return SearchSpace(()), problems
    types_ = field_types(options_class)
    fields = {f.name: f for f in dataclasses.fields(options_class)}
    dimensions = []
    for raw_name, value in spec.items():
        name = str(raw_name).replace("-", "_")
        where = f"search '{raw_name}'"
        if name not in fields:
            hint = did_you_mean(name, sorted(fields))
            problems.append(f"{where}: {options_class.__name__} has no option '{raw_name}'.{hint}")
            continue
        if name in NOT_SEARCHABLE:
            problems.append(f"{where}: '{name}' is not tuned (it decides what is measured or where, not how the "
                            "model trains); set it at the top level of the file.")
            continue
        tp, _optional = _base_type(types_[name])
        if isinstance(value, list):
            dimension = _choices(name, value, options_class, where, problems)
        elif isinstance(value, Mapping):
            dimension = _range(name, tp, value, options_class, where, problems)
        else:
            problems.append(f"{where}: give a range {{low: .., high: ..}} or a list of choices, not {value!r}.")
            continue
        if dimension is not None:
            dimensions.append(dimension)
    return SearchSpace(tuple(dimensions)), problems


def _choices(name: str, values: list[Any], options_class: type, where: str, problems: list[str]) -> Dimension | None:
    if not values:
        problems.append(f"{where}: the list of choices is empty.")
        return None
    parsed = []
    for value in values:
        try:
            parsed.append(parse_value(options_class, name, value, source=""))
        except ConfigError as exc:
            problems.append(f"{where}: choice {value!r} is not a valid value: {str(exc).removeprefix(': ')}")
            return None
    for value in parsed:
        refused = _refused(options_class, name, value)
        if refused:
            problems.append(f"{where}: choice {value!r} is not accepted: {refused}")
            return None
    unhashable = [p for p in parsed if isinstance(p, (list, dict))]
    if unhashable:
        problems.append(f"{where}: choices must be single values, not lists ({unhashable[0]!r}).")
        return None
    if len(set(map(repr, parsed))) != len(parsed):
        problems.append(f"{where}: a choice is listed twice.")
        return None
    return Dimension(name, "categorical", choices=tuple(parsed))


def _number(value: Any) -> float | None:
    # YAML 1.1 reads 1e-5 (no dot) as a string; accept it as the number it plainly is.
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _range(name: str, tp: Any, spec: Mapping[str, Any], options_class: type, where: str,
           problems: list[str]) -> Dimension | None:
    if tp not in (int, float):
        problems.append(f"{where}: '{name}' is not numeric ({getattr(tp, '__name__', tp)}): give a list of choices.")
        return None
    unknown = set(map(str, spec)) - _RANGE_KEYS
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a range has low, high, log, step.")
        return None
    if "low" not in spec or "high" not in spec:
        problems.append(f"{where}: a range needs both 'low' and 'high'.")
        return None
    low, high = _number(spec["low"]), _number(spec["high"])
    step = _number(spec["step"]) if spec.get("step") is not None else None
    log = spec.get("log", False)
    if low is None or high is None:
        problems.append(f"{where}: low and high must be numbers (got {spec['low']!r}, {spec['high']!r}).")
        return None
    if not isinstance(log, bool):
        problems.append(f"{where}: 'log' must be true or false, not {log!r}.")
        return None
    if low > high:
        problems.append(f"{where}: low {low:g} is greater than high {high:g}.")
        return None
    if log and low <= 0:
        problems.append(f"{where}: a log range needs low > 0 (got {low:g}).")
        return None
    if step is not None and (step <= 0 or log):
        problems.append(f"{where}: step must be > 0 and cannot be combined with log.")
        return None
    if tp is int and (low != int(low) or high != int(high) or (step is not None and step != int(step))):
        problems.append(f"{where}: '{name}' is an integer option: low, high and step must be whole numbers.")
        return None
    kind = "int" if tp is int else "float"
    for end in (low, high):
        refused = _refused(options_class, name, int(end) if tp is int else end)
        if refused:
            problems.append(f"{where}: the range [{low:g}, {high:g}] leaves what '{name}' accepts: {refused}")
            return None
    return Dimension(name, kind, low, high, log, step)


def _refused(options_class: type, name: str, value: Any) -> str | None:
    """Why the options' own validation refuses ``value`` for ``name`` (None if it accepts it).

    The ranges and choices of every option live in ``config.validate``; asking it keeps them in one home."""
    try:
        validate(dataclasses.replace(options_class(), **{name: value}), source="")
    except ConfigError as exc:
        return str(exc).removeprefix(": ")
    return None
