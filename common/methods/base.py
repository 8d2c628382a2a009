"""What every SSL method provides, so client, server and harness never ask which one it is."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedssl.common.augment import ViewRecipe
from fedssl.common.config import RunConfig


@dataclass(frozen=True)
class HeadSizes:
    proj_dim: int = 256
    hidden_dim: int = 1024


class SSLMethod(nn.Module):
    """An SSL method: its networks, its loss on its views, its update after each step.

    `shared_prefixes` name the state_dict entries the server aggregates; every other entry
    (a BYOL target, a MoCo queue) is local state that stays on the client between rounds.
    `encoder` is the backbone that is evaluated and exported. `augmentation` is the
    method's view recipe from its paper (common/training.py's `augmenter` builds the
    run's views from it), so the training loop never asks which method it trains.
    """

    shared_prefixes: tuple[str, ...] = ()
    # How many augmented views of each image `forward` takes: the recipe's view 1 (and view 2),
    # as common/training.py's `augmenter` makes them. MAE takes one.
    views: int = 2
    # The encoder `encoder = "auto"` (the run config's default) builds, and the encoders the
    # method can train (None: any in common/encoders.py); RunConfig resolves and checks both.
    preferred_encoder: str = "resnet10"
    encoders: tuple[str, ...] | None = None
    # Trained at its own rate: predictor-lr-scale x the round's or the base lr, by
    # predictor-lr-schedule (common/training.py's StepSettings.from_config).
    predictor_prefixes: tuple[str, ...] = ()
    augmentation: ViewRecipe
    encoder: nn.Module

    @classmethod
    def from_config(cls, encoder: nn.Module, feature_dim: int, heads: HeadSizes, cfg: RunConfig) -> SSLMethod:
        """The method with the run config's settings for it."""
        raise NotImplementedError

    def forward(self, *views: torch.Tensor) -> torch.Tensor:
        """The loss for a batch of `views` views (view1, view2 for most methods)."""
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Update non-gradient state; `progress` in [0, 1] over the whole federated run."""

    def fit_to_data(self, images_per_epoch: int) -> None:
        """Adapt local state to how many images an epoch at this site passes through;
        train_epochs calls it before training (MoCo v2 caps its queue by it)."""

    def init_local(self) -> None:
        """Build local state from the shared networks, for a client that has none yet."""

    def follow_global(self) -> None:
        """Re-derive the local copies of the shared networks (a target, teacher or key
        encoder) from the global model just loaded, keeping local state that is no such copy
        (a queue, a centre, a site's own decoder). FedEMA's global branch calls it, where the
        authors' client resets its target to the global online network. By default all local
        state is such a copy."""
        self.init_local()

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.shared_prefixes)}

    def local_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.shared_prefixes)}

    def load_partial(self, state: dict[str, torch.Tensor]) -> None:
        """Load a shared or local subset; keys outside this method's state are an error."""
        unexpected = self.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise KeyError(f"state holds keys this method does not have: {unexpected[:5]}")


def frozen_copy(module: nn.Module) -> nn.Module:
    """A gradient-free copy, for momentum (target / key) networks."""
    import copy

    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone
