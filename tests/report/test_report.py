"""Report tables, claims and figures on a small synthetic sweep (no models, no sweep directory)."""

from __future__ import annotations

import math
import re
import sys
import types

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

import icldistill.experiments
from icldistill.report import plots, tables
from icldistill.report.plots import (
    figure_unsupported_reason,
    make_figures,
    plot_accuracy_vs_k,
    plot_alpha_curve,
    plot_hans_heatmap,
    plot_id_vs_ood,
    plot_memory_vs_k,
)
from icldistill.report.render import (
    headline_claims,
    render_html,
    render_markdown,
    write_report,
)
from icldistill.report.tables import (
    _table_view,
    comparison_markdown,
    comparison_table,
    in_domain_and_ood,
    markdown_table,
)

TEACHER, STUDENT = "facebook/opt-1.3b", "facebook/opt-125m"
KS, SEEDS = (2, 8, 32), (0, 1)
FAILED = ("distill-k8-a0.9", 1)  # (cell, seed) that failed
SUBCASES = ("le_passive", "le_conjunction", "ln_passive", "ln_subject/object_swap", "ln_preposition")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _configs():
    """(cell prefix, method, model, peft, alpha, pattern) of the synthetic sweep."""
    return [
        ("icl-teacher", "icl-teacher", TEACHER, None, math.nan, "gpt3"),
        ("icl-student", "icl-student", STUDENT, None, math.nan, "gpt3"),
        ("pbft", "pbft", STUDENT, "lora", math.nan, "minimal"),
        ("distill", "distill", STUDENT, "lora", 0.5, "gpt3"),
        ("distill", "distill", STUDENT, "lora", 0.9, "gpt3"),
    ]


def make_results(ks=KS, seeds=SEEDS, alphas=(0.5, 0.9), evals=("mnli-m", "hans-lo")) -> pd.DataFrame:
    """A collect()-shaped frame: one row per (cell, seed, eval set), one failed run."""
    rng = np.random.default_rng(0)
    rows = []
    for prefix, method, model, peft, alpha, pattern in _configs():
        if method == "distill" and alpha not in alphas:
            continue
        for k in ks:
            cell = f"{prefix}-k{k}" + (f"-a{alpha:g}" if method == "distill" else "")
            memory = {"icl-teacher": 1000 + 50 * k, "icl-student": 300 + 10 * k,
                      "pbft": 2000.0, "distill": 800.0}[method]
            latency = {"icl-teacher": 20 + k, "icl-student": 5 + k / 4}.get(method, 4.0)
            for seed in seeds:
                failed = (cell, seed) == FAILED
                for name in evals:
                    ood = name.startswith("hans")
                    accuracy = float(rng.uniform(0.45, 0.75))
                    row = {
                        "cell": cell, "method": method, "model": model,
                        "teacher": TEACHER, "student": STUDENT, "task": "mnli", "shots": k, "seed": seed,
                        "alpha": alpha, "peft": peft, "pattern": pattern, "eval": name, "n": 100, "dropped": 0,
                        "accuracy": accuracy, "calibrated_accuracy": float(rng.uniform(0.5, 0.6)),
                        "auc": 0.6, "accuracy_full_vocab": 0.1, "non_label_rate": 0.2, "macro_f1": 0.5,
                        # Different from accuracy on purpose: the OOD column must use this one.
                        "ood_accuracy": float(rng.uniform(0.4, 0.7)) if ood else math.nan,
                        "peak_memory_mb": memory + rng.uniform(0, 10),
                        "train_time_s": math.nan if method.startswith("icl") else 30.0 + seed,
                        "teacher_time_s": 5.0 if method == "distill" else math.nan,
                        "seconds_per_step": math.nan if method.startswith("icl") else 0.1,
                        "trainable_parameters": math.nan if method.startswith("icl") else 1e5,
                        "inference_latency_ms": latency + rng.uniform(0, 1),
                        "inference_peak_memory_mb": (memory if method.startswith("icl") else 300.0) + rng.uniform(0, 5),
                        "status": "failed" if failed else "complete",
                    }  # fmt: skip
                    if failed:
                        for key in ("accuracy", "calibrated_accuracy", "auc", "accuracy_full_vocab", "non_label_rate",
                                    "macro_f1", "ood_accuracy", "peak_memory_mb", "train_time_s", "teacher_time_s",
                                    "seconds_per_step", "trainable_parameters", "inference_latency_ms",
                                    "inference_peak_memory_mb"):
                            row[key] = math.nan
                    rows.append(row)
    df = pd.DataFrame(rows, columns=list(tables.RESULT_COLUMNS))
    return df


