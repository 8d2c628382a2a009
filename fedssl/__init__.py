"""fedssl from Python: the runs and tools of the `fedssl` command as functions.

    import fedssl

    summary = fedssl.simulate(num_clients=4, num_rounds=3, method="byol")   # Ray engine
    summary = fedssl.centralized(num_rounds=3)                               # pooled baseline
    scores = fedssl.evaluate(summary["encoder"], data_path="/data/labelled")
    fedssl.embed(summary["encoder"], "/data/images", "features.npy")
    encoder = fedssl.load_encoder(summary["encoder"])                        # nn.Module, eval mode

Run-config keys are keyword arguments with underscores (`num_rounds` for `num-rounds`); a bad
key or value raises ConfigError, bad data DataError, each with a one-line message.

The functions load on first use (PEP 562), so `import fedssl` and the `fedssl` command's
start stay free of torch until a run or an encoder needs it."""
from __future__ import annotations

import importlib
import os
from typing import Any

# The project's layout keeps common/, client/, server/ and simulations/ beside this folder (a
# checkout, an editable install, a Flower App bundle unpacked by a SuperNode); a wheel puts
# them inside it. Either way they import as fedssl.common, ... : installing fedssl claims no
# top-level name but `fedssl` (those four are common words other distributions use too).
_HERE = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_HERE, "common")):
    __path__.append(os.path.dirname(_HERE))

from fedssl.common.config import ConfigError  # noqa: E402 - needs the path above
from fedssl.run_config import parse_run_config, run_config  # noqa: E402

_LAZY = {"simulate": "fedssl.api", "centralized": "fedssl.api", "evaluate": "fedssl.api",
         "embed": "fedssl.api", "load_encoder": "fedssl.api", "DataError": "fedssl.common.datasets"}

__all__ = ["ConfigError", "parse_run_config", "run_config", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fedssl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
