"""The `fedssl` subcommands that work on a run's outputs: `plot` (runs' curves on one PNG),
`evaluate` (an exported encoder on a labelled image folder: kNN, linear probe, fine-tuning
on a fraction of the labels) and `embed` (a folder of images to an embeddings file)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COMMANDS = ("plot", "evaluate", "embed")


def add_commands(commands) -> None:
    sub = commands.add_parser("plot", help="kNN top-1 and train loss per round of runs, as a PNG")
    sub.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                     help="run output directories (holding metrics.jsonl)")
    sub.add_argument("--out", required=True, type=Path, metavar="FILE.png")

    sub = commands.add_parser("evaluate", help="an exported encoder on a labelled image folder")
    sub.add_argument("encoder", type=Path, metavar="ENCODER", help="encoder.safetensors of a run")
    sub.add_argument("--data-path", required=True, metavar="LABELLED_DIR",
                     help="class subfolders; with train/ and test/ those are the split, "
                          "otherwise a seeded 80/20 split")
    sub.add_argument("--labels-fraction", default=None, metavar="FRACTION",
                     help="also fine-tune the whole encoder on this share of the train labels "
                          "(e.g. 0.01 or 0.1; class-balanced, seeded)")
    sub.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs (default: 30)")
    sub.add_argument("--lr", type=float, default=0.05,
                     help="fine-tuning learning rate, cosine-decayed (default: 0.05)")
    sub.add_argument("--batch-size", type=int, default=64, help="fine-tuning batch (default: 64)")
    sub.add_argument("--knn-k", type=int, default=200, help="kNN neighbours (default: 200)")
    sub.add_argument("--knn-temperature", type=float, default=0.1, help="(default: 0.1)")
    _add_compute_flags(sub)

    sub = commands.add_parser("embed", help="write the encoder's features of a folder of images")
    sub.add_argument("encoder", type=Path, metavar="ENCODER", help="encoder.safetensors of a run")
    sub.add_argument("images", metavar="IMAGES", help="a folder of images (recursive)")
    sub.add_argument("--out", required=True, type=Path, metavar="FILE",
                     help="FILE.npz (arrays embeddings, paths) or FILE.safetensors")
    _add_compute_flags(sub)


def _add_compute_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--seed", type=int, default=0, help="split, label fraction, shuffling")
    sub.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1")
    sub.add_argument("--threads", type=int, default=0, help="CPU threads (0: all)")


def _fraction(text: str) -> float:
    """Checked before any image is decoded; argparse's own error would be two lines."""
    from common.datasets import DataError
    from common.downstream import check_fraction

    try:
        fraction = float(text)
    except ValueError:
        raise DataError(f"--labels-fraction {text!r} is not a number; use e.g. 0.01 or 0.1") from None
    return check_fraction(fraction)


def evaluate(args: argparse.Namespace) -> dict:
    from common.datasets import load_eval_split
    from common.device import select_device, set_threads
    from common.downstream import finetune, frozen_scores, labelled_fraction, open_encoder

    fraction = _fraction(args.labels_fraction) if args.labels_fraction is not None else None
    encoder, meta = open_encoder(args.encoder)
    set_threads(args.threads)
    device = select_device(args.device)
    train, test = load_eval_split("imagefolder", args.data_path, int(meta["image-size"]),
                                  seed=args.seed)
    result = {"encoder": str(args.encoder), "data_path": args.data_path, "classes": len(train.classes),
              "train_images": len(train), "test_images": len(test),
              **frozen_scores(encoder, train, test, k=args.knn_k, temperature=args.knn_temperature,
                              seed=args.seed, device=device)}
    if fraction is not None:
        labelled = train.subset(labelled_fraction(train.labels, fraction, args.seed))
        result |= {"labels_fraction": fraction, "labelled_images": len(labelled),
                   "finetune_epochs": args.epochs,
                   "finetune_top1": finetune(encoder, labelled, test, epochs=args.epochs, lr=args.lr,
                                             batch_size=args.batch_size, seed=args.seed,
                                             device=device)}
    return result


def embed_folder(args: argparse.Namespace) -> dict:
    from common.datasets import load_folder_with_paths
    from common.device import select_device, set_threads
    from common.downstream import check_embeddings_path, open_encoder, write_embeddings
    from common.evaluation import embed

    check_embeddings_path(args.out)  # before any image is decoded
    encoder, meta = open_encoder(args.encoder)
    set_threads(args.threads)
    images, paths = load_folder_with_paths(args.images, int(meta["image-size"]))
    features = embed(encoder, images.images, device=select_device(args.device))
    out = write_embeddings(args.out, features, paths,
                           {"encoder": str(args.encoder), "images": str(args.images), **meta})
    return {"out": str(out), "images": len(paths), "dim": int(features.shape[1]),
            "skipped": images.skipped}


def run(args: argparse.Namespace) -> int:
    from common.datasets import DataError
    from simulations.plot import PlotError, plot_runs

    try:
        if args.command == "plot":
            result = {"out": str(plot_runs(args.run_dirs, args.out)), "runs": len(args.run_dirs)}
        elif args.command == "evaluate":
            result = evaluate(args)
        else:
            result = embed_folder(args)
    except (DataError, PlotError) as err:
        print(f"fedssl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedssl: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2))
    return 0
