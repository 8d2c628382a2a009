"""Throughput of TwoViewAugment vs a torchvision v2 pipeline applied image by image.

    python benchmarks/augment_throughput.py [--threads 2] [--batch 256] [--rounds 20]

Both run in the same process, interleaved round by round, so load from other
processes hits both alike; the best round of each is reported (the least
disturbed one). Counted in views/s: TwoViewAugment makes two views per image,
the torchvision pipeline one.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import torch
from torchvision.transforms import v2

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from fedssl.common.augment import MEAN, STD, AugmentConfig, TwoViewAugment  # noqa: E402


def torchvision_view(size: int, blur: bool) -> v2.Compose:
    """View 1 of the same recipe, the usual torchvision way (one image at a time)."""
    steps = [
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if blur:
        kernel = AugmentConfig(image_size=size).blur_kernel_size
        steps.append(v2.GaussianBlur(kernel, sigma=(0.1, 2.0)))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(steps)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(images: torch.Tensor, blur: bool, rounds: int) -> None:
    size = images.shape[-1]
    cfg = AugmentConfig(image_size=size, blur_probs=(1.0, 0.1) if blur else (0.0, 0.0))
    ours = TwoViewAugment(cfg)
    theirs = torchvision_view(size, blur)
    generator = torch.Generator().manual_seed(0)

    def run_ours():
        ours(images, generator)

    def run_theirs():
        torch.stack([theirs(image) for image in images])

    run_ours(), run_theirs()  # warm-up
    ours_s, theirs_s = [], []
    for _ in range(rounds):
        ours_s.append(_seconds(run_ours))
        theirs_s.append(_seconds(run_theirs))

    n = len(images)
    ours_views = 2 * n / min(ours_s)
    theirs_views = n / min(theirs_s)
    print(f"blur {'on ' if blur else 'off'}  (blur_probs={cfg.blur_probs})")
    print(
        f"  TwoViewAugment, batched      : {ours_views:9,.0f} views/s  "
        f"= {ours_views / 2:9,.0f} images/s (2 views each)   "
        f"[median round {2 * n / statistics.median(ours_s):,.0f} views/s]"
    )
    print(
        f"  torchvision v2, image by image: {theirs_views:9,.0f} views/s"
        f"{'':36}[median round {n / statistics.median(theirs_s):,.0f} views/s]"
    )
    print(f"  ratio (views/s)              : {ours_views / theirs_views:9.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g
    )
    print(
        f"batch {args.batch} x uint8 3x{args.size}x{args.size}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
        "(other processes skew multi-threaded timings badly)"
    )
    for blur in (False, True):
        compare(images, blur, args.rounds)


if __name__ == "__main__":
    main()
