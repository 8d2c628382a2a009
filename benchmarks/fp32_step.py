"""What makes the encoder's step faster on a CPU without native bf16 (issue 17), measured side
by side in one process, variants interleaved rep by rep so load from other processes hits all
alike; each variant's best rep is reported with its ratio to the first.

    python benchmarks/fp32_step.py eval  [--encoder resnet10 --image-size 32 --images 4096]
    python benchmarks/fp32_step.py train [--encoder resnet10 --image-size 32 --batch 64]
    python benchmarks/fp32_step.py all --out runs/fp32-step   # both, JSON beside

- eval: the evaluation pass (common/evaluation.embed's work: eval-mode forward, no grad) at
  batch 128/256/512, as built and with BatchNorm folded into the convolutions
  (torch.fx's conv-bn fusion).
- train: one BYOL step (two views, forward, backward, SGD, EMA target) on ready views, input
  in channels_last (what fedssl feeds) against contiguous NCHW, and under torch.compile
  (its compile seconds reported beside, against a round of the default job).
Run with ONEDNN_MAX_CPU_ISA=AVX2 and --amp false on a bf16 host as the stand-in for an
AVX2-only CPU; this script itself always runs fp32.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import platform
import sys
import time

import torch
from torch.fx.experimental.optimization import fuse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from fedssl.common.config import RunConfig  # noqa: E402
from fedssl.common.device import set_threads  # noqa: E402
from fedssl.common.encoders import build_encoder  # noqa: E402
from fedssl.common.methods import build_method  # noqa: E402


def _best(variants: dict, reps: int) -> dict[str, float]:
    """images/s of each variant's best rep, reps interleaved across variants."""
    best = {name: 0.0 for name in variants}
    for _ in range(reps):
        for name, run in variants.items():
            images, seconds = run()
            best[name] = max(best[name], images / seconds)
    return best


def _report(title: str, best: dict[str, float], extra: dict | None = None) -> dict:
    first = next(iter(best.values()))
    print(f"\n{title}\n| variant | images/s | ratio |\n| --- | --- | --- |")
    for name, rate in best.items():
        print(f"| {name} | {rate:.0f} | x{rate / first:.2f} |")
    return {"images_per_second": best, "ratio_to_first": {k: v / first for k, v in best.items()},
            **(extra or {})}


def eval_pass(args) -> dict:
    encoder, _ = build_encoder(args.encoder, args.image_size)
    encoder.eval()
    folded = fuse(copy.deepcopy(encoder))
    images = torch.randn(args.images, 3, args.image_size, args.image_size).contiguous(
        memory_format=torch.channels_last)

    def timed(model, batch):
        def run():
            start = time.perf_counter()
            with torch.inference_mode():
                for s in range(0, len(images), batch):
                    model(images[s:s + batch])
            return len(images), time.perf_counter() - start
        return run

    variants = {f"{kind}, batch {b}": timed(model, b)
                for kind, model in (("as built", encoder), ("BatchNorm folded", folded))
                for b in (512, 256, 128)}
    with torch.inference_mode():
        gap = (encoder(images[:64]) - folded(images[:64])).abs().max().item()
    return _report(f"eval pass, {args.encoder} at {args.image_size} px", _best(variants, args.reps),
                   {"max_abs_feature_difference_folded": gap})


def train_step(args) -> dict:
    cfg = RunConfig(method="byol", encoder=args.encoder, image_size=args.image_size, amp=False)
    s = args.image_size
    views = [torch.randn(args.batch, 3, s, s) for _ in range(2)]
    channels_last = [v.contiguous(memory_format=torch.channels_last) for v in views]

    def stepper(method, inputs):
        opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)

        def run():
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = method(*inputs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                method.after_step(0.5)
            return args.steps * args.batch, time.perf_counter() - start
        return run

    torch.manual_seed(0)
    method = build_method(cfg)
    variants = {"channels_last input (fedssl)": stepper(method, channels_last),
                "contiguous NCHW input": stepper(copy.deepcopy(method), views)}
    compile_seconds = None
    if args.compile:
        compiled = copy.deepcopy(method)
        compiled.forward = torch.compile(compiled.forward)
        first = stepper(compiled, channels_last)
        start = time.perf_counter()
        first()  # compiles forward and backward
        compile_seconds = time.perf_counter() - start
        variants["torch.compile, channels_last"] = first
    return _report(f"BYOL train step, {args.encoder} at {s} px, batch {args.batch}",
                   _best(variants, args.reps), {"compile_seconds": compile_seconds})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("eval", "train", "all"))
    parser.add_argument("--encoder", default="resnet10")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    set_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}, "
          f"load {os.getloadavg()[0]:.1f}")
    results = {}
    if args.what in ("eval", "all"):
        results["eval"] = eval_pass(args)
    if args.what in ("train", "all"):
        results["train"] = train_step(args)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fp32_step.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
