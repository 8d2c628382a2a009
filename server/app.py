"""The ServerApp: initial model, strategy, per-round evaluation, checkpoints, export."""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.config import ConfigError, RunConfig
from common.device import select_device, set_threads
from common.logs import get_logger
from common.methods import build_method
from common.records import from_record, to_record
from server.evaluation import GlobalEvaluator, stop_if_not_finite
from server.nodes import wait_for_nodes
from server.progress import Progress
from server.resume import RunState, load_run_state, rng_state, save_run_state, set_rng_state
from server.run_dir import RunDir, default_out_dir, summarize, weights_metadata
from server.strategies import build_strategy

log = get_logger()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunConfig.from_mapping(context.run_config))


def resume_point(cfg: RunConfig, out_dir: Path) -> RunState | None:
    """The checkpoint a resumed run continues from; None for a fresh run."""
    if not cfg.resume:
        return None
    path = out_dir / "checkpoint.safetensors"
    if not cfg.out_dir or not path.is_file():
        raise ConfigError(f"resume=True is invalid: out-dir={cfg.out_dir!r} holds no "
                          "checkpoint.safetensors to resume from")
    state = load_run_state(path)
    if state.round > cfg.num_rounds:
        raise ConfigError(f"num-rounds={cfg.num_rounds} is invalid: the checkpoint in "
                          f"{str(out_dir)!r} is already at round {state.round}")
    changed = sorted(k for k, v in cfg.to_mapping().items()
                     if k in state.config and state.config[k] != v and k not in RESUMABLE_CHANGES)
    if changed:
        log.warning("resuming with settings that differ from the checkpoint's: %s", ", ".join(changed))
    return state


# Settings that may differ between a run and its resumption without changing its results.
RESUMABLE_CHANGES = {"resume", "round-timeout", "node-wait-timeout", "device", "threads", "out-dir",
                     "tensorboard", "mlflow", "mlflow-uri"}


def run_federation(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Run all rounds; return the summary also written to OUT/summary.json."""
    random.seed(cfg.seed)  # Flower samples clients with `random`
    torch.manual_seed(cfg.seed)
    set_threads(cfg.threads)
    device = select_device(cfg.device)
    out_path = Path(cfg.out_dir).expanduser() if cfg.out_dir else default_out_dir()
    start = resume_point(cfg, out_path)
    history: list[dict[str, Any]] = list(start.history) if start else []
    out = RunDir(out_path, history, cfg)
    strategy = build_strategy(cfg)
    method = build_method(cfg)
    evaluator = GlobalEvaluator(cfg, device)
    nodes = wait_for_nodes(grid, cfg.min_train_clients, cfg.node_wait_timeout)
    log.info("%s + %s, %s encoder, %d rounds, %d client nodes, output in %s",
             cfg.method, cfg.strategy, cfg.encoder, cfg.num_rounds, nodes, out.path)
    if start:
        method.load_partial(start.shared)
        strategy.load_server_state(start.server_state)
        strategy.resume_after(start.round)
        log.info("resuming after round %d from %s", start.round, out.checkpoint_path)
    done = start.round if start else 0
    clock = {"start": time.perf_counter(), "round": time.perf_counter()}

    def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = flower_round + done
        if flower_round == 0 and start:
            return None  # evaluated and recorded before the interruption
        method.load_partial(from_record(arrays))
        final = server_round == cfg.num_rounds
        scores: dict[str, Any] = {}
        if final or server_round % cfg.eval_every == 0:
            scores = evaluator(method, probe=final and cfg.probe)
        stats = strategy.round_stats.get(server_round, {})
        train = stats.get("train_metrics", {})
        now = time.perf_counter()
        row = {
            "round": server_round,
            **scores,
            "train_loss": train.get("train-loss"),
            "client_images_per_second": train.get("images-per-second"),
            "skipped_images": stats.get("skipped_images", 0),
            "clients_ok": stats.get("clients_ok", 0),
            "clients_failed": stats.get("clients_failed", 0),
            "failures": stats.get("failures", {}),
            **({"client_rules": stats["client_rules"]} if stats.get("client_rules") else {}),
            "aggregated": stats.get("aggregated", server_round > 0),
            "bytes_sent": stats.get("bytes_sent", 0),
            "bytes_received": stats.get("bytes_received", 0),
            "client_train_seconds": round(stats.get("client_train_seconds", 0.0), 3),
            "seconds": round(now - clock["round"], 3),
        }
        clock["round"] = now
        history.append(row)
        # Checkpoint before the row: a row on disk always has its checkpoint. Weights come
        # back from the method, so buffers keep their dtypes (FedAvg returns int64 counters
        # as float64).
        save_run_state(out.checkpoint_path,
                       RunState(server_round, method.shared_state(), history,
                                strategy.server_state(), rng_state()),
                       weights_metadata(cfg, server_round))
        out.append_metrics(row)
        stop_if_not_finite(scores, server_round)  # a NaN/Inf model: warned, marked, stopped
        progress.update(row)
        return MetricRecord({k: float(v) for k, v in scores.items()})

    if start:
        set_rng_state(start.rng)  # after the model build and evaluator drew from them
    with Progress(cfg.num_rounds) as progress:
        strategy.start(grid, to_record(method.shared_state()), num_rounds=cfg.num_rounds - done,
                       timeout=cfg.round_timeout, train_config=ConfigRecord(cfg.to_mapping()),
                       evaluate_fn=evaluate)

    encoder_path = out.export_encoder(method.shared_state(), weights_metadata(cfg, cfg.num_rounds))
    summary = summarize(cfg, history, seconds=time.perf_counter() - clock["start"],
                        encoder=encoder_path, out_dir=out.path, rounds=cfg.num_rounds,
                        privacy=strategy.privacy_report())
    out.write_summary(summary)
    log.info("done: kNN top-1 %.4f -> %.4f after %d rounds in %.0f s; encoder: %s",
             history[0].get("knn_top1", float("nan")), history[-1].get("knn_top1", float("nan")),
             cfg.num_rounds, summary["seconds"], encoder_path)
    return summary
