"""The `fedssl` subcommands that work on a run's outputs: `plot` (runs' curves on one PNG),
`evaluate` (an exported encoder on a labelled image folder: kNN, linear probe, fine-tuning
on a fraction of the labels) and `embed` (a folder of images to an embeddings file)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COMMANDS = ("plot", "evaluate", "embed")
ENCODER_HELP = "a run's exported encoder: OUT/encoder (or its model.safetensors), or OUT itself"


def add_commands(commands) -> None:
    sub = commands.add_parser("plot", help="kNN top-1 and train loss per round of runs, or a sweep's "
                              "cells with bands, as a PNG")
    sub.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                     help="run output directories (holding metrics.jsonl), or one sweep folder")
    sub.add_argument("--out", required=True, type=Path, metavar="FILE.png")

    sub = commands.add_parser("evaluate", help="an exported encoder on a labelled image folder")
    sub.add_argument("encoder", type=Path, metavar="ENCODER", help=ENCODER_HELP)
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
    sub.add_argument("encoder", type=Path, metavar="ENCODER", help=ENCODER_HELP)
    sub.add_argument("images", metavar="IMAGES", help="a folder of images (recursive)")
    sub.add_argument("--out", required=True, type=Path, metavar="FILE",
                     help="FILE.npz (arrays embeddings, paths), FILE.safetensors, FILE.npy (paths "
                          "in FILE.json), FILE.csv (path, f0..) or FILE.parquet (path, embedding; "
                          "needs pyarrow)")
    _add_compute_flags(sub)


def _add_compute_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--seed", type=int, default=0, help="split, label fraction, shuffling")
    sub.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1")
    sub.add_argument("--threads", type=int, default=0, help="CPU threads (0: all)")


def _fraction(text: str) -> float:
    """Checked before any image is decoded; argparse's own error would be two lines."""
    from fedssl.common.datasets import DataError
    from fedssl.common.downstream import check_fraction

    try:
        fraction = float(text)
    except ValueError:
        raise DataError(f"--labels-fraction {text!r} is not a number; use e.g. 0.01 or 0.1") from None
    return check_fraction(fraction)


def evaluate(args: argparse.Namespace) -> dict:
    from fedssl.common.downstream import evaluate_encoder

    fraction = _fraction(args.labels_fraction) if args.labels_fraction is not None else None
    return evaluate_encoder(args.encoder, args.data_path, labels_fraction=fraction,
                            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            knn_k=args.knn_k, knn_temperature=args.knn_temperature, seed=args.seed,
                            device=args.device, threads=args.threads)


def embed_folder(args: argparse.Namespace) -> dict:
    from fedssl.common.downstream import embed_folder

    return embed_folder(args.encoder, args.images, args.out, device=args.device, threads=args.threads)


def run(args: argparse.Namespace) -> int:
    from fedssl.common.datasets import DataError
    from fedssl.simulations.plot import PlotError, plot

    try:
        if args.command == "plot":
            result = plot(args.run_dirs, args.out)
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
