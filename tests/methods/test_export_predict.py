"""Exports that travel; predict keeps a model's own pattern (issue 23 items 2, 3, 5, 7, 8; issue 21 cases 7, 11).

A 3-class task file of the user's (the README's tickets with two patterns for the tiny tokenizer) trains a
tiny student with its non-default pattern; the export must answer with that pattern anywhere.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from icldistill.config import PbftOptions, PredictOptions, build_config
from icldistill.errors import IcldError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tickets"
TINY_TASK = """\
base: tickets.yaml
patterns:
  tiny:  # single tokens of the tiny test tokenizer; the default
    template: "{text} question: answer:"
    label_words: [" Yes", " No", " True"]
  other:  # what the student is trained with
    template: "review: {text} sentiment"
    label_words: [" great", " terrible", " False"]
default_pattern: tiny
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dirs):
    """A 2-seed PBFT run with pattern 'other' on the user's task file."""
    from icldistill.methods.pbft import run_pbft

    root = tmp_path_factory.mktemp("user")
    for name in ("tickets.yaml", "tickets.csv"):
        shutil.copy(EXAMPLE / name, root / name)
    (root / "tiny.yaml").write_text(TINY_TASK, encoding="utf-8")
    values = dict(task=str(root / "tiny.yaml"), pattern="other", model=str(tiny_dirs["student"]), shots=6,
                  seeds=[0, 1], limit=6, batch_size=8, output_dir=str(root / "run"), dtype="fp32", device="cpu",
                  epochs=2, lr=5e-2, train_batch_size=6, warmup_ratio=0.0, lora_dropout=0.0, eval_every=-1)
    run_pbft(build_config(PbftOptions, values), progress=False)
    return root


def _predict(model, rows, out, **kw):
    from icldistill.methods.predict import run_predict

    values = dict(model=str(model), input=str(rows), output=str(out), device="cpu", dtype="fp32", **kw)
    return run_predict(build_config(PredictOptions, values), progress=False)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _rows_csv(tmp_path):
    path = tmp_path / "rows.csv"  # as Excel saves "CSV UTF-8": a byte-order mark before the header
    path.write_bytes(b"\xef\xbb\xbfticket_id,text\nT-1,my card was charged twice\nT-2,the app crashes on start\n")
    return path


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_an_export_keeps_its_pattern_travels_and_joins_back(trained, tmp_path, caplog):
    from icldistill.methods.export import export_run

    out = tmp_path / "export"
    export_run(str(trained / "run" / "seed-0"), out)
    meta = json.loads((out / "icldistill.json").read_text())
    definition = meta["task_definition"]
    assert meta["task"] == "tiny" and definition["id_column"] == "ticket_id" and definition["fields"] == ["text"]
    assert definition["pattern"]["name"] == "other" and definition["classes"] == ["billing", "technical", "account"]
    rows = _rows_csv(tmp_path)
    first = _predict(out, rows, tmp_path / "a.jsonl")
    answers = _rows(tmp_path / "a.jsonl")
    assert first["pattern"] == "other" and first["label_words"] == [" great", " terrible", " False"]
    # item 5: the task's id column (behind a BOM) and the input text join the answers back
    assert [(r["id"], r["text"]) for r in answers] == [("T-1", "my card was charged twice"),
                                                       ("T-2", "the app crashes on start")]
    _predict(out, rows, tmp_path / "a.csv")  # CSV answers carry the same id and input columns
    with (tmp_path / "a.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["id"], r["text"]) for r in table] == [("T-1", "my card was charged twice"),
                                                     ("T-2", "the app crashes on start")]
    assert list(table[0])[:3] == ["id", "text", "pred"] and "p_billing" in table[0]
    # item 2: --task gives columns and data; the pattern stays the trained one, and the log says so
    with caplog.at_level("WARNING"):
        again = _predict(out, rows, tmp_path / "b.jsonl", task=str(trained / "tiny.yaml"))
    assert again["pattern"] == "other" and "answers with the pattern it was trained with" in caplog.text
    assert [r["label_logprobs"] for r in _rows(tmp_path / "b.jsonl")] == [r["label_logprobs"] for r in answers]
    # the task's default pattern, asked for explicitly, does change the answers (so the check above can fail)
    _predict(out, rows, tmp_path / "c.jsonl", pattern="tiny")
    assert [r["label_logprobs"] for r in _rows(tmp_path / "c.jsonl")] != [r["label_logprobs"] for r in answers]
    # a task whose inputs and classes do not fit the trained pattern is refused, not silently re-prompted
    with pytest.raises(IcldError, match="was trained with the pattern .* task 'mnli' has inputs"):
        _predict(out, rows, tmp_path / "d.jsonl", task="mnli")
    # item 3: moved elsewhere, its task files gone, it still answers with its own pattern
    moved = tmp_path / "elsewhere" / "student"
    shutil.move(str(out), moved)
    gone = tmp_path / "gone"  # the task files are moved away for the duration (the module's run shares them)
    gone.mkdir()
    for name in ("tiny.yaml", "tickets.yaml"):
        (trained / name).rename(gone / (name + ".away"))
    try:
        travelled = _predict(moved, rows, tmp_path / "e.jsonl")
        with pytest.raises(IcldError, match="carries its task 'tiny' but not its data.*--task NAME_OR_FILE"):
            _predict(moved, rows, tmp_path / "f.jsonl", shots=3)
        from icldistill.config import EvalOptions
        from icldistill.methods.evaluate import run_eval

        with pytest.raises(IcldError, match="not its data.*icld eval reads its evaluation sets"):
            run_eval(build_config(EvalOptions, dict(model=str(moved), device="cpu", output_dir=str(tmp_path / "ev"))),
                     progress=False, write=False)
    finally:
        for name in ("tiny.yaml", "tickets.yaml"):
            (gone / (name + ".away")).rename(trained / name)
    assert travelled["pattern"] == "other" and travelled["task"] == "tiny"
    assert _rows(tmp_path / "e.jsonl") == answers


