"""`fedssl client`: the exact flower-supernode command for an edge site.

TLS is on by default (the CA certificate verifies the server) and the site authenticates
with its private key (`fedssl certs`); plaintext only with `insecure=True`. The ClientApp
reads the node config: `data-path` (the site's image folder), `threads`, `device` and,
when given, `state-dir` (where the site keeps its state between rounds: client/state_store.py).
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

# common.folders.IMAGE_EXTENSIONS, repeated so that this wrapper starts without importing
# torch (tests/test_deployment.py keeps the two equal)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ClientSetupError(ValueError):
    """One-line, user-facing."""


@dataclass(frozen=True)
class SuperNodeSettings:
    superlink: str  # HOST:PORT of the SuperLink
    data_path: Path
    ca: Path | None = None
    key: Path | None = None
    threads: int = 0  # 0: all CPUs of the process
    device: str = "auto"  # auto: cuda > mps > cpu
    port: int = 9094  # the SuperNode's local runtime API; one per SuperNode on a host
    insecure: bool = False
    max_wait_time: float | None = None  # give up connecting after this many seconds
    state_dir: Path | None = None  # None: state between rounds in the SuperNode's memory


def executable(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a TOML basic string for any path


def node_config(settings: SuperNodeSettings) -> str:
    config = (f"data-path={_toml_string(str(settings.data_path))} threads={int(settings.threads)} "
              f"device={_toml_string(settings.device)}")
    if settings.state_dir is not None:
        config += f" state-dir={_toml_string(str(settings.state_dir))}"
    return config


def check(settings: SuperNodeSettings, *, check_data: bool = True) -> None:
    if ":" not in settings.superlink:
        raise ClientSetupError(f"--superlink {settings.superlink!r}: expected HOST:PORT")
    if not settings.insecure:
        for flag, path in (("--ca", settings.ca), ("--key", settings.key)):
            if path is None:
                raise ClientSetupError(f"TLS with site authentication needs {flag}; "
                                       "plaintext only with --insecure")
            if not Path(path).is_file():
                raise ClientSetupError(f"{flag} {path}: no such file")
    if check_data:
        folder = Path(settings.data_path)
        if not folder.is_dir():
            raise ClientSetupError(f"--data-path {folder}: no such folder")
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file()):
            raise ClientSetupError(f"--data-path {folder}: no image files "
                                   f"({', '.join(IMAGE_EXTENSIONS)})")


def supernode_command(settings: SuperNodeSettings, *, check_data: bool = True) -> list[str]:
    check(settings, check_data=check_data)
    cmd = [executable("flower-supernode"), "--superlink", settings.superlink,
           "--port", str(settings.port), "--node-config", node_config(settings)]
    if settings.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(settings.ca),
                "--auth-supernode-private-key", str(settings.key)]
    if settings.max_wait_time is not None:
        cmd += ["--max-wait-time", str(settings.max_wait_time)]
    return cmd
