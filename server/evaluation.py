"""The server's view of the global encoder each round: kNN top-1 on a labelled held-out
set it holds, the collapse statistic, and a linear probe when asked.

A global model whose features hold NaN or Inf (a diverged model, a BatchNorm variance gone
negative) is not measured: a kNN on such features votes for one class and reads as chance
accuracy. Its row says `finite: false` with the scores null, the server warns naming the
round, and the run stops there (`stop_if_not_finite`): every later round would start from
that model.

With `monitor = "validation"` every evaluation queries the validation split carved from the
training images (common/eval_split.py; its bank is the rest of them) and writes `val_`
scores; the final one adds the test images' `knn_top1` and probe: the only time a run with
that monitor touches the test set."""
from __future__ import annotations

from typing import Any

import torch

from fedssl.common.config import RunConfig
from fedssl.common.datasets import ImageSet, load_eval_split, training_images
from fedssl.common.eval_split import evaluation_source, split_validation
from fedssl.common.evaluation import collapse_std, embed, knn_top1, linear_probe, nonfinite_rows
from fedssl.common.logs import get_logger
from fedssl.common.methods.base import SSLMethod
from fedssl.server.dp import batchnorm_statistics_from

log = get_logger()


def eval_source(cfg: RunConfig) -> tuple[str, str]:
    """The labelled images the server evaluates on: --eval-path, else the training source.
    Refuses (ConfigError) folders whose queries the clients could train on; a query split
    carved from the training folder is left out of training (common.datasets)."""
    return evaluation_source(cfg.dataset, cfg.data_path, cfg.eval_path)


def validation_images(cfg: RunConfig) -> tuple[ImageSet, ImageSet]:
    """(bank, queries) of the validation monitor, from all the run's training images (before
    max-images cuts them, so the split does not depend on it); the clients leave the queries
    out (training_images with validation=True)."""
    images = training_images(cfg.dataset, cfg.data_path, cfg.image_size, 0, cfg.seed,
                             eval_path=cfg.eval_path)
    return split_validation(images, cfg.seed, cfg.data_path or cfg.dataset)


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
        self.validation: tuple[ImageSet, ImageSet] | None = None
        if cfg.monitor == "validation":
            val_bank, val_query = validation_images(cfg)
            self.validation = (val_bank.sample(cfg.eval_bank_size, cfg.seed),
                               val_query.sample(cfg.eval_query_size, cfg.seed + 1))
            log.info("validation monitor: kNN bank %d training images, query %d validation images; "
                     "the test images are scored once, after the last round",
                     len(self.validation[0]), len(self.validation[1]))

    @torch.no_grad()
    def __call__(self, method: SSLMethod, *, probe: bool = False, final: bool = False) -> dict[str, Any]:
        """The scores with `finite: True`; or, when the encoder's features or the projections
        hold NaN/Inf, `finite: False`, the scores None and `nonfinite` (how many vectors of
        each kind), measuring nothing. Under the validation monitor the scores are `val_`
        ones, and `final` adds the test ones (`knn_top1`, and the probe when asked)."""
        method.to(self.device)
        if self.cfg.dp != "none":
            # DP releases no site statistics (docs/privacy.md): the server's own bank stands
            # in for the sites' images, in the model evaluated, checkpointed and exported.
            batchnorm_statistics_from([method.encoder, method.projector], self.bank.images,
                                      device=self.device)
        if self.validation is None:
            metrics = self._scores(method, self.bank, self.query, probe=probe)
        else:
            scores = self._scores(method, *self.validation, probe=False)
            metrics = {"val_knn_top1" if k == "knn_top1" else k: v for k, v in scores.items()}
            if final and metrics["finite"]:
                test = self._scores(method, self.bank, self.query, probe=probe)
                metrics.update({k: v for k, v in test.items()
                                if k in ("finite", "nonfinite", "knn_top1", "probe_top1")})
            elif final:
                metrics.update({"knn_top1": None, **({"probe_top1": None} if probe else {})})
        method.cpu()
        return metrics

    def _scores(self, method: SSLMethod, bank_images: ImageSet, query_images: ImageSet, *,
                probe: bool) -> dict[str, Any]:
        bank = embed(method.encoder, bank_images.images, device=self.device)
        query = embed(method.encoder, query_images.images, device=self.device)
        projector = method.projector.eval()
        projections = projector(query[:2048].to(self.device)).float().cpu()
        nonfinite = {name: count for name, features in
                     (("bank", bank), ("query", query), ("projections", projections))
                     if (count := nonfinite_rows(features))}
        if nonfinite:
            return {"finite": False, "nonfinite": nonfinite, "knn_top1": None, "collapse_std": None,
                    "collapse_healthy": projections.shape[1] ** -0.5,
                    **({"probe_top1": None} if probe else {})}
        metrics = {
            "finite": True,
            "knn_top1": knn_top1(bank, bank_images.labels, query, query_images.labels,
                                 k=self.cfg.knn_k, temperature=self.cfg.knn_temperature,
                                 num_classes=len(bank_images.classes)),
            "collapse_std": collapse_std(projections),
            "collapse_healthy": projections.shape[1] ** -0.5,
        }
        if probe:
            with torch.enable_grad():
                metrics["probe_top1"] = linear_probe(bank, bank_images.labels, query,
                                                     query_images.labels, seed=self.cfg.seed)
        return metrics


class NonFiniteModel(RuntimeError):
    """The global model gives NaN/Inf features: the run stops."""


def stop_if_not_finite(scores: dict[str, Any], server_round: int) -> None:
    """Warn and stop the run when the round's evaluation found non-finite features. Called
    once the round's checkpoint and row are written: the checkpoint holds the model that
    failed, for diagnosis (a negative running_var, a NaN weight); resuming from it would
    start from that model, so a new run with other settings is the way on."""
    if scores.get("finite", True):
        return
    counts = ", ".join(f"{count} {name}" for name, count in scores.get("nonfinite", {}).items())
    message = (f"round {server_round}: the global model gives non-finite features (NaN/Inf in "
               f"{counts} vectors); kNN, probe and collapse are not measured (metrics.jsonl: "
               f"finite=false, scores null) and the run stops here")
    log.warning(message)
    raise NonFiniteModel(message)
