"""The ServerApp: initial model, strategy, per-round evaluation, checkpoints, export."""
from __future__ import annotations

import random
import time
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.device import select_device, set_threads
from common.logs import get_logger
from common.methods import build_method
from common.records import from_record, to_record
from server.evaluation import GlobalEvaluator
from server.run_dir import RunDir, default_out_dir, summarize, weights_metadata
from server.strategies import build_strategy

log = get_logger()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunConfig.from_mapping(context.run_config))


def wait_for_nodes(grid: Grid, needed: int, timeout: float) -> int:
    """Flower's sampler waits forever for missing nodes; fail with a reason instead."""
    deadline = time.monotonic() + timeout
    while (seen := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{seen} client node(s) connected within {timeout:.0f} s "
                               f"(node-wait-timeout), {needed} needed (min-train-clients)")
        time.sleep(1.0)
    return seen


def run_federation(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Run all rounds; return the summary also written to OUT/summary.json."""
    random.seed(cfg.seed)  # Flower samples clients with `random`
    torch.manual_seed(cfg.seed)
    set_threads(cfg.threads)
    device = select_device(cfg.device)
    out = RunDir(cfg.out_dir or default_out_dir())
    strategy = build_strategy(cfg)
    method = build_method(cfg)
    evaluator = GlobalEvaluator(cfg, device)
    nodes = wait_for_nodes(grid, cfg.min_train_clients, cfg.node_wait_timeout)
    log.info("%s + %s, %s encoder, %d rounds, %d client nodes, output in %s",
             cfg.method, cfg.strategy, cfg.encoder, cfg.num_rounds, nodes, out.path)
    history: list[dict[str, Any]] = []
    clock = {"start": time.perf_counter(), "round": time.perf_counter()}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
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
            "clients_ok": stats.get("clients_ok", 0),
            "clients_failed": stats.get("clients_failed", 0),
            "failures": stats.get("failures", {}),
            "seconds": round(now - clock["round"], 3),
        }
        clock["round"] = now
        history.append(row)
        out.append_metrics(row)
        # Weights come back from the method, so buffers keep their dtypes (FedAvg returns
        # int64 counters as float64).
        out.save_checkpoint(method.shared_state(), weights_metadata(cfg, server_round))
        log.info(_progress_line(row, cfg.num_rounds))
        return MetricRecord({k: float(v) for k, v in scores.items()})

    strategy.start(grid, to_record(method.shared_state()), num_rounds=cfg.num_rounds,
                   timeout=cfg.round_timeout, train_config=ConfigRecord(cfg.to_mapping()),
                   evaluate_fn=evaluate)

    encoder_path = out.export_encoder(method.shared_state(), weights_metadata(cfg, cfg.num_rounds))
    summary = summarize(cfg, history, seconds=time.perf_counter() - clock["start"],
                        encoder=encoder_path, out_dir=out.path, rounds=cfg.num_rounds)
    out.write_summary(summary)
    log.info("done: kNN top-1 %.4f -> %.4f after %d rounds in %.0f s; encoder: %s",
             history[0].get("knn_top1", float("nan")), history[-1].get("knn_top1", float("nan")),
             cfg.num_rounds, summary["seconds"], encoder_path)
    return summary


def _progress_line(row: dict[str, Any], num_rounds: int) -> str:
    parts = [f"round {row['round']}/{num_rounds}"]
    if row["round"] > 0:
        parts.append(f"clients {row['clients_ok']} ok {row['clients_failed']} failed")
        if row["train_loss"] is not None:
            parts.append(f"loss {row['train_loss']:.4f}")
    if "knn_top1" in row:
        parts.append(f"kNN top-1 {row['knn_top1']:.4f}")
    if "probe_top1" in row:
        parts.append(f"probe {row['probe_top1']:.4f}")
    parts.append(f"{row['seconds']:.1f} s")
    return " | ".join(parts)
