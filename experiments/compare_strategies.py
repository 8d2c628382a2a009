"""Issue 4's comparison: BYOL under each aggregation rule with IID and Dirichlet(0.1) clients,
SimSiam and SimCLR with FedAvg, and the centralized baseline at the same image-passes, all
at one CPU-feasible scale on a labelled image folder. Each run is a plain `fedssl simulate`
(or `fedssl centralized`) into OUT/NAME; then OUT/results.md (the table, final-round kNN,
not best-of-rounds) and OUT/curves.png are written from the runs' metrics.jsonl.

    python experiments/compare_strategies.py --data-path ../shared/datasets/cifar10 --out runs/compare

A finished run (OUT/NAME/summary.json exists) is not run again, so an interrupted comparison
continues where it stopped; --only NAME ... runs a subset.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# (name, command, flags): every run shares the scale flags below.
RUNS = [
    *[(f"byol-{rule}-{part}", "simulate", ["--method", "byol", "--strategy", rule, *flags])
      for part, flags in (("iid", ["--partition", "iid"]),
                          ("dir0.1", ["--partition", "dirichlet", "--alpha", "0.1"]))
      for rule in ("fedavg", "fedu", "fedema", "ldawa")],
    *[(f"{method}-fedavg-dir0.1", "simulate",
       ["--method", method, "--strategy", "fedavg", "--partition", "dirichlet", "--alpha", "0.1"])
      for method in ("simsiam", "simclr")],
    ("byol-centralized", "centralized", ["--method", "byol"]),
]


def scale_flags(args) -> list[str]:
    return ["--dataset", "imagefolder", "--data-path", str(Path(args.data_path) / "train"),
            "--eval-path", args.data_path, "--max-images", str(args.max_images),
            "--fraction", str(args.fraction),
            "--rounds", str(args.rounds), "--local-epochs", "1", "--encoder", "resnet10",
            "--eval-every", str(args.eval_every), "--eval-bank-size", str(args.eval_images),
            "--eval-query-size", str(args.eval_images)]


def run(name: str, command: str, flags: list[str], args) -> None:
    out = Path(args.out) / name
    if (out / "summary.json").is_file():
        print(f"{name}: done already", flush=True)
        return
    harness = ["--num-clients", str(args.num_clients)] if command == "simulate" else []
    argv = [command, *scale_flags(args), *harness, *flags, "--out", str(out)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedssl.simulations.cli", *argv], check=True)
    print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)


def load(out: Path, name: str) -> dict:
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / name / "summary.json").read_text())
    return {"rows": [r for r in rows if "knn_top1" in r], "summary": summary}


def write_table(out: Path, results: dict[str, dict]) -> Path:
    lines = ["| run | kNN top-1 round 0 | final kNN top-1 | gain (points) | final linear probe | wall |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, result in results.items():
        first, last = result["rows"][0], result["rows"][-1]
        probe = last.get("probe_top1")
        lines.append(f"| {name} | {first['knn_top1']:.3f} | {last['knn_top1']:.3f} | "
                     f"{100 * (last['knn_top1'] - first['knn_top1']):+.1f} | "
                     f"{'' if probe is None else f'{probe:.3f}'} | {result['summary']['seconds'] / 60:.1f} min |")
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_curves(out: Path, results: dict[str, dict]) -> Path:
    """kNN top-1 against the share of the run's image-passes, so the centralized baseline's
    epochs and the federated rounds line up."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for panel, part in zip(panels, ("iid", "dir0.1")):
        for name, result in results.items():
            if part not in name and "centralized" not in name:
                continue
            rows = result["rows"]
            last = max(r["round"] for r in rows)
            panel.plot([r["round"] / last for r in rows], [r["knn_top1"] for r in rows],
                       marker="o", markersize=3, label=name,
                       linestyle="--" if "centralized" in name else "-")
        panel.set(title=f"{'IID' if part == 'iid' else 'Dirichlet alpha=0.1'} clients",
                  xlabel="share of the run's image-passes", ylabel="kNN top-1")
        panel.grid(alpha=0.3)
        panel.legend(fontsize=8)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True, help="labelled folder holding train/ and test/")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--max-images", type=int, default=10000, help="training images shared out")
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--eval-images", type=int, default=5000, help="kNN bank and query size each")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these only (names below)")
    args = parser.parse_args()
    names = [name for name, _, _ in RUNS]
    unknown = set(args.only or ()) - set(names)
    if unknown:
        parser.error(f"--only {' '.join(sorted(unknown))}: unknown; runs: {' '.join(names)}")
    out = Path(args.out)
    for name, command, flags in RUNS:
        if not args.only or name in args.only:
            run(name, command, flags, args)
    results = {name: load(out, name) for name in names if (out / name / "summary.json").is_file()}
    print(write_table(out, results).read_text())
    print(write_curves(out, results))


if __name__ == "__main__":
    main()
