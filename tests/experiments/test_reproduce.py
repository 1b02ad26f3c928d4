"""Same configuration, same numbers: bit-identical metrics on CPU in fp32, and `icld reproduce` says so."""

from __future__ import annotations

import json

from icldistill.cli import main
from icldistill.config import IclOptions, PbftOptions, build_config
from icldistill.experiments.reproduce import reproduce
from icldistill.methods.icl import run_icl
from icldistill.methods.pbft import run_pbft


def _icl(tmp_path, data_dir, tiny_dirs):
    return build_config(IclOptions, dict(model=str(tiny_dirs["opt"]), eval=["mnli-m"], shots=2, seeds=[0], limit=6,
                                         data_dir=str(data_dir), output_dir=str(tmp_path / "run"), dtype="fp32",
                                         device="cpu"))


def test_reproduce_icl_is_identical_and_detects_a_change(tmp_path, data_dir, tiny_dirs, capsys):
    run_icl(_icl(tmp_path, data_dir, tiny_dirs), progress=False)
    result = reproduce(tmp_path / "run", tmp_path / "again", progress=False)
    assert result["identical"] and result["same_inputs"]

    # A tampered record is reported, metric by metric.
    path = tmp_path / "run" / "results.json"
    record = json.loads(path.read_text())
    record["seeds"]["0"]["eval"]["mnli-m"]["accuracy"] += 0.25
    path.write_text(json.dumps(record))
    assert main(["-q", "reproduce", str(tmp_path / "run"), "--output-dir", str(tmp_path / "third")]) == 1
    out = capsys.readouterr().out
    assert "mnli-m.accuracy" in out and "1 metrics differ" in out


def test_training_is_bit_identical_on_cpu_fp32(tmp_path, data_dir, tiny_dirs, cache_dir):
    values = dict(model=str(tiny_dirs["student"]), eval=["mnli-m"], shots=4, seeds=[0], limit=6, epochs=2, lr=1e-2,
                  train_batch_size=2, data_dir=str(data_dir), dtype="fp32", device="cpu")
    a = run_pbft(build_config(PbftOptions, {**values, "output_dir": str(tmp_path / "a")}), progress=False)
    b = run_pbft(build_config(PbftOptions, {**values, "output_dir": str(tmp_path / "b")}), progress=False)
    assert a["seeds"]["0"]["eval"] == b["seeds"]["0"]["eval"]
    losses = [[h["train_loss"] for h in record["seeds"]["0"]["history"]] for record in (a, b)]
    assert losses[0] == losses[1]