def make_subcases(df: pd.DataFrame) -> pd.DataFrame:
    """collect_subcases()-shaped rows for the completed HANS evaluations of ``df``."""
    rng = np.random.default_rng(1)
    hans = df[(df["eval"] == "hans-lo") & (df["status"] == "complete")]
    rows = []
    for r in hans.itertuples():
        for name in SUBCASES:
            biased = r.method == "icl-student"
            accuracy = (0.98 if name.startswith("le") else 0.02) if biased else float(rng.uniform(0.2, 0.9))
            rows.append({"cell": r.cell, "method": r.method, "model": r.model, "shots": r.shots, "seed": r.seed,
                         "alpha": r.alpha, "eval": r.eval, "subcase": name, "n": 20, "accuracy": accuracy})
    return pd.DataFrame(rows, columns=list(tables.SUBCASE_COLUMNS))


def make_confusions(df: pd.DataFrame, classes: tuple[str, ...] = ("world", "sports", "business")) -> pd.DataFrame:
    """collect_confusions()-shaped rows: a 3-class set where the ICL student answers 'world' for everything."""
    rng = np.random.default_rng(2)
    rows = []
    for r in df[(df["eval"] == "mnli-m") & (df["status"] == "complete")].itertuples():
        for gold in classes:
            for pred in classes:
                biased = r.method == "icl-student"
                count = (10 if pred == "world" else 0) if biased else int(rng.integers(0, 10)) + 10 * (gold == pred)
                rows.append({"cell": r.cell, "method": r.method, "model": r.model, "shots": r.shots, "seed": r.seed,
                             "alpha": r.alpha, "eval": "topics", "gold": gold, "predicted": pred, "count": count})
    return pd.DataFrame(rows, columns=["cell", "method", "model", "shots", "seed", "alpha", "eval", "gold",
                                       "predicted", "count"])


@pytest.fixture(scope="module")
def results() -> pd.DataFrame:
    return make_results()


@pytest.fixture(scope="module")
def table(results) -> pd.DataFrame:
    return comparison_table(results)


@pytest.fixture(scope="module")
def figures(results, table, tmp_path_factory):
    return make_figures(table, make_subcases(results), tmp_path_factory.mktemp("figures"), make_confusions(results))


def _select(df, method, k, alpha=math.nan):
    rows = df[(df["method"] == method) & (df["shots"] == k) & (df["status"] == "complete")]
    return rows[rows["alpha"].isna()] if math.isnan(alpha) else rows[rows["alpha"] == alpha]


def _table_row(table, method, k, alpha=math.nan):
    rows = table[(table["method"] == method) & (table["shots"] == k)]
    rows = rows[rows["alpha"].isna()] if math.isnan(alpha) else rows[rows["alpha"] == alpha]
    assert len(rows) == 1
    return rows.iloc[0]


# ------------------------------------------------------------------------------------------
# Per-run values and the table


def test_comparison_table_means_and_stds_equal_numpy(results, table):
    groups = [(m, k, a) for _, m, _, _, a, _ in _configs() for k in KS]
    assert len(table) == len(groups)
    for method, k, alpha in groups:
        row = _table_row(table, method, k, alpha)
        rows = _select(results, method, k, alpha)
        ids = rows[rows["eval"] == "mnli-m"]["accuracy"].to_numpy()
        oods = rows[rows["eval"] == "hans-lo"]["ood_accuracy"].to_numpy()
        memory = rows.groupby("seed")["peak_memory_mb"].max().to_numpy()
        assert row["id_accuracy_mean"] == pytest.approx(np.mean(ids))
        assert row["ood_accuracy_mean"] == pytest.approx(np.mean(oods))
        assert row["peak_memory_mb_mean"] == pytest.approx(np.mean(memory))
        if len(ids) > 1:
            assert row["id_accuracy_std"] == pytest.approx(np.std(ids, ddof=1))
            assert row["ood_accuracy_std"] == pytest.approx(np.std(oods, ddof=1))
        else:
            assert math.isnan(row["id_accuracy_std"])  # one seed: no spread to report
        assert row["id_eval"] == "mnli-m" and row["ood_eval"] == "hans-lo"


