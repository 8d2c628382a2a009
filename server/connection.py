"""`fedssl connect`: a named SuperLink connection in $FLWR_HOME/config.toml (default
~/.flwr), which `flwr run . NAME`, `flwr supernode register ... NAME`, `flwr ls NAME` use:

    [superlink.NAME]
    address = "server.example.org:8000"
    root-certificates = "/abs/path/ca.crt"      # or: insecure = true
"""
from __future__ import annotations

from pathlib import Path


class ConnectionSetupError(ValueError):
    """One-line, user-facing."""


def add_connection(name: str, address: str, ca: str | Path | None, insecure: bool = False,
                   make_default: bool = False) -> Path:
    """Write (or replace) [superlink.NAME]; return the config file's path."""
    from flwr.cli.flower_config import (read_flower_config, set_default_superlink_connection,
                                        write_superlink_connection)
    from flwr.cli.typing import SuperLinkConnection

    if ":" not in address:
        raise ConnectionSetupError(f"--address {address!r}: expected HOST:PORT (default port 8000)")
    if insecure:
        connection = SuperLinkConnection(name=name, address=address, insecure=True)
    else:
        if ca is None or not Path(ca).is_file():
            raise ConnectionSetupError(f"--ca {ca}: no such file (the CA certificate from "
                                   "`fedssl certs`); plaintext only with --insecure")
        connection = SuperLinkConnection(name=name, address=address,
                                         root_certificates=str(Path(ca).expanduser().resolve()))
    write_superlink_connection(connection)
    if make_default:
        set_default_superlink_connection(name)
    return read_flower_config()[1]
