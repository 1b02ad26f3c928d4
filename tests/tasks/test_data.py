"""Tests for icldistill.tasks.data: the real staged files (conftest's ``data_dir``) parse to their documented
counts, every malformed input fails with a DataError that names the file, the line and the fix, and
sampling is deterministic."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from icldistill.errors import DataError
from icldistill.runtime.paths import DATA_ENV
from icldistill.tasks import data
from icldistill.tasks.data import Example, parse_rows, subsample
from icldistill.tasks.registry import EVAL_SETS, TASKS

FEW = settings(max_examples=30, deadline=None, derandomize=True)


def _labels(loaded: data.LoadedData) -> Counter[int]:
    return Counter(ex.label for ex in loaded.examples)


# ---------------------------------------------------------------------------------------------
# The real files: counts from SOURCES.md and PROTOCOL.md


@pytest.mark.parametrize(
    ("name", "rows", "per_label"),
    [
        # PROTOCOL.md: binarised validation_matched has 6,692 rows (entailment 3,479, contradiction 3,213)
        ("mnli-m", 6692, {0: 3479, 1: 3213}),
        # neutral (3,123) joins contradiction as non-entailment: all 9,815 rows
        ("mnli-m-nonent", 9815, {0: 3479, 1: 3213 + 3123}),
        ("hans", 30000, {0: 15000, 1: 15000}),
        ("hans-lo", 10000, {0: 5000, 1: 5000}),
        ("hans-sub", 10000, {0: 5000, 1: 5000}),
        ("hans-const", 10000, {0: 5000, 1: 5000}),
        ("rte", 277, {0: 146, 1: 131}),
        ("sst2", 872, {0: 444, 1: 428}),
    ],
)
def test_real_eval_sets_have_documented_counts(data_dir: Path, name: str, rows: int, per_label: dict[int, int]) -> None:
    loaded = data.load(EVAL_SETS[name], data_dir, "local")
    assert len(loaded.examples) == rows
    assert dict(_labels(loaded)) == per_label
    assert len({ex.id for ex in loaded.examples}) == rows


def test_real_mnli_train_drops_neutral_and_nonent_keeps_it(data_dir: Path) -> None:
    binary = data.load(TASKS["mnli"].train, data_dir, "local")
    nonent = data.load(TASKS["mnli-nonent"].train, data_dir, "local")
    # SOURCES.md: contradiction 3,436, entailment 3,565, neutral 3,470
    assert dict(_labels(binary)) == {0: 3565, 1: 3436}
    assert dict(_labels(nonent)) == {0: 3565, 1: 3436 + 3470}


def test_real_sst2_train_keeps_only_full_sentences(data_dir: Path) -> None:
    loaded = data.load(TASKS["sst2"].train, data_dir, "local")
    # SOURCES.md: 6,871 of the 67,349 train rows are full sentences
    assert len(loaded.examples) == 6871
    # every SST-2 sentence ends in one space in the file; the loader keeps it (text as the data has it)
    assert all(ex.fields["sentence"].endswith(" ") and not ex.fields["sentence"].endswith("  ")
               for ex in loaded.examples)
    assert {tuple(ex.fields) for ex in loaded.examples} == {("sentence",)}


def test_real_hans_carries_heuristic_and_subcase(data_dir: Path) -> None:
    hans = data.load(EVAL_SETS["hans"], data_dir, "local")
    heuristics = Counter(ex.meta["heuristic"] for ex in hans.examples)
    subcases = Counter(ex.meta["subcase"] for ex in hans.examples)
    assert heuristics == {"lexical_overlap": 10000, "subsequence": 10000, "constituent": 10000}
    assert len(subcases) == 30 and set(subcases.values()) == {1000}
    lo = data.load(EVAL_SETS["hans-lo"], data_dir, "local")
    assert {ex.meta["heuristic"] for ex in lo.examples} == {"lexical_overlap"}
    assert len({ex.meta["subcase"] for ex in lo.examples}) == 10


@pytest.mark.parametrize(
    ("name", "sha_prefix"),
    [("mnli-m", "0def4a8914db0421"), ("hans", "e016b07bcfe99ea8"), ("rte", "f1dcfc55d2f6d90f")],
)
def test_fingerprint_is_the_file_sha256_listed_in_sources(data_dir: Path, name: str, sha_prefix: str) -> None:
    assert data.load(EVAL_SETS[name], data_dir, "local").fingerprint == sha_prefix


def test_load_is_cached_per_file_version(tmp_path: Path) -> None:
    spec = dataclasses.replace(EVAL_SETS["mnli-m"], local="rows.jsonl")
    path = tmp_path / "rows.jsonl"
    path.write_text(_jsonl([_row("a"), _row("b", label="contradiction")]), encoding="utf-8")
    first = data.load(spec, tmp_path, "local")
    assert data.load(spec, tmp_path, "local") is first  # the same parse, not a re-read
    path.write_text(_jsonl([_row("a"), _row("b"), _row("c")]), encoding="utf-8")  # new size: a new version
    again = data.load(spec, tmp_path, "local")
    assert [ex.id for ex in again.examples] == ["a", "b", "c"]


def test_data_dir_argument_wins_over_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rows.jsonl").write_text(_jsonl([_row("a")]), encoding="utf-8")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "elsewhere"))
    spec = dataclasses.replace(EVAL_SETS["mnli-m"], local="rows.jsonl")
    assert [ex.id for ex in data.load(spec, tmp_path, "local").examples] == ["a"]


# ---------------------------------------------------------------------------------------------
# Small files written here


def _row(row_id: str, premise: str = "A man sleeps.", hypothesis: str = "A person rests.",
         label: str | None = "entailment", **extra: object) -> dict[str, object]:
    return {"id": row_id, "premise": premise, "hypothesis": hypothesis, "label": label, **extra}


def _jsonl(rows: list[object]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _spec(local: str, base: str = "mnli-m") -> data.DataSpec:
    return dataclasses.replace(EVAL_SETS[base], local=local)


def test_neutral_is_dropped_for_mnli_and_mapped_for_nonent(tmp_path: Path) -> None:
    rows = [_row("e", label="entailment"), _row("n", label="neutral"), _row("c", label="contradiction")]
    (tmp_path / "rows.jsonl").write_text(_jsonl(rows), encoding="utf-8")
    binary = data.load(_spec("rows.jsonl", "mnli-m"), tmp_path, "local")
    nonent = data.load(_spec("rows.jsonl", "mnli-m-nonent"), tmp_path, "local")
    assert [(ex.id, ex.label) for ex in binary.examples] == [("e", 0), ("c", 1)]
    assert [(ex.id, ex.label) for ex in nonent.examples] == [("e", 0), ("n", 1), ("c", 1)]


def test_filter_keeps_matching_rows_and_meta(tmp_path: Path) -> None:
    rows = [
        _row("1", label="entailment", heuristic="lexical_overlap", subcase="ln_subject/object_swap"),
        _row("2", label="non-entailment", heuristic="subsequence", subcase="sn_NP/S"),
        _row("3", label="non-entailment", heuristic="lexical_overlap", subcase="ln_passive"),
    ]
    (tmp_path / "hans.jsonl").write_text(_jsonl(rows), encoding="utf-8")
    loaded = data.load(_spec("hans.jsonl", "hans-lo"), tmp_path, "local")
    assert [(ex.id, ex.label, ex.meta["subcase"]) for ex in loaded.examples] == [
        ("1", 0, "ln_subject/object_swap"), ("3", 1, "ln_passive")]


def test_texts_are_kept_whole_and_line_separators_inside_strings_are_kept(tmp_path: Path) -> None:
    # json.dumps(ensure_ascii=False) writes U+2028 and U+0085 raw; they are not line breaks in JSON Lines
    rows = [_row("a", premise="  one\u2028two\x85three  "), _row("b", hypothesis="x\u2029y\x0cz\t")]
    (tmp_path / "rows.jsonl").write_bytes(_jsonl(rows).replace("\n", "\r\n").encode("utf-8"))
    loaded = data.load(_spec("rows.jsonl"), tmp_path, "local")
    assert [ex.fields for ex in loaded.examples] == [
        {"premise": "  one\u2028two\x85three  ", "hypothesis": "A person rests."},  # outer spaces kept (issue 13)
        {"premise": "A man sleeps.", "hypothesis": "x\u2029y\x0cz\t"},
    ]


def _gzip_truncated() -> bytes:
    raw = gzip.compress(_jsonl([_row(str(i)) for i in range(200)]).encode(), mtime=0)
    return raw[: len(raw) // 2]


def _gzip_corrupted() -> bytes:
    rows = _jsonl([_row(str(i), premise=f"Premise number {i}.") for i in range(200)])
    raw = bytearray(gzip.compress(rows.encode(), mtime=0))
    raw[20] ^= 0xFF  # inside the deflate stream: zlib reports it, not gzip
    return bytes(raw)


_GOOD = _jsonl([_row("a")])

# (case, file name, bytes, line the message must cite or None, substring that says what to do)
BAD_INPUTS = [
    ("invalid-json", "bad.jsonl", (_GOOD + '{"id": "b", "premise": \n').encode(), 2, "fix or remove the line"),
    ("truncated-gzip", "bad.jsonl.gz", _gzip_truncated(), None, "download or copy it again"),
    ("corrupted-gzip", "bad.jsonl.gz", _gzip_corrupted(), None, "download or copy it again"),
    ("not-utf8", "bad.jsonl",
     (_GOOD + _GOOD.replace('"a"', '"b"')).encode() + b'{"id": "c", "premise": "caf\xe9"}\n', 3,
     "re-encode the file as UTF-8"),
    ("json-array", "bad.jsonl", (_GOOD + '["b", "p", "h", "entailment"]\n').encode(), 2, "object per line"),
    ("missing-field", "bad.jsonl", _jsonl([{"id": "a", "premise": "p", "label": "entailment"}]).encode(), 1,
     "Every row needs"),
    ("empty-premise", "bad.jsonl", (_GOOD + _jsonl([_row("b", premise="   ")])).encode(), 2,
     "fill it in or remove the row"),
    ("non-string-premise", "bad.jsonl", _jsonl([_row("a", premise=7)]).encode(), 1, "fill it in or remove the row"),
    ("unknown-label", "bad.jsonl", (_GOOD + _jsonl([_row("b", label="maybe")])).encode(), 2, "expected one of"),
    ("null-label", "bad.jsonl", (_GOOD + _jsonl([_row("b", label=None)])).encode(), 2, "expected one of"),
    ("integer-label", "bad.jsonl", _jsonl([_row("a", label=0)]).encode(), 1, "expected one of"),
    ("duplicate-id", "bad.jsonl", (_GOOD + _jsonl([_row("b"), _row("a", label="contradiction")])).encode(), 3,
     "first on line 1"),
    ("empty-file", "bad.jsonl", b"", None, "one JSON object per line"),
    ("blank-lines-only", "bad.jsonl", b"\n  \n\n", None, "one JSON object per line"),
    ("empty-gzip", "bad.jsonl.gz", gzip.compress(b"", mtime=0), None, "one JSON object per line"),
    # issue 21 case 14: a JSON escape of a lone surrogate decodes to text no tokenizer can encode
    ("lone-surrogate", "bad.jsonl", (_GOOD + _GOOD.replace('"a"', '"b"').replace("A man sleeps.", "\\ud800")).encode(),
     2, "lone surrogate"),
    # issue 23 item 4: a header alone, not `Instruction "train" corresponds to no data!`
    ("header-only-csv", "bad.csv", b"id,premise,hypothesis,label\n", None, "holds no rows (a header alone"),
    ("all-rows-dropped", "bad.jsonl", _jsonl([_row("a", label="neutral"), _row("b", label="neutral")]).encode(), None,
     "none of its 2 rows"),
]


@pytest.mark.parametrize(("case", "name", "content", "line", "hint"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_file_line_and_fix(tmp_path: Path, case: str, name: str, content: bytes, line: int | None,
                                           hint: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        data.load(_spec(name), tmp_path, "local")
    message = str(info.value)
    assert str(path.resolve()) in message
    if line is not None:
        assert f"{path.resolve()}:{line}:" in message
    else:
        assert not re.search(re.escape(str(path.resolve())) + r":\d+:", message)
    assert hint in message


def test_missing_file_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        data.load(_spec("mnli/nothing.jsonl"), tmp_path, "local")
    message = str(info.value)
    assert str(tmp_path / "mnli" / "nothing.jsonl") in message
    assert "--data-dir" in message and DATA_ENV in message


def test_missing_data_dir_says_how_to_set_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(DataError) as info:
        data.load(EVAL_SETS["rte"], None, "local")
    message = str(info.value)
    assert "--data-dir" in message and DATA_ENV in message and "rte/validation.jsonl" in message


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rows.jsonl").write_text(_jsonl([_row("a"), _row("b")]), encoding="utf-8")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert [ex.id for ex in data.load(_spec("rows.jsonl"), None, "local").examples] == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# parse_rows round trip (property)

_LABELS = ("entailment", "neutral", "contradiction")
_texts = st.text(min_size=1, max_size=30).filter(lambda s: bool(s.strip()))
_raw_rows = st.lists(
    st.tuples(_texts, _texts, st.sampled_from(_LABELS), st.integers(0, 3), st.integers(0, 3)),
    min_size=1, max_size=12,
)


@FEW
@given(_raw_rows, st.sampled_from(["mnli-m", "mnli-m-nonent"]))
def test_valid_rows_round_trip_through_parse_rows(raw: list[tuple[str, str, str, int, int]], spec_name: str) -> None:
    spec = EVAL_SETS[spec_name]
    rows = [
        (i + 1, {"id": f"row-{i}", "premise": " " * lead + premise, "hypothesis": hypothesis + " " * trail,
                 "label": label})
        for i, (premise, hypothesis, label, lead, trail) in enumerate(raw)
    ]
    expected = [
        (row["id"], {"premise": row["premise"], "hypothesis": row["hypothesis"]}, spec.label_map[row["label"]])
        for _, row in rows
        if spec.label_map[row["label"]] is not None
    ]
    if not expected:  # only neutral rows for binarised MNLI: nothing usable is an error, not an empty set
        with pytest.raises(DataError, match="none of its"):
            parse_rows(spec, rows, "mem.jsonl")
        return
    examples = parse_rows(spec, rows, "mem.jsonl")
    assert [(ex.id, dict(ex.fields), ex.label) for ex in examples] == expected


_file_counter = itertools.count()


@FEW
@given(st.lists(st.tuples(_texts, _texts), min_size=1, max_size=8))
def test_any_unicode_text_round_trips_through_a_file(tmp_path_factory: pytest.TempPathFactory,
                                                     pairs: list[tuple[str, str]]) -> None:
    directory = tmp_path_factory.mktemp(f"roundtrip{next(_file_counter)}")
    rows = [_row(str(i), premise=p, hypothesis=h) for i, (p, h) in enumerate(pairs)]
    (directory / "rows.jsonl").write_text(_jsonl(rows), encoding="utf-8")
    loaded = data.load(_spec("rows.jsonl"), directory, "local")
    assert [dict(ex.fields) for ex in loaded.examples] == [{"premise": p, "hypothesis": h} for p, h in pairs]


# ---------------------------------------------------------------------------------------------
# subsample


def _examples(n: int) -> list[Example]:
    return [Example(f"id{i}", {"premise": f"p{i}", "hypothesis": f"h{i}"}, i % 2) for i in range(n)]


def test_subsample_is_deterministic_in_file_order_and_bounded() -> None:
    pool = _examples(100)
    first = subsample(pool, 10)
    assert len(first) == 10
    assert first == subsample(pool, 10) == subsample(list(pool), 10)
    positions = [pool.index(ex) for ex in first]
    assert positions == sorted(positions) and len(set(positions)) == 10
    assert first != pool[:10]  # a sample, not the head of the file
    assert subsample(pool, 10, seed=1) != first


@pytest.mark.parametrize("limit", [None, 100, 1000])
def test_subsample_without_effective_limit_returns_everything(limit: int | None) -> None:
    pool = _examples(100)
    assert subsample(pool, limit) == pool


@FEW
@given(st.integers(0, 60), st.integers(1, 80), st.integers(0, 5))
def test_subsample_properties(n: int, limit: int, seed: int) -> None:
    pool = _examples(n)
    sample = subsample(pool, limit, seed)
    assert len(sample) == min(n, limit)
    positions = [int(ex.id[2:]) for ex in sample]
    assert positions == sorted(set(positions))
    assert sample == subsample(pool, limit, seed)


def test_a_csv_with_a_byte_order_mark_keeps_its_first_column(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a BOM: the id column (first) is still found (issue 21 case 6, 23 item 4)."""
    text = "id,premise,hypothesis,label\nr1,A cat.,A pet.,entailment\nr2,A dog.,A cat.,contradiction\n"
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    loaded = data.load(_spec("bom.csv"), tmp_path, "local")
    found = [(ex.id, ex.fields["premise"], ex.label) for ex in loaded.examples]
    assert found == [("r1", "A cat.", 0), ("r2", "A dog.", 1)]


