"""Experiment trackers: a spec's `report_to` mirrors every metric and the spec to TensorBoard,
Weights & Biases and MLflow through their own libraries (the names HF Trainer uses).

Each tracker is a :class:`~opsd_engine.events.TrainerCallbacks`: the `started` event opens the run
with the whole spec as its configuration, every `on_metrics` is logged at its optimizer step, and
`finished` / `cancelled` / `interrupted` (or :meth:`TrackerCallbacks.close`) ends it. Where they
write and every credential come from the environment of the process that trains, never from the
spec (a tenant cannot point a worker anywhere):

* ``tensorboard``: event files in ``$TENSORBOARD_LOGGING_DIR`` (default ``OUTPUT/tensorboard``);
* ``wandb``: ``WANDB_API_KEY``, ``WANDB_PROJECT`` (default ``opsd``), ``WANDB_ENTITY``,
  ``WANDB_MODE`` (``offline`` writes a run directory under ``WANDB_DIR``, default ``OUTPUT``);
* ``mlflow``: ``MLFLOW_TRACKING_URI`` (default a file store ``OUTPUT/mlruns``; MLflow 3 needs
  ``MLFLOW_ALLOW_FILE_STORE=true`` for a file store you name yourself),
  ``MLFLOW_EXPERIMENT_NAME`` (default ``opsd``) and MLflow's own credential variables.

MLflow allows only ``[A-Za-z0-9_-. /]`` in names, so ``eval/avg@8`` is logged there as
``eval/avg_at_8``; TensorBoard and W&B keep every name as it is.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opsd_engine.config import JobSpec, SpecError, spec_to_dict

TRACKERS = ("tensorboard", "wandb", "mlflow")
INSTALL_HINT = "pip install 'opsd[trackers]'"
_ENDS = ("finished", "cancelled", "interrupted")


class TrackerCallbacks:
    """Base of the three trackers: opens on `started`, logs metrics, closes at the end."""

    name = ""

    def __init__(self, spec: JobSpec, output_dir: Path, run_name: str) -> None:
        self.spec, self.output_dir, self.run_name = spec, Path(output_dir), run_name
        self.opened = False

    # the callback protocol -------------------------------------------------------------
    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        if kind == "started" and not self.opened:
            self.open(spec_to_dict(self.spec))
            self.opened = True
        elif kind in _ENDS:
            self.close()

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.opened:
            self.log(step, metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        return None

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        if self.opened:
            self.opened = False
            self.finish()

    # what each tracker implements ------------------------------------------------------
    def open(self, spec: dict[str, Any]) -> None:
        raise NotImplementedError

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class TensorBoardTracker(TrackerCallbacks):
    """Scalars per metric (tag = metric name) and the spec as a text summary."""

    name = "tensorboard"

    def open(self, spec: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        root = os.environ.get("TENSORBOARD_LOGGING_DIR") or str(self.output_dir / "tensorboard")
        self.writer = SummaryWriter(log_dir=str(Path(root) / self.run_name))
        self.writer.add_text("spec", "```\n" + json.dumps(spec, indent=2) + "\n```", 0)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class WandbTracker(TrackerCallbacks):
    """One W&B run: the spec as its config, every metric at its step."""

    name = "wandb"

    def open(self, spec: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "opsd"),
            name=self.run_name,
            config=spec,
            dir=os.environ.get("WANDB_DIR") or str(self.output_dir),
            reinit="create_new",
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self) -> None:
        self.run.finish()


_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def mlflow_name(name: str) -> str:
    """A metric or parameter name MLflow accepts (`eval/avg@8` -> `eval/avg_at_8`)."""
    return _MLFLOW_BAD.sub("_", name.replace("@", "_at_"))


class MlflowTracker(TrackerCallbacks):
    """One MLflow run: the spec as flattened params (and `spec.json`), metrics by step."""

    name = "mlflow"

    def open(self, spec: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # no server named: a file store in the run (MLflow 3 wants an explicit yes)
            uri = (self.output_dir / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "opsd")
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        params = {mlflow_name(k): str(v)[:6000] for k, v in _flatten(spec).items()}
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        self.client.log_dict(self.run_id, spec, "spec.json")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric as MlflowMetric

        now = int(time.time() * 1000)
        batch = [MlflowMetric(mlflow_name(k), float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


_CLASSES: dict[str, type[TrackerCallbacks]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
}
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def make_trackers(spec: JobSpec, output_dir: str | Path, run_name: str) -> list[TrackerCallbacks]:
    """The trackers of `spec.report_to`; :class:`SpecError` on `report_to` when one's library is
    not installed (before any training starts)."""
    import importlib.util

    trackers = []
    for name in spec.report_to:
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise SpecError(
                [("report_to", f"{name} is not installed in this environment ({INSTALL_HINT})")]
            )
        trackers.append(_CLASSES[name](spec, Path(output_dir), run_name))
    return trackers
