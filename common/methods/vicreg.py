"""VICReg (Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization
for Self-Supervised Learning", ICLR 2022): no negatives, no momentum network, no
predictor; three terms on the expander's outputs Z, Z' (n x d) of the two views keep the
embedding from collapsing.

Loss (the paper's section 3, as the authors' main_vicreg.py computes it):
    lambda * mse(Z, Z') + mu * (v(Z) + v(Z')) / 2 + nu * (c(Z) + c(Z'))
- invariance: the mean squared distance between the two views' embeddings;
- variance: v(Z) = mean over dimensions of max(0, gamma - sqrt(Var(z_j) + eps)), the
  unbiased variance over the batch; a hinge that pushes every dimension's std up to gamma;
- covariance: c(Z) = the sum of the squared off-diagonal entries of Z's covariance matrix
  (over n - 1), divided by d; it decorrelates the dimensions.
The paper's coefficients, kept at every scale: lambda = 25, mu = 25, nu = 1, gamma = 1,
eps = 1e-4 (solo-learn's CIFAR setting, scripts/pretrain/cifar/vicreg.yaml, keeps the same
25 / 25 / 1). The paper writes the variance term without the halving; its code (and
lightly's VICRegLoss, which the tests match) halves it, and that is what trained the
paper's models. Its invariance term likewise is a mean over the n x d entries (F.mse_loss),
where the paper's eq. 5 divides the sum by n only: a factor d, also the code's.

Expander: the paper's is three layers of 8192 on ResNet-50's 2048 features; here three
layers (common/heads.py's `expander`) at the run's sizes, feature dim -> hidden-dim ->
hidden-dim -> proj-dim (512 -> 1024 -> 1024 -> 256 with resnet10 at the defaults). The
output narrower than the hidden layers is a departure: the authors' (8192 x 3) and
solo-learn's (2048 x 2) keep the output as wide as the hidden layers, and both decorrelation
terms act on the output's width; --proj-dim equal to --hidden-dim restores the shape. At 32
px on a CPU a batch is 64 images, so a 8192 x 8192 covariance would be estimated from 64
samples (rank 63), and the paper's expander would cost twice resnet10's encoder (138 M
against 63 M multiply-adds an image at 32 px; at the run's sizes, 1.8 M); solo-learn's CIFAR
setting shrinks it to 2048-2048 on ResNet-18's 512 features. The paper finds accuracy rising
with the expander's width at ImageNet scale (Garrido et al., ICLR 2023, "On the duality
between contrastive and non-contrastive SSL", find small output dimensions lose little once
tuned), so a run with compute to spare can raise --proj-dim and --hidden-dim; this default
was not measured against a wider one. No config keys of its own: the coefficients are the
paper's and the head sizes the run's.

Augmentation: the authors' code (augmentations.py, TrainTransform), which is BYOL's,
asymmetric between the views: crop scale (0.08, 1), flip 0.5, jitter p 0.8 (0.4, 0.4,
0.2, 0.1), grayscale 0.2, blur 1.0 / 0.1, solarize 0.0 / 0.2. The paper's appendix text
describes a symmetric variant (blur 0.5 and solarize 0.1 on both views; lightly's
VICRegTransform follows that text), and solo-learn's CIFAR setting is that symmetric one
without blur at crop scale 0.2. At 32 px fedssl's `blur` (default off) and crop-min-scale
(0.2) give solo-learn's CIFAR views except for solarize, split 0 / 0.2 here instead of
0.1 / 0.1: the same share of solarized views per pair.

Federated design: everything is shared (encoder and expander, prefixes "encoder." and
"projector."), nothing stays at the site. VICReg has no momentum network, queue or
predictor to keep, and its variance and covariance terms are statistics of each local
batch, recomputed every step and never stored. The expander is averaged with the encoder
because the loss is defined on its output: a site-local expander would let every site
settle into its own basis of the embedding, and the averaged encoder would be trained
under heads that disagree. The server's collapse telemetry reads the averaged expander's
output (`projector`, as for the other methods), the space the variance term regularises.
Under non-IID splits each site decorrelates the features of its own data only; that is
stated, not yet measured.

Optimiser: the paper trains with LARS, whose per-layer step is bounded by the weights'
norm; fedssl's clients use plain SGD (common/training.py), where the covariance term,
quartic in the embedding's scale, can run away. Measured (16 px, heads 64 / 32, lr 0.05,
momentum 0.9, 3 seeds): the loss became NaN within 16 steps at batch 4 in 3 of 3 seeds
and at batch 8 and 12 in 1 of 3; finite at batch 4 with lr 0.01 and 0.02, and at the
defaults (32 px, batch 64, heads 1024 / 256, 32 steps). Its first gradient is about 3x
BYOL's at the defaults. Small batches (a small site) want a lower --lr.

Small sites: a site with fewer images than a batch trains on batches of its size, the NaN
regime above at the default lr; nothing prevents it (no clipping, no warm-up). Screening
rejects the NaN reply (the site's round is lost, the run goes on); lower --lr for such
splits. Weight decay (--weight-decay, 5e-4) applies to every parameter; the authors use
1e-6 and exempt biases and 1-D parameters, and scale lr with the batch (base x B / 256).

Both views go through the encoder and the expander as one batch (one pass, as the other
methods here), so their BatchNorm layers normalise over the 2N views; the authors' code
passes each view separately. The loss terms themselves are per view, as the paper's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.common.augment import ViewRecipe
from fedssl.common.config import RunConfig
from fedssl.common.heads import expander
from fedssl.common.methods.base import HeadSizes, SSLMethod

INVARIANCE, VARIANCE, COVARIANCE = 25.0, 25.0, 1.0  # the paper's lambda, mu, nu
STD_TARGET, EPS = 1.0, 1e-4  # the paper's gamma and epsilon


def variance_term(z: torch.Tensor, gamma: float = STD_TARGET, eps: float = EPS) -> torch.Tensor:
    """The mean hinge max(0, gamma - std) over dimensions: 0 once every dimension's std
    over the batch reaches gamma, up to gamma when they all collapse to a point."""
    return F.relu(gamma - torch.sqrt(z.var(dim=0) + eps)).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """The squared off-diagonal covariances over the batch, summed, over the dimension."""
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = (z.T @ z) / (n - 1)
    off_diagonal = ~torch.eye(d, dtype=torch.bool, device=z.device)
    return cov[off_diagonal].pow(2).sum() / d


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, *, invariance: float = INVARIANCE,
                variance: float = VARIANCE, covariance: float = COVARIANCE) -> torch.Tensor:
    """The VICReg loss of two views' embeddings [n, d] (n >= 2). In fp32 with autocast off,
    for the reason common/methods/simclr.py's nt_xent gives: a covariance of bf16 products
    carries errors as large as the off-diagonal entries it is meant to drive to 0."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()
        return (invariance * F.mse_loss(z1, z2)
                + variance * (variance_term(z1) + variance_term(z2)) / 2
                + covariance * (covariance_term(z1) + covariance_term(z2)))


class VICReg(SSLMethod):
    shared_prefixes = ("encoder.", "projector.")
    augmentation = ViewRecipe(
        crop_scale=(0.08, 1.0), jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
        hue=0.1, grayscale_prob=0.2, blur_probs=(1.0, 0.1), solarize_probs=(0.0, 0.2),
    )

    def __init__(self, encoder: nn.Module, feature_dim: int, heads: HeadSizes):
        super().__init__()
        self.encoder = encoder
        # The paper's "expander"; named projector, the head the server's telemetry reads.
        self.projector = expander(feature_dim, heads.hidden_dim, heads.proj_dim)

    @classmethod
    def from_config(cls, encoder: nn.Module, feature_dim: int, heads: HeadSizes, cfg: RunConfig) -> VICReg:
        return cls(encoder, feature_dim, heads)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.projector(self.encoder(torch.cat([view1, view2]))).chunk(2)
        return vicreg_loss(z1, z2)
