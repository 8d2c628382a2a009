"""FedTrimmedAvg (Yin et al., 2018): per coordinate, the mean of the accepted replies after
cutting the int(trim-beta * n) largest and as many smallest values, Flower's FedTrimmedAvg;
sites count equally. It withstands f hostile replies while it cuts at least f from each end,
so min-train-clients must be large enough for trim-beta to cut num-malicious. BatchNorm
statistics take the trimmed mean too, and every array returns in its sent dtype (robust.py).
No server state."""
from __future__ import annotations

from flwr.serverapp.strategy import FedTrimmedAvg

from fedssl.common.config import ConfigError, RunConfig
from fedssl.server.rule import AggregationRule, sampling
from fedssl.server.strategies.robust import InSentDtypes, require_replies


class FedTrimmedAvgInSentDtypes(InSentDtypes, FedTrimmedAvg):
    pass


def fewest_replies(beta: float, num_malicious: int) -> int:
    """The fewest replies n from which Flower's trimmed mean cuts num-malicious from each end:
    int(beta * n) >= f, Flower's own arithmetic."""
    n = 1
    while int(beta * n) < num_malicious:
        n += 1
    return n


def check(cfg: RunConfig) -> None:
    if cfg.num_malicious and cfg.trim_beta == 0:
        raise ConfigError(f"trim-beta=0.0 is invalid with num-malicious={cfg.num_malicious}: must be > 0, "
                          "or nothing is cut")
    require_replies(cfg, fewest_replies(cfg.trim_beta, cfg.num_malicious),
                    f"trim-beta={cfg.trim_beta:g} must cut num-malicious replies from each end")


RULE = AggregationRule(build=lambda cfg: FedTrimmedAvgInSentDtypes(**sampling(cfg), beta=cfg.trim_beta),
                       check=check)
