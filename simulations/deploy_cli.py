"""The deployment subcommands of `fedssl`: `certs`, `server`, `client`, `connect`.
`server` and `client` print the exact Flower command, then replace this process with it
(`--dry-run` only prints), so a service manager supervises Flower's own process."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

COMMANDS = ("certs", "server", "client", "connect")


def add_commands(commands) -> None:
    sub = commands.add_parser("certs", help="CA, server TLS certificate and site key pairs")
    sub.add_argument("--out", default="certs", help="directory to write (default: ./certs)")
    sub.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                     help="a name or IP the server is reached at (repeat; the certificate's SANs)")
    sub.add_argument("--site", action="append", default=[], metavar="NAME",
                     help="an edge site that gets an authentication key pair (repeat)")
    sub.add_argument("--keys-only", action="store_true",
                     help="only add site key pairs (a new site; the CA is kept)")
    sub.add_argument("--days", type=int, default=825, help="certificate validity (default: 825)")
    sub.add_argument("--force", action="store_true", help="overwrite existing files")

    sub = commands.add_parser("server", help="start the SuperLink (TLS + site authentication)")
    sub.add_argument("--certs", type=Path, default=None, help="directory from `fedssl certs`")
    sub.add_argument("--workdir", type=Path, default=Path("."),
                     help="database, logs and default run outputs live here (default: .)")
    sub.add_argument("--host", default="0.0.0.0", help="interface to listen on (default: 0.0.0.0)")
    sub.add_argument("--port", type=int, default=8000, help="the one port (default: 8000)")
    sub.add_argument("--database", type=Path, default=None,
                     help="SQLite state (default: WORKDIR/state/superlink.db)")
    sub.add_argument("--log-file", type=Path, default=None,
                     help="default: WORKDIR/logs/superlink.log (rotated daily)")
    sub.add_argument("--insecure", action="store_true",
                     help="plaintext and no site authentication (testing only)")
    sub.add_argument("--db-busy-timeout", type=float, default=60.0, metavar="SECONDS",
                     help="how long a request waits for the database lock (Flower's own: 5); "
                          "0 runs the plain flower-superlink (default: 60)")
    sub.add_argument("--install-deps", action="store_true",
                     help="let Flower install each app's dependencies per run (uv sync)")
    sub.add_argument("--dry-run", action="store_true", help="print the command, do not start it")

    sub = commands.add_parser("client", help="start this site's SuperNode")
    sub.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the server")
    sub.add_argument("--data-path", required=True, type=Path, help="this site's image folder")
    sub.add_argument("--ca", type=Path, default=None, help="ca.crt from `fedssl certs`")
    sub.add_argument("--key", type=Path, default=None, help="this site's private key (NAME.key)")
    sub.add_argument("--threads", type=int, default=0, help="CPU threads for training (0: all)")
    sub.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1")
    sub.add_argument("--state-dir", type=Path, default=None,
                     help="keep the state a client carries between rounds (BYOL's target) in files "
                          "here, so a restarted SuperNode keeps it (default: in memory)")
    sub.add_argument("--port", type=int, default=9094,
                     help="local runtime API port; one per SuperNode on a host (default: 9094)")
    sub.add_argument("--max-wait-time", type=float, default=None,
                     help="give up after this many seconds without the server (default: never)")
    sub.add_argument("--insecure", action="store_true",
                     help="plaintext, no site authentication (testing only)")
    sub.add_argument("--dry-run", action="store_true", help="print the command, do not start it")

    sub = commands.add_parser("connect", help="name a SuperLink in $FLWR_HOME/config.toml")
    sub.add_argument("name", help="connection name for `flwr run . NAME`")
    sub.add_argument("--address", required=True, metavar="HOST:PORT")
    sub.add_argument("--ca", type=Path, default=None, help="ca.crt from `fedssl certs`")
    sub.add_argument("--insecure", action="store_true", help="plaintext (testing only)")
    sub.add_argument("--default", action="store_true", help="make it the default connection")


def _exec(cmd: list[str], dry_run: bool, cwd: Path | None = None) -> int:
    print(("cd " + shlex.quote(str(cwd)) + " && " if cwd else "") + shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    if cwd is not None:
        os.chdir(cwd)
    # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH.
    bin_dir = str(Path(cmd[0]).parent)
    os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    os.execv(cmd[0], cmd)
    return 1  # not reached


def run(args: argparse.Namespace) -> int:
    from fedssl.client.supernode import ClientSetupError, SuperNodeSettings, supernode_command
    from fedssl.server.certs import CertError, make_certs, next_steps
    from fedssl.server.connection import ConnectionSetupError, add_connection
    from fedssl.server.superlink import ServerSetupError, SuperLinkSettings, prepare, superlink_command

    try:
        if args.command == "certs":
            files = make_certs(args.out, args.host, args.site, force=args.force,
                               keys_only=args.keys_only, days=args.days)
            for path in files:
                print(f"wrote {path} ({oct(path.stat().st_mode & 0o777)})")
            print(next_steps(Path(args.out), args.host, args.site, args.keys_only))
        elif args.command == "server":
            workdir = args.workdir.expanduser().resolve()
            settings = SuperLinkSettings(
                workdir=workdir, certs=args.certs.expanduser().resolve() if args.certs else None,
                host=args.host, port=args.port,
                database=args.database.expanduser().resolve() if args.database else None,
                log_file=args.log_file.expanduser().resolve() if args.log_file else None,
                insecure=args.insecure, install_deps=args.install_deps,
                db_busy_timeout=args.db_busy_timeout)
            cmd = superlink_command(settings)
            if not args.dry_run:
                prepare(settings)
                print(f"logs: {settings.log_path}; runs without out-dir: {workdir}/runs",
                      flush=True)
            return _exec(cmd, args.dry_run, cwd=workdir)
        elif args.command == "client":
            resolve = (lambda p: p.expanduser().resolve() if p else None)
            settings = SuperNodeSettings(
                superlink=args.superlink, data_path=resolve(args.data_path), ca=resolve(args.ca),
                key=resolve(args.key), threads=args.threads, device=args.device, port=args.port,
                insecure=args.insecure, max_wait_time=args.max_wait_time, state_dir=resolve(args.state_dir))
            return _exec(supernode_command(settings), args.dry_run)
        elif args.command == "connect":
            path = add_connection(args.name, args.address, args.ca, insecure=args.insecure,
                                  make_default=args.default)
            print(f"wrote [superlink.{args.name}] to {path}; now: flwr run . {args.name} --stream")
    except (CertError, ServerSetupError, ClientSetupError, ConnectionSetupError) as err:
        print(f"fedssl: error: {err}", file=sys.stderr)
        return 2
    return 0