def test_overlapping_carves_are_refused(tmp_path: Path) -> None:
    """Issue 21 case 5: an evaluation carve with another seed or size than the train carve shares rows with it."""
    from icldistill.errors import ConfigError
    from icldistill.tasks.taskfile import load_task_file

    rows = "".join(json.dumps({"id": str(i), "text": f"row {i}", "label": "ab"[i % 2]}) + "\n" for i in range(40))
    (tmp_path / "rows.jsonl").write_text(rows)
    pattern = "patterns:\n  p: {template: '{text}:', label_words: [' a', ' b']}\n"

    def task(train_carve: str, eval_carve: str) -> Path:
        path = tmp_path / f"t{abs(hash((train_carve, eval_carve)))}.yaml"
        path.write_text("inputs: [text]\nclasses: [a, b]\n" + pattern
                        + f"train: {{path: rows.jsonl{train_carve}}}\n"
                        + f"eval:\n  test: {{path: rows.jsonl{eval_carve}}}\n")
        return path

    def carve(part: str, rows: int = 10, seed: int = 0) -> str:
        return f", carve: {{part: {part}, eval_rows: {rows}, seed: {seed}}}"

    same = load_task_file(task(carve("train"), carve("eval")))
    train_ids = {ex.id for ex in data.load(same.train).examples}
    assert not train_ids & {ex.id for ex in data.load(same.eval_sets["test"]).examples}
    for train_carve, eval_carve in [(carve("train"), carve("eval", seed=1)), (carve("train"), carve("eval", 12)),
                                    (carve("train"), ""), ("", carve("eval"))]:
        with pytest.raises(ConfigError, match="evaluation rows can be training rows"):
            load_task_file(task(train_carve, eval_carve))
