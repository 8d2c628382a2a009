"""A long deployed run with a trivial workload: do the server's and sites' processes hold
their memory, file descriptors and state database flat over rounds?

    .venv/bin/python benchmarks/soak.py [--rounds 200] [--sites 2] [--minutes 25] [--csv FILE]

Starts `fedssl server` (TLS + site authentication), one `fedssl client` per site (8 tiny
images each) and one `flwr run` of `--rounds` rounds with the deployment tests' workload
(batch 4, tiny heads, a 16-image kNN monitor). Each time a round's row reaches
metrics.jsonl it samples the resident memory (VmRSS) and open file descriptors of the
SuperLink, the SuperExec, the ServerApp and each SuperNode, and the size of the
SuperLink's state database (with its -wal and -shm files). It stops after `--rounds`, or
after `--minutes` (then it says how many rounds it saw), and prints about 10 samples and
least-squares slopes in MB per 100 rounds, fitted over the rounds after the first 5
(start-up: imports, caches, the first connections). `--csv` gets each sample as it is
taken; SIGTERM or Ctrl-C ends the run early and still reports.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedssl.simulations.loopback import (BIN, PROJECT, LoopbackDeployment, _detached_children,  # noqa: E402
                                  scratch_dir, site_images, tiny_run_config)

WARM_UP = 5  # rounds left out of the slopes


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def server_side(link: int) -> dict[str, int]:
    """The SuperExec the SuperLink detached, and the ServerApp it started (in the SuperExec's
    session: other runs on the machine are not counted)."""
    found = {}
    for pid in _detached_children(link):
        if b"flower-superexec" in cmdline(pid):
            found["superexec"] = pid
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and b"flwr-serverapp" in cmdline(int(entry.name)):
                    try:
                        if os.getsid(int(entry.name)) == pid:
                            found["serverapp"] = int(entry.name)
                    except OSError:
                        continue
    return found


def slope_per_100(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")


def sample(server_round: int, started: float, db: Path, procs: dict[str, int]) -> dict:
    row = {"round": server_round, "t": round(time.monotonic() - started, 1),
           "db_mb": sum(p.stat().st_size for p in db.parent.glob(db.name + "*")) / 2**20}
    for name, pid in procs.items():
        try:
            row[f"{name}_rss_mb"], row[f"{name}_fds"] = rss_mb(pid), fds(pid)
        except OSError:
            pass  # it ended between the listing and the read
    return row


def _stop_on_signals() -> list:
    """A list that becomes non-empty on SIGTERM or SIGINT: the loop ends and still reports."""
    stop: list = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    return stop


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=25.0, help="stop sampling after this long")
    ap.add_argument("--csv", type=Path, default=None, help="write every sample here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    sites = [f"site{i}" for i in range(args.sites)]
    samples: list[dict] = []
    started = time.monotonic()
    with scratch_dir("fedssl-soak-", args.keep) as root, LoopbackDeployment(root, sites) as dep:
        dep.start_server()
        for site, images in site_images(root, sites).items():
            dep.register(site)
            dep.start_site(site, images, threads=1)
        dep.wait_online(len(sites))
        run_config, out = tiny_run_config(root, args.rounds, args.sites)
        with (root / "flwr-run.log").open("wb") as log:
            run = subprocess.Popen([str(BIN / "flwr"), "run", str(PROJECT), dep.CONNECTION, "--stream",
                                    "--run-config", run_config], env=dep.env, cwd=PROJECT,
                                   stdout=log, stderr=subprocess.STDOUT)
        link = dep.procs.procs["superlink"].pid
        nodes = {site: dep.procs.procs[site].pid for site in sites}
        db = dep.workdir / "state" / "superlink.db"
        seen = 0
        deadline = started + 60 * args.minutes
        stop = _stop_on_signals()
        csv_file = args.csv.open("w", newline="") if args.csv else None
        if csv_file:
            writer = csv.DictWriter(csv_file, ["round", "t", "db_mb"] + [
                f"{n}_{m}" for n in ("superlink", "superexec", "serverapp", *sites) for m in ("rss_mb", "fds")])
            writer.writeheader()
        try:
            while True:  # rows first, so the last round is sampled too
                metrics = out / "metrics.jsonl"
                rows = metrics.read_text().splitlines() if metrics.is_file() else []
                if len(rows) > seen:
                    seen = len(rows)
                    samples.append(sample(json.loads(rows[-1])["round"], started, db,
                                          {"superlink": link, **server_side(link), **nodes}))
                    if csv_file:
                        writer.writerow(samples[-1])
                        csv_file.flush()
                if run.poll() is not None or time.monotonic() > deadline or stop:
                    break
                time.sleep(1.0)
        finally:
            if csv_file:
                csv_file.close()
        finished = run.poll() is not None
        if not finished:
            run.terminate()

    last = samples[-1]["round"] if samples else 0
    print(f"{last} of {args.rounds} rounds in {(time.monotonic() - started) / 60:.1f} min"
          f"{'' if finished else ' (stopped early: --minutes or a signal)'}; {args.sites} sites, TLS + auth; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    names = [k[:-len("_rss_mb")] for k in samples[-1] if k.endswith("_rss_mb")] if samples else []
    print("round  t(s)  db MB  " + "  ".join(f"{n} MB/fds" for n in names))
    step = max(1, len(samples) // 10)
    for s in samples:
        if s["round"] % step == 0 or s is samples[-1]:
            print(f"{s['round']:5d} {s['t']:6.0f} {s['db_mb']:6.2f}  " + "  ".join(
                f"{s.get(n + '_rss_mb', float('nan')):7.1f}/{s.get(n + '_fds', -1):<3d}" for n in names))
    fit = [s for s in samples if s["round"] > WARM_UP]
    if len(fit) >= 2:
        xs = [s["round"] for s in fit]
        print(f"slopes over rounds {xs[0]}-{xs[-1]} (MB per 100 rounds):")
        for key in ["db_mb"] + [n + "_rss_mb" for n in names]:
            pairs = [(s["round"], s[key]) for s in fit if key in s]
            print(f"  {key:24s} {slope_per_100([p[0] for p in pairs], [p[1] for p in pairs]):+8.2f}")
        for n in names:
            counts = [s[n + "_fds"] for s in fit if n + "_fds" in s]
            if counts:
                print(f"  {n + ' fds':24s} {min(counts)}..{max(counts)} (first {counts[0]}, last {counts[-1]})")
    else:
        print(f"fewer than {WARM_UP + 2} rounds: no slopes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
