"""The server's view of the global encoder each round: kNN top-1 on a labelled held-out
set it holds, the collapse statistic, and a linear probe when asked."""
from __future__ import annotations

import torch

from common.config import RunConfig
from common.datasets import load_eval_split
from common.evaluation import collapse_std, embed, knn_top1, linear_probe
from common.logs import get_logger
from common.methods.base import SSLMethod

log = get_logger()



def eval_source(cfg: RunConfig) -> tuple[str, str]:
    """The labelled images the server evaluates on: --eval-path, else the training source."""
    return ("imagefolder", cfg.eval_path) if cfg.eval_path else (cfg.dataset, cfg.data_path)


class GlobalEvaluator:
    """Holds the decoded evaluation images for the whole run (decoded once)."""

    def __init__(self, cfg: RunConfig, device: torch.device):
        source, path = eval_source(cfg)
        bank, query = load_eval_split(source, path, cfg.image_size, seed=cfg.seed)
        self.bank = bank.sample(cfg.eval_bank_size, cfg.seed)
        self.query = query.sample(cfg.eval_query_size, cfg.seed + 1)
        self.num_classes = len(self.bank.classes)
        self.cfg, self.device = cfg, device
        log.info("evaluation: kNN bank %d images, query %d images, %d classes from %s",
                 len(self.bank), len(self.query), self.num_classes, path or source)

    @torch.no_grad()
    def __call__(self, method: SSLMethod, *, probe: bool = False) -> dict[str, float]:
        method.to(self.device)
        bank = embed(method.encoder, self.bank.images, device=self.device)
        query = embed(method.encoder, self.query.images, device=self.device)
        projector = method.projector.eval()
        projections = projector(query[:2048].to(self.device)).float().cpu()
        metrics = {
            "knn_top1": knn_top1(bank, self.bank.labels, query, self.query.labels,
                                 k=self.cfg.knn_k, temperature=self.cfg.knn_temperature,
                                 num_classes=self.num_classes),
            "collapse_std": collapse_std(projections),
            "collapse_healthy": projections.shape[1] ** -0.5,
        }
        if probe:
            with torch.enable_grad():
                metrics["probe_top1"] = linear_probe(bank, self.bank.labels, query,
                                                     self.query.labels, seed=self.cfg.seed)
        method.cpu()
        return metrics
