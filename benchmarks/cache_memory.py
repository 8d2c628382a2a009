"""Peak memory of a client process against the size of its decoded-image cache (issue 17).

    python benchmarks/cache_memory.py make --root DIR [--images 40000 --small 10000]
    python benchmarks/cache_memory.py measure --root DIR [--out runs/cache-memory]

`make` writes DIR/part0 (the first `--small` images) and DIR/part1 (the rest): 224x224 JPEGs,
each a random low-resolution colour field upsampled (so JPEG compresses it as it would a
photograph) with a random shape on it. `measure` decodes DIR/part0 and all of DIR into their
own image caches under `--cache-dir` (default DIR/../cache), so two caches of different sizes,
and then runs each measurement below in a fresh process per cache:

- decode: the first load (decoding every JPEG into the cache);
- read: a site's data path (client/local_data.py with node config `data-path`) reading every
  row of the cache once, batch by batch in a random order, as an epoch of training indexes it;
- train: the same, then `train_epochs` (resnet10 BYOL at 224 px, batch `--batch`) over
  `--train-images` rows drawn at random from the whole cache: the model and its activations;
- mapped (for comparison): the same epoch's batches indexed from the memory-mapped tensor
  (`load_images(...).images`) instead of read, which leaves every page touched resident in the
  process (as shared page cache, RssFile);
- in memory (for comparison, the smaller cache only): the whole array read into the process,
  as the earlier one-file `.npz` cache was.

Each reports the process's peak RSS (VmHWM), and the largest RssAnon (private memory) and
RssFile (mapped file pages) seen after a batch, from /proc/self/status (Linux). Writes
OUT/cache_memory.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

MB = 1e6


def status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


# ------------------------------------------------------------------------------- make

def _write_images(args: tuple[Path, int, int]) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    folder, start, stop = args
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        field = Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)).resize((224, 224), Image.BICUBIC)
        draw = ImageDraw.Draw(field)
        x, y, side = (int(v) for v in rng.integers(0, 150, 3) + np.array([0, 0, 24]))
        draw.ellipse((x, y, x + side, y + side), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        field.save(folder / f"{i:06d}.jpg", quality=90)


def make(args) -> None:
    from concurrent.futures import ProcessPoolExecutor

    root = Path(args.root)
    step = 1000
    jobs = [(root / ("part0" if s < args.small else "part1"), s, min(s + step, args.small if s < args.small else args.images))
            for s in list(range(0, args.small, step)) + list(range(args.small, args.images, step))]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        list(pool.map(_write_images, jobs))
    size = sum(p.stat().st_size for p in root.rglob("*.jpg"))
    print(f"{args.images} JPEGs, {size / MB:.0f} MB, in {time.perf_counter() - start:.0f} s under {root}")


# ------------------------------------------------------------------------------ child

def child(args) -> dict:
    """One measurement in this (fresh) process; prints its JSON line."""
    import numpy as np
    import torch

    from fedssl.client.local_data import local_images
    from fedssl.common.config import RunConfig
    from fedssl.common.datasets import load_images
    from fedssl.common.device import set_threads

    set_threads(args.threads)
    cfg = RunConfig.from_mapping({"image-size": args.image_size, "batch-size": args.batch, "method": "byol",
                                  "encoder": "resnet10", "amp": False})
    peaks = {"RssAnon": 0, "RssFile": 0}

    def note() -> None:
        now = status()
        for key in peaks:
            peaks[key] = max(peaks[key], now[key])

    before = status()
    start = time.perf_counter()
    result: dict = {"mode": args.mode, "folder": args.folder}
    if args.mode == "decode":
        images = load_images("imagefolder", args.folder, args.image_size)
        result["images"] = len(images)
    elif args.mode in ("read", "mapped", "in memory"):
        if args.mode == "read":
            images = local_images(cfg, {"data-path": args.folder}).images  # the site's own path
        elif args.mode == "mapped":
            images = load_images("imagefolder", args.folder, args.image_size).images
        else:
            images = torch.from_numpy(np.array(load_images("imagefolder", args.folder, args.image_size).images))
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        total = 0
        for b in range(0, len(images), args.batch):
            batch = images[order[b:b + args.batch]]
            total += int(batch[:, :, ::56, ::56].sum())  # use it, as a step would
            note()
        result["images"] = len(images)
    elif args.mode == "train":
        from fedssl.common.methods import build_method
        from fedssl.common.training import StepSettings, augmenter, train_epochs

        data = local_images(cfg, {"data-path": args.folder})
        picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: args.train_images]
        images = data.images.take(picked.sort().values)
        method = build_method(cfg)
        method.init_local()
        note()
        trained = train_epochs(method, images, augmenter(cfg), settings=StepSettings.from_config(cfg),
                               epochs=1, device=torch.device("cpu"))
        note()
        result |= {"images": len(data), "trained images": trained.images,
                   "images/s": round(trained.images_per_second, 2)}
    note()
    after = status()
    result |= {"seconds": round(time.perf_counter() - start, 1),
               "RSS before MB": round(before["VmRSS"] / MB), "peak RSS MB": round(after["VmHWM"] / MB),
               "peak RssAnon MB": round(peaks["RssAnon"] / MB), "peak RssFile MB": round(peaks["RssFile"] / MB)}
    print(json.dumps(result), flush=True)
    return result


# ---------------------------------------------------------------------------- measure

def run_child(mode: str, folder: Path, args) -> dict:
    env = dict(os.environ, FEDSSL_CACHE_DIR=str(args.cache_dir))
    command = [sys.executable, __file__, "child", "--mode", mode, "--folder", str(folder),
               "--batch", str(args.batch), "--threads", str(args.threads), "--image-size", str(args.image_size),
               "--train-images", str(args.train_images)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} on {folder} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    root = Path(args.root)
    args.cache_dir = Path(args.cache_dir or root.parent / "cache")
    rows = []
    for label, folder in (("smaller", root / "part0"), ("larger", root)):
        for mode in ("decode", "read", "train", "mapped", *(("in memory",) if label == "smaller" else ())):
            row = run_child(mode, folder, args)
            row["cache MB"] = round(row["images"] * 3 * args.image_size ** 2 / MB)  # the .npy, less its header
            row["cache"] = label
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = {"cpu": _cpu(), "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
               "load_average_1m": round(os.getloadavg()[0], 2)}
    report = {"machine": machine, "settings": {"batch": args.batch, "threads": args.threads,
                                               "image size": args.image_size, "train images": args.train_images},
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_memory.json").write_text(json.dumps(report, indent=1))
    keys = ["cache", "cache MB", "mode", "images", "seconds", "peak RSS MB", "peak RssAnon MB", "peak RssFile MB"]
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return report


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    top = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    top.add_argument("command", choices=["make", "measure", "child"])
    top.add_argument("--root", default="runs/cache-memory-images")
    top.add_argument("--images", type=int, default=40_000)
    top.add_argument("--small", type=int, default=10_000, help="images in DIR/part0, the smaller cache")
    top.add_argument("--cache-dir", default="")
    top.add_argument("--out", default="runs/cache-memory")
    top.add_argument("--batch", type=int, default=64)
    top.add_argument("--threads", type=int, default=0)
    top.add_argument("--image-size", type=int, default=224)
    top.add_argument("--train-images", type=int, default=256, help="train: rows trained on, from the whole cache")
    top.add_argument("--mode", default="read")
    top.add_argument("--folder", default="")
    args = top.parse_args()
    {"make": make, "measure": measure, "child": child}[args.command](args)


if __name__ == "__main__":
    main()
