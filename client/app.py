"""The ClientApp: receive the global shared arrays, train locally on private images, reply
with the shared arrays and metrics. Local state (e.g. BYOL's target) lives in context.state
or, with a state directory, on the site's disk (client/state_store.py)."""
from __future__ import annotations

import functools
import logging
from typing import Callable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedssl.client.local_data import local_images
from fedssl.client.privacy import clip_update_mod
from fedssl.client.secure import secure_rounds_mod
from fedssl.client.state_store import Store, state_store
from fedssl.client.transfer import transfer_mod
from fedssl.common.config import RunConfig
from fedssl.common.image_set import ImageSet
from fedssl.common.device import select_device, set_threads
from fedssl.common.global_updates import METRIC_PREFIX, Rule, rule_for
from fedssl.common.methods import build_method
from fedssl.common.records import from_record, to_record
from fedssl.common.schedules import round_lr
from fedssl.common.training import StepSettings, augmenter, steps_per_epoch, train_epochs

log = logging.getLogger("fedssl")
LOCAL_STATE_KEY = "fedssl-local"
# For the strategy's client-side rule (common/global_updates): this node's shared arrays after
# its last round with that round's number and divergence, and the rule's own numbers
# (FedEMA's lambda).
PREVIOUS_KEY = "fedssl-previous-shared"
MEMO_KEY = "fedssl-update-memo"

app = ClientApp()


def round_config(sent: Mapping) -> tuple[RunConfig, int]:
    """The server sends the whole (validated) run config with each round, unchanged, so a
    site cannot train with settings that differ from the server's; Flower adds the round
    number, from which the client computes the round's schedules."""
    config = dict(sent)
    server_round = int(config.pop("server-round", 1))
    return RunConfig.from_mapping(config, ignore_unknown=True), server_round


@functools.lru_cache(maxsize=1)
def built_method(cfg: RunConfig):
    """The run's method, built once per run config: the config is the same every round of a
    run, so a long-lived process (simulation actors) reuses it across rounds and clients;
    every round loads all of its state, so nothing leaks from one client or round into the
    next."""
    return build_method(cfg)


def _train_seed(seed: int, server_round: int, context: Context) -> int:
    # Simulated node ids are random per run; partition ids are stable, so reruns repeat.
    client = int(context.node_config.get("partition-id", context.node_id))
    return (seed * 1_000_003 + server_round * 10_007 + client) % 2**62


def restore_local_state(method, store: Store, server_round: int, fresh: bool = False) -> bool:
    """Load this node's local state (BYOL's target); when the rule asks for it (`fresh`),
    then re-derive its copies of the shared networks from the just-loaded global model
    (`follow_global`: the target, not a site's own decoder or queue). Rebuild all of it when
    it is missing or does not fit (a restarted SuperNode, a resumed server, a changed
    method). Returns whether state a client should have had was rebuilt."""
    expected = method.local_state()
    if not expected:
        return False  # this method keeps nothing locally
    state = store.get(LOCAL_STATE_KEY)
    problem = "none kept" if state is None else None
    if problem is None:
        # strict=False loading would leave missing entries as whatever the cached method
        # object last held: another client's target.
        if set(state) != set(expected):
            problem = "its keys differ from the method's"
        elif any(state[k].shape != expected[k].shape for k in expected):
            problem = "its shapes differ from the method's"
        else:
            method.load_partial(state)
            if fresh:
                method.follow_global()
            return False
    method.init_local()
    if server_round == 1:
        return False  # built, as every client does in the first round: nothing was lost
    # With client sampling a node's first round may come late, and then nothing was lost
    # either; state that is there but does not fit is always worth a warning.
    missing = problem == "none kept"
    log.log(logging.INFO if missing else logging.WARNING,
            "round %d: local state rebuilt from the global model (%s)", server_round,
            "none kept: this node's first round, or it restarted" if missing else problem)
    return True


