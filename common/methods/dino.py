"""DINO (Caron, Touvron, Misra, Jégou, Mairal, Bojanowski & Joulin, "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021): self-distillation without labels. A
student network is trained to predict, for one view, the output distribution a momentum
teacher gives for the other view; the teacher's outputs are centred and sharpened so that
neither a uniform output nor a single dominant dimension is a solution.

Loss (the paper's Algorithm 1, as the authors' main_dino.py DINOLoss computes it, two global
views and no local crops): with student outputs s1, s2 and teacher outputs t1, t2 (K logits
each) and the centre c,
    P_t = softmax((t - c) / tau_t),  log P_s = log_softmax(s / tau_s),
    L = (H(P_t1, P_s2) + H(P_t2, P_s1)) / 2,  H(a, b) = -sum_k a_k log b_k, batch-averaged;
no gradient through the teacher. After the step the centre follows the teacher's batch
mean over both views: c <- m c + (1 - m) mean(t1, t2), m = 0.9 (the authors update it in
the loss's forward, from the same outputs; here in after_step, so a forward without a step
changes nothing). The teacher's parameters follow the student's by EMA with a momentum
that a cosine raises from --dino-tau to 1 over the whole run (the paper's schedule, as
BYOL's, common/schedules.py), after every step.

Settings: tau_s 0.1, tau_t 0.04, centre momentum 0.9: main_dino.py's defaults. The teacher
temperature is constant at 0.04 (--warmup_teacher_temp and --teacher_temp both 0.04,
--warmup_teacher_temp_epochs 0, as its ResNet-50 command keeps them); the paper's ViT
setting (the authors' README, VISSL) and solo-learn's CIFAR one warm it up linearly from
0.04 to 0.07 (over 30 and 50 epochs), which fedssl does not: --dino-teacher-temperature
0.07 would start hot, which DINOLoss's help calls unstable. Out dim
K = 4096 (--dino-out-dim) instead of the paper's 65,536: solo-learn's CIFAR setting
(scripts/pretrain/cifar/dino.yaml, ResNet-18, 4096 "prototypes", bottleneck 256); a CIFAR
training set has 50,000 images against ImageNet's 1.28 M, about 12 images per output at
4096 (20 per output for the paper's at ImageNet), and the last layer is proj-dim x K
weights shipped every round (1 M at the defaults, a fifth of resnet10's encoder). Teacher
momentum: the paper's base 0.996 (--dino-tau), cosine to 1. Its code recommends 0.9995 at
batch 256 (solo-learn's CIFAR setting uses that over 1000 epochs); a short federated run
would want a faster teacher, as BYOL's 0.9 here, but in the one small run measured (issue
19: 4 sites, 4 rounds, 16 px) 0.9, 0.99 and 0.996 ended within 0.2 kNN points of each
other (at the default out dim), so the paper's value stands.

Head (common/heads.py): the authors' DINOHead without BatchNorm (use_bn_in_head False, their
default): (Linear-GELU) x 2 -> Linear to a bottleneck, L2-normalised, -> a weight-normalised
bias-free Linear whose gain is fixed at 1 (norm_last_layer True, their default), at the
run's sizes: feature dim -> hidden-dim (1024) -> hidden-dim -> proj-dim (256, the paper's
bottleneck) -> K. `projector` is the head up to the bottleneck, the output the server's
collapse telemetry reads (its std after L2 normalisation; the paper's own collapse
diagnostics, the teacher's entropy and KL to the student, need the local teacher).

Views: two global views only; multi-crop (main_dino.py's default: 2 x 224 + 8 x 96 px) is
out of scope. Augmentation: the authors' DataAugmentationDINO for the two global crops,
asymmetric: flip 0.5, jitter p 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1),
grayscale 0.2, blur 1.0 / 0.1, solarize 0.0 / 0.2, at the crop scale the code recommends
when multi-crop is off (--global_crops_scale 0.14 1; crop-min-scale, default 0.2, replaces
the lower bound as for every method, so 0.2 by default). fedssl's `blur` (default off) drops
the blur at any size; the two views then differ by solarize alone.

Where fedssl's DINO differs from the authors' code, besides multi-crop and sizes: no
freezing of the last layer during the first epoch (--freeze_last_layer 1) and no gradient
clipping (--clip_grad 3.0): the client's training loop (common/training.py) is the same
for every method and has neither; plain SGD with the run's cosine learning rate, weight
decay (on every parameter: the authors exempt biases and 1-D parameters) and momentum
instead of AdamW / LARS with their schedules.

Evaluated and exported: the averaged student (the teacher stays at the sites), where the
authors evaluate the teacher (eval_knn.py's --checkpoint_key "teacher").

Federated design: the student is shared (backbone, head and last layer: prefixes
"encoder.", "projector.", "last_layer."); the teacher and the centre stay at the site. The
teacher is the momentum copy of what this site trained, as FedBYOL keeps BYOL's target
local (Zhuang et al., ICCV 2021; common/methods/byol.py); averaging it would make it a
second copy of the global student, and its BatchNorm statistics are of this site's images.
The centre is the running mean of this local teacher's outputs on this site's images: it
removes from the teacher's targets the direction this site's data already dominates, so it
belongs with the teacher it centres. No federated DINO paper we know of settles it; a
shared (averaged) centre (--dino-share-center) was compared with the local one once during
development (synthetic images, 4 sites, Dirichlet 0.5, 4 rounds, 16 px, seed 0, teacher
momentum 0.99; no spec in the repo reproduces it): kNN top-1 0.294 shared against 0.286
local, within the 2-point noise of 500 queries. At the methods sweep's CIFAR-10 setting
(experiments/sweep-dino-centre.toml, seed 0, validation kNN): 0.306 shared against 0.302
local, inside the noise, both collapsed alike (docs/results.md, "Federated design choices,
measured once"). The local centre stays the default for the reason above.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.common.augment import ViewRecipe
from fedssl.common.config import RunConfig
from fedssl.common.ema import ema_
from fedssl.common.heads import NormalizedLinear, dino_head
from fedssl.common.methods.base import HeadSizes, SSLMethod, frozen_copy
from fedssl.common.schedules import cosine


def dino_loss(student: tuple[torch.Tensor, torch.Tensor], teacher: tuple[torch.Tensor, torch.Tensor],
              center: torch.Tensor, *, student_temperature: float = 0.1,
              teacher_temperature: float = 0.04) -> torch.Tensor:
    """The cross-entropy of each view's student distribution against the other view's
    centred, sharpened teacher distribution, averaged over the two pairs and the batch. In
    fp32 with autocast off: logits divided by 0.04 turn bf16's rounding into targets that
    are off by about 10% of a logit."""
    with torch.autocast(center.device.type, enabled=False):
        targets = [F.softmax((t.detach().float() - center.float()) / teacher_temperature, dim=-1)
                   for t in teacher]
        log_probs = [F.log_softmax(s.float() / student_temperature, dim=-1) for s in student]
        return sum(-(targets[i] * log_probs[1 - i]).sum(dim=-1).mean() for i in (0, 1)) / 2


@torch.no_grad()
def updated_center(center: torch.Tensor, teacher_outputs: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """The centre after one step: an EMA toward the mean of the teacher's outputs [N, K]
    over the batch (both views)."""
    return center * momentum + teacher_outputs.float().mean(dim=0) * (1 - momentum)


class DINO(SSLMethod):
    shared_prefixes = ("encoder.", "projector.", "last_layer.")
    augmentation = ViewRecipe(
        crop_scale=(0.14, 1.0), jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
        hue=0.1, grayscale_prob=0.2, blur_probs=(1.0, 0.1), solarize_probs=(0.0, 0.2),
    )

    def __init__(self, encoder: nn.Module, feature_dim: int, heads: HeadSizes, *, out_dim: int = 4096,
                 base_tau: float = 0.996, student_temperature: float = 0.1,
                 teacher_temperature: float = 0.04, center_momentum: float = 0.9,
                 share_center: bool = False):
        super().__init__()
        self.encoder = encoder
        self.projector = dino_head(feature_dim, heads.hidden_dim, heads.proj_dim)
        self.last_layer = NormalizedLinear(heads.proj_dim, out_dim)
        self.teacher_encoder = frozen_copy(encoder)
        self.teacher_projector = frozen_copy(self.projector)
        self.teacher_last_layer = frozen_copy(self.last_layer)
        # A buffer: it travels in local_state() and with .to(device), and is never trained.
        self.register_buffer("center", torch.zeros(out_dim))
        self.base_tau = base_tau
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.center_momentum = center_momentum
        self._teacher_outputs: torch.Tensor | None = None
        # Per instance: the run config decides whether the centre travels.
        self.shared_prefixes = DINO.shared_prefixes + (("center",) if share_center else ())

    @classmethod
    def from_config(cls, encoder: nn.Module, feature_dim: int, heads: HeadSizes, cfg: RunConfig) -> DINO:
        return cls(encoder, feature_dim, heads, out_dim=cfg.dino_out_dim, base_tau=cfg.dino_tau,
                   student_temperature=cfg.dino_student_temperature,
                   teacher_temperature=cfg.dino_teacher_temperature,
                   center_momentum=cfg.dino_center_momentum, share_center=cfg.dino_share_center)

    @staticmethod
    def _logits(last_layer: nn.Module, bottleneck: torch.Tensor) -> torch.Tensor:
        # Cosines in fp32: divided by the temperatures, bf16's rounding would be a tenth of
        # a logit.
        with torch.autocast(bottleneck.device.type, enabled=False):
            return last_layer(bottleneck.float())

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        # Both views as one batch through each network, as the authors' MultiCropWrapper
        # passes crops of one resolution together.
        views = torch.cat([view1, view2])
        s1, s2 = self._logits(self.last_layer, self.projector(self.encoder(views))).chunk(2)
        with torch.no_grad():
            t = self._logits(self.teacher_last_layer, self.teacher_projector(self.teacher_encoder(views)))
        self._teacher_outputs = t
        t1, t2 = t.chunk(2)
        return dino_loss((s1, s2), (t1, t2), self.center, student_temperature=self.student_temperature,
                         teacher_temperature=self.teacher_temperature)

    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student = [*self.encoder.parameters(), *self.projector.parameters(), *self.last_layer.parameters()]
        teacher = [*self.teacher_encoder.parameters(), *self.teacher_projector.parameters(),
                   *self.teacher_last_layer.parameters()]
        return teacher, student

    def after_step(self, progress: float) -> None:
        if self._teacher_outputs is not None:
            self.center.copy_(updated_center(self.center, self._teacher_outputs, self.center_momentum))
            self._teacher_outputs = None
        ema_(*self._pairs(), cosine(progress, self.base_tau, 1.0))

    @torch.no_grad()
    def follow_global(self) -> None:
        self.teacher_encoder.load_state_dict(self.encoder.state_dict())
        self.teacher_projector.load_state_dict(self.projector.state_dict())
        self.teacher_last_layer.load_state_dict(self.last_layer.state_dict())
        self._teacher_outputs = None

    @torch.no_grad()
    def init_local(self) -> None:
        self.follow_global()
        if not "center".startswith(self.shared_prefixes):
            self.center.zero_()  # a shared centre has just come from the server