def test_table_order_and_model_labels(table):
    assert list(dict.fromkeys(table["method"])) == ["icl-teacher", "icl-student", "pbft", "distill"]
    assert set(table.loc[table["method"] == "distill", "models"]) == {"opt-1.3b → opt-125m"}
    assert set(table.loc[table["method"] == "icl-teacher", "models"]) == {"opt-1.3b"}
    assert list(table.loc[table["method"] == "pbft", "shots"]) == list(KS)


def test_failed_run_is_left_out_of_means_but_counted(results, table):
    row = _table_row(table, "distill", 8, 0.9)
    assert row["n_seeds"] == 1 and row["n_failed"] == 1
    survivor = _select(results, "distill", 8, 0.9)
    assert row["id_accuracy_mean"] == pytest.approx(survivor[survivor["eval"] == "mnli-m"]["accuracy"].item())
    runs = in_domain_and_ood(results)
    assert (runs["status"] == "failed").sum() == 1
    markdown = render_markdown(results, [])
    assert "29 complete, 1 failed" in markdown and f"Failed: {FAILED[0]} seed {FAILED[1]}" in markdown
    assert "1 (1 failed)" in comparison_markdown(table)


def test_skipped_and_partly_failed_runs(results):
    df = results.copy()
    skipped = df["cell"] == "icl-teacher-k32"  # e.g. the 32 demonstrations did not fit the context
    df.loc[skipped, "status"] = "skipped"
    df.loc[skipped, ["accuracy", "ood_accuracy", "peak_memory_mb"]] = math.nan
    partly = (df["cell"] == "pbft-k8") & (df["seed"] == 0) & (df["eval"] == "hans-lo")
    df.loc[partly, "status"] = "failed"
    df.loc[partly, ["accuracy", "ood_accuracy"]] = math.nan
    table = comparison_table(df)

    row = _table_row(table, "icl-teacher", 32)
    assert (row["n_seeds"], row["n_failed"], row["n_skipped"]) == (0, 0, 2)
    assert math.isnan(row["id_accuracy_mean"])
    row = _table_row(table, "pbft", 8)
    assert (row["n_seeds"], row["n_failed"]) == (2, 1)
    complete = _select(df, "pbft", 8)
    assert row["id_accuracy_mean"] == pytest.approx(complete[complete["eval"] == "mnli-m"]["accuracy"].mean())
    assert row["ood_accuracy_mean"] == pytest.approx(complete[complete["eval"] == "hans-lo"]["ood_accuracy"].item())
    markdown = render_markdown(df, [])
    assert "26 complete, 1 partly failed, 1 failed, 2 skipped" in markdown
    assert "pbft-k8 seed 0 (partly)" in markdown


def test_ood_uses_ood_accuracy_and_never_the_pooled_accuracy(results):
    """Issue 12 item 7: a missing label-mean OOD value is a gap, not the pooled accuracy under the same header."""
    df = results.copy()
    hans = (df["eval"] == "hans-lo") & (df["cell"] == "pbft-k2") & (df["seed"] == 0)
    df.loc[hans, "ood_accuracy"] = math.nan
    runs = in_domain_and_ood(df).set_index(["cell", "seed"])
    assert math.isnan(runs.loc[("pbft-k2", 0), "ood_accuracy"])
    headers, _, _ = _table_view(comparison_table(df))
    assert any(h.startswith("OOD acc") and "mean of the label accuracies" in h for h in headers)
    other = (results["eval"] == "hans-lo") & (results["cell"] == "pbft-k2") & (results["seed"] == 1)
    assert runs.loc[("pbft-k2", 1), "ood_accuracy"] == pytest.approx(results.loc[other, "ood_accuracy"].item())


def test_hans_lo_is_preferred_over_other_hans_sets():
    df = make_results(ks=(2,), alphas=(0.5,), evals=("mnli-m", "hans-sub", "hans-lo"))
    runs = in_domain_and_ood(df)
    assert set(runs["ood_eval"]) == {"hans-lo"}
    row = df[(df["cell"] == "pbft-k2") & (df["seed"] == 0) & (df["eval"] == "hans-lo")]
    assert runs.set_index(["cell", "seed"]).loc[("pbft-k2", 0), "ood_accuracy"] == pytest.approx(
        row["ood_accuracy"].item())


@pytest.mark.parametrize("evals", [("mnli-m",), ("hans-lo",)])
def test_sweeps_with_only_one_kind_of_eval_set(evals, tmp_path):
    df = make_results(evals=evals)
    table = comparison_table(df)
    has_ood = evals == ("hans-lo",)
    assert table["ood_accuracy_mean"].notna().any() == has_ood
    assert table["id_accuracy_mean"].notna().any() == (not has_ood)
    assert plot_accuracy_vs_k(table, tmp_path / "acc.png") is not None  # one panel
    assert plot_id_vs_ood(table, tmp_path / "scatter.png") is None
    missing = "in-domain" if has_ood else "out-of-domain"
    assert f"no {missing}" in figure_unsupported_reason("id_vs_ood", table)
    assert "Results" in render_markdown(df, [])
    header = comparison_markdown(table).splitlines()[0]
    assert ("OOD acc" in header) == has_ood and ("in-domain acc" in header) == (not has_ood)


def test_missing_columns_fail_with_a_clear_message(results):
    with pytest.raises(icldistill.errors.DataError, match="ood_accuracy"):
        in_domain_and_ood(results.drop(columns=["ood_accuracy"]))


# ------------------------------------------------------------------------------------------
# Markdown


def test_markdown_table_formatter():
    text = markdown_table(["name", "value"], [["a|b", "1.0"], ["c", "22.5"]], ["l", "r"])
    lines = text.splitlines()
    assert lines[0].startswith("| name") and lines[1].endswith(":|")
    assert "a\\|b" in lines[2]
    assert len({len(line) for line in lines}) == 1  # padded to equal width
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [["only one"]])


def test_comparison_markdown_shows_mean_pm_std(table):
    text = comparison_markdown(table)
    row = _table_row(table, "pbft", 32)
    assert f"{row['id_accuracy_mean']:.3f} ± {row['id_accuracy_std']:.3f}" in text
    assert "α" in text and "PEFT" in text and "inference latency (ms/query)" in text
    assert len(text.splitlines()) == 2 + len(table)


def test_markdown_has_table_figures_claims_and_notes(results, table, figures):
    markdown = render_markdown(results, figures)
    assert comparison_markdown(table) in markdown
    for figure in figures:
        assert figure.path is not None, figure.reason
        assert f"]({figure.path.name})" in markdown
        assert figure.caption in markdown
    for needle in ("## What ran", "opt-125m", "2, 8, 32", "Seeds: 0, 1", "Reading this report", "chance",
                   "Queries scored per run: hans-lo 100, mnli-m 100",
                   "CD vs PBFT: peak memory", "nearly 50%"):
        assert needle in markdown


def test_missing_figures_are_explained(results, tmp_path):
    df = make_results(ks=(8,), alphas=(0.5,))
    figures = make_figures(comparison_table(df), None, tmp_path)
    markdown = render_markdown(df, figures)
    skipped = {f.name: f.reason for f in figures if f.path is None}
    assert set(skipped) == {"accuracy_vs_k", "memory_vs_k", "alpha_curve", "hans_heatmap", "confusion"}
    for reason in skipped.values():
        assert f"Not drawn: {reason}." in markdown
    assert not list(tmp_path.glob("accuracy_vs_k.png"))


def test_html_is_self_contained(results, figures):
    text = render_html(results, figures)
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text, flags=re.IGNORECASE)
    assert len(links) == len(figures)
    assert all(link.startswith("data:image/png;base64,") for link in links)
    assert "<style>" in text and "<table>" in text and "<link" not in text and "@import" not in text
    assert "Reading this report" in text and "CD vs PBFT: peak memory" in text


