"""What the SecAgg+ client and server agree on (client/secure.py, server/secure.py): which
shared arrays are summed, and the round config key that names them."""
from __future__ import annotations

from typing import Mapping

import numpy as np

# The round config key under which the server names the shared arrays (comma-separated), in
# the order of the legacy protocol's unnamed array list.
SHARED_KEYS = "shared-keys"


def summed_keys(keys: list[str], arrays: Mapping) -> list[str]:
    """The entries that are securely summed, in `keys` order: the float ones. Integer step
    counters (BatchNorm's num_batches_tracked) are not: quantized to +-clip-range they would
    be lost, and the server keeps the global ones."""
    return [k for k in keys if np.asarray(arrays[k]).dtype.kind == "f"]