def test_eval_with_task_keeps_the_run_pattern(trained, tmp_path, data_dir):
    from icldistill.config import EvalOptions
    from icldistill.methods.evaluate import run_eval

    values = dict(model=str(trained / "run" / "seed-1"), task=str(trained / "tiny.yaml"), limit=6, device="cpu",
                  dtype="fp32", output_dir=str(tmp_path / "ev"))
    record = run_eval(build_config(EvalOptions, values), progress=False, write=False)
    assert record["pattern"]["name"] == "other"
    trained_record = json.loads((trained / "run" / "results.json").read_text())
    assert record["seeds"]["1"]["eval"]["test"]["accuracy"] == trained_record["seeds"]["1"]["eval"]["test"]["accuracy"]


_KILLED_EXPORT = """
import os, sys
import icldistill.methods.export as export

real = export.share_files
def killed(path):
    real(path)
    os.kill(os.getpid(), 9)  # after the new weights are on disk, before the metadata and the card
export.share_files = killed
export.export_run(sys.argv[1], sys.argv[2])
"""


def test_a_killed_or_failed_re_export_leaves_the_earlier_export_whole(trained, tmp_path, monkeypatch):
    """Issue 21 case 7 (a kill in a subprocess) and case 11 (disk full: one line naming the path)."""
    from icldistill.methods import export as export_mod

    out = tmp_path / "export"
    export_mod.export_run(str(trained / "run" / "seed-0"), out)
    before = {p.name: _sha(p) for p in out.iterdir()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(export_mod.__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(trained / "run" / "seed-1"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr
    assert {p.name: _sha(p) for p in out.iterdir()} == before  # seed 0's weights beside seed 0's metadata
    from transformers import PreTrainedModel

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    partial = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial"))  # the killed one's
    with pytest.raises(IcldError) as info:
        export_mod.export_run(str(trained / "run" / "seed-1"), out)
    message = str(info.value)
    assert "No space left on device" in message and str(out) in message and "Free disk space" in message
    assert {p.name: _sha(p) for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")) == partial  # cleaned up


def test_a_safetensors_error_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import torch
    from safetensors import SafetensorError

    from icldistill.models import adapters

    def full(tensors, filename, metadata=None):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(IcldError, match=r"Writing tensors to .*x.safetensors failed .*StorageFull.*Free disk space"):
        adapters.save_tensors({"w": torch.zeros(2)}, tmp_path / "x.safetensors")


def test_safetensors_follow_the_umask(trained, tmp_path):
    """Item 7: exports, adapters and saved tensors are 0644 under umask 022, as every other file."""
    import torch

    from icldistill.methods.export import export_run
    from icldistill.models.adapters import save_tensors

    previous = os.umask(0o022)
    try:
        save_tensors({"w": torch.zeros(2)}, tmp_path / "t.safetensors")
        export_run(str(trained / "run" / "seed-0"), tmp_path / "export")
    finally:
        os.umask(previous)
    files = [tmp_path / "t.safetensors", *(tmp_path / "export").glob("*.safetensors"),
             *(trained / "run").glob("seed-*/adapter/*.safetensors")]
    assert len(files) >= 4
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}
    assert oct((tmp_path / "export").stat().st_mode & 0o777) == "0o755"


def test_the_model_card_names_the_task_the_upstream_model_and_one_seed():
    from icldistill.methods.export import model_card, upstream_id
    from icldistill.methods.trained import ModelSource

    assert upstream_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert upstream_id("gemma3-270m") == "google/gemma-3-270m"
    assert upstream_id("org/model") == "org/model"
    run = {"task": "/home/me/tasks/tickets.yaml", "method": "pbft", "classes": ["a", "b", "c"],
           "pattern": {"name": "p", "template": "{text}:", "label_words": [" a", " b", " c"]},
           "config": {"label_score": "sum"},
           "aggregate": {"test": {"accuracy": {"mean": 0.5, "ci95": None, "n_seeds": 1}}}}
    seed = {"eval": {"test": {"n": 10, "accuracy": 0.5}}, "student": {"name": "smollm2-135m"}}
    source = ModelSource("x", "run", "smollm2-135m", 0, Path("/runs/r/seed-0"), seed, run, {})
    card = model_card(source, {"task": "tickets", "base_model": "smollm2-135m", "notes": []})
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "# tickets student (pattern-based fine-tuning)" in card and "/home/me" not in card.split("\n## ")[0]
    assert "(1 seed)" in card and "(1 seeds)" not in card


# ------------------------------------------------------------------ damaged artefacts (issue 21 case 12)

_DAMAGED = [("seed-0/adapter/adapter_model.safetensors", "truncate"),
            ("seed-0/adapter/adapter_config.json", "truncate"), ("seed-0/adapter/adapter_config.json", "[]"),
            ("results.json", "truncate"), ("results.json", "null"),
            ("seed-0/seed_result.json", "truncate")]


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_text(how, encoding="utf-8")


def _command(command: str, model: str, trained: Path, tmp_path: Path) -> list[str]:
    return {"predict": ["predict", "--model", model, "--input", str(_rows_csv(tmp_path)), "--output",
                        str(tmp_path / "answers.jsonl"), "--device", "cpu"],
            "export": ["export", model, "--output", str(tmp_path / "export")],
            "eval": ["eval", "--model", model, "--task", str(trained / "tiny.yaml"), "--limit", "4", "--device", "cpu",
                     "--output-dir", str(tmp_path / "ev")]}[command]


@pytest.mark.parametrize("command", ["predict", "export", "eval"])
@pytest.mark.parametrize(("name", "how"), _DAMAGED)
def test_a_damaged_artefact_or_record_is_one_line_naming_its_file(trained, tmp_path, capsys, name, how, command):
    """A truncated adapter, adapter_config.json, results.json or seed record read by predict, export or eval."""
    from icldistill.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    _damage(run / name, how)
    code = main(["-q", *_command(command, str(run / "seed-0"), trained, tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and str(run / name) in err
    assert len(err.strip().splitlines()) == 1 and ("Delete" in err or "delete" in err)


@pytest.mark.parametrize("how", ["truncate", "[]"])
def test_a_damaged_export_record_is_one_line_naming_its_file(trained, tmp_path, capsys, how):
    from icldistill.cli import main
    from icldistill.methods.export import export_run

    out = tmp_path / "export"
    export_run(str(trained / "run" / "seed-0"), out)
    _damage(out / "icldistill.json", how)
    code = main(["-q", *_command("predict", str(out), trained, tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and str(out / "icldistill.json") in err
    assert "Export the run again" in err


def test_truncated_bitfit_tensors_name_their_file(tmp_path):
    import torch
    from tiny import make_model

    from icldistill.errors import ModelError
    from icldistill.models.adapters import load_trainable, save_tensors

    model = make_model("llama", 300)
    path = tmp_path / "trainable.safetensors"
    save_tensors({"model.layers.0.self_attn.q_proj.bias": torch.zeros(model.config.hidden_size)}, path)
    _damage(path, "truncate")
    with pytest.raises(ModelError, match=f"{path} cannot be read .*truncated or corrupted"):
        load_trainable(model, path)


# ------------------------------------------------------------------ the option a write error names (issue 21 case 14)


def test_an_unwritable_predict_output_names_output_before_the_model_loads(trained, tmp_path, monkeypatch):
    from icldistill.methods import predict as predict_mod

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory", encoding="utf-8")
    monkeypatch.setattr(predict_mod, "load_source", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(IcldError) as caught:
        _predict(trained / "run" / "seed-0", _rows_csv(tmp_path), blocker / "answers.csv")
    message = str(caught.value)
    assert "--output" in message and "--output-dir" not in message and str(blocker) in message


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_full_disk_writing_predictions_names_output_not_output_dir(tmp_path, monkeypatch, suffix):
    from icldistill.methods.predict import write_rows

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    row = {"id": "1", "pred": 0, "label": "a", "label_word": " a", "probs": {"a": 1.0}}
    with pytest.raises(IcldError) as caught:
        write_rows(tmp_path / f"answers{suffix}", [row], ["a"])
    message = str(caught.value)
    assert "No space left on device" in message and "choose another --output." in message


def test_an_unwritable_export_output_fails_before_the_model_loads(trained, tmp_path, monkeypatch):
    """Issue 21 case 13 (export): --output was found unwritable only after the merge."""
    from icldistill.methods import export as export_mod

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory", encoding="utf-8")
    monkeypatch.setattr(export_mod, "merged_model", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(IcldError) as caught:
        export_mod.export_run(str(trained / "run" / "seed-0"), blocker / "export")
    assert "--output" in str(caught.value) and str(blocker) in str(caught.value)
