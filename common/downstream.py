"""An exported encoder used downstream: the kNN monitor and a linear probe on frozen
features, fine-tuning the whole encoder on a fraction of the labels (`evaluate_encoder`),
and embeddings of a folder of images written to a file (`embed_folder`). The `fedssl
evaluate` / `embed` commands and the Python API (fedssl/) both call these."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from fedssl.common.augment import AugmentConfig, TwoViewAugment
from fedssl.common.checkpoint import EXPORT_WEIGHTS, atomic_write, encoder_weights_path, load_encoder, read_metadata
from fedssl.common.datasets import DataError, ImageSet, load_eval_split
from fedssl.common.folders import load_folder_with_paths
from fedssl.common.device import autocast, select_device, set_threads
from fedssl.common.evaluation import embed, knn_top1, linear_probe
from fedssl.common.schedules import cosine
from fedssl.common.training import steps_per_epoch

EMBEDDING_FORMATS = (".npz", ".safetensors", ".npy", ".csv", ".parquet")
PARQUET_HINT = "pip install pyarrow"


def open_encoder(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The exported encoder, in eval mode, and its metadata (image size, method, config).
    `path`: an export folder (OUT/encoder), its model.safetensors, a run's output folder or
    an encoder.safetensors file. Missing or not an exported encoder: a one-line DataError."""
    given = Path(path).expanduser()
    file = encoder_weights_path(given)
    if file.is_dir():
        raise DataError(f"encoder folder {str(given)!r} holds no {EXPORT_WEIGHTS} "
                        f"(nor encoder/{EXPORT_WEIGHTS})")
    if not file.is_file():
        raise DataError(f"encoder file {str(given)!r} does not exist")
    try:
        return load_encoder(file), read_metadata(file)
    except Exception as err:  # safetensors, JSON or a state-dict mismatch: all mean "not ours"
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise DataError(f"{str(given)!r} is not an encoder exported by fedssl "
                        f"(OUT/encoder/{EXPORT_WEIGHTS}): {reason}") from None


def evaluate_encoder(encoder: str | Path, data_path: str, *, labels_fraction: float | None = None,
                     epochs: int = 30, lr: float = 0.05, batch_size: int = 64, knn_k: int = 200,
                     knn_temperature: float = 0.1, seed: int = 0, device: str = "auto",
                     threads: int = 0) -> dict[str, Any]:
    """An exported encoder on a labelled folder (class subfolders; its train/ and test/ are
    the split, otherwise a seeded 80/20 split): kNN and linear-probe top-1 on frozen
    features and, with `labels_fraction`, top-1 after fine-tuning the whole encoder on that
    class-balanced, seeded share of the train labels for `epochs`."""
    if labels_fraction is not None:
        check_fraction(labels_fraction)
    model, meta = open_encoder(encoder)
    set_threads(threads)
    where = select_device(device)
    train, test = load_eval_split("imagefolder", data_path, int(meta["image-size"]), seed=seed)
    result = {"encoder": str(encoder), "data_path": str(data_path), "classes": len(train.classes),
              "train_images": len(train), "test_images": len(test),
              **frozen_scores(model, train, test, k=knn_k, temperature=knn_temperature, seed=seed,
                              device=where)}
    if labels_fraction is not None:
        labelled = train.subset(labelled_fraction(train.labels, labels_fraction, seed))
        result |= {"labels_fraction": labels_fraction, "labelled_images": len(labelled),
                   "finetune_epochs": epochs,
                   "finetune_top1": finetune(model, labelled, test, epochs=epochs, lr=lr,
                                             batch_size=batch_size, seed=seed, device=where)}
    return result


def embed_folder(encoder: str | Path, images: str | Path, out: str | Path, *, device: str = "auto",
                 threads: int = 0) -> dict[str, Any]:
    """The encoder's features of every image below `images` (recursive), written to `out`
    (`write_embeddings` names the formats); returns where, how many and their dimension."""
    check_embeddings_path(out)  # before any image is decoded
    model, meta = open_encoder(encoder)
    set_threads(threads)
    decoded, paths = load_folder_with_paths(str(images), int(meta["image-size"]))
    features = embed(model, decoded.images, device=select_device(device))
    written = write_embeddings(out, features, paths,
                               {"encoder": str(encoder), "images": str(images), **meta})
    return {"out": str(written), "images": len(paths), "dim": int(features.shape[1]),
            "skipped": decoded.skipped}


def frozen_scores(encoder: nn.Module, train: ImageSet, test: ImageSet, *, k: int = 200,
                  temperature: float = 0.1, seed: int = 0,
                  device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """kNN top-1 (train as the bank) and linear-probe top-1 on the encoder's frozen features."""
    bank = embed(encoder, train.images, device=device)
    query = embed(encoder, test.images, device=device)
    return {
        "knn_top1": knn_top1(bank, train.labels, query, test.labels, k=k, temperature=temperature,
                             num_classes=len(train.classes)),
        "probe_top1": linear_probe(bank, train.labels, query, test.labels, seed=seed),
    }


def check_fraction(fraction: float) -> float:
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"--labels-fraction {fraction!r} is not allowed: it must be in (0, 1], "
                        "e.g. 0.01 or 0.1")
    return fraction


