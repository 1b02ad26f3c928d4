"""Tests for icldistill.config: type conversion from strings and YAML, validation of choices and ranges,
and YAML loading, each failure naming the option or file."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from icldistill.config import (
    CommonOptions,
    CompareOptions,
    DistillOptions,
    IclOptions,
    PbftOptions,
    PredictOptions,
    TuneOptions,
    build_config,
    load_yaml,
    to_dict,
)
from icldistill.errors import ConfigError


@pytest.mark.parametrize("cls", [CommonOptions, IclOptions, PbftOptions, DistillOptions], ids=lambda c: c.__name__)
def test_defaults_build_and_serialise(cls: type) -> None:
    config = build_config(cls)
    assert config == cls()
    assert json.loads(json.dumps(to_dict(config))) == to_dict(config)


def test_comma_lists_are_split_and_stripped() -> None:
    config = build_config(CommonOptions, {"seeds": "0, 1,2", "eval": " mnli-m , hans-lo"})
    assert config.seeds == [0, 1, 2]
    assert config.eval == ["mnli-m", "hans-lo"]
    distill = build_config(DistillOptions, {"lora_targets": "q_proj, v_proj"})
    assert distill.lora_targets == ["q_proj", "v_proj"]


def test_yaml_lists_are_converted_item_by_item() -> None:
    assert build_config(CommonOptions, {"seeds": [0, "1", 2]}).seeds == [0, 1, 2]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(" Yes, No", [" Yes", " No"]), (" True, False", [" True", " False"]), ([" Yes", " No"], [" Yes", " No"]),
     ("none", None), ("", None)],
)
def test_label_words_keep_their_spaces(value: Any, expected: list[str] | None) -> None:
    assert build_config(CommonOptions, {"label_words": value}).label_words == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True), (True, True),
     ("false", False), ("False", False), ("0", False), ("no", False), ("off", False), (False, False)],
)
def test_bools_from_strings(value: Any, expected: bool) -> None:
    assert build_config(CommonOptions, {"prefix_cache": value}).prefix_cache is expected
    assert build_config(DistillOptions, {"train-embeddings": value}).train_embeddings is expected


@pytest.mark.parametrize(
    ("key", "value"),
    [("prefix_cache", "maybe"), ("shots", "x"), ("shots", "2.5"), ("shots", 2.5), ("shots", ""), ("seeds", "0,a"),
     ("batch_size", "none"), ("limit", "ten")],
)
def test_unreadable_values_name_the_option(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(CommonOptions, {key: value})
    assert f"'{key}'" in str(info.value) and repr(value) in str(info.value)


def test_numbers_from_strings_and_optionals() -> None:
    config = build_config(DistillOptions, {"shots": "8", "lr": "1e-4", "alpha": 1, "limit": "none",
                                           "pattern": "{premise} {hypothesis} ?", "data-dir": "", "epochs": 3.0})
    assert (config.shots, config.lr, config.alpha, config.limit) == (8, 1e-4, 1.0, None)
    assert config.epochs == 3 and isinstance(config.epochs, int)
    assert config.data_dir is None and config.pattern == "{premise} {hypothesis} ?"
    assert isinstance(config.alpha, float) and isinstance(config.shots, int)


def test_dashed_keys_are_accepted() -> None:
    config = build_config(DistillOptions, {"train-queries": "32", "teacher-signal": "online"})
    assert (config.train_queries, config.teacher_signal) == (32, "online")


def test_unknown_key_suggests_close_matches() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(CommonOptions, {"batchsize": 4}, source="run.yaml")
    message = str(info.value)
    assert "run.yaml" in message and "'batchsize'" in message and "Did you mean: batch_size" in message


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(CommonOptions, {"zzzzzz": 1})
    message = str(info.value)
    assert "Valid keys" in message
    assert all(f.name in message for f in dataclasses.fields(CommonOptions))


def test_option_of_another_command_is_unknown() -> None:
    with pytest.raises(ConfigError, match="unknown option 'alpha'"):
        build_config(IclOptions, {"alpha": 0.3})


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [(CommonOptions, "dtype", "fp64"), (CommonOptions, "data_source", "web"), (PbftOptions, "peft", "qlora"),
     (DistillOptions, "kl_space", "logits"), (DistillOptions, "teacher_signal", "live"),
     (DistillOptions, "teacher_dtype", "int8"), (PbftOptions, "bitfit_fallback", "ignore")],
)
def test_invalid_choice_names_option_and_choices(cls: type, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(cls, {key: value}, source="cfg.yaml")
    message = str(info.value)
    assert "cfg.yaml" in message and f"'{key}'" in message and repr(value) in message
    choices = {f.name: f for f in dataclasses.fields(cls)}[key].metadata["choices"]
    assert all(choice in message for choice in choices)


@pytest.mark.parametrize(
    ("cls", "values", "named"),
    [
        (CommonOptions, {"shots": -1}, "shots"),
        (CommonOptions, {"batch_size": 0}, "batch_size"),
        (CommonOptions, {"limit": 0}, "limit"),
        (CommonOptions, {"seeds": []}, "seeds"),
        (CommonOptions, {"eval": []}, "eval"),
        (PbftOptions, {"epochs": 0}, "epochs"),
        (PbftOptions, {"lr": 0}, "lr"),
        (PbftOptions, {"lora_r": 0}, "lora_r"),
        (PbftOptions, {"lora_alpha": 0}, "lora_alpha"),
        (PbftOptions, {"max_steps": 0}, "max_steps"),
        (PbftOptions, {"select": "best", "dev_queries": 0}, "dev-queries"),
        (CommonOptions, {"seeds": "99999999999999999999"}, "seeds"),
        (CommonOptions, {"seeds": "0,0"}, "seeds"),
        (CommonOptions, {"seeds": -1}, "seeds"),
        (CommonOptions, {"batch_size": "99999999999999999999999"}, "batch_size"),
        (PbftOptions, {"lr": "inf"}, "lr"),
        (PbftOptions, {"weight_decay": "nan"}, "weight_decay"),
        (PbftOptions, {"train_batch_size": 0}, "train_batch_size"),
        (PbftOptions, {"grad_accum": 0}, "grad_accum"),
        (PbftOptions, {"train_batch_size": 8, "grad_accum": 3}, "grad_accum"),
        (DistillOptions, {"alpha": 1.5}, "alpha"),
        (DistillOptions, {"alpha": -0.1}, "alpha"),
        (DistillOptions, {"alpha": "nan"}, "alpha"),
        (DistillOptions, {"temperature": 0}, "temperature"),
        (DistillOptions, {"train_queries": 0}, "train_queries"),
        (DistillOptions, {"teacher_contexts": 0}, "teacher_contexts"),
        (DistillOptions, {"teacher_topk": 0}, "teacher_topk"),
    ],
)
def test_out_of_range_values_name_the_option(cls: type, values: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(cls, values, source="cfg.yaml")
    assert named in str(info.value) and "cfg.yaml" in str(info.value)


@pytest.mark.parametrize("values", [{"shots": 0}, {"alpha": 0.0}, {"alpha": 1.0}, {"limit": 1},
                                    {"train_batch_size": 8, "grad_accum": 4}, {"temperature": 0.01}])
def test_boundary_values_are_accepted(values: dict[str, Any]) -> None:
    config = build_config(DistillOptions, values)
    assert all(getattr(config, k) == v for k, v in values.items())


# ---------------------------------------------------------------------------------------------
# load_yaml


def test_load_yaml_reads_a_mapping_that_builds_a_config(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("task: mnli\nseeds: [0, 1]\nlabel_words: [' Yes', ' No']\nalpha: 0.25\nprefix-cache: false\n",
                    encoding="utf-8")
    values = load_yaml(path)
    config = build_config(DistillOptions, values, source=str(path))
    assert (config.seeds, config.label_words, config.alpha, config.prefix_cache) == (
        [0, 1], [" Yes", " No"], 0.25, False)


def test_load_yaml_of_an_empty_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n", encoding="utf-8")
    assert load_yaml(path) == {}


def test_load_yaml_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("task: [mnli\n", "not valid YAML"), ("a: b: c\n", "not valid YAML"), ("- mnli\n- rte\n", "mapping"),
     ("just a string\n", "mapping"), ("42\n", "mapping")],
)
def test_load_yaml_bad_content_names_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_load_yaml_unreadable_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"task: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert str(path) in str(info.value)


def test_cli_output_into_a_closed_pipe_is_not_a_traceback():
    """`icld tasks | head -0`: the reader closes the pipe before any output; the command ends quietly."""
    import subprocess
    import sys

    code = ("import subprocess, sys\n"
            "p = subprocess.Popen([sys.executable, '-m', 'icldistill.cli', 'tasks'], stdout=subprocess.PIPE, "
            "stderr=subprocess.PIPE)\n"
            "p.stdout.close()\n"  # before the command writes anything
            "err = p.stderr.read().decode(); p.wait()\n"
            "print(p.returncode, 'Traceback' in err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ["0", "False"], out


# ---------------------------------------------------------------------------------------------
# Ranges declared on the options (issue 19), retired options, integers of any length (issue 21 case 14)


def test_retired_option_still_loads_and_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """Run records and option files written before `eval_limit` was removed still build a config."""
    config = build_config(PbftOptions, {"eval_limit": 50, "epochs": 2}, source="old.yaml")
    assert config.epochs == 2 and not hasattr(config, "eval_limit")
    assert "eval_limit" in caplog.text and "old.yaml" in caplog.text
    caplog.clear()
    build_config(PbftOptions, {"eval_limit": None})  # what older results.json hold: dropped without a word
    assert caplog.text == ""


def test_huge_seed_is_a_clear_error_not_an_overflow() -> None:
    with pytest.raises(ConfigError, match=r"option 'seeds' \(item 99999999999999999999\) must lie in \[0, "
                                          r"4294967295\]"):
        build_config(CommonOptions, {"seeds": "99999999999999999999"}, source="command line")


def _bounded_int_options() -> list[tuple[type, str, Any, Any]]:
    found = []
    for cls in (CommonOptions, IclOptions, PbftOptions, DistillOptions, PredictOptions, CompareOptions, TuneOptions):
        for f in dataclasses.fields(cls):
            # grad_accum also has to divide train_batch_size (a cross-check tested above)
            if f.metadata.get("min") is not None and f.type in ("int", "int | None", "list[int]") \
                    and f.name != "grad_accum":
                found.append((cls, f.name, f.metadata["min"], f.metadata.get("max")))
    return found


BOUNDED = _bounded_int_options()
REQUIRED_VALUES: dict[type, dict[str, Any]] = {CompareOptions: {"run_a": "a", "run_b": "b"},
                                               TuneOptions: {"experiment": "tune.yaml"}}


def test_every_range_is_found() -> None:
    names = {name for _, name, _, _ in BOUNDED}
    assert {"shots", "seeds", "lora_alpha", "lora_r", "epochs", "batch_size", "teacher_topk", "seed"} <= names


@settings(max_examples=200, deadline=None)
@given(case=st.sampled_from(BOUNDED), value=st.integers(min_value=-(10**30), max_value=10**30))
def test_declared_int_ranges_decide_acceptance(case: tuple[type, str, Any, Any], value: int) -> None:
    """A value is accepted exactly when it lies in the declared range; a refusal names the option and value,
    whether the value comes as a number or as command-line text."""
    cls, name, low, high = case
    extra = REQUIRED_VALUES.get(cls, {})
    inside = value >= low and (high is None or value <= high) and value <= 2**63 - 1
    for given_value in (value, str(value)):
        if inside:
            config = build_config(cls, {name: given_value, **extra})
            assert getattr(config, name) in (value, [value])
        else:
            with pytest.raises(ConfigError) as info:
                build_config(cls, {name: given_value, **extra}, source="cli")
            assert f"'{name}'" in str(info.value) and str(value) in str(info.value)


@settings(max_examples=100, deadline=None)
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_float_ranges_refuse_non_finite_and_outside(value: float) -> None:
    ok = math.isfinite(value) and 0.0 <= value <= 1.0
    if ok:
        assert build_config(DistillOptions, {"alpha": value}).alpha == value
    else:
        with pytest.raises(ConfigError, match="'alpha'"):
            build_config(DistillOptions, {"alpha": value})


def test_required_option_missing_is_named() -> None:
    with pytest.raises(ConfigError, match="option 'run_a' must be given"):
        build_config(CompareOptions, {"run_b": "x"})


def _option_classes() -> list[type]:
    import icldistill.config as config_module

    return [c for c in vars(config_module).values()
            if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__name__.endswith("Options")]


@pytest.mark.parametrize("cls", _option_classes(), ids=lambda c: c.__name__)
def test_every_default_lies_in_its_declared_range(cls: type) -> None:
    """A default that its own range refuses would make the command unusable without that option."""
    from icldistill.config import validate

    required = {f.name: (f.metadata.get("choices") or ["x"])[0] for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    validate(cls(**required), source=cls.__name__)  # raises on a default outside its range or choices
    assert len(_option_classes()) >= 15
