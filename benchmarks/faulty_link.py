"""Round latency when one site sits behind a slow or a lossy link, side by side with a
healthy one, on loopback.

    .venv/bin/python benchmarks/faulty_link.py [--rounds 3] [--repeats 1] [--profiles direct,healthy,slow,lossy]

For each link profile a fresh deployment (`fedssl server` with TLS and site
authentication, two `fedssl client` sites with 8 tiny images each): site0 connects
directly, site1 through simulations/tcp_proxy.py with the profile's faults (`direct`: site1
without the proxy). One `flwr run` of `--rounds` rounds with min-train-clients=2, so every
round waits for site1. Prints each round's seconds (metrics.jsonl: send, replies,
aggregate, evaluate, checkpoint), the sites that replied, and what the proxy did; then the
mean round time of each profile against `healthy` (the proxy without faults). Profiles run
one after another (repeats interleave them), so machine load shifts all of them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedssl.simulations.loopback import LoopbackDeployment, scratch_dir, site_images, tiny_run_config  # noqa: E402
from fedssl.simulations.tcp_proxy import FaultyLink, Link  # noqa: E402

PROFILES = {
    "direct": None,
    "healthy": Link(),
    "slow": Link(latency=0.1, bandwidth=2e6),  # 100 ms one way, 16 Mbit/s each way
    # as tests/test_deployment_faults.py: 50 ms, 32 Mbit/s, a fifth of new connections
    # cut, every connection reset after 8 s on average
    "lossy": Link(latency=0.05, bandwidth=4e6, refuse=0.2, reset_every=8.0, seed=1),
}


def one_run(root: Path, link: Link | None, rounds: int) -> tuple[list[dict], str, float]:
    """Per-round rows of one run with site1 behind `link`; the proxy's counters; wall time."""
    with LoopbackDeployment(root, ["site0", "site1"]) as dep:
        dep.start_server()
        for site in ("site0", "site1"):
            dep.register(site)
        images = site_images(root, ["site0", "site1"])
        dep.start_site("site0", images["site0"], threads=1)
        with FaultyLink(dep.port, link) if link is not None else nullcontext() as proxy:
            dep.start_site("site1", images["site1"], threads=1,
                           superlink=None if proxy is None else f"127.0.0.1:{proxy.port}")
            dep.wait_online(2, timeout=300)
            config, out = tiny_run_config(root, rounds, 2, **{"round-timeout": 300})
            start = time.monotonic()
            proc = dep.run(config, timeout=3600)
            wall = time.monotonic() - start
            counters = "" if proxy is None else (
                f"{proxy.counters.connections} connections, {proxy.counters.refused} refused, "
                f"{proxy.counters.resets} reset, {proxy.counters.bytes_up / 2**20:.0f} MiB up, "
                f"{proxy.counters.bytes_down / 2**20:.0f} MiB down")
        if proc.returncode != 0:
            raise RuntimeError(f"the run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[1:], counters, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated: " + ", ".join(PROFILES))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    names = args.profiles.split(",")
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        ap.error(f"--profiles {','.join(unknown)}: unknown; choose from {', '.join(PROFILES)}")

    seconds: dict[str, list[float]] = {n: [] for n in names}
    lost: dict[str, int] = {n: 0 for n in names}
    print(f"{args.rounds} rounds a run, 2 sites (site1 behind the link), TLS + site authentication, "
          f"{os.cpu_count()} CPUs")
    with scratch_dir("fedssl-link-", args.keep) as root:
        for repeat in range(args.repeats):
            for name in names:
                load = os.getloadavg()[0]
                rows, counters, wall = one_run(root / f"{name}-{repeat}", PROFILES[name], args.rounds)
                seconds[name] += [r["seconds"] for r in rows]
                lost[name] += sum(r["clients_ok"] < 2 for r in rows)
                print(f"{name:8s} load {load:4.1f}: rounds " + ", ".join(f"{r['seconds']:.1f} s" for r in rows)
                      + f" | sites ok {[r['clients_ok'] for r in rows]} | flwr run {wall:.0f} s"
                      + (f" | proxy: {counters}" if counters else ""), flush=True)
    base = seconds.get("healthy") or seconds[names[0]]
    base_mean = sum(base) / len(base)
    print(f"\n{'profile':8s} {'mean round':>10s} {'vs ' + ('healthy' if 'healthy' in seconds else names[0]):>11s} "
          f"{'rounds without site1':>21s}")
    for name in names:
        mean = sum(seconds[name]) / len(seconds[name])
        print(f"{name:8s} {mean:9.1f}s {mean / base_mean:10.2f}x {lost[name]:>10d} of {len(seconds[name])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