def labelled_fraction(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded `fraction` of the images, the same share of every class
    (at least one image each), as in the 1% / 10% semi-supervised protocol."""
    check_fraction(fraction)
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        count = max(1, round(fraction * len(members)))
        picked.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(picked).sort().values


def finetune(encoder: nn.Module, train: ImageSet, test: ImageSet, *, epochs: int = 30,
             lr: float = 0.05, batch_size: int = 64, seed: int = 0,
             device: torch.device = torch.device("cpu"), amp: bool = True) -> float:
    """Train the whole encoder and a linear head with cross-entropy on `train` (random
    resized crops and flips), in place; return the test top-1 after the last epoch:
    nothing is selected on the test set."""
    if epochs < 1 or batch_size < 2:
        raise DataError(f"fine-tuning needs --epochs >= 1 and --batch-size >= 2 (batch norm), "
                        f"got {epochs} and {batch_size}")
    if len(train) < 2:
        raise DataError(f"fine-tuning needs at least 2 labelled images, got {len(train)}: "
                        "raise --labels-fraction or add images")
    image_size = int(train.images.shape[-1])
    feature_dim = embed(encoder, train.images[:2]).shape[1]
    # Zeros, as the probe: the first steps fit the head, then the encoder gets gradients.
    head = nn.Linear(feature_dim, len(train.classes))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model = nn.Sequential(encoder, head).to(device).train()
    # Crop and flip only: the colour distortions of SSL views would hide what labels name.
    augment = TwoViewAugment(AugmentConfig(image_size=image_size, crop_scale=(0.5, 1.0),
                                           jitter_prob=0.0, grayscale_prob=0.0,
                                           blur_probs=(0.0, 0.0), solarize_probs=(0.0, 0.0)))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    batch = min(batch_size, len(train))
    per_epoch = steps_per_epoch(len(train), batch)
    total = epochs * per_epoch
    order_generator = torch.Generator().manual_seed(seed)
    view_generator = torch.Generator().manual_seed(seed + 1)
    labels = train.labels.to(device)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=order_generator)
        for b in range(per_epoch):
            index = order[b * batch:(b + 1) * batch]
            view = augment.one_view(train.images[index].to(device), view_generator)
            for group in optimizer.param_groups:
                group["lr"] = cosine(step / total, lr, 0.0)
            with autocast(device, amp, encoder):
                logits = model(view)
            loss = F.cross_entropy(logits.float(), labels[index.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    predictions = embed(model, test.images, device=device).argmax(dim=1)
    model.cpu()
    return float((predictions == test.labels).float().mean())


def check_embeddings_path(out: str | Path) -> Path:
    out = Path(out).expanduser()
    if out.suffix not in EMBEDDING_FORMATS:
        raise DataError(f"--out {str(out)!r}: the file must end in {', '.join(EMBEDDING_FORMATS[:-1])} "
                        f"or {EMBEDDING_FORMATS[-1]}")
    if out.suffix == ".parquet":
        try:
            import pyarrow.parquet  # noqa: F401 - an optional dependency, asked for by this suffix
        except ImportError:
            raise DataError(f"--out {str(out)!r}: writing .parquet needs pyarrow, which is not "
                            f"installed: {PARQUET_HINT}") from None
    return out


def paths_file(out: str | Path) -> Path:
    """The JSON file beside FILE.npy that names its rows' images."""
    return Path(out).with_suffix(".json")


def write_embeddings(out: str | Path, features: torch.Tensor, paths: list[str],
                     metadata: dict[str, Any]) -> Path:
    """`features` [N, D] float32 with the image paths they belong to, row i for paths[i]:
    .npz (arrays `embeddings`, `paths`); .safetensors (tensor `embeddings`, the paths as JSON
    in its header); .npy (the array) with FILE.json beside it (`paths` and `metadata`);
    .csv (a header `path,f0,...,f{D-1}`, then a row per image); .parquet (columns `path` and
    `embedding`, a fixed-size list of D float32; `metadata` as JSON in the schema's `fedssl`)."""
    out = check_embeddings_path(out)
    array = features.float().contiguous().numpy()
    WRITERS[out.suffix](out, array, paths, metadata)
    return out


def _write_npz(out: Path, array: np.ndarray, paths: list[str], metadata: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, embeddings=array, paths=np.array(paths, dtype=np.str_))
    atomic_write(out, write)


def _write_safetensors(out: Path, array: np.ndarray, paths: list[str], metadata: dict[str, Any]) -> None:
    header = {"paths": json.dumps(paths), "fedssl": json.dumps(metadata, sort_keys=True)}
    atomic_write(out, lambda tmp: save_file({"embeddings": torch.from_numpy(array)}, tmp, metadata=header))


def _write_npy(out: Path, array: np.ndarray, paths: list[str], metadata: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)
    atomic_write(out, write)
    # JSON, not a line per path: a file name may hold any character but "/" and NUL.
    sidecar = {"paths": paths, "embeddings": out.name, "fedssl": metadata}
    atomic_write(paths_file(out), lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=1)))


def _write_csv(out: Path, array: np.ndarray, paths: list[str], metadata: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(["path", *(f"f{i}" for i in range(array.shape[1]))])
            for path, row in zip(paths, array):
                # 9 significant digits: every float32 reads back exactly
                rows.writerow([path, *(format(x, ".9g") for x in row.tolist())])
    atomic_write(out, write)


def _write_parquet(out: Path, array: np.ndarray, paths: list[str], metadata: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    embedding = pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1), pa.float32()), array.shape[1])
    table = pa.table({"path": pa.array(paths, pa.string()), "embedding": embedding})
    table = table.replace_schema_metadata({"fedssl": json.dumps(metadata, sort_keys=True)})
    atomic_write(out, lambda tmp: pq.write_table(table, tmp))


WRITERS = {".npz": _write_npz, ".safetensors": _write_safetensors, ".npy": _write_npy,
           ".csv": _write_csv, ".parquet": _write_parquet}
