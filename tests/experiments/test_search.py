"""Search spaces of tuning files: every mistake named before any trial runs; suggestions follow the space."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from icldistill.config import DistillOptions, PbftOptions
from icldistill.experiments.search import NOT_SEARCHABLE, parse_search_space


def _problems(spec, cls=DistillOptions):
    return parse_search_space(spec, cls, source="t.yaml")[1]


def test_a_valid_space_parses_each_kind():
    space, problems = parse_search_space({
        "alpha": {"low": 0, "high": 1}, "lr": {"low": "1e-5", "high": 1e-3, "log": True},  # YAML reads 1e-5 as text
        "epochs": {"low": 1, "high": 4}, "lora_r": [4, 8, 16], "peft": ["lora", "bitfit"],
    }, DistillOptions, source="t.yaml")
    assert problems == []
    kinds = {d.name: (d.kind, d.low, d.high, d.log, d.choices) for d in space.dimensions}
    assert kinds == {"alpha": ("float", 0.0, 1.0, False, ()), "lr": ("float", 1e-5, 1e-3, True, ()),
                     "epochs": ("int", 1.0, 4.0, False, ()), "lora_r": ("categorical", None, None, False, (4, 8, 16)),
                     "peft": ("categorical", None, None, False, ("lora", "bitfit"))}
    assert space.names == ["alpha", "lr", "epochs", "lora_r", "peft"]  # the file's order


@pytest.mark.parametrize("spec, message", [
    ({"alhpa": {"low": 0, "high": 1}}, "has no option 'alhpa'. Did you mean: alpha"),
    ({"alpha": {"low": 0.8, "high": 0.2}}, "low 0.8 is greater than high 0.2"),
    ({"alpha": {"low": 0, "high": 2}}, "'alpha' must lie in [0, 1]"),
    ({"lr": {"low": 0, "high": 1e-3, "log": True}}, "a log range needs low > 0"),
    ({"lr": {"low": 1e-5}}, "needs both 'low' and 'high'"),
    ({"lr": {"low": "small", "high": 1}}, "low and high must be numbers"),
    ({"lr": {"low": 1e-5, "high": 1e-3, "scale": "log"}}, "unknown key(s) scale"),
    ({"lora_r": ["four", 8]}, "choice 'four' is not a valid value"),
    ({"lora_r": [4, 4]}, "a choice is listed twice"),
    ({"lora_r": []}, "the list of choices is empty"),
    ({"peft": ["lora", "prefix"]}, "choose one of lora, bitfit, none"),
    ({"peft": {"low": 0, "high": 1}}, "is not numeric"),
    ({"epochs": {"low": 1.5, "high": 3}}, "integer option"),
    ({"epochs": {"low": 0, "high": 3}}, "'epochs' must be >= 1"),
    ({"task": ["mnli", "rte"]}, "'task' is not tuned"),
    ({"alpha": 0.5}, "give a range"),
])
def test_bad_search_spaces_are_named_with_their_key(spec, message):
    problems = _problems(spec)
    assert len(problems) == 1 and message in problems[0], problems
    assert problems[0].startswith(f"search '{next(iter(spec))}'")


def test_every_problem_is_reported_at_once_and_method_options_apply():
    problems = _problems({"alpha": {"low": 1, "high": 0}, "lora_r": ["x"], "nope": [1]})
    assert len(problems) == 3
    # PBFT has no alpha: searching it there is an unknown option, not a silent no-op.
    assert "PbftOptions has no option 'alpha'" in _problems({"alpha": {"low": 0, "high": 1}}, PbftOptions)[0]
    assert _problems({}) and "must map option names" in _problems({})[0]


def test_not_searchable_names_are_real_options():
    """A renamed option must not silently become searchable: every name here is an option of some command."""
    from icldistill.config import IclOptions

    fields = set(DistillOptions.__dataclass_fields__) | set(IclOptions.__dataclass_fields__)
    assert NOT_SEARCHABLE <= fields, NOT_SEARCHABLE - fields


class _Trial:
    """The part of optuna.Trial that SearchSpace.suggest uses, answering with a range's ends."""

    def __init__(self, pick):
        self.pick, self.calls = pick, []

    def suggest_float(self, name, low, high, *, log=False, step=None):
        self.calls.append(("float", name, low, high, log, step))
        return low if self.pick == "low" else high

    def suggest_int(self, name, low, high, *, log=False, step=1):
        self.calls.append(("int", name, low, high, log, step))
        return low if self.pick == "low" else high

    def suggest_categorical(self, name, choices):
        self.calls.append(("cat", name, tuple(choices)))
        return choices[0] if self.pick == "low" else choices[-1]


@settings(max_examples=40, deadline=None)
@given(low=st.floats(1e-6, 1e-2), span=st.floats(1.0, 100.0),
       r=st.lists(st.integers(1, 64), min_size=1, max_size=4, unique=True), pick=st.sampled_from(["low", "high"]))
def test_suggested_configurations_are_valid_options(low, span, r, pick):
    """Whatever the space, every value it can suggest builds a valid config (the ends are the extreme cases)."""
    from icldistill.config import build_config

    space, problems = parse_search_space({"lr": {"low": low, "high": low * span, "log": True}, "lora_r": r,
                                          "alpha": {"low": 0.0, "high": 1.0}}, DistillOptions, source="t")
    assert problems == []
    trial = _Trial(pick)
    values = space.suggest(trial)
    assert [c[1] for c in trial.calls] == ["lr", "lora_r", "alpha"]
    build_config(DistillOptions, values)  # raises if a suggestion is not a valid option value
    assert values["lr"] == pytest.approx(low if pick == "low" else low * span)


def test_optuna_draws_are_deterministic_for_a_seed():
    optuna = pytest.importorskip("optuna")
    space, _ = parse_search_space({"alpha": {"low": 0, "high": 1}, "lora_r": [4, 8, 16],
                                   "lr": {"low": 1e-5, "high": 1e-3, "log": True}}, DistillOptions, source="t")

    def draws(seed):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3))
        out = []
        for _ in range(6):
            trial = study.ask()
            values = space.suggest(trial)
            study.tell(trial, values["alpha"])  # any objective: TPE's later draws depend on it
            out.append(values)
        return out

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)
