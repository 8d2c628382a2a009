"""SwAV (Caron, Misra, Mairal, Goyal, Bojanowski & Joulin, "Unsupervised Learning of Visual
Features by Contrasting Cluster Assignments", NeurIPS 2020): swapped prediction. Each view's
embedding is scored against K learnt prototypes; a code (a soft assignment to the
prototypes) is computed for one view under an equipartition constraint over the batch, and
the other view has to predict it.

Loss (the paper's eq. 1-3 and Algorithm 1, as the authors' main_swav.py computes it, two
views): with z the L2-normalised projections, C the prototypes (rows L2-normalised before
every step) and scores s = z C^T,
    q = sinkhorn(s) (no gradient),  p = softmax(s / tau),
    L = (H(q1, p2) + H(q2, p1)) / 2,  H(q, p) = -sum_k q_k log p_k, batch-averaged.
sinkhorn: Q = exp(s / epsilon)^T over the batch, then 3 rounds of rows (prototypes) scaled
to 1/K and columns (samples) to 1/B; each sample's code sums to 1. tau 0.1, epsilon 0.05,
3 iterations: the paper's and its scripts' values, at every scale (solo-learn's CIFAR
setting, scripts/pretrain/cifar/swav.yaml, keeps them).

Prototypes: K = 3000 (--swav-prototypes), the paper's and solo-learn's CIFAR setting (the
paper reports little sensitivity to K as long as there are enough). Both give Sinkhorn more
samples than prototypes (batch 256 and a 3,840-embedding queue); here it sees the 64 of a
batch, and the equipartition then spreads each code over about K / B = 47 prototypes (a
numpy check on made-up scores, each sample near one prototype: a code's perplexity about 800
at B = 64, 16 at B = 3,900, 52 with K = 300). K = 300 against 3000, measured once (seed 0,
FedAvg over Dirichlet(0.1) CIFAR-10 clients, 40,000 image-passes,
experiments/sweep-swav-design.toml): neither left the untrained encoder's validation kNN
(0.279 at round 0; 0.273 with 300, 0.271 with 3000) and the loss stayed near log K, so the
measurement cannot tell them apart and the paper's K stays (docs/results.md, "Federated
design choices, measured once"). Projector (common/heads.py's
`mlp`, Linear-BN-ReLU-Linear, as the authors' projection head) at the run's sizes, feature
dim -> hidden-dim (1024) -> proj-dim (256; the paper's is 2048 -> 128).

No queue. The authors add one when the batch is small (scripts/swav_200ep_bs256_pretrain.sh:
3,840 embeddings of past batches, from epoch 15), so that Sinkhorn's equipartition is over
more samples; their README warns that a queue started too early or too long "can
considerably disturb training: this is because the queue members are too inconsistent". In a
federated round every site starts from a global model that replaced its own, so embeddings
from before the round are of a different model; a queue of one round's own embeddings would
start empty each round. At batch 64 the codes are computed over the 64 samples of each view.
Nothing but the weights is kept between steps.

Views: two only; multi-crop (the paper's 2 x 224 + 6 x 96 px) is out of scope.
Augmentation: the authors' src/multicropdataset.py, the same for both views: flip 0.5,
colour distortion of strength 1 (jitter p 0.8: brightness, contrast, saturation 0.8, hue
0.2), grayscale 0.2, gaussian blur 0.5, no solarize, at the crop scale of the authors' two-view
script (scripts/swav_400ep_2x224_pretrain.sh: --min_scale_crops 0.08); crop-min-scale
(default 0.2) replaces the lower bound as for every method, so 0.2 by default, and fedssl's
`blur` (default off) drops the blur at any size.

Where fedssl's SwAV differs from the authors' code, besides multi-crop, the queue and the
sizes: the prototypes are not frozen during the first iterations (--freeze_prototypes_niters
313, one ImageNet epoch at batch 4096), and plain SGD replaces LARS; the client's training
loop (common/training.py) is the same for every method. The prototype scores and the codes
are computed in fp32 with autocast off: exp(s / 0.05) multiplies bf16's rounding of s by 20.

Federated design: the encoder and projector are shared (prefixes "encoder.", "projector.");
the prototypes are shared too by default (--swav-share-prototypes). Orchestra (Lubana et
al., ICML 2022) argues for clusters that are consistent across sites: a site's codes then
mean the same as another's, and the averaged projector is trained toward one set of
prototypes, not one per site. Orchestra gets there by clustering the sites' centroids at the
server; here the prototypes are averaged with the rest of the model (FedAvg), and
normalised again before the next step. Local prototypes (--swav-share-prototypes false)
were compared with shared ones once during development (synthetic images, 4 sites, Dirichlet
0.5, 4 rounds, 16 px, seed 0; no spec in the repo reproduces it): kNN top-1 0.306 shared
against 0.304 local, no difference at that scale. At CIFAR-10 scale
(experiments/sweep-swav-design.toml, seed 0): 0.276 local against 0.271 shared on validation,
both below the untrained encoder's 0.279 (SwAV does not learn there with either, nor with K =
300), inside the noise. Shared stays the default for the reason above. The server's collapse
telemetry reads the projector's output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.common.augment import ViewRecipe
from fedssl.common.config import RunConfig
from fedssl.common.heads import mlp
from fedssl.common.methods.base import HeadSizes, SSLMethod


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """The codes [B, K] of scores [B, K]: soft assignments of the batch to the prototypes,
    each row summing to 1, the prototypes sharing the batch about equally (Sinkhorn-Knopp).
    Scores are cosines, so exp(score / epsilon) stays within fp32 at epsilon 0.05."""
    q = torch.exp(scores.float() / epsilon).T  # K x B, the paper's notation
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * k  # each prototype: 1/K of the mass
        q /= q.sum(dim=0, keepdim=True) * b  # each sample: 1/B
    return (q * b).T


def swapped_prediction(scores: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """The cross-entropy of the codes against the softmax of the scores, batch-averaged."""
    return -(codes * F.log_softmax(scores / temperature, dim=1)).sum(dim=1).mean()


def swav_loss(scores1: torch.Tensor, scores2: torch.Tensor, *, temperature: float = 0.1,
              epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """SwAV's loss of two views' prototype scores [B, K]: each view predicts the other's
    codes; in fp32 with autocast off."""
    with torch.autocast(scores1.device.type, enabled=False):
        s1, s2 = scores1.float(), scores2.float()
        q1, q2 = sinkhorn(s1, epsilon, iterations), sinkhorn(s2, epsilon, iterations)
        return (swapped_prediction(s2, q1, temperature) + swapped_prediction(s1, q2, temperature)) / 2


class SwAV(SSLMethod):
    augmentation = ViewRecipe(
        crop_scale=(0.08, 1.0), jitter_prob=0.8, brightness=0.8, contrast=0.8, saturation=0.8,
        hue=0.2, grayscale_prob=0.2, blur_probs=(0.5, 0.5), solarize_probs=(0.0, 0.0),
    )

    def __init__(self, encoder: nn.Module, feature_dim: int, heads: HeadSizes, *, prototypes: int = 3000,
                 temperature: float = 0.1, epsilon: float = 0.05, iterations: int = 3,
                 share_prototypes: bool = True):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(feature_dim, heads.hidden_dim, heads.proj_dim)
        self.prototypes = nn.Linear(heads.proj_dim, prototypes, bias=False)
        # Per instance: the run config decides whether the prototypes travel.
        self.shared_prefixes = ("encoder.", "projector.") + (("prototypes.",) if share_prototypes else ())
        self.temperature, self.epsilon, self.iterations = temperature, epsilon, iterations

    @classmethod
    def from_config(cls, encoder: nn.Module, feature_dim: int, heads: HeadSizes, cfg: RunConfig) -> SwAV:
        return cls(encoder, feature_dim, heads, prototypes=cfg.swav_prototypes,
                   temperature=cfg.swav_temperature, epsilon=cfg.swav_epsilon,
                   iterations=cfg.swav_sinkhorn_iterations, share_prototypes=cfg.swav_share_prototypes)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        # Unit prototypes before every step, as the authors do: after an SGD step (or the
        # server's average) they are not.
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        z = self.projector(self.encoder(torch.cat([view1, view2])))
        with torch.autocast(z.device.type, enabled=False):
            scores = self.prototypes(F.normalize(z.float(), dim=1))
        s1, s2 = scores.chunk(2)
        return swav_loss(s1, s2, temperature=self.temperature, epsilon=self.epsilon,
                         iterations=self.iterations)
