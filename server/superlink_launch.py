"""Run Flower's `flower-superlink` entry point with a longer SQLite busy timeout.

    python -m server.superlink_launch [--db-busy-timeout SECONDS] <flower-superlink flags>

Flower 1.42 opens its state database with `PRAGMA busy_timeout=5000`: on a busy server a
request that waits more than 5 s for the write lock fails with "database is locked", and a
ServerApp that gets that error ends its run. Waiting longer (default 60 s) rides it out.
Everything else is the unmodified flower-superlink.
"""
from __future__ import annotations

import sys


def patch_busy_timeout(seconds: float) -> None:
    from flwr.supercore import sql_mixin

    millis = str(int(seconds * 1000))
    sql_mixin.SQLITE_PRAGMAS = tuple((k, millis if k == "busy_timeout" else v)
                                     for k, v in sql_mixin.SQLITE_PRAGMAS)


def main(argv: list[str]) -> None:
    seconds = 60.0
    if argv[:1] == ["--db-busy-timeout"]:
        seconds, argv = float(argv[1]), argv[2:]
    patch_busy_timeout(seconds)
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *argv]
    sys.exit(flower_superlink())


if __name__ == "__main__":
    main(sys.argv[1:])
