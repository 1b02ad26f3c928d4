"""Re-run a finished run from its record and report every metric that differs.

A ``results.json`` holds the full resolved configuration, the model and data fingerprints and the
versions it ran with; this module runs the same configuration again and compares, so that "the same
configuration gives the same numbers" is something a user can check, not only a promise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from icldistill.config import build_config
from icldistill.methods.registry import get_method
from icldistill.runtime.records import environment
from icldistill.runtime.rundir import RunDir, load_run


def _leaves(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{path}.{key}" if path else str(key))
    else:
        yield path, tree


def compare_metrics(a: dict[str, Any], b: dict[str, Any], tolerance: float = 0.0) -> list[dict[str, Any]]:
    """Numeric leaves of two per-seed metric trees that differ by more than ``tolerance``."""
    left, right = dict(_leaves(a)), dict(_leaves(b))
    out = []
    for key in sorted(set(left) | set(right)):
        x, y = left.get(key), right.get(key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            if not (math.isclose(x, y, rel_tol=0, abs_tol=tolerance) or (math.isnan(x) and math.isnan(y))):
                out.append({"metric": key, "original": x, "reproduced": y})
        elif x != y:
            out.append({"metric": key, "original": x, "reproduced": y})
    return out


def reproduce(run_dir: str | Path, output_dir: str | Path | None = None, *, tolerance: float = 0.0,
              progress: bool = True) -> dict[str, Any]:
    """Re-run the run recorded in ``run_dir/results.json`` into ``output_dir`` and compare the metrics."""
    run = load_run(run_dir)
    path = RunDir(run_dir).results_path
    spec = get_method(run.method, where=str(path))
    method, record = run.method, run.to_dict()
    values = dict(run.config)
    values["output_dir"] = str(output_dir or Path(run_dir) / "reproduced")
    if "resume" in values:
        values["resume"] = False
    config = build_config(spec.options, values, source=str(path))
    again = spec(config, progress=progress)
    differences = []
    for seed, entry in record.get("seeds", {}).items():
        other = again.get("seeds", {}).get(seed, {})
        for d in compare_metrics(entry.get("eval") or {}, other.get("eval") or {}, tolerance):
            differences.append({"seed": seed, **d})
    now = environment()
    changed = {k: (record["environment"].get(k), now.get(k)) for k in ("torch", "transformers", "peft", "git_revision")
               if record.get("environment", {}).get(k) != now.get(k)}
    fingerprints = {"model": (record.get("model") or {}).get("fingerprint"), "data": record.get("data")}
    same_inputs = (fingerprints["data"] == again.get("data")
                   and fingerprints["model"] == (again.get("model") or {}).get("fingerprint"))
    return {"method": method, "output_dir": values["output_dir"], "differences": differences,
            "environment_changes": changed, "same_inputs": same_inputs, "identical": not differences}
