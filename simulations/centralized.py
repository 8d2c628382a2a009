"""The centralized baseline: the same method and hot path on the pooled data, for the
same number of image-passes as a federated run, evaluated the same way."""
from __future__ import annotations

import time
from typing import Any

import torch

from fedssl.common.checkpoint import load_init_weights
from fedssl.common.config import RunConfig
from fedssl.common.datasets import ImageSet, training_images
from fedssl.common.device import select_device, set_threads
from fedssl.common.logs import get_logger
from fedssl.common.methods import build_method, encoder_line
from fedssl.common.schedules import round_lr
from fedssl.common.training import StepSettings, augmenter, train_epochs
from fedssl.server.evaluation import GlobalEvaluator
from fedssl.server.progress import Progress
from fedssl.server.run_dir import RunDir, default_out_dir, summarize, weights_metadata

log = get_logger()


def pooled_epochs(cfg: RunConfig) -> int:
    """Epochs over the pooled data that match the federated run's image-passes."""
    return max(round(cfg.num_rounds * cfg.local_epochs * cfg.fraction_train), 1)


def pooled_images(cfg: RunConfig) -> ImageSet:
    """All the images the federated run's clients share among them: the training images less
    the server's held-out evaluation images (common.datasets.training_images)."""
    return training_images(cfg.dataset, cfg.data_path, cfg.image_size, cfg.max_images, cfg.seed,
                           eval_path=cfg.eval_path, validation=cfg.monitor == "validation")


def run_centralized(cfg: RunConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    set_threads(cfg.threads)
    device = select_device(cfg.device)
    out = RunDir(cfg.out_dir or default_out_dir(), cfg=cfg)
    data = pooled_images(cfg)
    method = build_method(cfg)
    load_init_weights(method, cfg)  # a no-op without init-weights
    method.init_local()
    evaluator = GlobalEvaluator(cfg, device)
    augment = augmenter(cfg)
    epochs = pooled_epochs(cfg)
    start = time.perf_counter()
    log.info("centralized %s, %s: %d images, %d epochs", cfg.method, encoder_line(cfg), len(data), epochs)
    with Progress(epochs, unit="epoch") as progress:
        history = [{"round": 0, **evaluator(method), "seconds": 0.0}]
        out.append_metrics(history[0])
        progress.update(history[0])
        for epoch in range(1, epochs + 1):
            tick = time.perf_counter()
            result = train_epochs(
                method, data.images, augment, epochs=1, device=device,
                progress_start=(epoch - 1) / epochs, progress_end=epoch / epochs,
                seed=cfg.seed * 1_000_003 + epoch,
                settings=StepSettings.from_config(cfg, lr=round_lr(epoch, epochs, cfg.lr)))
            final = epoch == epochs
            evaluate = final or epoch % cfg.eval_every == 0
            scores = evaluator(method, probe=final and cfg.probe, final=final) if evaluate else {}
            row = {"round": epoch, **scores, "train_loss": result.loss,
                   "client_images_per_second": result.images_per_second,
                   "seconds": round(time.perf_counter() - tick, 3)}
            history.append(row)
            out.append_metrics(row)
            progress.update(row)
    summary = summarize(cfg, history, seconds=time.perf_counter() - start,
                        encoder=out.encoder_dir, out_dir=out.path, centralized=True, epochs=epochs)
    out.export_encoder(method.shared_state(), weights_metadata(cfg, epochs, centralized=True), summary)
    out.write_summary(summary)
    return summary
