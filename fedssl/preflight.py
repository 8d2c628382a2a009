"""What runs before a run starts, so bad input fails in one line before Ray starts or any
image is trained on: the settings (data, strategy, trackers, init-weights) checked and the
images decoded once (the disk cache then serves every client process)."""
from __future__ import annotations

import os
from pathlib import Path

from fedssl.common.config import ConfigError, RunConfig

# Settings of the simulation harness, not of the run (not sent to clients).
HARNESS_DEFAULTS = {"num-clients": 20, "client-cpus": float(len(os.sched_getaffinity(0))),
                    "client-gpus": 0.0, "ray-address": ""}


def preflight(cfg: RunConfig, num_clients: int | None) -> None:
    from fedssl.common.checkpoint import load_init_weights
    from fedssl.common.datasets import load_eval_split, training_images
    from fedssl.common.methods import build_method
    from fedssl.common.partition import partition_indices
    from fedssl.server.evaluation import eval_source
    from fedssl.server.strategies import build_strategy
    from fedssl.server.tracking import check_installed

    check_installed(cfg)
    if cfg.resume:
        from fedssl.server.app import resume_point
        resume_point(cfg, Path(cfg.out_dir).expanduser())
    elif cfg.init_weights:
        load_init_weights(build_method(cfg), cfg)
    build_strategy(cfg)
    images = training_images(cfg.dataset, cfg.data_path, cfg.image_size, cfg.max_images, cfg.seed,
                             eval_path=cfg.eval_path, validation=cfg.monitor == "validation")
    if num_clients is not None:
        if num_clients < cfg.min_train_clients:
            raise ConfigError(f"num-clients={num_clients} is invalid: must be >= "
                              f"min-train-clients ({cfg.min_train_clients})")
        labels = None if images.labels is None else images.labels.numpy()
        partition_indices(len(images), labels, num_clients, cfg.partition, alpha=cfg.alpha,
                          shards_per_client=cfg.shards_per_client, seed=cfg.seed)
    load_eval_split(*eval_source(cfg), cfg.image_size, seed=cfg.seed)


def quiet_engines(verbose: bool) -> None:
    if verbose:
        return
    import logging
    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
