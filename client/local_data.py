"""Which images a client trains on: its partition in simulation, its own folder at a site."""
from __future__ import annotations

import functools
from typing import Mapping

from fedssl.common.config import RunConfig
from fedssl.common.datasets import DataError, ImageSet, load_images, training_images
from fedssl.common.partition import partition_indices


@functools.lru_cache(maxsize=2)
def _site_folder(path: str, image_size: int) -> ImageSet:
    # Read a batch at a time from the image cache: a site's process holds one batch of its
    # folder, not all of it (a simulated partition, a subset of the cache, is read so too).
    return load_images("imagefolder", path, image_size).read_on_demand()


@functools.lru_cache(maxsize=2)
def _partitions(dataset: str, path: str, eval_path: str, image_size: int, max_images: int,
                scheme: str, num: int, alpha: float, shards: int,
                seed: int, validation: bool) -> tuple[ImageSet, tuple]:
    # Cached per process: a simulation actor serving many clients decodes and splits once.
    # eval_path decides which images are held out for the server's evaluation.
    images = training_images(dataset, path, image_size, max_images, seed, eval_path=eval_path,
                             validation=validation)
    labels = None if images.labels is None else images.labels.numpy()
    parts = partition_indices(len(images), labels, num, scheme, alpha=alpha,
                              shards_per_client=shards, seed=seed)
    return images, tuple(parts)


def local_images(cfg: RunConfig, node_config: Mapping) -> ImageSet:
    """A deployed site names its folder with node config `data-path` (all of it: the server
    cannot see it, so keeping its eval-path apart from every site's images is the operators'
    part); a simulated node has a `partition-id` of the run's training images, which leave out
    the server's held-out images (common.datasets.training_images)."""
    if "data-path" in node_config:
        return _site_folder(str(node_config["data-path"]), cfg.image_size)
    if "partition-id" in node_config:
        images, parts = _partitions(cfg.dataset, cfg.data_path, cfg.eval_path, cfg.image_size,
                                    cfg.max_images, cfg.partition, int(node_config["num-partitions"]),
                                    cfg.alpha, cfg.shards_per_client, cfg.seed,
                                    cfg.monitor == "validation")
        return images.subset(parts[int(node_config["partition-id"])])
    raise DataError("this node has no data: start the SuperNode with "
                    "--node-config 'data-path=\"/path/to/images\"'")