def enter_global(cfg: RunConfig, method, arrays: ArrayRecord, context: Context,
                 store: Store, server_round: int) -> tuple[Rule, dict[str, float], dict | None]:
    """Load the global shared arrays as the run's strategy says: most replace the local ones,
    FedU and FedEMA keep some of this node's own. Returns the rule, the numbers it decided
    by this round, and what it needs of the arrays training starts from (for `Rule.to_keep`)."""
    rule = rule_for(cfg.strategy)
    kept = store.get(PREVIOUS_KEY) if rule.keeps_previous else None
    memo = dict(context.state.get(MEMO_KEY, {}))
    decided_by = rule.apply(cfg, method, from_record(arrays), kept, memo, server_round)
    if memo:
        context.state[MEMO_KEY] = ConfigRecord(memo)
    return rule, decided_by, rule.starting_point(method.shared_state())


def train_round(sent_config: Mapping, global_arrays: ArrayRecord, context: Context, *,
                images: Callable[[RunConfig, Mapping], ImageSet] = local_images) -> tuple[dict, MetricRecord]:
    """One round of local training from the global shared arrays and the round's config:
    this node's new shared state and its metrics. Plain and SecAgg+ rounds
    (client/secure.py) both run it; the simulation's poisoned sites (simulations/attacks.py)
    run it on other `images`."""
    cfg, server_round = round_config(sent_config)
    threads = set_threads(int(context.node_config.get("threads", cfg.threads)))
    device = select_device(str(context.node_config.get("device", cfg.device)))
    data = images(cfg, context.node_config)

    method = built_method(cfg)
    store = state_store(context, cfg.client_state_dir)
    rule, decided_by, started_from = enter_global(cfg, method, global_arrays, context, store, server_round)
    rebuilt = restore_local_state(method, store, server_round, fresh=rule.follows_global(decided_by))

    # BYOL's momentum (and any schedule) runs over the whole run's steps, counted from the
    # round number, so a client that skips rounds stays on the global schedule.
    per_round = cfg.local_epochs * steps_per_epoch(len(data), cfg.batch_size)
    total = cfg.num_rounds * per_round
    result = train_epochs(
        method, data.images, augmenter(cfg), epochs=cfg.local_epochs, device=device,
        progress_start=(server_round - 1) * per_round / total,
        progress_end=server_round * per_round / total,
        seed=_train_seed(cfg.seed, server_round, context),
        settings=StepSettings.from_config(cfg, lr=round_lr(server_round, cfg.num_rounds, cfg.lr)),
    )
    method.cpu()
    local_state = method.local_state()
    if local_state:
        store.put(LOCAL_STATE_KEY, local_state)
    if rule.keeps_previous:
        store.put(PREVIOUS_KEY, rule.to_keep(started_from, method.shared_state(), server_round))
    metrics = MetricRecord({
        "num-examples": len(data),
        "train-loss": result.loss,
        "train-seconds": result.seconds,
        "images-per-second": result.images_per_second,
        "skipped-images": data.skipped,
        "local-state-rebuilt": int(rebuilt),
        "threads": threads,
        **{METRIC_PREFIX + k: float(v) for k, v in decided_by.items()},
    })
    log.info("round %d: %d images, loss %.4f, %.0f img/s on %s", server_round, len(data),
             result.loss, result.images_per_second, device)
    return method.shared_state(), metrics


# Outermost first: everything inside sees float32 arrays whatever dtype they travel in;
# SecAgg+ rounds leave for their own protocol; DP clipping wraps the plain round's reply.
@app.train(mods=[transfer_mod, secure_rounds_mod(train_round), clip_update_mod])
def train(msg: Message, context: Context) -> Message:
    shared, metrics = train_round(msg.content["config"], msg.content["arrays"], context)
    return Message(RecordDict({"arrays": to_record(shared), "metrics": metrics}), reply_to=msg)
