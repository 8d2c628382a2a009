"""Hostile sites for the simulation (run config `attack`, `attack-sites`, `attack-scale`;
docs/security.md): partitions 0 to attack-sites - 1 attack, every other site is the honest
ClientApp, untouched.

Why here, in simulations/: `app` below is the ClientApp `fedssl simulate` runs
(simulations/engine.py). A deployed SuperNode runs client/app.py's ClientApp (the app's
`clientapp` component in pyproject.toml), and nothing in client/ imports simulations/, so no
run config a server sends can make a deployed site attack: there the `attack` keys reach no
code that reads them.

Update attacks take the update the honest code would have sent (its reply minus the global
model the site received; under DP, already clipped) and send global + the attacked update:
the attack comes after the honest ClientApp's mods, as a hostile site's own software would,
so it is not clipped. Float arrays only (weights and BatchNorm statistics); integer step
counters go as the honest site's.

- sign-flip: minus the honest update.
- scaled-flip: minus the honest update times attack-scale x max-update-norm-ratio: the flip
  boosted to just inside screening's bound (server/validation.py), the site taking its own
  honest norm for the round's median norm, which it cannot see.
- random: Gaussian noise with the honest update's norm, so screening cannot tell it by norm.
- constant: the same value in every float entry, with the honest update's norm.

Data poisoning, noise-images: the site runs the honest code (mods included) on uniform random
noise images in place of its own, the same number and size, the same images every round. In
self-supervised training no labels are read, so shuffled labels would change nothing; the
images themselves are what a poisoned site can spoil.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedssl.client.app import app as honest_app
from fedssl.client.app import round_config, train_round
from fedssl.client.local_data import local_images
from fedssl.client.privacy import clip_update_mod
from fedssl.client.transfer import transfer_mod
from fedssl.common.config import ConfigError, RunConfig
from fedssl.common.image_set import ImageSet
from fedssl.common.records import from_record, to_record

Update = dict[str, torch.Tensor]


def _norm(update: Update) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in update.values()))


def sign_flip(update: Update, cfg: RunConfig, rng: torch.Generator) -> Update:
    return {k: -v for k, v in update.items()}


def scaled_flip(update: Update, cfg: RunConfig, rng: torch.Generator) -> Update:
    scale = cfg.attack_scale * cfg.max_update_norm_ratio
    return {k: -scale * v for k, v in update.items()}


def random_update(update: Update, cfg: RunConfig, rng: torch.Generator) -> Update:
    noise = {k: torch.randn(v.shape, generator=rng, dtype=torch.float64) for k, v in update.items()}
    scale = _norm(update) / max(_norm(noise), 1e-30)
    return {k: scale * v for k, v in noise.items()}


def constant_update(update: Update, cfg: RunConfig, rng: torch.Generator) -> Update:
    entries = sum(v.numel() for v in update.values())
    value = _norm(update) / math.sqrt(max(entries, 1))
    return {k: torch.full(v.shape, value, dtype=torch.float64) for k, v in update.items()}


UPDATE_ATTACKS: dict[str, Callable[[Update, RunConfig, torch.Generator], Update]] = {
    "sign-flip": sign_flip,
    "scaled-flip": scaled_flip,
    "random": random_update,
    "constant": constant_update,
}


def noise_images(cfg: RunConfig, node_config: Mapping) -> ImageSet:
    """The site's images replaced by uniform noise, the same every round (seeded by the run
    and the partition)."""
    own = local_images(cfg, node_config)
    seed = (cfg.seed * 1_000_003 + int(node_config["partition-id"])) % 2**62
    noise = torch.randint(0, 256, tuple(own.images.shape), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(seed))
    return ImageSet(noise, own.labels, own.classes)


DATA_ATTACKS: dict[str, Callable[[RunConfig, Mapping], ImageSet]] = {"noise-images": noise_images}


def check(cfg: RunConfig, num_clients: int) -> None:
    """Refuse, in one line, an attack the harness cannot run as asked."""
    if cfg.attack == "none":
        return
    if cfg.attack_sites > num_clients:
        raise ConfigError(f"attack-sites={cfg.attack_sites} is invalid: must be <= num-clients ({num_clients})")
    if cfg.secure_aggregation:
        raise ConfigError(f"attack={cfg.attack!r} is invalid with secure-aggregation=true: the attacks "
                          "change plain replies, not SecAgg+'s masked ones; allowed: attack='none'")
    if cfg.attack == "scaled-flip" and cfg.max_update_norm_ratio == 0:
        raise ConfigError("attack='scaled-flip' is invalid with max-update-norm-ratio=0: it scales to "
                          "screening's bound, and 0 turns screening off; allowed: a ratio >= 1")


def is_attacker(cfg: RunConfig, node_config: Mapping) -> bool:
    return cfg.attack != "none" and int(node_config.get("partition-id", -1)) in range(cfg.attack_sites)


def _rng(cfg: RunConfig, server_round: int, node_config: Mapping) -> torch.Generator:
    # Apart from the training seed's formula (client/app.py), so the noise is not the
    # augmentation's draws; a seed and a round still fix it.
    seed = (cfg.seed * 998_244_353 + server_round * 7_919 + int(node_config["partition-id"]) + 1) % 2**62
    return torch.Generator().manual_seed(seed)


def _attack_update(cfg: RunConfig, server_round: int) -> Callable[[Message, Context], Message]:
    attack = UPDATE_ATTACKS[cfg.attack]

    def send_attacked(msg: Message, context: Context) -> Message:
        sent = from_record(msg.content["arrays"])  # read first: mods may change the message
        reply = honest_app(msg, context)
        if reply.has_error():
            return reply
        name, record = next(iter(reply.content.array_records.items()))
        arrays = from_record(record)
        floats = [k for k, v in arrays.items() if v.is_floating_point()]
        update = {k: arrays[k].double() - sent[k].double() for k in floats}
        attacked = attack(update, cfg, _rng(cfg, server_round, context.node_config))
        arrays.update({k: (sent[k].double() + attacked[k]).to(arrays[k].dtype) for k in floats})
        reply.content[name] = to_record(arrays)
        return reply

    return send_attacked


def _train_on(images: Callable[[RunConfig, Mapping], ImageSet]) -> Callable[[Message, Context], Message]:
    def train_poisoned(msg: Message, context: Context) -> Message:
        shared, metrics = train_round(msg.content["config"], msg.content["arrays"], context, images=images)
        return Message(RecordDict({"arrays": to_record(shared), "metrics": metrics}), reply_to=msg)

    return train_poisoned


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    if "config" not in msg.content:
        # A SecAgg+ stage message carries only that stage's keys; check() refuses attacks
        # under SecAgg+, so every such site is honest.
        return honest_app(msg, context)
    cfg, server_round = round_config(msg.content["config"])
    if not is_attacker(cfg, context.node_config):
        return honest_app(msg, context)
    # Outermost, as on an honest site: the attack sees float32 arrays whatever dtype they
    # travel in, and its reply travels as an honest one would (the honest app inside finds
    # nothing narrow and passes through).
    if cfg.attack in DATA_ATTACKS:
        # An honest site's software on poisoned data: client/app.py's mods, SecAgg+'s aside
        # (check refuses attacks under SecAgg+).
        poisoned = _train_on(DATA_ATTACKS[cfg.attack])
        return transfer_mod(msg, context, lambda m, c: clip_update_mod(m, c, poisoned))
    return transfer_mod(msg, context, _attack_update(cfg, server_round))

