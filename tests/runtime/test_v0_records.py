"""Run directories written by the previous record format (tests/fixtures/v0, made at ca96d28) still read.

The fixture was written from a working directory with relative output paths (``runs/pbft``), so its seed
records name artefacts relative to a directory that no longer exists; readers must find them in the run.
Its LoRA adapters are not in git: they are trained again, bit for bit, into the copy the tests read
(``tests/fixtures/make_v0_runs.rebuild_adapters``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from icldistill.cli import main

V0 = Path(__file__).resolve().parents[1] / "fixtures" / "v0"
OLD_MODEL = "/tmp/icld-v0-dl4zzyer/models/student"  # where the fixture's student lived when it was made


LOADED_ADAPTERS = ["pbft/seed-0/adapter/adapter_model.safetensors"]  # the only weights these tests load


@pytest.fixture(scope="module")
def v0_with_adapters(tmp_path_factory, tiny_dirs, data_dir) -> Path:
    """A copy of the fixture with the adapter its pbft run trained for seed 0, trained again (once)."""
    from fixtures.make_v0_runs import rebuild_adapters

    root = tmp_path_factory.mktemp("v0-fixture") / "v0"
    shutil.copytree(V0, root)
    rebuild_adapters(root, tiny_dirs["student"], data_dir, root.parent / "work", LOADED_ADAPTERS)
    return root


@pytest.fixture
def v0(v0_with_adapters, tmp_path, tiny_dirs, monkeypatch):
    """A copy of the fixture whose recorded student path names this session's (identical) tiny student."""
    root = tmp_path / "v0"
    shutil.copytree(v0_with_adapters, root)
    for path in root.rglob("*.json"):
        path.write_text(path.read_text().replace(OLD_MODEL, str(tiny_dirs["student"])))
    monkeypatch.chdir(tmp_path)  # not the directory the fixture was written from
    return root


def test_results_and_report_read_a_v0_sweep(v0, capsys, tmp_path):
    assert main(["results", str(v0 / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "icl-student" in out and "pbft" in out
    assert main(["report", str(v0 / "sweep"), "--output-dir", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()


def test_compare_reads_v0_runs(v0, capsys):
    assert main(["compare", str(v0 / "icl"), str(v0 / "pbft")]) == 0
    out = capsys.readouterr().out
    assert "mnli-m" in out and "0,1" in out


def test_eval_loads_a_v0_seed_with_its_adapter(v0, data_dir, capsys, tmp_path):
    from icldistill.runtime.records import read_json

    seed0 = read_json(v0 / "pbft" / "seed-0" / "seed_result.json")
    assert main(["-q", "eval", "--model", str(v0 / "pbft" / "seed-0"), "--eval", "mnli-m", "--limit", "6",
                 "--data-dir", str(data_dir), "--device", "cpu", "--dtype", "fp32",
                 "--output-dir", str(tmp_path / "ev")]) == 0
    record = read_json(tmp_path / "ev" / "results.json")
    # The same adapter on the same rows: the accuracy the run recorded for seed 0.
    assert record["seeds"]["0"]["eval"]["mnli-m"]["accuracy"] == pytest.approx(seed0["eval"]["mnli-m"]["accuracy"])
