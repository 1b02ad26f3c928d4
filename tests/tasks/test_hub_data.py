"""The Hugging Face `datasets` path, on real `datasets.Dataset` objects built in memory (no network).

Only `load_dataset`'s download is replaced; the ClassLabel decoding, column renames, filters and
validation are the real code path a user with hub access runs.
"""

from __future__ import annotations

import datasets
import pytest

from icldistill.errors import DataError
from icldistill.tasks import data
from icldistill.tasks.registry import EVAL_SETS, TASKS


def _fake_hub(monkeypatch, table: dict, label_names: list[str]):
    features = {k: datasets.Value("string") for k in table if k != "label"}
    features["label"] = datasets.ClassLabel(names=label_names)
    if "idx" in table:
        features["idx"] = datasets.Value("int32")
    ds = datasets.Dataset.from_dict(table, features=datasets.Features(features))
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_glue_mnli_integer_labels_become_binary_classes(monkeypatch):
    calls = _fake_hub(monkeypatch, {"premise": ["a", "b", "c"], "hypothesis": ["x", "y", "z"], "label": [0, 1, 2],
                                    "idx": [10, 11, 12]}, ["entailment", "neutral", "contradiction"])
    loaded = data.load(EVAL_SETS["mnli-m"], None, "hub")
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert [(ex.id, ex.label) for ex in loaded.examples] == [("mnli-m-10", 0), ("mnli-m-12", 1)]  # neutral dropped
    assert loaded.source.startswith("hub:") and len(loaded.fingerprint) == 16


def test_rte_columns_are_renamed(monkeypatch):
    _fake_hub(monkeypatch, {"sentence1": ["p"], "sentence2": ["h"], "label": [1]}, ["entailment", "not_entailment"])
    (ex,) = data.load(EVAL_SETS["rte"], None, "hub").examples
    assert ex.fields == {"premise": "p", "hypothesis": "h"} and ex.label == 1


def test_a_local_only_filter_is_dropped_for_the_hub(monkeypatch, caplog):
    _fake_hub(monkeypatch, {"sentence": ["good film ", "bad"], "label": [1, 0]}, ["negative", "positive"])
    loaded = data.load(TASKS["sst2"].train, None, "hub")
    assert [ex.label for ex in loaded.examples] == [0, 1]  # positive -> class 0, negative -> class 1
    assert "full_sentence" in caplog.text


def test_unlabelled_rows_are_skipped_and_hub_failures_are_clear(monkeypatch):
    _fake_hub(monkeypatch, {"premise": ["a", "b", "c"], "hypothesis": ["x", "y", "z"], "label": [0, -1, 2]},
              ["entailment", "neutral", "contradiction"])
    assert [ex.label for ex in data.load(EVAL_SETS["snli"], None, "hub").examples] == [0, 1]  # SNLI's -1 skipped

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="--data-source local"):
        data.load(EVAL_SETS["hans"], None, "hub")


def test_unknown_data_source_is_an_error():
    with pytest.raises(DataError, match="Unknown data source 'hubb'"):
        data.load(EVAL_SETS["rte"], None, "hubb")
