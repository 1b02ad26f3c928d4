"""Training curves in the trackers people use (TensorBoard, MLflow, Weights & Biases, ...).

Through accelerate's own tracker integration (``Accelerator(log_with=...)``), so that every tracker
accelerate supports works the same way and only the main process writes. The training loop logs per
optimiser step the loss and its KL / CE terms, the learning rate and the gradient norm, and per
evaluation the dev metrics; the run's resolved configuration goes in as hyperparameters. Logs of a
run with ``--report-to tensorboard`` land in ``<seed dir>/logs/<run name>``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from icldistill.config import TRACKERS
from icldistill.errors import ConfigError

# The package(s) each of config.TRACKERS needs, checked before training starts.
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "mlflow": ("mlflow",),
    "wandb": ("wandb",),
    "aim": ("aim",),
    "comet_ml": ("comet_ml",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
}
LOG_DIR = "logs"
assert set(TRACKER_PACKAGES) == set(TRACKERS) - {"none"}, "config.TRACKERS and TRACKER_PACKAGES disagree"


def check_tracker(report_to: str) -> None:
    """Refuse, before any work, a tracker whose package is not installed."""
    if report_to == "none":
        return
    packages = TRACKER_PACKAGES.get(report_to)
    if packages is None:
        raise ConfigError(f"option 'report_to': unknown tracker {report_to!r}; choose none or one of "
                          f"{', '.join(TRACKER_PACKAGES)}.")
    if not any(importlib.util.find_spec(p) is not None for p in packages):
        raise ConfigError(f"option 'report_to' is {report_to}, but the package {packages[0]!r} is not installed: "
                          f"pip install {packages[0]}.")


def accelerator_kwargs(report_to: str, seed_dir: Path | None) -> dict[str, Any]:
    """What ``Accelerator(...)`` needs for the tracker (nothing for ``none``)."""
    if report_to == "none":
        return {}
    check_tracker(report_to)
    if seed_dir is None:
        raise ConfigError("option 'report_to' needs an output directory for the logs.")
    return {"log_with": report_to, "project_dir": str(Path(seed_dir) / LOG_DIR)}


def hyperparameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved configuration as trackers take it: scalars kept, lists joined, None as 'none'.

    TensorBoard's hparams (and MLflow's params) accept only str, int, float and bool values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, (bool, int, float, str)):
            flat[key] = value
        elif value is None:
            flat[key] = "none"
        elif isinstance(value, (list, tuple)):
            flat[key] = ",".join(map(str, value))
        else:
            flat[key] = str(value)
    return flat


def step_values(loss: float, kl: float | None, ce: float | None, lr: float,
                grad_norm: float | None) -> dict[str, float]:
    """One optimiser step's scalars, per example (the loop's sums divided by the step's examples)."""
    values = {"train/loss": loss, "train/lr": lr}
    if kl is not None:
        values["train/kl"] = kl
    if ce is not None:
        values["train/ce"] = ce
    if grad_norm is not None:
        values["train/grad_norm"] = grad_norm
    return values


def eval_values(metrics: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
    """An evaluation's numeric metrics, ``<prefix>/<set>/<metric>``; nested breakdowns are left out."""
    values: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            for metric, number in value.items():
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    values[f"{prefix}/{name}/{metric}"] = float(number)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[f"{prefix}/{name}"] = float(value)
    return values
