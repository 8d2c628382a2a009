"""Server side of SecAgg+ (secure-aggregation = true): a thin adapter that runs the fedssl
round on Flower's legacy SecAgg+ workflow (`DefaultWorkflow` + `SecAggPlusWorkflow`), the
only place Flower 1.42 has it, while the rest of the server (evaluation, checkpoints,
metrics rows, resume, summary: server/app.py) stays as in a plain run. It offers the same
`start(...)` as a Flower strategy, so server/app.py does not know which it runs.

Each sampled site uploads its update masked (client/secure.py); the server learns only the
unmasked example-weighted mean of the updates of the sites that finished the round, and adds
it to the global model. So the server side of a rule can only be FedAvg's mean: FedAvg, and
FedU and FedEMA, whose per-site rules run on the sites. Rules that look at each update
(L-DAWA's per-site cosine weights, norm-based rejection) cannot run; the server optimizers
(FedAvgM, FedAdam) need only the mean but are not wired to this adapter."""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedssl.common.config import ConfigError, RunConfig
from fedssl.common.secure_update import SHARED_KEYS, summed_keys
from fedssl.server.nodes import wait_for_nodes
from fedssl.server.round_record import RoundOffset, RoundRecord
from fedssl.server.privacy_settings import refuse_per_update_settings

log = logging.getLogger("fedssl")
WEIGHT_KEY = "num-examples"


def check(cfg: RunConfig, fedavg_means: list[str]) -> None:
    """Refuse settings SecAgg+ cannot run with, in one line each. `fedavg_means`: the rules
    whose aggregate is FedAvg's mean (server/rule.py), which the unmasked sum can stand in for."""
    if not cfg.secure_aggregation:
        return
    if cfg.strategy not in fedavg_means:
        raise ConfigError(f"strategy={cfg.strategy!r} is invalid with secure-aggregation=true: allowed: "
                          f"{', '.join(fedavg_means)} (the server sees only the sum of the updates)")
    refuse_per_update_settings(
        cfg, "secure-aggregation=true", norm_reason="the server never sees an individual update's norm",
        dtype_reason="SecAgg+ sends its masked update as quantized integers")
    if cfg.dp != "none":
        raise ConfigError(f"dp={cfg.dp!r} is invalid with secure-aggregation=true: allowed: none "
                          "(DP and SecAgg+ are not combined in this version)")
    if cfg.secagg_shares and cfg.secagg_threshold >= cfg.secagg_shares:
        raise ConfigError(f"secagg-threshold={cfg.secagg_threshold} is invalid with secagg-shares="
                          f"{cfg.secagg_shares}: must be < secagg-shares")
    if cfg.secagg_threshold > cfg.min_train_clients:
        raise ConfigError(f"secagg-threshold={cfg.secagg_threshold} is invalid with min-train-clients="
                          f"{cfg.min_train_clients}: must be <= min-train-clients, or a round with "
                          "that few sites could never be unmasked")


def weighted_mean(values: list[tuple[float, dict]]) -> dict[str, float]:
    """Example-weighted mean of each numeric metric, as Flower's FedAvg reports them."""
    total = sum(w for w, _ in values)
    keys = set.intersection(*(set(m) for _, m in values))
    return {k: sum(w * float(m[k]) for w, m in values) / total for k in sorted(keys)
            if all(isinstance(m[k], (int, float)) for _, m in values)}


