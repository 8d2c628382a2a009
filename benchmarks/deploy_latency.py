"""Round latency of the deployment engine with a trivial workload, on loopback.

    .venv/bin/python benchmarks/deploy_latency.py [--rounds 2] [--sites 2] [--insecure]

Starts `fedssl server` (TLS + site authentication unless --insecure), one `fedssl client`
per site (8 tiny 32x32 images each, batch 4, 1 local epoch), runs `flwr run . loopback`
with tiny heads and a 16-image kNN monitor, and prints per round: the ServerApp's round
time (metrics.jsonl "seconds": send -> replies -> aggregate -> evaluate -> checkpoint),
the message round trip seen by the SuperLink (round dispatched -> last reply pushed), and
the sites' own training seconds. The difference is the per-message overhead: polling,
a fresh `flwr-clientapp` process per message (imports torch, builds the model, loads the
site's cached images) and the transfers. Also prints the load average: on a shared
machine other processes stretch every number.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedssl.simulations.loopback import LoopbackDeployment, scratch_dir, site_images, tiny_run_config  # noqa: E402

STAMP = re.compile(r"^\w+ flwr (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \| [\w.]+:\d+ \| (.*)$")


def timeline(log: str) -> list[tuple[float, str]]:
    events = []
    for line in log.splitlines():
        m = STAMP.match(line)
        if m and ("Push replies" in m[2] or "Started task" in m[2] or "Finished task" in m[2]):
            t = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.append((t, m[2]))
    return events


def reply_waves(events: list[tuple[float, str]], sites: int) -> list[float]:
    """Times at which the last of `sites` replies of each round arrived."""
    pushes = [t for t, text in events if "Push replies" in text]
    return [pushes[i + sites - 1] for i in range(0, len(pushes) - sites + 1, sites)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--insecure", action="store_true", help="plaintext, no site authentication")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    sites = [f"site{i}" for i in range(args.sites)]
    with scratch_dir("fedssl-latency-", args.keep) as root, \
            LoopbackDeployment(root, sites, insecure=args.insecure) as dep:
        dep.start_server()
        for site, images in site_images(root, sites).items():
            if not args.insecure:
                dep.register(site)
            dep.start_site(site, images, threads=1)
        dep.wait_online(len(sites))
        run_config, out = tiny_run_config(root, args.rounds, args.sites)
        start = time.monotonic()
        proc = dep.run(run_config)
        wall = time.monotonic() - start
        if proc.returncode != 0:
            print((proc.stdout + proc.stderr)[-3000:], file=sys.stderr)
            return 1
        for _ in range(20):  # the SuperLink logs the task's end a moment after the run ends
            events = timeline((dep.workdir / "logs" / "superlink.log").read_text())
            if any("Finished task" in text for _, text in events):
                break
            time.sleep(0.5)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    started = next(t for t, text in events if "Started task" in text)
    finished = next((t for t, text in events if "Finished task" in text), float("nan"))
    waves = reply_waves(events, args.sites)
    print(f"{'tls+auth' if not args.insecure else 'insecure'}, {args.sites} sites, "
          f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"flwr run wall time: {wall:.1f} s (ServerApp task {finished - started:.1f} s)")
    for row in rows[1:]:
        print(f"round {row['round']}: ServerApp round {row['seconds']:.1f} s, "
              f"clients ok {row['clients_ok']}, client images/s {row['client_images_per_second']:.1f}")
    if waves:
        gaps = [b - a for a, b in zip([started] + waves[:-1], waves)]
        print("dispatch -> last reply per round (SuperLink log, round 1 includes ServerApp "
              "start-up and round-0 evaluation): " + ", ".join(f"{g:.1f} s" for g in gaps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
