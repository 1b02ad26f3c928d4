"""ICL for generation end to end on a tiny model and real GSM8K rows: the record, the answers, the context."""

from __future__ import annotations

import json

import pytest

from icldistill.cli import main
from icldistill.config import GenerateOptions, build_config
from icldistill.methods.generate import run_generate


def _config(tmp_path, data_dir, model, **kw):
    values = dict(model=str(model), task="gsm8k", shots=2, seeds=[0, 1], limit=4, batch_size=4, max_new_tokens=6,
                  data_dir=str(data_dir), output_dir=str(tmp_path / "out"), dtype="fp32", device="cpu",
                  chat_template="no")
    values.update(kw)
    return build_config(GenerateOptions, values)


def test_generate_writes_results_and_answers(tmp_path, data_dir, tiny_dirs, cache_dir):
    record = run_generate(_config(tmp_path, data_dir, tiny_dirs["teacher"]), progress=False)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["status"] == record["status"] == "complete" and on_disk["method"] == "generate"
    assert on_disk["generation"]["shots"] == 2 and on_disk["generation"]["max_new_tokens"] == 6
    demos = [on_disk["seeds"][s]["demonstrations"] for s in ("0", "1")]
    assert len(demos[0]) == 2 and demos[0] != demos[1]
    agg = on_disk["aggregate"]["gsm8k"]
    per_seed = [on_disk["seeds"][s]["eval"]["gsm8k"]["token_f1"] for s in ("0", "1")]
    assert agg["token_f1"]["mean"] == pytest.approx(sum(per_seed) / 2)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 and {r["seed"] for r in rows} == {0, 1}
    assert all(r["tokens"] <= 6 and r["finish"] in ("eos", "stop", "length") for r in rows)
    assert all(r["gold_answer"] is not None and r["exact_match"] in (0.0, 1.0) for r in rows)
    # The same queries for every seed (a seeded sample of the set), so seeds pair.
    assert {r["id"] for r in rows if r["seed"] == 0} == {r["id"] for r in rows if r["seed"] == 1}


def test_context_changes_the_prompt_and_is_recorded(tmp_path, data_dir, tiny_dirs, cache_dir):
    with_ctx = run_generate(_config(tmp_path, data_dir, tiny_dirs["teacher"], seeds=[0]), progress=False)
    without = run_generate(_config(tmp_path, data_dir, tiny_dirs["teacher"], seeds=[0], context=False,
                                   output_dir=str(tmp_path / "bare")), progress=False)
    assert with_ctx["labelled_examples"] == 2 and without["labelled_examples"] == 0
    assert without["seeds"]["0"]["demonstrations"] == []


def test_prefix_cache_does_not_change_answers(tmp_path, data_dir, tiny_dirs, cache_dir):
    cached = run_generate(_config(tmp_path, data_dir, tiny_dirs["opt"], seeds=[0]), progress=False)
    naive = run_generate(_config(tmp_path, data_dir, tiny_dirs["opt"], seeds=[0], prefix_cache=False,
                                 output_dir=str(tmp_path / "naive")), progress=False)
    read = [[json.loads(line)["text"] for line in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]
            for d in ("out", "naive")]
    assert read[0] == read[1]
    assert cached["aggregate"] == naive["aggregate"]


def test_cli_refuses_a_classification_task(tmp_path, data_dir, tiny_dirs, capsys):
    code = main(["generate", "--task", "mnli", "--model", str(tiny_dirs["teacher"]), "--data-dir", str(data_dir),
                 "--output-dir", str(tmp_path / "x")])
    assert code != 0
    assert "'mnli' is a classification task: run it with icl, pbft or distill" in capsys.readouterr().err


def test_the_record_holds_the_runs_cost(tmp_path, data_dir, tiny_dirs, cache_dir):
    record = run_generate(_config(tmp_path, data_dir, tiny_dirs["teacher"], seeds=[0]), progress=False)
    total, inference = record["resources"]["total"], record["resources"]["inference"]
    assert total["peak_memory_mb"] > 0 and total["wall_time_s"] >= inference["wall_time_s"] > 0
    assert inference["queries"] == 4 and inference["latency_ms_per_query"] > 0


def test_two_generate_runs_compare_on_the_same_queries(tmp_path, data_dir, tiny_dirs, cache_dir):
    from icldistill.experiments.compare import compare_runs

    run_generate(_config(tmp_path, data_dir, tiny_dirs["teacher"], seeds=[0]), progress=False)
    run_generate(_config(tmp_path, data_dir, tiny_dirs["student"], seeds=[0], output_dir=str(tmp_path / "s")),
                 progress=False)
    result, f1 = compare_runs(tmp_path / "out", tmp_path / "s", resamples=200)  # exact match, then token F1
    assert result.eval == "gsm8k" and result.queries == 4 and result.seeds == [0]
    assert (result.metric, f1.metric, f1.queries) == ("accuracy", "token_f1", 4)
    assert 0.0 <= result.accuracy_a <= 1.0 and result.ci95_low <= result.difference <= result.ci95_high


def test_a_run_killed_mid_decode_resumes_at_its_next_batch(tmp_path, data_dir, tiny_dirs, cache_dir, monkeypatch):
    """Killed in seed 1's second batch: the rerun decodes only what was not journalled, equals a run never
    killed, and leaves no journal behind."""
    from icldistill.runtime.rundir import JOURNAL_DIR
    from icldistill.scoring import generation

    config = _config(tmp_path, data_dir, tiny_dirs["teacher"], batch_size=2)
    reference = run_generate(build_config(GenerateOptions, {**vars(config), "output_dir": str(tmp_path / "ref")}),
                             progress=False)
    real, calls = generation._decode_batch, []

    def decode(model, prefix, queries, *args):
        calls.append(len(queries))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(model, prefix, queries, *args)

    monkeypatch.setattr(generation, "_decode_batch", decode)
    with pytest.raises(KeyboardInterrupt):
        run_generate(config, progress=False)
    assert (tmp_path / "out" / JOURNAL_DIR).is_dir()
    calls.clear()
    record = run_generate(config, progress=False)
    assert sum(calls) == 2  # seed 0 (2 batches) and seed 1's first batch came from the journal
    assert record["seeds"] == reference["seeds"]
    assert (tmp_path / "out" / "predictions.jsonl").read_text() == (tmp_path / "ref" / "predictions.jsonl").read_text()
    assert not (tmp_path / "out" / JOURNAL_DIR).exists()
