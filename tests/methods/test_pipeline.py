"""The end of the pipeline on tiny models: train, export, reload with plain transformers, predict, eval, compare."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from icldistill.cli import main
from icldistill.config import EvalOptions, PbftOptions, PredictOptions, build_config
from icldistill.errors import IcldError


def _train_values(tmp_path, data_dir, out="run", **kw):
    values = dict(task="mnli", eval=["mnli-m", "hans-lo"], shots=4, seeds=[0, 1], limit=12, batch_size=8,
                  data_dir=str(data_dir), output_dir=str(tmp_path / out), epochs=2, lr=1e-2, train_batch_size=4,
                  warmup_ratio=0.0, lora_dropout=0.0, dtype="fp32", device="cpu", eval_every=-1)
    values.update(kw)
    return values


@pytest.fixture(scope="module")
def pbft_run(tmp_path_factory, data_dir, tiny_dirs):
    from icldistill.methods.pbft import run_pbft

    tmp = tmp_path_factory.mktemp("pbft")
    values = _train_values(tmp, data_dir, model=str(tiny_dirs["student"]), cache_dir=str(tmp / "cache"))
    return tmp / "run", run_pbft(build_config(PbftOptions, values), progress=False)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_training_runs_write_predictions_like_icl(pbft_run):
    run_dir, record = pbft_run
    rows = _rows(run_dir / "predictions.jsonl")
    assert {"seed", "eval", "id", "gold", "pred", "label_logprobs"} <= set(rows[0])
    assert {r["seed"] for r in rows} == {0, 1}
    # issue 23 item 12: a boolean, and the class whose first token it is kept beside it
    assert all(isinstance(r["top_token_is_label"], bool) for r in rows)
    assert all((r["top_token_label"] is not None) == r["top_token_is_label"] for r in rows)
    for seed in ("0", "1"):
        for name in ("mnli-m", "hans-lo"):
            mine = [r for r in rows if r["seed"] == int(seed) and r["eval"] == name]
            assert len(mine) == record["seeds"][seed]["eval"][name]["n"]
            accuracy = sum(r["pred"] == r["gold"] for r in mine) / len(mine)
            assert accuracy == pytest.approx(record["seeds"][seed]["eval"][name]["accuracy"])


def _label_logprobs(model, tokenizer, texts, words):
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")
            out.append(torch.log_softmax(model(**enc).logits[0, -1].float(), -1)[ids])
    return torch.stack(out)


def test_export_round_trip_matches_adapter_on_base(pbft_run, tiny_dirs, tmp_path, data_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    run_dir, record = pbft_run
    out = tmp_path / "export"
    assert main(["-q", "export", str(run_dir / "seed-1"), "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    meta = json.loads((out / "icldistill.json").read_text())
    assert meta["task"] == "mnli" and meta["label_words"] == [" Yes", " No"] and meta["seed"] == 1
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "gpt3" in card and "mnli-m" in card

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"])
    adapted = PeftModel.from_pretrained(base, record["seeds"]["1"]["artefacts"]["adapter"]).eval()
    texts = ["the cat saw the dog question: the dog was seen Yes or No? answer:",
             "a man ran question: he slept Yes or No? answer:"]
    words = [" Yes", " No"]
    a = _label_logprobs(exported, tokenizer, texts, words)
    b = _label_logprobs(adapted, tokenizer, texts, words)
    assert torch.allclose(a, b, atol=1e-5)
    plain = _label_logprobs(AutoModelForCausalLM.from_pretrained(tiny_dirs["student"]), tokenizer, texts, words)
    assert not torch.allclose(a, plain, atol=1e-4)  # training changed the answers
    generate = pipeline("text-generation", model=str(out), tokenizer=str(out), device="cpu")
    assert generate(texts[0], max_new_tokens=1, do_sample=False)[0]["generated_text"].startswith(texts[0])

    # predict with no other flag than the export, on a CSV; eval the export and the seed directory alike
    source = tmp_path / "rows.csv"
    with source.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "premise", "hypothesis"])
        writer.writerow(["q1", "the cat saw the dog", "the dog was seen"])
        writer.writerow(["q2", "a man ran", "he slept"])
    assert main(["-q", "predict", "--model", str(out), "--input", str(source), "--output", str(tmp_path / "p.jsonl"),
                 "--device", "cpu"]) == 0
    predicted = _rows(tmp_path / "p.jsonl")
    assert [r["id"] for r in predicted] == ["q1", "q2"]
    for row in predicted:
        assert row["label_word"] == words[row["pred"]] and sum(row["probs"].values()) == pytest.approx(1, abs=1e-5)
    # the seed directory itself (base + adapter from its record) answers as the export does
    assert main(["-q", "predict", "--model", str(run_dir / "seed-1"), "--input", str(source),
                 "--output", str(tmp_path / "p2.jsonl"), "--device", "cpu"]) == 0
    for a, b in zip(predicted, _rows(tmp_path / "p2.jsonl")):
        assert a["pred"] == b["pred"] and np.allclose(a["label_logprobs"], b["label_logprobs"], atol=1e-5)

    eval_values = dict(eval=["mnli-m"], limit=12, data_dir=str(data_dir), device="cpu", dtype="fp32")
    from icldistill.methods.evaluate import run_eval

    of_export = run_eval(build_config(EvalOptions, {**eval_values, "model": str(out),
                                                    "output_dir": str(tmp_path / "e1")}), progress=False)
    of_seed = run_eval(build_config(EvalOptions, {**eval_values, "model": str(run_dir / "seed-1"),
                                                  "output_dir": str(tmp_path / "e2")}), progress=False)
    trained = record["seeds"]["1"]["eval"]["mnli-m"]
    assert of_seed["seeds"]["1"]["eval"]["mnli-m"]["accuracy"] == trained["accuracy"]
    assert of_seed["seeds"]["1"]["eval"]["mnli-m"]["auc"] == pytest.approx(trained["auc"], abs=1e-6)
    assert of_export["seeds"]["0"]["eval"]["mnli-m"]["auc"] == pytest.approx(trained["auc"], abs=1e-5)
    assert of_seed["resources"]["inference"]["latency_ms_per_query"] > 0
    e2 = {r["id"]: r for r in _rows(tmp_path / "e2" / "predictions.jsonl")}
    trained_rows = {r["id"]: r for r in _rows(run_dir / "predictions.jsonl")
                    if r["seed"] == 1 and r["eval"] == "mnli-m"}
    assert e2.keys() == trained_rows.keys()
    assert all(np.allclose(e2[k]["label_logprobs"], trained_rows[k]["label_logprobs"], atol=1e-5) for k in e2)


def test_eval_of_a_run_keeps_its_seeds_and_compare_pairs_them(pbft_run, tmp_path, data_dir, capsys):
    run_dir, record = pbft_run
    args = ["-q", "eval", "--model", str(run_dir), "--eval", "hans-lo", "--limit", "12", "--device", "cpu",
            "--data-dir", str(data_dir)]
    assert main(args + ["--output-dir", str(run_dir)]) == 2  # never over a training run's own results
    assert "would overwrite" in capsys.readouterr().err
    assert json.loads((run_dir / "results.json").read_text())["method"] == "pbft"
    assert main(args) == 0
    evaluated = json.loads((run_dir / "eval-hans-lo" / "results.json").read_text())  # the default: beside the run
    assert set(evaluated["seeds"]) == {"0", "1"}
    for seed in ("0", "1"):
        assert (evaluated["seeds"][seed]["eval"]["hans-lo"]["accuracy"]
                == record["seeds"][seed]["eval"]["hans-lo"]["accuracy"])
    capsys.readouterr()
    assert main(["compare", str(run_dir), str(run_dir / "eval-hans-lo"), "--eval", "hans-lo",
                 "--resamples", "200"]) == 0
    printed = capsys.readouterr().out
    assert "covers 0" in printed and "ood_accuracy" in printed  # identical answers: difference 0, interval [0, 0]


def test_predict_reports_bad_and_long_rows(tiny_dirs, tmp_path):
    def predict(name, text, **kw):
        path = tmp_path / name
        path.write_text(text)
        values = dict(model=str(tiny_dirs["student"]), input=str(path), output=str(tmp_path / "out.jsonl"),
                      device="cpu", dtype="fp32")
        values.update(kw)
        from icldistill.methods.predict import run_predict

        return run_predict(build_config(PredictOptions, values), progress=False)

    with pytest.raises(IcldError, match=r"rows.csv: no column 'hypothesis'"):
        predict("rows.csv", "id,premise\n1,a cat\n")
    with pytest.raises(IcldError, match=r"rows.jsonl:2: missing field 'hypothesis'"):
        predict("rows.jsonl", '{"premise": "a", "hypothesis": "b"}\n{"premise": "a"}\n')
    with pytest.raises(IcldError, match=r"empty.csv:3: field 'premise' must be non-empty"):
        predict("empty.csv", "premise,hypothesis\na cat,a dog\n  ,a dog\n")
    with pytest.raises(IcldError, match=r"unknown input format"):
        predict("rows.txt", "x")
    long_text = " ".join(["the cat"] * 1500)
    summary = predict("long.jsonl", json.dumps({"id": "ok", "premise": "a cat", "hypothesis": "a dog"}) + "\n"
                      + json.dumps({"id": "long", "premise": long_text, "hypothesis": "a dog"}) + "\n")
    assert summary["scored"] == 1 and [s["id"] for s in summary["skipped"]] == ["long"]
    assert "too long" in summary["skipped"][0]["why"]
    rows = _rows(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == ["ok", "long"] and rows[1]["pred"] is None and rows[0]["pred"] in (0, 1)
    assert summary["inference"]["peak_memory_mb"] > 0
    recorded = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert recorded["inference"]["latency_ms_per_query"] > 0 and recorded["skipped"] == summary["skipped"]


def test_predict_with_shots_matches_icl_scoring(tiny_dirs, tmp_path, data_dir):
    """An ICL teacher through predict gives the label log-probs of icl's evaluation on the same rows and seed."""
    from icldistill.config import IclOptions
    from icldistill.methods.icl import run_icl
    from icldistill.methods.predict import run_predict

    icl = run_icl(build_config(IclOptions, dict(model=str(tiny_dirs["teacher"]), eval=["mnli-m"], shots=4, seeds=[0],
                                                limit=6, data_dir=str(data_dir), output_dir=str(tmp_path / "icl"),
                                                device="cpu", dtype="fp32")), progress=False)
    scored = _rows(tmp_path / "icl" / "predictions.jsonl")
    from icldistill.tasks import data as data_mod
    from icldistill.tasks.registry import get_eval_set, get_task

    examples = {ex.id: ex for ex in data_mod.load(get_eval_set("mnli-m", get_task("mnli")), data_dir).examples}
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"id": r["id"], **examples[r["id"]].fields}) + "\n" for r in scored))
    # The demonstrations exclude the query texts, as icl's do, so the same seed draws the same context.
    run_predict(build_config(PredictOptions, dict(model=str(tiny_dirs["teacher"]), input=str(source), shots=4, seed=0,
                                                  output=str(tmp_path / "p.jsonl"), data_dir=str(data_dir),
                                                  device="cpu", dtype="fp32")), progress=False)
    predicted = {r["id"]: r for r in _rows(tmp_path / "p.jsonl")}
    demos = icl["seeds"]["0"]["demonstrations"]
    assert len(demos) == 4
    for r in scored:
        assert np.allclose(predicted[r["id"]]["label_logprobs"], r["label_logprobs"], atol=1e-5)


