"""A run config from Python keyword arguments, a mapping (a preset) or `flwr run`-style
`--run-config` text, checked in one place (common.config.RunConfig)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from fedssl.common.config import ConfigError, RunConfig


def run_config(config: RunConfig | Mapping[str, Any] | None = None, /, **keys: Any) -> RunConfig:
    """`config` (a RunConfig, or hyphenated keys as in a preset or pyproject.toml), then
    `keys` with underscores or hyphens (`num_rounds=3`); later values win."""
    values = dict(config.to_mapping() if isinstance(config, RunConfig) else config or {})
    values.update({key.replace("_", "-"): value for key, value in keys.items()})
    return RunConfig.from_mapping(values)


def parse_run_config(texts: str | Iterable[str]) -> dict[str, Any]:
    """`key=value key2=value2` (one string or several) or a single FILE.toml, parsed as `flwr
    run --run-config` parses it (Flower's own parser: values are TOML, strings quoted). The
    keys are checked where the values are used (`run_config`)."""
    import click
    from flwr.common.config import parse_config_args

    texts = [texts] if isinstance(texts, str) else list(texts)
    try:
        return parse_config_args(texts)
    except click.ClickException:  # Flower's message for it runs to several sentences
        raise ConfigError(f"--run-config {' '.join(texts)!r} is invalid: values are TOML: numbers, "
                          "true/false or quoted strings, e.g. num-rounds=3 amp=false "
                          "method=\"simsiam\"") from None
    except (ValueError, OSError) as err:  # a .toml file beside pairs, or one not readable
        raise ConfigError(f"--run-config {' '.join(texts)!r} is invalid: {err}") from None