class SecureRounds(Strategy):
    """A legacy Flower strategy that only ever receives the unmasked mean update."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.offset = RoundOffset()
        self.records: dict[int, RoundRecord] = {}
        self.keys: list[str] = []
        self.summed: list[str] = []
        self.global_arrays: dict[str, np.ndarray] = {}
        self.grid: Grid | None = None
        self.train_config = ConfigRecord()
        self.evaluate_fn: Callable | None = None

    # --- the fedssl strategy interface (server/protocol.py) -------------------------------
    def resume_after(self, completed_round: int) -> None:
        self.offset = RoundOffset(completed_round)

    def round_record(self, server_round: int) -> RoundRecord | None:
        return self.records.get(server_round)

    def server_state(self) -> dict:
        return {}

    def load_server_state(self, state: dict) -> None:
        if state:
            raise KeyError(f"checkpoint holds server state {sorted(state)} SecAgg+ runs do not keep")

    def privacy_report(self) -> dict:
        cfg = self.cfg
        return {"dp": "none", "secure_aggregation": True, "protocol": "SecAgg+ (Flower legacy workflow)",
                "shares": cfg.secagg_shares or "every sampled site", "threshold": cfg.secagg_threshold,
                "clip_range": cfg.secagg_clip_range, "quant_bits": cfg.secagg_quant_bits,
                "max_weight": cfg.secagg_max_weight,
                "server_sees": "the mean update of the sites that finished a round, and their metrics"}

    def workflow(self, timeout: float | None) -> DefaultWorkflow:
        cfg = self.cfg
        # Flower reads a float number of shares as a fraction of the sampled sites.
        shares = cfg.secagg_shares or 1.0
        return DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
            num_shares=shares, reconstruction_threshold=cfg.secagg_threshold,
            max_weight=cfg.secagg_max_weight, clipping_range=cfg.secagg_clip_range,
            quantization_range=2 ** cfg.secagg_quant_bits, timeout=timeout))

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int, timeout: float,
              train_config: ConfigRecord, evaluate_fn: Callable) -> None:
        self.grid, self.train_config, self.evaluate_fn = grid, train_config, evaluate_fn
        self.keys = list(initial_arrays.keys())
        self.global_arrays = {k: v.numpy() for k, v in initial_arrays.items()}
        self.summed = summed_keys(self.keys, self.global_arrays)
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                        run_config={}),
                                config=ServerConfig(num_rounds=num_rounds, round_timeout=timeout),
                                strategy=self)
        self.workflow(timeout)(grid, context)

    # --- the legacy strategy --------------------------------------------------------------
    def initialize_parameters(self, client_manager):
        return ndarrays_to_parameters([self.global_arrays[k] for k in self.keys])

    def configure_fit(self, server_round, parameters, client_manager):
        server_round = self.offset.server_round(server_round)
        cfg = self.cfg
        wait_for_nodes(self.grid, cfg.min_train_clients, cfg.node_wait_timeout)
        self.global_arrays = dict(zip(self.keys, parameters_to_ndarrays(parameters), strict=True))
        wanted = max(int(client_manager.num_available() * cfg.fraction_train), cfg.min_train_clients)
        clients = client_manager.sample(num_clients=wanted, min_num_clients=cfg.min_train_clients)
        config = ConfigRecord(dict(self.train_config))  # the run config, unchanged
        config["server-round"] = server_round
        config[SHARED_KEYS] = ",".join(self.keys)
        # Replaced by aggregate_fit; stays when the protocol halts before it (too few sites
        # left to unmask the sum).
        self.records[server_round] = RoundRecord.of_round(
            clients_ok=0, aggregated=False,
            failures={c.node_id: "SecAgg+ round halted: too few sites left to unmask the sum" for c in clients})
        self._sampled = [c.node_id for c in clients]
        return [(c, FitIns(parameters, dict(config))) for c in clients]

    def aggregate_fit(self, server_round, results, failures):
        server_round = self.offset.server_round(server_round)
        finished = {proxy.node_id for proxy, _ in results}
        dropped = {n: "dropped out of the SecAgg+ round (error or timeout); its masks were removed"
                   for n in self._sampled if n not in finished}
        # Replaced below once the mean is added to the model.
        self.records[server_round] = RoundRecord.of_round(clients_ok=len(finished), failures=dropped,
                                                          aggregated=False)
        if len(finished) < self.cfg.min_train_clients:
            log.warning("round %d: %d sites finished, %d needed (min-train-clients); the global "
                        "model stays as it was", server_round, len(finished), self.cfg.min_train_clients)
            return None, {}
        # Every result carries the same unmasked mean: SecAgg+ hands the strategy no single update.
        mean_update = parameters_to_ndarrays(results[0][1].parameters)
        new = dict(self.global_arrays)
        for key, update in zip(self.summed, mean_update, strict=True):
            new[key] = (self.global_arrays[key].astype(np.float64) + update).astype(self.global_arrays[key].dtype)
        if not all(np.isfinite(new[k]).all() for k in self.summed):
            log.warning("round %d: the unmasked mean holds NaN or Inf; the global model stays", server_round)
            return None, {}
        metrics = [(float(res.num_examples), res.metrics) for _, res in results]
        train_metrics = weighted_mean(metrics)
        self.records[server_round] = RoundRecord.of_round(
            clients_ok=len(finished), failures=dropped, aggregated=True,
            client_metrics=[m for _, m in metrics], train_metrics=train_metrics)
        self.global_arrays = new
        return ndarrays_to_parameters([new[k] for k in self.keys]), train_metrics

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []  # evaluation is the server's own (server/evaluation.py)

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in
                              zip(self.keys, parameters_to_ndarrays(parameters), strict=True)})
        scores = self.evaluate_fn(server_round, arrays)
        return None if scores is None else (0.0, dict(scores))


def build(cfg: RunConfig) -> SecureRounds:
    return SecureRounds(cfg)
