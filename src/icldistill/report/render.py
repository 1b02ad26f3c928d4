"""The sweep report: the paper's headline claims as measured, and ``report.md`` / ``report.html``.

A report holds the comparison table (:mod:`icldistill.report.tables`), the figures (:mod:`icldistill.report.plots`) and
the claims. The core functions take the DataFrames of :mod:`icldistill.experiments.results` (``collect`` and
``collect_subcases``) and never read a sweep directory themselves; only :func:`write_report` does,
so every number in a report can be recomputed and tested from a DataFrame.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from icldistill.errors import IcldError
from icldistill.report.console import MISSING
from icldistill.report.headline import headline_lines, zero_shot_paired
from icldistill.report.plots import FigureResult, make_figures
from icldistill.report.tables import (
    _FAILED,
    METHOD_LABELS,
    OOD_CHANCE,
    _first_series,
    _fmt_alpha,
    _growth,
    _method_rank,
    _missing,
    _reference_rows,
    _table_from_runs,
    _table_view,
    _values,
    chance_levels,
    comparison_table,
    in_domain_and_ood,
    markdown_table,
)
from icldistill.runtime.records import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "Claim",
    "headline_claims",
    "render_markdown",
    "render_html",
    "write_report",
]

_STATUS_WORDS = {"partial": "partly failed"}

DEFAULT_TITLE = "ICL distillation report"

def reading_notes(table: pd.DataFrame) -> str:
    """How to read the report, for the classes and sets this sweep has (no binary wording on a C-class sweep)."""
    chance, majority = chance_levels(table) if not table.empty else (None, None)
    has_ood = not table.empty and table["ood_accuracy_mean"].notna().any()
    if chance is not None:
        classes = round(1 / chance) if chance > 0 else 0
        level = (f"In domain, chance is 1/C = {chance:.3f} (C = {classes} classes)"
                 + (f" and always answering the majority class scores {majority:.3f}" if majority is not None else "")
                 + "; accuracies near these show no measurable skill. ")
    else:
        level = "In domain, chance is 1/C for C classes (see the chance / majority-class rates above). "
    ood = (f"OOD accuracy is, on every HANS set (lexical overlap HANS-LO by preference), the mean of the entailment "
           f"and non-entailment accuracies, as in the lineage (Mosbach et al. 2023); never the pooled accuracy; its "
           f"chance is {OOD_CHANCE}, and a model that answers 'entailment' to everything scores about 0.5 on it. "
           if has_ood else "This sweep has no out-of-domain set, so every claim is in domain. ")
    return (
        "Accuracy is restricted accuracy: the prediction is the most probable of the pattern's label words (one per "
        "class), whatever else the model would have said. Full-vocabulary accuracy (in the per-run results) also "
        "requires the label word to be the model's top token overall; tiny models often score near 0 there. "
        "Calibrated accuracy applies contextual calibration (Zhao et al. 2021) against a content-free input; it is "
        "empty for runs that did not score one. " + level + ood +
        "Labelled examples is each run's label budget: ICL and PBFT use the k demonstrations; CD uses them plus its "
        "training queries' gold labels when its CE term targets them (--ce-target gold, the paper's), and only the k "
        "with --ce-target teacher; a run that chose its checkpoint on the dev split (--select best) counts the dev "
        "labels too. Steps and examples seen are the training budget. Small models are strongly label-biased: one "
        "that answers one class to everything scores the majority rate, so a relative gain over a near-chance "
        "baseline says little on its own. Std is the sample standard deviation over seeds (none with one seed)."
    )


# ---------------------------------------------------------------------------------------------
# Headline claims, as measured


@dataclass
class Claim:
    """One headline claim of the paper and what this sweep measured for it.

    ``values`` maps k to the numbers behind the sentence (e.g. ``{"cd": .., "baseline": ..,
    "change_percent": ..}``); it is empty when the sweep cannot test the claim, and ``measured``
    then says why.
    """

    topic: str
    paper: str
    measured: str
    values: dict[Any, dict[str, float]]


def _relative_percent(value: float, baseline: float) -> float:
    return (value - baseline) / baseline * 100.0 if baseline else math.nan


def _signed(value: float, digits: int = 1, unit: str = "%") -> str:
    if math.isnan(value):
        return "undefined"
    return f"{'+' if value >= 0 else '−'}{abs(value):.{digits}f}{unit}"


def _pair_by_k(cd: pd.DataFrame, other: pd.DataFrame, column: str) -> dict[int, tuple[float, float]]:
    """k -> (CD mean, baseline mean) of ``column`` where both exist (first configuration of each)."""
    cd, other = _values(cd, f"{column}_mean"), _values(other, f"{column}_mean")
    pairs = {}
    for k in sorted(set(cd["shots"]) & set(other["shots"])):
        pairs[int(k)] = (float(cd[cd["shots"] == k].iloc[0][f"{column}_mean"]),
                         float(other[other["shots"] == k].iloc[0][f"{column}_mean"]))
    return pairs


def _cd_rows(table: pd.DataFrame) -> pd.DataFrame:
    return _first_series(_reference_rows(table, "distill"))


def _matching(table: pd.DataFrame, method: str, cd: pd.DataFrame, same_peft: bool = False) -> pd.DataFrame:
    """Baseline rows on the CD student's model (the teacher's for ``pbft-teacher``; same task),
    same PEFT when available."""
    rows = table[table["method"] == method]
    if cd.empty or rows.empty:
        return rows.iloc[0:0]
    first = cd.iloc[0]
    model = first["teacher"] if method == "pbft-teacher" else first["student"]
    rows = rows[(rows["model"].astype(str) == str(model)) & (rows["task"].astype(str) == str(first["task"]))]
    if same_peft and not _missing(first["peft"]):
        same = rows[rows["peft"].astype(str) == str(first["peft"])]
        rows = same if not same.empty else rows
    return _first_series(rows)


def _labels_at(rows: pd.DataFrame, k: int) -> str:
    """The label budget of a row at k, as a claim quotes it."""
    at = rows[rows["shots"] == k]
    value = at.iloc[0].get("labelled_examples_mean") if len(at) else None
    return "?" if _missing(value) else f"{float(value):.0f}"


def _cd_note(cd: pd.DataFrame) -> str:
    first = cd.iloc[0]
    note = f"CD = {first['models']}"
    if not _missing(first["alpha"]):
        note += f", α={_fmt_alpha(first['alpha'])}"
    if not _missing(first["peft"]):
        note += f", {first['peft']}"
    return note


def _comparison_claim(topic: str, paper: str, table: pd.DataFrame, baseline: str, column: str,
                      unit: str, digits: int, lower_is_better: bool = False,
                      paired: pd.DataFrame | None = None) -> Claim:
    cd = _cd_rows(table)
    base = _matching(table, baseline, cd, same_peft=baseline in ("pbft", "pbft-teacher"))
    name = METHOD_LABELS[baseline]
    if cd.empty or base.empty:
        side = "teacher" if baseline == "pbft-teacher" else "student"
        missing = "CD" if cd.empty else f"{name} on the CD {side}'s model"
        return Claim(topic, paper, f"Not measurable: the sweep has no {missing} results.", {})
    pairs = _pair_by_k(cd, base, column)
    if not pairs:
        return Claim(topic, paper, f"Not measurable: CD and {name} share no k with {column} results.", {})
    values = {k: {"cd": a, "baseline": b, "change_percent": _relative_percent(a, b)} for k, (a, b) in pairs.items()}
    accuracy = "accuracy" in column
    chance = OOD_CHANCE if column == "ood_accuracy" else (chance_levels(table)[0] or OOD_CHANCE)
    for k, v in values.items():  # accuracy claims: the paired interval over queries and seeds (issue 11)
        if accuracy and (hit := _paired(paired, cd, base, k, column)) is not None:
            v["paired"] = hit
    # Each pair names its label budgets: CD with gold CE labels uses its training queries' labels too.
    parts = [f"k={k}: {v['cd']:.{digits}f} vs {v['baseline']:.{digits}f}{unit} ({_signed(v['change_percent'])}"
             + (", both within 0.05 of chance or below" if accuracy and max(v["cd"], v["baseline"]) < chance + 0.05
                else "") + (f"; paired difference {v['paired']['sentence']}" if "paired" in v else "")
             + f"; labelled examples {_labels_at(cd, k)} vs {_labels_at(base, k)})"
             for k, v in values.items()]
    changes = [v["change_percent"] for v in values.values() if not math.isnan(v["change_percent"])]
    summary = ""
    if len(changes) > 1 and _signed(min(changes)) != _signed(max(changes)):
        extreme = min(changes) if lower_is_better else max(changes)
        summary = (f"; range {_signed(min(changes))} to {_signed(max(changes))}, "
                   f"most favourable to CD {_signed(extreme)}")
    base_first = base.iloc[0]
    base_note = f"{name} = {base_first['models']}"
    if not _missing(base_first["peft"]):
        base_note += f", {base_first['peft']}"
    text = f"CD vs {name}, " + "; ".join(parts) + f"{summary} ({_cd_note(cd)}; {base_note})."
    return Claim(topic, paper, text, values)


def _paired(paired: pd.DataFrame | None, cd: pd.DataFrame, base: pd.DataFrame, k: int, column: str) -> dict | None:
    """The paired comparison (experiments.compare.sweep_paired) of the rows at k that ``_pair_by_k`` compares."""
    from icldistill.experiments.compare import paired_lookup

    if paired is None:
        return None
    a, b = cd[cd["shots"] == k].iloc[0], base[base["shots"] == k].iloc[0]
    eval_set = a["ood_eval"] if column == "ood_accuracy" else a["id_eval"]
    return paired_lookup(paired, a.to_dict(), b.to_dict(), None if _missing(eval_set) else str(eval_set),
                         "ood_accuracy" if column == "ood_accuracy" else "accuracy")


IN_DOMAIN_PAPER = "its headline is out of domain; in domain CD is expected to stay close to the baseline"


def _accuracy_claims(topic: str, paper: str, table: pd.DataFrame, baseline: str,
                     paired: pd.DataFrame | None) -> list[Claim]:
    """The in-domain and the out-of-domain accuracy claim against ``baseline``, each with its paired interval.

    A sweep without an OOD set still gets the in-domain claim (with the paired interval `icld compare`
    computes) for any number of classes; its OOD claim says what is missing.
    """
    claims = [_comparison_claim(f"{topic}: in-domain accuracy", IN_DOMAIN_PAPER, table, baseline, "id_accuracy",
                                "", 3, paired=paired)]
    if table["ood_accuracy_mean"].notna().any():
        claims.append(_comparison_claim(f"{topic}: OOD accuracy", paper, table, baseline, "ood_accuracy", "", 3,
                                        paired=paired))
    else:
        claims.append(Claim(f"{topic}: OOD accuracy", paper,
                            "Not measurable: the sweep has no out-of-domain evaluation set (add one with --eval, or "
                            "later with `icld eval --model SWEEP_DIR --eval SET`); the in-domain claim above carries "
                            "the paired interval.", {}))
    return claims


def headline_claims(table: pd.DataFrame, paired: pd.DataFrame | None = None) -> list[Claim]:
    """The paper's headline claims (PROTOCOL.md) checked against the comparison table.

    Relative changes are ``(CD - baseline) / baseline * 100`` of the seed means, per k. CD is the
    configuration whose alpha is nearest :data:`REFERENCE_ALPHA`; baselines run on the CD student's
    model (PBFT with the same PEFT where the sweep has it).
    """
    claims = _accuracy_claims("CD vs ICL at the student's size",
                              "CD gives nearly 50% better out-of-domain accuracy than ICL on a model of similar size",
                              table, "icl-student", paired)
    # Against PBFT of the student's model and of the teacher's: the paper's memory claim only makes sense
    # against fine-tuning the large model, so both rows are compared, each named with its model.
    for baseline in ("pbft-teacher", "pbft"):
        if baseline == "pbft-teacher" and not (table["method"] == baseline).any():
            continue
        which = "PBFT of the teacher's model" if baseline == "pbft-teacher" else "PBFT"
        claims += [
            _comparison_claim(f"CD vs {which}: peak memory",
                              "CD needs up to 60% less peak memory than PBFT",
                              table, baseline, "peak_memory_mb", " MB", 0, lower_is_better=True),
            *_accuracy_claims(f"CD vs {which}", "CD gives 20% better out-of-domain accuracy than PBFT", table,
                              baseline, paired),
        ]
    for claim in claims:
        if "peak memory" in claim.topic and claim.values:
            claim.measured += (" Peak memory is each run's overall peak: for CD the largest of the teacher pass, "
                               "the training and the final evaluation.")

    topic, paper = "CD memory across k", "CD's memory stays nearly constant as the number of demonstrations grows"
    cd = _cd_rows(table)
    growth = _growth(cd, "peak_memory_mb") if not cd.empty else None
    if growth is None or math.isnan(growth[0]):
        claims.append(Claim(topic, paper, "Not measurable: CD ran at fewer than two k with peak memory recorded.", {}))
    else:
        ratio, k_min, k_max = growth
        values = {"cd": {"ratio": ratio, "k_min": k_min, "k_max": k_max}}
        text = f"CD peak memory at k={k_max} / at k={k_min}: ×{ratio:.2f} ({_cd_note(cd)})"
        teacher = _first_series(_reference_rows(table, "icl-teacher"))
        teacher_growth = _growth(teacher, "peak_memory_mb") if not teacher.empty else None
        if teacher_growth and not math.isnan(teacher_growth[0]):
            values["icl-teacher"] = {"ratio": teacher_growth[0], "k_min": teacher_growth[1], "k_max": teacher_growth[2]}
            text += (f"; for contrast, ICL teacher scoring peak at k={teacher_growth[2]} / k={teacher_growth[1]}: "
                     f"×{teacher_growth[0]:.2f}")
        hits = cd["teacher_cache_hit_mean"] if "teacher_cache_hit_mean" in cd else pd.Series(dtype=float)
        text += (". By design, not by measurement: with a cached teacher signal the student never sees the "
                 "demonstrations, so CD's training peak cannot grow with k; what k changes is the teacher pass, which "
                 "this overall peak includes")
        if hits.notna().any():
            text += f" (teacher signal read from the cache in {hits.mean():.0%} of the runs, where the pass is cheap)"
        claims.append(Claim(topic, paper, text + ".", values))

    topic = "Inference cost: CD student vs ICL teacher"
    paper = "no number given; answering without the k demonstrations is what the method is for"
    teacher = _first_series(_reference_rows(table, "icl-teacher"))
    if cd.empty or teacher.empty:
        claims.append(Claim(topic, paper, "Not measurable: the sweep needs both CD and ICL-teacher results.", {}))
    else:
        latency = _pair_by_k(cd, teacher, "inference_latency_ms")
        memory = _pair_by_k(cd, teacher, "inference_peak_memory_mb")
        values, parts = {}, []
        for k in sorted(set(latency) | set(memory)):
            entry, bits = {}, []
            if k in latency:
                (a, b) = latency[k]
                entry.update(cd_latency_ms=a, teacher_latency_ms=b, latency_change_percent=_relative_percent(a, b))
                bits.append(f"{a:.2f} vs {b:.2f} ms/query ({_signed(entry['latency_change_percent'])})")
            if k in memory:
                (a, b) = memory[k]
                entry.update(cd_memory_mb=a, teacher_memory_mb=b, memory_change_percent=_relative_percent(a, b))
                bits.append(f"{a:.0f} vs {b:.0f} MB ({_signed(entry['memory_change_percent'])})")
            values[k] = entry
            parts.append(f"k={k}: " + ", ".join(bits))
        text = ("CD student vs ICL teacher at inference, " + "; ".join(parts) + "." if parts
                else "Not measurable: no k has inference cost for both CD and the ICL teacher.")
        claims.append(Claim(topic, paper, text, values))
    return claims


# ---------------------------------------------------------------------------------------------
# The report: one list of blocks, rendered to markdown and to HTML


def _header_lines(df: pd.DataFrame, runs: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    def names(values: Iterable[Any], key: Any = str) -> str:
        found = sorted({v for v in values if not _missing(v)}, key=key)
        return ", ".join(str(v) for v in found) if found else MISSING

    methods = sorted({m for m in df["method"] if not _missing(m)}, key=_method_rank)
    lines = [
        "Methods: " + "; ".join(f"{METHOD_LABELS.get(m, m)} ({m})" for m in methods),
        f"Models: teacher {names(df['teacher'])}; student {names(df['student'])}",
        f"Tasks: {names(df['task'])}; in-domain evaluation: {names(runs['id_eval'])}; "
        f"out-of-domain: {names(runs['ood_eval'])}",
        f"Demonstrations k: {names((int(k) for k in df['shots'] if not _missing(k)), int)}",
        f"Seeds: {names((int(s) for s in df['seed'] if not _missing(s)), int)}",
    ]
    alphas = sorted({float(a) for a in df.loc[df["method"] == "distill", "alpha"] if not _missing(a)})
    if alphas:
        lines.append("CD α: " + ", ".join(f"{a:g}" for a in alphas))
    pefts = names(df["peft"])
    if pefts != MISSING:
        lines.append(f"Parameter-efficient training: {pefts}")
    counts = runs["status"].value_counts()
    failed = runs[runs["status"].isin(_FAILED)]
    order = ["complete", "partial", "failed", "skipped"]
    states = sorted(counts.index, key=lambda s: (order.index(s) if s in order else len(order), s))
    text = f"Runs (cell × seed): {len(runs)}: " + ", ".join(f"{counts[s]} {_STATUS_WORDS.get(s, s)}" for s in states)
    if "failed" not in counts:
        text += ", 0 failed"
    if len(failed):
        listed = ", ".join(f"{r.cell}" + ("" if f"seed={r.seed}" in str(r.cell) else f" seed {r.seed}")
                           + (" (partly)" if r.status == "partial" else "") for r in failed.head(10).itertuples())
        text += f". Failed: {listed}{', …' if len(failed) > 10 else ''}"
    if len(runs) > counts.get("complete", 0):
        text += ". Only completed evaluations enter the means."
    lines.append(text)
    done = df[df["status"].astype(str) == "complete"]
    if len(done):
        sizes = []
        for name, rows in done.groupby(done["eval"].astype(str), sort=True):
            n = pd.to_numeric(rows["n"], errors="coerce").dropna()
            dropped = int(pd.to_numeric(rows["dropped"], errors="coerce").fillna(0).sum())
            if len(n):
                span = f"{int(n.min())}" if n.min() == n.max() else f"{int(n.min())}–{int(n.max())}"
                sizes.append(f"{name} {span}" + (f" ({dropped} dropped as too long, over all runs)" if dropped else ""))
        if sizes:
            lines.append("Queries scored per run: " + ", ".join(sizes))
        levels = []  # what no skill scores on each set: guessing uniformly, and always answering the majority class
        for name, rows in done.groupby(done["eval"].astype(str), sort=True):
            if "chance_rate" not in rows or "majority_rate" not in rows:
                break  # results collected by an older version
            chance = pd.to_numeric(rows["chance_rate"], errors="coerce").dropna()
            majority = pd.to_numeric(rows["majority_rate"], errors="coerce").dropna()
            if len(chance):
                levels.append(f"{name} {chance.mean():.3f} / {majority.mean():.3f}" if len(majority)
                              else f"{name} {chance.mean():.3f}")
        if levels:
            lines.append("Chance / majority-class rate per set: " + ", ".join(levels))
    # What ``collect`` left out or could not count, and why (as ``icld results`` prints it).
    return lines + [f"Note: {note}" for note in df.attrs.get("notes", [])]


def _blocks(df: pd.DataFrame, figures: Sequence[FigureResult], title: str,
            paired: pd.DataFrame | None = None) -> list[tuple[str, Any]]:
    runs = in_domain_and_ood(df)
    table = _table_from_runs(runs)
    # The first screen: what was found and how sure it is (report/headline), then what ran.
    blocks: list[tuple[str, Any]] = [("h1", title), ("h2", "What was found"), ("ul", headline_lines(table, paired)),
                                     ("h2", "What ran"), ("ul", _header_lines(df, runs, table))]
    # What was found comes first (in domain and out, with paired intervals); the table and figures follow.
    blocks.append(("h2", "Headline claims of the paper, as measured here"))
    blocks.append(("p", "Each line quotes the paper (arXiv 2412.13243) and gives what this sweep measured; relative "
                        "changes are (CD − baseline) / baseline of the seed means. Accuracy differences also carry a "
                        "paired bootstrap 95% interval over the queries both scored and the seeds (paired by seed); "
                        "where it covers 0 the difference is not distinguishable from 0 (`icld compare`)."))
    blocks.append(("ul", [f"**{c.topic}** (paper: {c.paper}). Measured: {c.measured}"
                          for c in headline_claims(table, paired)]))
    blocks.append(("h2", "Results"))
    if table.empty:
        blocks.append(("p", "No results to tabulate."))
    else:
        blocks.append(("table", _table_view(table)))
        blocks.append(("p", "One row per configuration; accuracy is mean ± std over the seeds that completed; "
                            "costs are means. Overall peak memory is what a run paid at its largest: for CD the "
                            "largest of the teacher pass, the training and the final evaluation (both parts are "
                            "shown beside it), for PBFT the training or evaluation, for ICL the scoring; "
                            "inference latency and memory are the cost of answering one query (ICL with its k "
                            "demonstrations, a trained student alone)."))
    blocks.append(("h2", "Figures"))
    for figure in figures:
        blocks.append(("h3", figure.title))
        if figure.path is not None:
            blocks.append(("figure", figure))
        else:
            blocks.append(("p", f"Not drawn: {figure.reason or 'no data'}."))
    blocks.append(("h2", "Reading this report"))
    blocks.append(("p", reading_notes(table)))
    return blocks


def render_markdown(df: pd.DataFrame, figures: Sequence[FigureResult] = (), *, title: str = DEFAULT_TITLE,
                    paired: pd.DataFrame | None = None) -> str:
    """``report.md``: header, comparison table, figures (linked by file name), claims, reading notes.

    Figure links are relative to the directory the figures were written to, where ``report.md``
    goes too.
    """
    out: list[str] = []
    for kind, content in _blocks(df, figures, title, paired):
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + content)
        elif kind == "p":
            out.append(content)
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in content))
        elif kind == "table":
            out.append(markdown_table(*content))
        elif kind == "figure":
            out.append(f"![{content.title}]({content.path.name})\n\n*{content.caption}*")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1360px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.5; }
h1, h2, h3 { line-height: 1.25; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: 0.8em; margin: 1em 0; width: 100%; }
th, td { border: 1px solid #ccc; padding: .25em .4em; } th { vertical-align: bottom; }
td.r { white-space: nowrap; }
th { background: #f3f3f3; } td.r, th.r { text-align: right; } tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-style: italic; color: #444; } .missing { color: #777; font-style: italic; }
"""


