"""Barlow Twins (Zbontar, Jing, Misra, LeCun & Deny, "Barlow Twins: Self-Supervised Learning
via Redundancy Reduction", ICML 2021): the cross-correlation matrix of the two views'
embeddings is driven to the identity. No negatives, no momentum network, no predictor.

Loss (the paper's eq. 1-2 and Algorithm 1, as the authors' main.py computes it): with Z, Z'
(n x d) standardised per dimension over the batch (mean 0, std 1: an affine-free
BatchNorm in training mode, biased variance, eps 1e-5), C = Z^T Z' / n and
    L = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2.
The diagonal makes the views' embeddings agree; the off-diagonal term decorrelates the
dimensions, so they carry no redundant information. lambda = 0.0051, the authors' code
default and solo-learn's (its BarlowTwins method's default, which its CIFAR setting,
scripts/pretrain/cifar/barlow.yaml, does not override); the paper's text rounds it to 5e-3,
lightly's BarlowTwinsLoss default. solo-learn's CIFAR setting also scales the loss by 0.1
(`scale_loss`), under LARS, whose per-layer normalised step makes that scale matter far less
than under SGD; with fedssl's plain SGD and weight decay a scale s would equal lr x s with
weight decay / s, so the loss is the paper's, unscaled. The standardisation is the
functional one, as lightly's: the authors' BatchNorm1d module also keeps running statistics
that nothing reads, which here would be state to ship to the server for nothing.

Projector: the paper's is three layers of 8192 on ResNet-50's 2048 features (it finds
accuracy still rising with the output width); here three layers (common/heads.py's
`expander`) at the run's sizes, feature dim -> hidden-dim -> hidden-dim -> proj-dim (512 ->
1024 -> 1024 -> 256 with resnet10 at the defaults; an output narrower than the hidden
layers, unlike the paper's and solo-learn's, which --proj-dim = --hidden-dim restores), for
the reason common/methods/vicreg.py gives: at 32 px on a CPU a batch is 64 images,
solo-learn's CIFAR setting already shrinks it to 2048-2048, and a wider one is --proj-dim /
--hidden-dim away (this default was not measured against a wider one). lambda was set for
the paper's width, where the off-diagonal term has 8,191 entries per diagonal one; at d =
256 it has 255, so the decorrelation weighs relatively less here; lambda was not retuned for
that (solo-learn keeps 0.0051 at 2048). No config keys of its own.

Augmentation: the paper's ("we use the same augmentation parameters as BYOL"; the authors'
main.py Transform), asymmetric between the views: crop scale (0.08, 1), flip 0.5, jitter
p 0.8 (0.4, 0.4, 0.2, 0.1), grayscale 0.2, blur 1.0 / 0.1, solarize 0.0 / 0.2. solo-learn's
CIFAR setting (augmentations/asymmetric.yaml) keeps it at 32 px without the blur, which is
what fedssl's `blur` key (default off) gives, but crops from 0.08; fedssl's crop-min-scale
(default 0.2) replaces the lower bound as for every method, so its views crop from 0.2.
Optimiser: plain SGD with weight decay on every parameter (common/training.py), where the
authors use LARS, weight decay 1.5e-6 and a 40x smaller rate for biases and BatchNorm.

Federated design: everything is shared (encoder and projector, prefixes "encoder." and
"projector."), nothing stays at the site, for the reasons common/methods/vicreg.py gives
for VICReg: no momentum network, queue or predictor to keep; the cross-correlation is a
statistic of each local batch, recomputed every step and never stored; and the loss is
defined on the projector's output, so a site-local projector would train the averaged
encoder under heads that disagree. The server's collapse telemetry reads the averaged
projector's output (`projector`). Each site drives the cross-correlation of its own data
to the identity; under non-IID splits that is stated, not yet measured.

Optimiser: the paper trains with LARS; fedssl's clients use plain SGD, under which the
loss's scale is the step's. At the defaults the first gradient's norm is about 230x
BYOL's (the diagonal term sums over proj-dim dimensions); the standardisation bounds every
correlation, and in the short runs measured (batch 4 and 16, 3 seeds each; batch 64,
one) it stayed finite and fell. solo-learn's 0.1 scale is the knob a measured comparison
may want.

Both views go through the encoder and projector as one batch (one pass, as the other methods
here), so their BatchNorm layers normalise over the 2N views; the authors' code passes each
view separately. The standardisation in the loss is per view, as the paper's."""
from __future__ import annotations

import torch
from torch import nn

from fedssl.common.augment import ViewRecipe
from fedssl.common.config import RunConfig
from fedssl.common.heads import expander
from fedssl.common.methods.base import HeadSizes, SSLMethod

LAMBDA_OFFDIAG = 0.0051  # the authors' code
BN_EPS = 1e-5  # BatchNorm1d's, as the authors' affine-free BatchNorm


def standardise(z: torch.Tensor, eps: float = BN_EPS) -> torch.Tensor:
    """Each dimension to mean 0 and std 1 over the batch (biased variance), as an affine-free
    BatchNorm in training mode."""
    centred = z - z.mean(dim=0)
    return centred / torch.sqrt(centred.pow(2).mean(dim=0) + eps)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """[d, d]: entry (i, j) is the correlation over the batch of dimension i of the first
    view's embeddings with dimension j of the second's."""
    return standardise(z1).T @ standardise(z2) / len(z1)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor,
                      lambda_offdiag: float = LAMBDA_OFFDIAG) -> torch.Tensor:
    """The Barlow Twins loss of two views' embeddings [n, d] (n >= 2). In fp32 with autocast
    off, for the reason common/methods/simclr.py's nt_xent gives: bf16 correlations carry
    errors as large as the off-diagonal entries the loss drives to 0."""
    with torch.autocast(z1.device.type, enabled=False):
        c = cross_correlation(z1.float(), z2.float())
        off_diagonal = ~torch.eye(len(c), dtype=torch.bool, device=c.device)
        return (1 - c.diagonal()).pow(2).sum() + lambda_offdiag * c[off_diagonal].pow(2).sum()


class BarlowTwins(SSLMethod):
    shared_prefixes = ("encoder.", "projector.")
    augmentation = ViewRecipe(
        crop_scale=(0.08, 1.0), jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
        hue=0.1, grayscale_prob=0.2, blur_probs=(1.0, 0.1), solarize_probs=(0.0, 0.2),
    )

    def __init__(self, encoder: nn.Module, feature_dim: int, heads: HeadSizes,
                 lambda_offdiag: float = LAMBDA_OFFDIAG):
        super().__init__()
        self.encoder = encoder
        self.projector = expander(feature_dim, heads.hidden_dim, heads.proj_dim)
        self.lambda_offdiag = lambda_offdiag

    @classmethod
    def from_config(cls, encoder: nn.Module, feature_dim: int, heads: HeadSizes, cfg: RunConfig) -> BarlowTwins:
        return cls(encoder, feature_dim, heads)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.projector(self.encoder(torch.cat([view1, view2]))).chunk(2)
        return barlow_twins_loss(z1, z2, self.lambda_offdiag)