# ------------------------------------------------------------------------------------------
# Claims


def _mean_over_seeds(df, method, k, column, alpha=math.nan, eval_name=None):
    rows = _select(df, method, k, alpha)
    if eval_name:
        rows = rows[rows["eval"] == eval_name]
    reducer = "max" if "memory" in column else "mean"
    return rows.groupby("seed")[column].agg(reducer).mean()


def test_claims_are_computed_from_the_data(results, table):
    claims = {c.topic: c for c in headline_claims(table)}
    memory = claims["CD vs PBFT: peak memory"]
    for k in KS:
        cd = _mean_over_seeds(results, "distill", k, "peak_memory_mb", alpha=0.5)  # nearest the paper's alpha
        pbft = _mean_over_seeds(results, "pbft", k, "peak_memory_mb")
        assert memory.values[k]["change_percent"] == pytest.approx((cd - pbft) / pbft * 100)
        assert memory.values[k]["change_percent"] < -50  # 800 vs 2000 MB in the synthetic sweep
    assert f"−{abs(memory.values[2]['change_percent']):.1f}%" in memory.measured

    ood = claims["CD vs ICL at the student's size: OOD accuracy"]
    for k in KS:
        cd = _mean_over_seeds(results, "distill", k, "ood_accuracy", alpha=0.5, eval_name="hans-lo")
        icl = _mean_over_seeds(results, "icl-student", k, "ood_accuracy", eval_name="hans-lo")
        assert ood.values[k]["change_percent"] == pytest.approx((cd - icl) / icl * 100)

    flat = claims["CD memory across k"]
    cd_ratio = (_mean_over_seeds(results, "distill", 32, "peak_memory_mb", alpha=0.5)
                / _mean_over_seeds(results, "distill", 2, "peak_memory_mb", alpha=0.5))
    teacher_ratio = (_mean_over_seeds(results, "icl-teacher", 32, "peak_memory_mb")
                     / _mean_over_seeds(results, "icl-teacher", 2, "peak_memory_mb"))
    assert flat.values["cd"]["ratio"] == pytest.approx(cd_ratio)
    assert flat.values["icl-teacher"]["ratio"] == pytest.approx(teacher_ratio)
    assert f"×{cd_ratio:.2f}" in flat.measured

    inference = claims["Inference cost: CD student vs ICL teacher"]
    assert inference.values[32]["latency_change_percent"] < 0


def test_claims_say_when_they_cannot_be_measured():
    df = make_results(ks=(8,), alphas=(0.5,))
    df = df[df["method"] != "pbft"]
    claims = {c.topic: c for c in headline_claims(comparison_table(df))}
    assert claims["CD vs PBFT: peak memory"].values == {}
    assert claims["CD vs PBFT: peak memory"].measured.startswith("Not measurable")
    assert claims["CD memory across k"].measured.startswith("Not measurable")
    assert claims["CD vs ICL at the student's size: OOD accuracy"].values  # still measurable at k=8


# ------------------------------------------------------------------------------------------
# Figures


def _assert_png(path):
    assert path is not None and path.suffix == ".png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 400 and image.shape[1] >= 600
    assert float(np.std(image[..., :3])) > 0.01  # not a blank canvas


def test_every_figure_writes_a_valid_png(figures):
    assert [f.name for f in figures] == list(plots.FIGURES)
    for figure in figures:
        assert figure.reason is None
        assert figure.path.name == f"{figure.name}.png"
        _assert_png(figure.path)
    folder = figures[0].path.parent
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files


