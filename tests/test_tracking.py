"""Tracking: each metrics.jsonl row also reaches TensorBoard and MLflow when asked, and reads
back from their own files; a missing package is one line naming the extra to install."""
from __future__ import annotations

import importlib.util
import json

import pytest

from fedssl.client.app import app as client_app
from fedssl.common.config import ConfigError, RunConfig
from fedssl.server.app import run_federation
from fedssl.server.run_dir import RunDir
from fedssl.server.tracking import MLFLOW_DB, TENSORBOARD_DIR, check_installed
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config
from fedssl.simulations.cli import main

PER_ROUND = {"knn_top1", "collapse_std", "train_loss", "clients_ok", "clients_failed",
             "bytes_sent", "bytes_received", "seconds"}


def tensorboard_scalars(run_dir) -> dict[str, dict[int, float]]:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR)).Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def mlflow_run(run_dir, uri: str | None = None):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri or f"sqlite:///{run_dir / MLFLOW_DB}")
    run_id = json.loads((run_dir / "mlflow-run.json").read_text())["run_id"]
    return client, client.get_run(run_id)


def metric_steps(client, run, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


def test_a_federation_writes_tensorboard_and_mlflow_that_read_back(small_image_folder, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    cfg = fast_config(small_image_folder, out, num_rounds=2, tensorboard=True, mlflow=True)
    run_federation(InProcessGrid(client_app, num_nodes=2), cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    scalars = tensorboard_scalars(out)
    assert PER_ROUND <= set(scalars)
    assert scalars["knn_top1"] == pytest.approx({r["round"]: r["knn_top1"] for r in rows})
    assert scalars["train_loss"] == pytest.approx({r["round"]: r["train_loss"] for r in rows[1:]})
    assert all(scalars["bytes_sent"][r] > 0 and scalars["bytes_received"][r] > 0 for r in (1, 2))

    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["method"] == cfg.method and run.data.params["num-rounds"] == "2"
    assert PER_ROUND <= set(run.data.metrics)
    assert metric_steps(client, run, "knn_top1") == pytest.approx(scalars["knn_top1"])
    assert metric_steps(client, run, "clients_ok") == {0: 0.0, 1: 2.0, 2: 2.0}


def test_a_resumed_run_continues_its_mlflow_run_and_purges_later_tensorboard_steps(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    cfg = RunConfig(tensorboard=True, mlflow=True, out_dir=str(tmp_path))
    rows = [{"round": r, "knn_top1": 0.1 * (r + 1), "seconds": 1.0} for r in range(3)]
    first = RunDir(tmp_path, cfg=cfg)
    for row in rows:
        first.append_metrics(row)  # a run killed after round 2, checkpointed after round 1
    first.tracking.close()

    again = RunDir(tmp_path, rows[:2], cfg.replace(resume=True))
    again.append_metrics({"round": 2, "knn_top1": 0.9, "seconds": 1.0})
    again.write_summary({})

    assert tensorboard_scalars(tmp_path)["knn_top1"] == pytest.approx({0: 0.1, 1: 0.2, 2: 0.9})
    client, run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert metric_steps(client, run, "knn_top1")[1] == pytest.approx(0.2)
    assert 0.9 in [m.value for m in client.get_metric_history(run.info.run_id, "knn_top1")]


def test_any_tracking_uri_is_used(tmp_path):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    out = RunDir(tmp_path / "run", cfg=RunConfig(mlflow=True, mlflow_uri=uri))
    out.append_metrics({"round": 0, "knn_top1": 0.5, "failures": {}, "aggregated": True})
    out.write_summary({})
    client, run = mlflow_run(tmp_path / "run", uri)
    assert run.data.metrics == {"knn_top1": 0.5}  # numbers only: not dicts, not flags
    assert not (tmp_path / "run" / MLFLOW_DB).exists()


def test_tracking_off_writes_nothing_extra(tmp_path):
    out = RunDir(tmp_path, cfg=RunConfig())
    out.append_metrics({"round": 0, "knn_top1": 0.5})
    out.write_summary({})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "summary.json"]


def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"mlflow=true needs the mlflow package"):
        check_installed(RunConfig(mlflow=True))
    check_installed(RunConfig(mlflow=False))

    assert main(["simulate", "--mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'fedssl[track]'" in err and "\n" not in err


def test_an_unusable_tracking_uri_fails_before_training(tmp_path):
    pytest.importorskip("mlflow")
    with pytest.raises(ConfigError, match="mlflow-uri='nosuchscheme://x': could not start"):
        RunDir(tmp_path, cfg=RunConfig(mlflow=True, mlflow_uri="nosuchscheme://x"))
