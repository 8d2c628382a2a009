"""The settings a privacy mode (DP, server/dp.py; SecAgg+, server/secure.py) rules out."""
from __future__ import annotations

from fedssl.common.config import ConfigError, RunConfig


def refuse_per_update_settings(cfg: RunConfig, mode: str, *, norm_reason: str, dtype_reason: str) -> None:
    """A privacy mode (docs/privacy.md) rules out the two settings that judge or reshape each
    update on its own: norm screening against the others, and a narrower transfer dtype."""
    if cfg.max_update_norm_ratio != 0:
        raise ConfigError(f"max-update-norm-ratio={cfg.max_update_norm_ratio!r} is invalid with "
                          f"{mode}: must be 0 (off); {norm_reason}")
    if cfg.transfer_dtype != "float32":
        raise ConfigError(f"transfer-dtype={cfg.transfer_dtype!r} is invalid with {mode}: allowed: "
                          f"float32 ({dtype_reason})")
