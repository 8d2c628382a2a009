"""Which encoder learns fastest per CPU second: client-step throughput, side by side, and the
kNN curve of a short centralized run through the clients' own hot path (train_epochs).

    python benchmarks/encoder_choice.py speed [--encoders resnet10 mobilenet_v3_small]
    python benchmarks/encoder_choice.py learn --encoder resnet10 [--dataset imagefolder
        --data-path CIFAR] [--chunks 4 --chunk-images 10000 --batch 128 --crop-min-scale 0.2]

`speed` interleaves the encoders, each in fp32 and (where the CPU has native bf16) under bf16
autocast, round by round in one process (load from other processes hits all alike), and
reports each one's best round and the ratio to the first. `learn`
prints kNN top-1 (5,000-image bank, 5,000 queries) before training and after each chunk.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from fedssl.common.config import RunConfig  # noqa: E402
from fedssl.common.datasets import load_eval_split, load_images  # noqa: E402
from fedssl.common.device import cpu_has_native_bf16, set_threads  # noqa: E402
from fedssl.common.evaluation import collapse_std, embed, knn_top1  # noqa: E402
from fedssl.common.methods import build_method  # noqa: E402
from fedssl.common.training import StepSettings, augmenter, train_epochs  # noqa: E402

CPU = torch.device("cpu")


def _train(method, cfg: RunConfig, images: torch.Tensor, seed: int = 0, **progress):
    # The predictor at the base rate (scale 1), as this comparison was measured.
    settings = StepSettings(batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay, amp=cfg.amp)
    return train_epochs(method, images, augmenter(cfg), epochs=1, settings=settings,
                        device=CPU, seed=seed, **progress)


def speed(args) -> None:
    images = torch.randint(0, 256, (args.batch * args.steps, 3, 32, 32), dtype=torch.uint8)
    # fp32 beside bf16 autocast, where the CPU runs bf16 natively (common/device.autocast).
    precisions = [False, True] if cpu_has_native_bf16() and not args.no_amp else [False]
    methods = {}
    for name in args.encoders:
        for amp in precisions:
            cfg = RunConfig(encoder=name, method=args.method, batch_size=args.batch, amp=amp)
            label = f"{name} {'bf16' if amp else 'fp32'}"
            methods[label] = (cfg, build_method(cfg))
            # bf16 itself, also for an encoder that opts out of it on CPUs (the reason it does)
            methods[label][1].encoder.cpu_bf16 = amp
            methods[label][1].init_local()
            _train(methods[label][1], cfg, images[: 2 * args.batch])  # warm-up
    best = {label: 0.0 for label in methods}
    for _ in range(args.rounds):
        for label, (cfg, method) in methods.items():
            best[label] = max(best[label], _train(method, cfg, images).images_per_second)
    first = next(iter(best.values()))
    for label, value in best.items():
        print(f"{label:25s} {value:7.0f} images/s ({args.method} client step, batch "
              f"{args.batch}, two views)  x{value / first:.2f}")


def learn(args) -> None:
    cfg = RunConfig(encoder=args.encoder, method=args.method, dataset=args.dataset,
                    data_path=args.data_path, batch_size=args.batch,
                    crop_min_scale=args.crop_min_scale, lr=args.lr, byol_tau=args.tau,
                    amp=not args.no_amp)
    train = load_images(cfg.dataset, cfg.data_path, cfg.image_size)
    bank, query = load_eval_split(cfg.dataset, cfg.data_path, cfg.image_size)
    gen = torch.Generator().manual_seed(0)
    bank = bank.subset(torch.randperm(len(bank), generator=gen)[:5000])
    query = query.subset(torch.randperm(len(query), generator=gen)[:5000])
    method = build_method(cfg)
    method.init_local()

    def score(tag: str) -> None:
        b, q = embed(method.encoder, bank.images), embed(method.encoder, query.images)
        print(f"{tag}: kNN top-1 {knn_top1(b, bank.labels, q, query.labels):.4f}, "
              f"collapse std {collapse_std(q):.4f}", flush=True)

    score("untrained")
    order = torch.randperm(len(train), generator=gen)
    for c in range(args.chunks):
        index = order.roll(-c * args.chunk_images)[: args.chunk_images]
        result = _train(method, cfg, train.images[index], seed=c,
                        progress_start=c / args.chunks, progress_end=(c + 1) / args.chunks)
        score(f"after {(c + 1) * args.chunk_images} images (loss {result.loss:.3f}, "
              f"{result.images_per_second:.0f} images/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("speed", "learn"))
    parser.add_argument("--method", default="byol")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--encoders", nargs="+", default=["resnet10", "mobilenet_v3_small"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--encoder", default="resnet10")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data-path", default="")
    parser.add_argument("--crop-min-scale", type=float, default=RunConfig.crop_min_scale)
    parser.add_argument("--lr", type=float, default=RunConfig.lr)
    parser.add_argument("--tau", type=float, default=RunConfig.byol_tau)
    parser.add_argument("--no-amp", action="store_true", help="fp32 only, even where bf16 is native")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--chunk-images", type=int, default=10000)
    args = parser.parse_args()
    set_threads(args.threads)
    (speed if args.mode == "speed" else learn)(args)


if __name__ == "__main__":
    main()
