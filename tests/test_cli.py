"""The command line is generated from config.py: every option of every command is a flag (or an argument)
of its subcommand, with its help; bad values end in one clear line, before any model or data is read."""

from __future__ import annotations

import dataclasses

import pytest

from icldistill import cli
from icldistill.config import CompareOptions, ExportOptions, TuneOptions


def _subparsers() -> dict:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def _all_commands() -> dict[str, type]:
    commands = {name: cls for name, (_, cls, _) in cli.COMMANDS.items()}
    commands.update({name: cls for name, (_, cls) in cli.TOOLS.items()})
    return commands


def test_every_subcommand_has_an_options_class():
    assert set(_subparsers()) == set(_all_commands())
    assert {"models", "reproduce", "report", "tasks", "sweep", "tune", "validate", "export", "compare",
            "results"} <= set(cli.TOOLS)


@pytest.mark.parametrize("name", sorted(_all_commands()))
def test_every_option_is_an_argument_with_its_help(name):
    cls = _all_commands()[name]
    parser = _subparsers()[name]
    by_dest = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(cls):
        action = by_dest[f.name]
        assert f.metadata["help"] in action.help
        if f.metadata.get("positional"):
            assert not action.option_strings
        else:
            assert "--" + f.name.replace("_", "-") in action.option_strings


def test_tool_options_parse_to_their_typed_class():
    args = cli.build_parser().parse_args(["compare", "a", "b", "--eval", "mnli-m, hans-lo", "--resamples", "50"])
    options = cli._options(args)
    assert isinstance(options, CompareOptions)
    assert (options.run_a, options.run_b, options.eval, options.resamples, options.seed) == (
        "a", "b", ["mnli-m", "hans-lo"], 50, 0)


@pytest.mark.parametrize(("argv", "finish", "finish_only"), [
    (["tune", "t.yaml"], True, False), (["tune", "t.yaml", "--no-finish"], False, False),
    (["tune", "t.yaml", "--finish-only"], True, True),
])
def test_tune_keeps_its_flags(argv, finish, finish_only):
    options = cli._options(cli.build_parser().parse_args(argv))
    assert isinstance(options, TuneOptions) and (options.finish, options.finish_only) == (finish, finish_only)


def test_export_output_is_required_and_push_to_hub_shows_repo(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["export", "run/seed-0"])
    assert "--output" in capsys.readouterr().err
    options = cli._options(cli.build_parser().parse_args(["export", "r", "--output", "o", "--push-to-hub", "me/x"]))
    assert isinstance(options, ExportOptions) and options.push_to_hub == "me/x" and options.private is False
    assert "--push-to-hub REPO" in _subparsers()["export"].format_help()


@pytest.mark.parametrize(("argv", "message"), [
    (["pbft", "--lora-alpha", "0"], "option 'lora_alpha' must be >= 1 (a positive number)"),  # issue 21 case 9
    (["distill", "--seeds", "99999999999999999999"], "option 'seeds' (item 99999999999999999999)"),  # case 14
    (["icl", "--seeds", "0,0"], "option 'seeds' lists 0 more than once"),
    (["compare", "a", "b", "--resamples", "0"], "option 'resamples'"),
    (["tune", "t.yaml", "--trials", "-3"], "option 'trials'"),
])
def test_bad_values_end_in_one_clear_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_unknown_task_name_gets_a_suggestion(capsys):
    assert cli.main(["tasks", "show", "mnlii"]) == 2
    assert "Did you mean: mnli" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(_all_commands()))
def test_every_subcommand_help_renders(name):
    """argparse formats help lazily: a stray '%' in a help text would fail only when a user asks for --help."""
    text = _subparsers()[name].format_help()
    assert text.startswith(f"usage: icld {name}")
