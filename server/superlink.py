"""`fedssl server`: the flower-superlink command for an aggregation server (by default through
server/superlink_launch.py, Flower's entry point with a longer SQLite busy timeout).

TLS and SuperNode authentication are on by default (only `insecure=True` turns both off);
state is kept in an SQLite database and logs in a file, both under the work directory.
The SuperLink starts each ServerApp as a child process in its working directory, so a run
without an absolute `out-dir` writes to WORKDIR/runs/run-<time>.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


class ServerSetupError(ValueError):
    """One-line, user-facing."""


@dataclass(frozen=True)
class SuperLinkSettings:
    workdir: Path
    certs: Path | None = None  # ca.crt, server.crt, server.key (fedssl certs)
    host: str = "0.0.0.0"
    port: int = 8000
    database: Path | None = None  # default WORKDIR/state/superlink.db
    log_file: Path | None = None  # default WORKDIR/logs/superlink.log
    insecure: bool = False
    install_deps: bool = False  # let Flower `uv sync` each app's dependencies per run
    db_busy_timeout: float = 60.0  # SQLite lock wait (Flower's own: 5 s); 0: plain flower-superlink

    @property
    def database_path(self) -> Path:
        return self.database or self.workdir / "state" / "superlink.db"

    @property
    def log_path(self) -> Path:
        return self.log_file or self.workdir / "logs" / "superlink.log"


def executable(name: str) -> str:
    """Prefer the tool next to this Python (the venv), then PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def check(settings: SuperLinkSettings) -> None:
    if settings.insecure:
        return
    if settings.certs is None:
        raise ServerSetupError("TLS needs --certs DIR (ca.crt, server.crt, server.key from "
                               "`fedssl certs`); plaintext only with --insecure")
    missing = [str(settings.certs / n) for n in ("ca.crt", "server.crt", "server.key")
               if not (settings.certs / n).is_file()]
    if missing:
        raise ServerSetupError("missing " + ", ".join(missing) + " (make them with `fedssl certs`)")


def superlink_command(settings: SuperLinkSettings) -> list[str]:
    check(settings)
    if settings.db_busy_timeout > 0:  # see server/superlink_launch.py
        cmd = [sys.executable, "-m", "fedssl.server.superlink_launch",
               "--db-busy-timeout", f"{settings.db_busy_timeout:g}"]
    else:
        cmd = [executable("flower-superlink")]
    cmd += ["--host", settings.host, "--port", str(settings.port),
            "--database", str(settings.database_path), "--log-file", str(settings.log_path)]
    if settings.insecure:
        cmd.append("--insecure")
    else:
        certs = settings.certs
        cmd += ["--ssl-ca-certfile", str(certs / "ca.crt"),
                "--ssl-certfile", str(certs / "server.crt"),
                "--ssl-keyfile", str(certs / "server.key"),
                "--enable-supernode-auth"]
    if not settings.install_deps:
        cmd.append("--disable-runtime-dependency-installation")
    return cmd


def prepare(settings: SuperLinkSettings) -> None:
    """Create the directories the SuperLink writes to."""
    for path in (settings.workdir, settings.database_path.parent, settings.log_path.parent,
                 settings.workdir / "runs"):
        path.mkdir(parents=True, exist_ok=True)
