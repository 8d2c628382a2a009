"""Run Flower's `flower-superlink` entry point with a longer SQLite busy timeout.

    python -m server.superlink_launch [--db-busy-timeout SECONDS] <flower-superlink flags>

Flower 1.42 opens its state database with `PRAGMA busy_timeout=5000`: on a busy server a
request that waits more than 5 s for the write lock fails with "database is locked", and a
ServerApp that gets that error ends its run. Waiting longer (default 60 s) rides it out.

It also makes a repeated object push succeed (`idempotent_object_push`): on a lossy link a
site's whole reply was lost otherwise. Everything else is the unmodified flower-superlink.
"""
from __future__ import annotations

import sys


def patch_busy_timeout(seconds: float) -> None:
    from flwr.supercore import sql_mixin

    millis = str(int(seconds * 1000))
    sql_mixin.SQLITE_PRAGMAS = tuple((k, millis if k == "busy_timeout" else v)
                                     for k, v in sql_mixin.SQLITE_PRAGMAS)


def idempotent_object_push() -> None:
    """Flower 1.42 stores a pushed object only while its push session still lists it as
    pending, and answers stored=False otherwise. When a connection is reset after the
    SuperLink stored an object but before its answer arrived, the SuperNode retries, reads
    False, and drops the whole reply ("Failed to push object ... The push session may have
    expired or been replaced"): the round then waits its round-timeout for that site.
    Object ids are hashes of their content, so an object already in the store is the one
    being pushed again: answer that it is stored. (tests/test_deployment_faults.py, lossy link)"""
    from flwr.supercore.corestate.in_memory_corestate import InMemoryCoreState
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    for cls in (SqlCoreState, InMemoryCoreState):
        first_push = cls.store_object
        if getattr(first_push, "idempotent", False):
            continue

        def store_object(self, run_id, session_id, object_id, object_content, _first=first_push):
            if _first(self, run_id, session_id, object_id, object_content):
                return True
            return bool(self.object_store.get(object_id))  # b"": known, not yet pushed

        store_object.idempotent = True
        cls.store_object = store_object


def main(argv: list[str]) -> None:
    seconds = 60.0
    if argv[:1] == ["--db-busy-timeout"]:
        seconds, argv = float(argv[1]), argv[2:]
    patch_busy_timeout(seconds)
    idempotent_object_push()
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *argv]
    sys.exit(flower_superlink())


if __name__ == "__main__":
    main(sys.argv[1:])