def test_unsupported_data_gives_none_and_a_reason(tmp_path):
    single_k = comparison_table(make_results(ks=(8,), alphas=(0.5, 0.9)))
    assert plot_accuracy_vs_k(single_k, tmp_path / "a.png") is None
    assert plot_memory_vs_k(single_k, tmp_path / "m.png") is None
    assert "single k (8)" in figure_unsupported_reason("accuracy_vs_k", single_k)
    assert "single k (8)" in figure_unsupported_reason("memory_vs_k", single_k)
    assert plot_alpha_curve(single_k, tmp_path / "alpha.png") is not None  # two alphas at one k still make a curve

    single_alpha = comparison_table(make_results(alphas=(0.5,)))
    assert plot_alpha_curve(single_alpha, tmp_path / "alpha1.png") is None
    assert "single α (α=0.5)" in figure_unsupported_reason("alpha_curve", single_alpha)

    no_distill = comparison_table(make_results(alphas=()))
    assert "no context-distillation" in figure_unsupported_reason("alpha_curve", no_distill)

    empty = make_subcases(make_results(ks=(2,)).iloc[0:0])
    assert plot_hans_heatmap(empty, tmp_path / "h.png") is None
    assert plot_hans_heatmap(None, tmp_path / "h.png") is None
    assert "no HANS subcase" in figure_unsupported_reason("hans_heatmap", None)
    assert not list(tmp_path.glob("[amh].png"))


# ------------------------------------------------------------------------------------------
# write_report, with results.collect replaced by the synthetic frames


def test_write_report_writes_everything(monkeypatch, tmp_path):
    results = make_results(ks=(8,), alphas=(0.5,))  # one k: two figures drawn, three explained
    fake = types.ModuleType("icldistill.experiments.results")
    fake.collect = lambda sweep_dir: results
    fake.collect_subcases = lambda sweep_dir: make_subcases(results)
    fake.collect_confusions = lambda sweep_dir: make_confusions(results.iloc[0:0])
    monkeypatch.setitem(sys.modules, "icldistill.experiments.results", fake)
    monkeypatch.setattr(icldistill.experiments, "results", fake, raising=False)

    paths = write_report(tmp_path / "sweep")
    out = tmp_path / "sweep" / "report"
    assert paths["markdown"] == out / "report.md" and paths["html"] == out / "report.html"
    assert set(paths["figures"]) == {"id_vs_ood", "hans_heatmap"}
    assert set(paths["skipped"]) == {"accuracy_vs_k", "memory_vs_k", "alpha_curve", "confusion"}
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert markdown.startswith("# ICL distillation report: sweep")
    for path in paths["figures"].values():
        assert path.parent == out and f"]({path.name})" in markdown
        _assert_png(path)
    for reason in paths["skipped"].values():
        assert reason in markdown
    assert paths["html"].read_text(encoding="utf-8").count("data:image/png;base64,") == 2
    assert sorted(p.name for p in out.iterdir()) == ["hans_heatmap.png", "id_vs_ood.png", "report.html", "report.md"]

    fake.collect = lambda sweep_dir: results.iloc[0:0]
    with pytest.raises(icldistill.errors.IcldError, match="No results found"):
        write_report(tmp_path / "empty")


def test_confusion_figure_only_for_more_than_two_classes(results, tmp_path):
    binary = make_confusions(results, classes=("yes", "no"))
    assert "two classes" in figure_unsupported_reason("confusion", binary)
    assert figure_unsupported_reason("confusion", make_confusions(results)) is None
    path = plots.plot_confusions(make_confusions(results), tmp_path / "confusion.png")
    _assert_png(path)


# ------------------------------------------------------------------------------------------
# A 3-class sweep without an OOD set (issue 23 item 6)


def _three_class_results() -> pd.DataFrame:
    df = make_results(evals=("tickets",)).assign(task="tickets", chance_rate=1 / 3, majority_rate=0.4)
    zero = df[(df["method"] == "icl-student") & (df["shots"] == KS[0])].copy()
    zero["shots"], zero["cell"] = 0, "icl-student-k0"  # the untrained student answering zero-shot
    return pd.concat([df, zero], ignore_index=True)


def _paired_for(table: pd.DataFrame) -> pd.DataFrame:
    """sweep_paired()-shaped rows for every CD configuration and baseline at the same k (sentences are markers)."""
    from icldistill.experiments.compare import config_key

    rows = []
    for _, cd in table[table["method"] == "distill"].iterrows():
        same_k = table[table["method"].isin(["icl-student", "pbft"]) & (table["shots"] == cd["shots"])]
        for _, base in same_k.iterrows():
            rows.append({"cd_key": config_key(cd.to_dict()), "baseline_key": config_key(base.to_dict()),
                         "eval": "tickets", "metric": "accuracy", "difference": 0.04, "ci95_low": -0.01,
                         "ci95_high": 0.09, "queries": 100, "n_seeds": 2, "a_only": 9, "b_only": 5, "mcnemar_p": 0.4,
                         "sentence": f"PAIRED-{base['method']}-k{int(cd['shots'])}"})
    return pd.DataFrame(rows)


