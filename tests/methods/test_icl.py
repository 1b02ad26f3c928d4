"""ICL evaluation end to end on a tiny model and real rows: files, metrics, dropped queries, skipped runs."""

from __future__ import annotations

import json

import pytest

from icldistill.cli import main
from icldistill.config import IclOptions, build_config
from icldistill.methods.icl import run_icl


def _config(tmp_path, data_dir, model, **kw):
    values = dict(model=str(model), task="mnli", eval=["mnli-m", "hans-lo"], shots=4, seeds=[0, 1], limit=10,
                  batch_size=4, data_dir=str(data_dir), output_dir=str(tmp_path / "out"), dtype="fp32", device="cpu")
    values.update(kw)
    return build_config(IclOptions, values)


def test_icl_writes_results_and_predictions(tmp_path, data_dir, tiny_dirs):
    record = run_icl(_config(tmp_path, data_dir, tiny_dirs["opt"]), progress=False)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["status"] == record["status"] == "complete"
    assert set(on_disk["seeds"]) == {"0", "1"}
    demos = [on_disk["seeds"][s]["demonstrations"] for s in ("0", "1")]
    assert len(demos[0]) == 4 and demos[0] != demos[1]  # one context per seed
    for name in ("mnli-m", "hans-lo"):
        agg = on_disk["aggregate"][name]
        assert agg["accuracy"]["n_seeds"] == 2
        per_seed = [on_disk["seeds"][s]["eval"][name]["accuracy"] for s in ("0", "1")]
        assert agg["accuracy"]["mean"] == pytest.approx(sum(per_seed) / 2)
    hans = on_disk["seeds"]["0"]["eval"]["hans-lo"]
    assert "by_subcase" in hans and hans["ood_accuracy"] is not None
    assert on_disk["model"]["fingerprint"] and on_disk["data"]["eval"]["mnli-m"]["fingerprint"]
    assert on_disk["resources"]["prompt_tokens_per_s"] > 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 10
    row = rows[0]
    assert {"seed", "eval", "id", "gold", "pred", "label_logprobs"} <= set(row)
    # The recorded accuracy is the accuracy of the recorded predictions.
    seed0 = [r for r in rows if r["seed"] == 0 and r["eval"] == "mnli-m"]
    assert sum(r["pred"] == r["gold"] for r in seed0) / len(seed0) == pytest.approx(
        on_disk["seeds"]["0"]["eval"]["mnli-m"]["accuracy"])


def test_cached_and_naive_runs_agree(tmp_path, data_dir, tiny_dirs):
    cached = run_icl(_config(tmp_path / "a", data_dir, tiny_dirs["gemma3"], seeds=[0]), progress=False)
    naive = run_icl(_config(tmp_path / "b", data_dir, tiny_dirs["gemma3"], seeds=[0], prefix_cache=False),
                    progress=False)
    for name in ("mnli-m", "hans-lo"):
        a, b = cached["seeds"]["0"]["eval"][name], naive["seeds"]["0"]["eval"][name]
        assert a["accuracy"] == b["accuracy"] and a["auc"] == pytest.approx(b["auc"], abs=1e-6)


def test_too_long_queries_are_dropped_and_counted(tmp_path, data_dir, tiny_dirs, monkeypatch):
    import icldistill.scoring.evalsets as inference

    config = _config(tmp_path, data_dir, tiny_dirs["student"],
                     seeds=[0], shots=2)
    original = inference.encode_prompts

    def shorter(model, *args, **kwargs):
        # Leave room for the prefix and the shortest queries only.
        prefix = original(model, *args, **kwargs).prefix_ids
        model.max_length = len(prefix) + 45
        return original(model, *args, **kwargs)

    monkeypatch.setattr(inference, "encode_prompts", shorter)
    record = run_icl(config, progress=False)
    m = record["seeds"]["0"]["eval"]["mnli-m"]
    assert m["dropped"] > 0 and m["n"] + m["dropped"] == 10


def test_context_longer_than_the_model_skips_the_run(tmp_path, data_dir, tiny_dirs, monkeypatch):
    import icldistill.methods.icl as icl_mod

    real_load = icl_mod.load_model

    def tiny_context(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        loaded.max_length = 50
        return loaded

    monkeypatch.setattr(icl_mod, "load_model", tiny_context)
    record = run_icl(_config(tmp_path, data_dir, tiny_dirs["student"], seeds=[0], shots=8), progress=False)
    assert record["status"] == "skipped"
    assert "lower --shots" in record["seeds"]["0"]["skipped"]


def test_cli_icl_prints_table_and_exits_zero(tmp_path, data_dir, tiny_dirs, capsys):
    code = main(["-q", "icl", "--model", str(tiny_dirs["student"]), "--eval", "mnli-m", "--shots", "2", "--seeds", "0",
                 "--limit", "6", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "cli"), "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "mnli-m" in out and "accuracy" in out and "results.json" in out
    assert (tmp_path / "cli" / "predictions.jsonl").exists()


def test_cli_config_file_and_override(tmp_path, data_dir, tiny_dirs, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_dirs['student']}\neval: [mnli-m]\nshots: 2\nseeds: [0]\nlimit: 4\n"
                   f"data_dir: {data_dir}\noutput_dir: {tmp_path / 'from-file'}\n")
    assert main(["-q", "icl", "--config", str(cfg), "--limit", "3"]) == 0
    saved = json.loads((tmp_path / "from-file" / "results.json").read_text())
    assert saved["config"]["limit"] == 3 and saved["seeds"]["0"]["eval"]["mnli-m"]["n"] == 3


@pytest.mark.parametrize("argv, message", [
    (["icl", "--shots", "3"], "cannot be balanced"),
    (["icl", "--task", "nope"], "Unknown task"),
    (["icl", "--eval", "sst2"], "Unknown evaluation set 'sst2' for task 'mnli'"),
    (["icl", "--pattern", "{premise} only"], "lacks {hypothesis}"),
    (["icl", "--limit", "0"], "positive number"),
    (["icl", "--model", "./no/such/dir"], "no such directory"),
    (["icl", "--label-words", " Yes, Yes"], "distinct"),
])
def test_cli_bad_options_fail_clearly(argv, message, tmp_path, data_dir, tiny_dirs, capsys):
    base = ["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "x"), "--limit", "2", "--seeds", "0",
            "--shots", "2", "--model", str(tiny_dirs["student"])]
    # Later options win: the tested option goes last.
    code = main(["-q", argv[0], *base, *argv[1:]])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_cli_unknown_config_key_suggests(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("shot: 4\n")
    assert main(["icl", "--config", str(cfg)]) == 2
    assert "Did you mean: shots" in capsys.readouterr().err
