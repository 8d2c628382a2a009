"""The ServerApp: initial model, strategy, per-round evaluation, checkpoints, export."""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedssl.common.checkpoint import load_init_weights
from fedssl.common.config import ConfigError, RunConfig
from fedssl.common.device import select_device, set_threads
from fedssl.common.logs import get_logger
from fedssl.common.methods import build_method, encoder_line
from fedssl.common.records import to_record
from fedssl.server.evaluation import GlobalEvaluator
from fedssl.server.nodes import wait_for_nodes
from fedssl.server.progress import Progress
from fedssl.server.resume import RunState, load_run_state, set_rng_state
from fedssl.server.round_record import RoundOffset
from fedssl.server.round_step import RoundRecorder
from fedssl.server.run_dir import RunDir, default_out_dir, summarize, weights_metadata
from fedssl.server.strategies import build_strategy

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
                     "tensorboard", "mlflow", "mlflow-uri", "data-description"}


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
    if not start:
        load_init_weights(method, cfg)  # the initial global model; a no-op without init-weights
    evaluator = GlobalEvaluator(cfg, device)
    nodes = wait_for_nodes(grid, cfg.min_train_clients, cfg.node_wait_timeout)
    log.info("%s + %s, %s, %d rounds, %d client nodes, output in %s",
             cfg.method, cfg.strategy, encoder_line(cfg), cfg.num_rounds, nodes, out.path)
    if start:
        method.load_partial(start.shared)
        strategy.load_server_state(start.server_state)
        strategy.resume_after(start.round)
        log.info("resuming after round %d from %s", start.round, out.checkpoint_path)
    offset = RoundOffset(start.round if start else 0)
    clock = {"start": time.perf_counter()}
    record_round = RoundRecorder(cfg, method, evaluator, strategy, out, history, offset, resumed=start is not None)

    def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        return record_round(flower_round, arrays, progress)

    if start:
        set_rng_state(start.rng)  # after the model build and evaluator drew from them
    with Progress(cfg.num_rounds) as progress:
        strategy.start(grid, to_record(method.shared_state()), num_rounds=offset.remaining(cfg.num_rounds),
                       timeout=cfg.round_timeout, train_config=ConfigRecord(cfg.to_mapping()),
                       evaluate_fn=evaluate)

    encoder_path = out.encoder_dir
    summary = summarize(cfg, history, seconds=time.perf_counter() - clock["start"],
                        encoder=encoder_path, out_dir=out.path, rounds=cfg.num_rounds,
                        privacy=strategy.privacy_report())
    out.export_encoder(method.shared_state(), weights_metadata(cfg, cfg.num_rounds), summary)
    out.write_summary(summary)
    monitored = "val_knn_top1" if cfg.monitor == "validation" else "knn_top1"
    log.info("done: %s %.4f -> %.4f after %d rounds in %.0f s; encoder: %s", monitored,
             history[0].get(monitored) or float("nan"), history[-1].get(monitored) or float("nan"),
             cfg.num_rounds, summary["seconds"], encoder_path)
    return summary