def _estimated_width_px(headers, rows, align) -> float:
    """The table's width as the report's CSS lays it out: headers wrap at spaces, right-aligned cells do not,
    left-aligned ones wrap at spaces; about 7 px per character at 0.8em, plus padding and borders."""
    total = 0.0
    for i, (header, a) in enumerate(zip(headers, align)):
        words = [len(w) for w in header.split()]
        cells = [len(r[i]) if a == "r" else max(len(w) for w in (r[i].split() or [""])) for r in rows]
        total += 7.0 * max(words + cells) + 2 * 5 + 1
    return total


def test_a_three_class_sweep_without_ood_reports_chance_and_in_domain_paired_claims(tmp_path):
    df = _three_class_results()
    table = comparison_table(df)
    paired = _paired_for(table)
    markdown = render_markdown(df, [], paired=paired)
    assert "chance is 1/C = 0.333 (C = 3 classes)" in markdown and "majority class scores 0.400" in markdown
    assert "Chance is 0.5" not in markdown and "' Yes' / ' No'" not in markdown and "HANS-LO" not in markdown
    claims = {c.topic: c for c in headline_claims(table, paired)}
    in_domain = claims["CD vs ICL at the student's size: in-domain accuracy"]
    assert in_domain.values and all("paired" in v for v in in_domain.values.values())
    assert f"paired difference PAIRED-icl-student-k{KS[0]}" in in_domain.measured
    assert "paired difference PAIRED-pbft-k8" in claims["CD vs PBFT: in-domain accuracy"].measured
    assert claims["CD vs PBFT: OOD accuracy"].measured.startswith("Not measurable: the sweep has no out-of-domain")
    # what was found comes before the table, and the untrained student has its own row
    assert markdown.index("Headline claims") < markdown.index("## Results")
    assert "ICL student (zero-shot)" in comparison_markdown(table)
    # the HTML table wraps instead of scrolling, and its columns fit a 1400 px window (body padding aside)
    text = render_html(df, [], paired=paired)
    assert "overflow-x" not in text and "white-space: nowrap; }" not in text.split("th, td")[1].split("\n")[0]
    headers, rows, align = _table_view(table)
    assert _estimated_width_px(headers, rows, align) <= 1360, headers


def test_the_binary_hans_sweep_keeps_its_ood_notes(results, table):
    markdown = render_markdown(results, [])
    assert "chance is 0.5" in markdown and "HANS-LO" in markdown
    claims = {c.topic for c in headline_claims(table)}
    topic = "CD vs ICL at the student's size"
    assert {f"{topic}: in-domain accuracy", f"{topic}: OOD accuracy"} <= claims


def test_two_kl_spaces_are_two_configurations(results):
    """A grid over kl_space gives one table row per KL space (never one row averaging both as six seeds)."""
    cd = results[results["method"] == "distill"]
    vocab = cd.assign(cell=cd["cell"] + "-vocab", kl_space="vocab",
                      accuracy=cd["accuracy"] - 0.1)
    df = pd.concat([results.assign(kl_space=results["method"].map({"distill": "label"})), vocab], ignore_index=True)
    table = comparison_table(df)
    for k in KS:
        for alpha in (0.5, 0.9):
            rows = table[(table["method"] == "distill") & (table["shots"] == k) & (table["alpha"] == alpha)]
            assert sorted(rows["kl_space"]) == ["label", "vocab"]
            label, vocab_row = (rows[rows["kl_space"] == s].iloc[0] for s in ("label", "vocab"))
            assert vocab_row["id_accuracy_mean"] == pytest.approx(label["id_accuracy_mean"] - 0.1)
            assert vocab_row["models"].endswith("(vocab KL)") and "(vocab KL)" not in label["models"]
            assert vocab_row["n_seeds"] == label["n_seeds"]
