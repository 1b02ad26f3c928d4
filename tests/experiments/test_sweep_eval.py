"""A sweep's trained cells evaluated on a set added later, and the report's paired intervals, on tiny models."""

from __future__ import annotations

import json

import pytest

from icldistill import cli
from icldistill.experiments.compare import compare_runs, config_key, sweep_paired
from icldistill.experiments.grid import expand
from icldistill.experiments.results import collect
from icldistill.experiments.sweep import run_sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_dirs, data_dir):
    root = tmp_path_factory.mktemp("sweep")
    spec = {"task": "mnli", "cache_dir": str(tmp_path_factory.mktemp("cache")), "eval": ["mnli-m", "hans-lo"],
            "teacher": str(tiny_dirs["teacher"]), "student": str(tiny_dirs["student"]), "data_dir": str(data_dir),
            "limit": 10, "epochs": 1, "train_queries": 4, "train_batch_size": 4, "batch_size": 8, "dtype": "fp32",
            "device": "cpu", "lr": 1e-2, "warmup_ratio": 0.0, "eval_every": -1,
            "grid": {"method": ["pbft", "distill"], "shots": [2], "seed": [0, 1]}}
    experiment = expand(spec, source="tiny.yaml", output_dir=root)
    assert run_sweep(experiment, progress=False).finished
    return experiment


def test_eval_adds_a_set_to_every_trained_cell(sweep, data_dir, capsys):
    root = sweep.output_dir
    args = ["-q", "eval", "--model", str(root), "--eval", "rte,hans-lo", "--limit", "6", "--device", "cpu",
            "--data-dir", str(data_dir)]
    assert cli.main(args) == 0
    assert "rte" in capsys.readouterr().out
    for cell in sweep.cells:
        record = json.loads((root / "cells" / cell.id / "eval-rte" / "results.json").read_text())
        assert record["method"] == "eval" and set(record["seeds"]) == {str(cell.seed)}
        assert record["resources"]["inference"]["latency_ms_per_query"] > 0
        assert not (root / "cells" / cell.id / "eval-hans-lo").exists()  # evaluated by the sweep already
    df = collect(root)
    rte = df[df["eval"] == "rte"]
    assert len(rte) == 4 and (rte["n"] == 6).all() and (rte["status"] == "complete").all()
    assert rte["inference_latency_ms"].notna().all() and (rte["train_time_s"] > 0).all()
    mtimes = {c.id: (root / "cells" / c.id / "eval-rte" / "results.json").stat().st_mtime_ns for c in sweep.cells}
    assert cli.main(args) == 0  # resumable: nothing is evaluated twice
    assert mtimes == {c.id: (root / "cells" / c.id / "eval-rte" / "results.json").stat().st_mtime_ns
                      for c in sweep.cells}


def test_report_claims_carry_paired_intervals(sweep, tmp_path):
    from icldistill.report.render import write_report

    root = sweep.output_dir
    df = collect(root)
    paired = sweep_paired(root, df)
    hit = paired[(paired["eval"] == "hans-lo") & (paired["metric"] == "ood_accuracy")]
    assert len(hit) == 1 and hit.iloc[0]["n_seeds"] == 2 and hit.iloc[0]["queries"] == 10
    # The same numbers as `icld compare` on the cells, seeds merged.
    cells = {m: [root / "cells" / c.id for c in sweep.cells if c.method == m] for m in ("distill", "pbft")}
    direct = [r for r in compare_runs(cells["distill"], cells["pbft"], ["hans-lo"], resamples=2000)
              if r.metric == "ood_accuracy"][0]
    assert hit.iloc[0]["difference"] == pytest.approx(direct.difference)
    assert (hit.iloc[0]["ci95_low"], hit.iloc[0]["ci95_high"]) == pytest.approx((direct.ci95_low, direct.ci95_high))
    assert hit.iloc[0]["cd_key"] == config_key(df[df["method"] == "distill"].iloc[0])

    paths = write_report(root, tmp_path / "report")
    text = paths["markdown"].read_text()
    claim = next(line for line in text.splitlines() if line.startswith("- **CD vs PBFT: OOD accuracy"))
    assert "paired difference" in claim and "95% CI" in claim and "10 queries x 2 seeds" in claim
    assert ("not distinguishable from 0" in claim) == (direct.ci95_low <= 0 <= direct.ci95_high)
