"""Copies of every metrics.jsonl row for TensorBoard and MLflow, when the run config asks
(`tensorboard`, `mlflow`, `mlflow-uri`). Both packages are optional: asked for and missing
is a one-line ConfigError naming the package and the extra that installs it."""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

from fedssl.common.config import ConfigError, RunConfig
from fedssl.common.logs import get_logger

log = get_logger()

INSTALL_HINT = "pip install 'fedssl[track]'"
EXPERIMENT = "fedssl"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_RUN_FILE = "mlflow-run.json"  # which MLflow run a resumed run continues


def check_installed(cfg: RunConfig) -> None:
    """Fail before anything starts when a requested tracker's package is missing."""
    for key, package in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
        if getattr(cfg, key) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{key}=true needs the {package} package, which is not "
                              f"installed: {INSTALL_HINT}")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers by name (the round is the step): whatever a row gains is
    tracked without a second list to keep in step with it."""
    return {key: float(value) for key, value in row.items()
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


class Sink(Protocol):
    name: str

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    name = "TensorBoard"

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_from: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides what a killed run logged after its last checkpoint, as
        # metrics.jsonl drops those rows.
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=resume_from)
        if resume_from is None:
            table = "\n".join(["| key | value |", "| --- | --- |"] +
                              [f"| {k} | {v} |" for k, v in config.items()])
            self.writer.add_text("config", table)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a TensorBoard watching the run shows each round as it ends

    def close(self) -> None:
        self.writer.close()


class MLflowSink:
    name = "MLflow"

    def __init__(self, run_dir: Path, uri: str, config: dict[str, Any], resumed: bool):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # set-up chatter
        local = not uri
        uri = uri or f"sqlite:///{run_dir / MLFLOW_DB}"
        self.client = MlflowClient(tracking_uri=uri)
        record = run_dir / MLFLOW_RUN_FILE
        previous = json.loads(record.read_text()) if resumed and record.is_file() else {}
        if previous.get("uri") == uri:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            EXPERIMENT, artifact_location=(run_dir / "mlflow-artifacts").as_uri() if local else None)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        record.write_text(json.dumps({"uri": uri, "run_id": self.run_id}))
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in config.items()])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Tracking:
    """Sends each metrics row to every sink the run asked for (none: does nothing)."""

    def __init__(self, sinks: Sequence[Sink] = ()):
        self.sinks = list(sinks)

    @classmethod
    def open(cls, cfg: RunConfig, run_dir: Path, resume_from: int | None) -> "Tracking":
        """`resume_from`: the first round a resumed run will log; None for a fresh run."""
        check_installed(cfg)
        sinks: list[Sink] = []
        config = cfg.to_mapping()
        if cfg.tensorboard:
            sinks.append(TensorBoardSink(run_dir, config, resume_from))
        if cfg.mlflow:
            try:
                sinks.append(MLflowSink(run_dir, cfg.mlflow_uri, config, resume_from is not None))
            except Exception as err:  # a bad URI or an unreachable server: say so before training
                first_line = (str(err).splitlines() or [type(err).__name__])[0]
                raise ConfigError(f"mlflow-uri={cfg.mlflow_uri!r}: could not start an MLflow "
                                  f"run: {first_line}") from None
        return cls(sinks)

    def log_row(self, row: dict[str, Any]) -> None:
        values = scalars(row)
        for sink in list(self.sinks):
            try:
                sink.log(int(row["round"]), values)
            except Exception as err:
                # Tracking is a copy of metrics.jsonl: losing it must not end a long run.
                log.warning("%s tracking stopped: %s", sink.name, err)
                self.sinks.remove(sink)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:
                log.warning("%s tracking did not close cleanly: %s", sink.name, err)
        self.sinks = []
