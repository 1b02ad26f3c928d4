"""Unlabelled rows for predict: any text survives CSV and JSON Lines, and bad rows name the file and row."""

from __future__ import annotations

import csv
import json

import pytest
from hypothesis import given, settings, strategies as st

from icldistill.errors import DataError
from icldistill.tasks.inputs import UNLABELLED, read_inputs

texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"), min_size=1).filter(
    lambda t: t.strip())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(texts, texts), min_size=1, max_size=6))
def test_any_text_round_trips_through_csv_and_jsonl(tmp_path_factory, rows):
    directory = tmp_path_factory.mktemp("rows")
    for name, encoding in (("rows.csv", "utf-8"), ("rows-bom.csv", "utf-8-sig")):  # utf-8-sig: Excel's BOM
        with (directory / name).open("w", encoding=encoding, newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["premise", "hypothesis"])
            writer.writerows(rows)
    (directory / "rows.jsonl").write_text("".join(json.dumps({"premise": p, "hypothesis": h}) + "\n" for p, h in rows),
                                          encoding="utf-8")
    for name in ("rows.csv", "rows-bom.csv", "rows.jsonl"):
        examples = read_inputs(directory / name, ("premise", "hypothesis"))
        assert [(ex.fields["premise"], ex.fields["hypothesis"]) for ex in examples] == [
            (p, h) for p, h in rows]  # as the file has it (issue 13)
        assert [ex.id for ex in examples] == [str(i) for i in range(len(rows))]
        assert all(ex.label == UNLABELLED for ex in examples)


def test_ids_are_kept_and_duplicates_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "x", "sentence": "good"}\n{"id": "y", "sentence": "bad"}\n')
    assert [ex.id for ex in read_inputs(path, ("sentence",))] == ["x", "y"]
    path.write_text('{"id": "x", "sentence": "good"}\n\n{"id": "x", "sentence": "bad"}\n')
    with pytest.raises(DataError, match=r":3: duplicate id 'x' \(first at line 1\)"):
        read_inputs(path, ("sentence",))
    path.write_text('{"sentence": 3}\n')
    with pytest.raises(DataError, match=r":1: field 'sentence' must be non-empty text, got 3"):
        read_inputs(path, ("sentence",))
    path.write_text('{"sentence": "ok"\n')
    with pytest.raises(DataError, match=r"rows.jsonl:1: invalid JSON"):
        read_inputs(path, ("sentence",))
    with pytest.raises(DataError, match="does not exist"):
        read_inputs(tmp_path / "none.csv", ("sentence",))
    (tmp_path / "empty.csv").write_text("sentence\n")
    with pytest.raises(DataError, match="holds no rows"):
        read_inputs(tmp_path / "empty.csv", ("sentence",))


def test_the_task_id_column_is_used_and_a_bom_does_not_hide_it(tmp_path):
    """Issue 23 items 4-5, issue 21 case 6: the task's id column joins answers back, also from Excel's CSV UTF-8."""
    path = tmp_path / "rows.csv"
    path.write_bytes(b"\xef\xbb\xbfpair_id,sentence\np7,good\np9,bad\n")
    assert [ex.id for ex in read_inputs(path, ("sentence",), id_column="pair_id")] == ["p7", "p9"]
    assert [ex.fields["sentence"] for ex in read_inputs(path, ("sentence",), id_column="pair_id")] == ["good", "bad"]
    assert [ex.id for ex in read_inputs(path, ("sentence",))] == ["0", "1"]  # no `id` column: positions
    (tmp_path / "rows.jsonl").write_text('{"pair_id": "x", "sentence": "good"}\n')
    assert [ex.id for ex in read_inputs(tmp_path / "rows.jsonl", ("sentence",), id_column="pair_id")] == ["x"]


def test_a_lone_surrogate_names_the_file_and_row(tmp_path):
    """Issue 21 case 14: a JSON "\\ud800" escape is one clear line, not a tokenizer TypeError."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"sentence": "fine"}\n{"sentence": "bad \\ud800 text"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: field 'sentence' holds an invalid character.*lone surrogate"):
        read_inputs(path, ("sentence",))


def test_a_header_alone_says_so(tmp_path):
    (tmp_path / "rows.tsv").write_text("sentence\tid\n")
    with pytest.raises(DataError, match=r"holds no rows \(a header alone"):
        read_inputs(tmp_path / "rows.tsv", ("sentence",))