def test_predict_with_a_demonstrations_file_and_mean_scores_matches_icl(tiny_dirs, tmp_path, data_dir):
    """--demonstrations and --label-score reach predict's scoring as they reach icl's."""
    from icldistill.config import IclOptions
    from icldistill.methods.icl import run_icl
    from icldistill.methods.predict import run_predict
    from icldistill.tasks import data as data_mod
    from icldistill.tasks.registry import get_eval_set, get_task

    task = get_task("mnli")
    train = data_mod.load(task.train, data_dir).examples
    demos = tmp_path / "demos.jsonl"
    words = {0: "entailment", 1: "contradiction"}  # the raw labels of the two classes
    demos.write_text("".join(json.dumps({**ex.fields, "label": words[ex.label]}) + "\n"
                             for ex in [next(e for e in train if e.label == c) for c in (1, 0, 1, 0)]))
    # A two-token word, so that mean and sum differ.
    common = dict(data_dir=str(data_dir), device="cpu", dtype="fp32", demonstrations=str(demos), label_score="mean",
                  label_words=[" the cat", " No"])
    run_icl(build_config(IclOptions, dict(model=str(tiny_dirs["teacher"]), eval=["mnli-m"], seeds=[0], limit=5,
                                          output_dir=str(tmp_path / "icl"), **common)), progress=False)
    scored = _rows(tmp_path / "icl" / "predictions.jsonl")
    examples = {ex.id: ex for ex in data_mod.load(get_eval_set("mnli-m", task), data_dir).examples}
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"id": r["id"], **examples[r["id"]].fields}) + "\n" for r in scored))
    summary = run_predict(build_config(PredictOptions, dict(model=str(tiny_dirs["teacher"]), input=str(source),
                                                            output=str(tmp_path / "p.jsonl"), **common)),
                          progress=False)
    assert summary["shots"] == 4 and summary["label_score"] == "mean"
    predicted = {r["id"]: r for r in _rows(tmp_path / "p.jsonl")}
    for r in scored:
        assert np.allclose(predicted[r["id"]]["label_logprobs"], r["label_logprobs"], atol=1e-5)
    run_predict(build_config(PredictOptions, dict(model=str(tiny_dirs["teacher"]), input=str(source),
                                                  output=str(tmp_path / "s.jsonl"),
                                                  **{**common, "label_score": "sum"})),
                progress=False)
    summed = {r["id"]: r for r in _rows(tmp_path / "s.jsonl")}
    assert all(not np.allclose(summed[i]["label_logprobs"][0], predicted[i]["label_logprobs"][0]) for i in summed)