def _inline_html(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def render_html(df: pd.DataFrame, figures: Sequence[FigureResult] = (), *, title: str = DEFAULT_TITLE,
                paired: pd.DataFrame | None = None) -> str:
    """``report.html``: the same content as :func:`render_markdown`, self-contained (inline CSS, PNGs as data URIs)."""
    body: list[str] = []
    for kind, content in _blocks(df, figures, title, paired):
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            css = ' class="missing"' if content.startswith("Not drawn:") else ""
            body.append(f"<p{css}>{_inline_html(content)}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in content) + "</ul>")
        elif kind == "table":
            headers, rows, align = content
            cls = [' class="r"' if a == "r" else "" for a in align]
            head = "".join(f"<th{c}>{html.escape(h)}</th>" for h, c in zip(headers, cls))
            cells = "".join("<tr>" + "".join(f"<td{c}>{html.escape(v)}</td>" for v, c in zip(row, cls)) + "</tr>"
                            for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif kind == "figure":
            data = base64.b64encode(Path(content.path).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(content.title)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(content.caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Collect a sweep's results and write ``report.md``, ``report.html`` and the PNGs.

    Args:
        sweep_dir: the sweep's output directory (what :func:`icldistill.experiments.results.collect` reads).
        out_dir: where to write; default ``<sweep_dir>/report``.

    Returns:
        ``{"markdown": Path, "html": Path, "figures": {name: Path}, "skipped": {name: reason}}``.

    Raises:
        IcldError: the sweep directory holds no results.
    """
    from icldistill.experiments import results

    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    from icldistill.experiments.gen_results import is_generation_sweep

    if is_generation_sweep(sweep_dir):  # free-form answers: their own table (report/generation.py)
        from icldistill.report.generation import write_generation_report

        return write_generation_report(sweep_dir, out_dir)
    df = results.collect(sweep_dir)
    if df is None or len(df) == 0:
        raise IcldError(f"No results found under {sweep_dir}; run the sweep first, or point to its output directory.")
    subcases = results.collect_subcases(sweep_dir)
    table = comparison_table(df)
    figures = make_figures(table, subcases, out_dir, results.collect_confusions(sweep_dir))
    title = f"{DEFAULT_TITLE}: {sweep_dir.resolve().name}"
    markdown_path, html_path = out_dir / "report.md", out_dir / "report.html"
    from icldistill.experiments.compare import sweep_paired

    paired = sweep_paired(sweep_dir, df)
    zero_shot = zero_shot_paired(sweep_dir, df)  # CD against the zero-shot student (k = 0), for the first screen
    if len(zero_shot):
        paired = zero_shot if paired.empty else pd.concat([paired, zero_shot], ignore_index=True)
    atomic_write_text(markdown_path, render_markdown(df, figures, title=title, paired=paired))
    atomic_write_text(html_path, render_html(df, figures, title=title, paired=paired))
    logger.info("wrote %s and %s", markdown_path, html_path)
    return {
        "markdown": markdown_path,
        "html": html_path,
        "figures": {f.name: f.path for f in figures if f.path is not None},
        "skipped": {f.name: f.reason for f in figures if f.path is None},
    }