def test_export_refuses_what_is_not_a_run(tiny_dirs, tmp_path):
    from icldistill.methods.export import export_run

    with pytest.raises(IcldError, match="not a training run"):
        export_run(str(tiny_dirs["student"]), tmp_path / "x")


def test_bitfit_add_bias_exports_as_a_plain_llama(tmp_path, data_dir, tiny_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icldistill.methods.export import export_run
    from icldistill.methods.pbft import run_pbft
    from icldistill.methods.trained import load_source, resolve_source

    values = _train_values(tmp_path, data_dir, model=str(tiny_dirs["student"]), peft="bitfit",
                           bitfit_fallback="add-bias", seeds=[0], epochs=1, eval=["mnli-m"])
    run_pbft(build_config(PbftOptions, values), progress=False)
    seed_dir = tmp_path / "run" / "seed-0"
    export_run(str(seed_dir), tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert exported.config.attention_bias
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    trained = load_source(resolve_source(str(seed_dir)), dtype="fp32", device="cpu").model
    texts = ["the cat saw the dog question: the dog was seen Yes or No? answer:"]
    a = _label_logprobs(exported, tokenizer, texts, [" Yes", " No"])
    b = _label_logprobs(trained, tokenizer, texts, [" Yes", " No"])
    assert torch.allclose(a, b, atol=1e-5)
    from icldistill.errors import ModelError
    from icldistill.methods.trained import apply_trained

    with pytest.raises(ModelError, match=r"trainable.safetensors does not fit this model.*base model"):  # wrong base
        apply_trained(AutoModelForCausalLM.from_pretrained(tiny_dirs["opt"]), resolve_source(str(seed_dir)))


@pytest.mark.parametrize("save_every_epoch", [True, False])  # without per-epoch checkpoints too (seed dir not yet made)
def test_bitfit_on_native_biases_exports_and_unmergeable_biases_are_refused(tmp_path, data_dir, tiny_dirs,
                                                                            save_every_epoch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icldistill.errors import ModelError
    from icldistill.methods.export import _biases_into_config, export_run
    from icldistill.methods.pbft import run_pbft
    from icldistill.methods.trained import ModelSource, load_source, resolve_source

    values = _train_values(tmp_path, data_dir, model=str(tiny_dirs["opt"]), peft="bitfit", seeds=[0], epochs=1,
                           eval=["mnli-m"], save_every_epoch=save_every_epoch)
    run_pbft(build_config(PbftOptions, values), progress=False)
    seed_dir = tmp_path / "run" / "seed-0"
    assert (seed_dir / "checkpoint").exists() == save_every_epoch
    export_run(str(seed_dir), tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    trained = load_source(resolve_source(str(seed_dir)), dtype="fp32", device="cpu").model
    texts = ["the cat saw the dog question: the dog was seen Yes or No? answer:"]
    assert torch.allclose(_label_logprobs(exported, tokenizer, texts, [" Yes", " No"]),
                          _label_logprobs(trained, tokenizer, texts, [" Yes", " No"]), atol=1e-5)

    llama = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"])
    with pytest.raises(ModelError, match=r"cannot hold in their standard architecture"):
        _biases_into_config(llama, ["lm_head.bias"], ModelSource("x", "run", "x", seed_dir=seed_dir))


def test_predict_reads_and_writes_parquet(tiny_dirs, tmp_path):
    import pandas as pd

    from icldistill.methods.predict import run_predict

    inputs = pd.DataFrame({"premise": ["a cat ran", "the dog slept"], "hypothesis": ["a cat", "a dog"]})
    inputs.to_parquet(tmp_path / "in.parquet")
    summary = run_predict(build_config(PredictOptions, dict(model=str(tiny_dirs["student"]),
                                                            input=str(tmp_path / "in.parquet"),
                                                            output=str(tmp_path / "out.parquet"), device="cpu")),
                          progress=False)
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert summary["scored"] == 2 and list(out["id"]) == ["0", "1"]
    assert np.allclose(out["p_entailment"] + out["p_non-entailment"], 1.0)
    pd.DataFrame({"premise": ["a cat ran"], "hypothesis": [None]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(IcldError, match=r"bad.parquet:1: missing field 'hypothesis'"):
        run_predict(build_config(PredictOptions, dict(model=str(tiny_dirs["student"]),
                                                      input=str(tmp_path / "bad.parquet"), device="cpu")),
                    progress=False)


def test_push_to_hub_uploads_the_directory_through_huggingface_hub(tmp_path, monkeypatch):
    """The upload itself needs the network; here the hub client is replaced to check what is sent."""
    import huggingface_hub

    from icldistill.methods.export import push

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", folder_path, repo_id))
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push(tmp_path, "me/student", private=True) == "https://hub/me/student/commit/1"
    assert calls == [("create", "me/student", True, True), ("upload", str(tmp_path), "me/student")]

    class FailingApi(FakeApi):
        def upload_folder(self, **kwargs):
            raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", FailingApi)
    with pytest.raises(IcldError, match="The local export is complete"):
        push(tmp_path, "me/student")
