"""MAE (He, Chen, Xie, Li, Dollar & Girshick, "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022): hide most of an image's patches, encode the visible ones only, and
reconstruct the hidden ones' pixels with a small decoder.

Loss (the paper's section 3, as the authors' models_mae.py computes it): per image, a
random 75% of the patches is masked (mask-ratio 0.75, Figure 5; a fresh draw per sample by
sorting uniform noise); the ViT encodes the class token and the visible 25%; the decoder
embeds them, puts one learned mask token at each hidden position, adds its own fixed sine-
cosine positions, runs its transformer blocks and predicts each patch's pixels. The loss is
the mean squared error on the masked patches only, against each patch's pixels normalised by
that patch's own mean and (unbiased) variance, + 1e-6 (norm_pix_loss, the paper's default
target, Table 1(d)). The pixels are those the encoder sees: the view after fedssl's
normalisation. Patches are flattened row by row, pixel by pixel, channels last (the
authors' `patchify`, which lightly's `patchify` matches; tests compare with lightly).

Decoder: the paper's default is 8 blocks of width 512 behind ViT-L; it finds fine-tuning
accuracy flat over depth 1-12 and width 128-1024 (Table 1(a), 1(b)) while linear probing
gains with depth (65.5 at 1 block, 70.0 at 2, 73.5 at 8). On 2 CPU cores the decoder runs
on every patch (4x the tokens the encoder sees), so here it defaults to 2 blocks of width
128 (4 heads of 32, MLP 4x), `mae-decoder-depth` and `mae-decoder-dim` to change it. Its
blocks are torchvision's (vision_transformer.Encoder: pre-norm blocks and a final
LayerNorm), with the fixed sine-cosine positions MAE uses.

Encoder: a torchvision VisionTransformer (common/vit.py: `vit_tiny`, MAE's preferred
encoder, which `--encoder auto` picks). A ResNet cannot drop masked patches, so any other
encoder is a config error. `--proj-dim` and `--hidden-dim` mean nothing here: MAE has no
projector, and the server's collapse monitor (`projector`, the Identity here) reads the
ViT's evaluated feature itself, the class token (healthy about 1/sqrt(192)).

Augmentation: the paper's Table 1(e) default as the authors' main_pretrain.py sets it:
random resized crop, scale (0.2, 1), and a horizontal flip; no colour jitter, grayscale,
blur or solarize. One view per image (`views = 1`); given more (a caller with two views),
the loss averages over them.

Federated design: the encoder is shared, as for every method. The literature has no answer for
the decoder (with its mask token), so both choices are one flag, `mae-share-decoder`, compared
once during development (no spec in the repo reproduces it) and once at the methods sweep's
CIFAR-10 setting (below). During development: in-process federation on the embedded synthetic
data, 512 images over 4 iid sites, half sampled a round, 6 rounds, 32 px, batch 32, seed 0, kNN
on 500 / 250 held-out images (2 shared CPU cores, fp32). Shared: train loss 1.111 -> 0.908, kNN
top-1 0.244 -> 0.296; kept at the site: 1.111 -> 0.917, 0.244 -> 0.288. The kNN gap is within
one run's noise (250 queries: about 3 points); the loss gap fits a local decoder lagging under
partial participation (a site trains in about half the rounds, so its decoder lags the averaged
encoder and starts over at its first round; one seed, not an established difference). At the
methods sweep's CIFAR-10 setting (experiments/sweep-mae-decoder.toml, FedAvg over 10
Dirichlet(0.1) sites, 2 a round, 20 rounds, seed 0, validation kNN): shared 0.308 (+2.1 points
over round 0), kept at the site 0.281 (-0.6: it did not learn), 2.7 points apart; one seed, no
interval (docs/results.md, "Federated design choices, measured once"). Shared is
the default: one decoder that every site's reconstruction trains, so the averaged encoder is
trained against one decoder, for 0.44 M more values each way a round (8% of vit_tiny's 5.36 M).
A local decoder starts from the same seeded weights at every site and is rebuilt to them when a
site has none (`init_local`), and never leaves the site; FedEMA's global branch, which
re-derives a site's copies of the shared networks, keeps it (`follow_global`). Under DP its
fixed position embeddings, like the encoder's, are released as sent (server/dp.py). Nothing
else is kept: the masks are drawn afresh every step (from the generator common/training.py
seeds per round).

Where else it departs from the authors' code: the decoder's linear layers keep PyTorch's
default initialisation and the encoder torchvision's (MAE: Xavier-uniform, zero biases,
normal(0.02) tokens); crops are resampled bilinearly (MAE: bicubic); crop-min-scale replaces
the recipe's lower bound as for every method (its default 0.2 is MAE's).

Optimiser: the paper trains with AdamW (lr 1.5e-4 x batch/256, betas 0.9/0.95, weight
decay 0.05, 40 warm-up epochs); fedssl's clients use SGD with momentum at the run's `lr`
(common/training.py), one optimiser for every method. Under it MAE learns at the run's
defaults (the runs above: loss and kNN move within 6 short rounds); AdamW was not compared.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import Encoder, VisionTransformer

from fedssl.common.augment import ViewRecipe
from fedssl.common.config import RunConfig
from fedssl.common.methods.base import HeadSizes, SSLMethod
from fedssl.common.vit import encode_visible, sincos_position_embedding

HEAD_WIDTH = 32  # the decoder's attention heads are this wide (MAE's: 512 / 16)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C]: patches row-major, each flattened row by row,
    pixel by pixel, channels last (MAE's order)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def random_masking(batch: int, patches: int, ratio: float,
                   device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [B, K], masked [B, N - K]) patch indices, a different random subset per sample:
    the order of uniform noise (MAE's per-sample shuffling). K = int(N (1 - ratio)), kept
    within 1..N-1: a ratio near 0 or 1 still hides one patch and shows one (none hidden
    would leave the loss a mean over nothing: NaN)."""
    keep = min(max(int(patches * (1 - ratio)), 1), patches - 1)
    order = torch.rand(batch, patches, device=device).argsort(dim=1)
    return order[:, :keep], order[:, keep:]


def _gather(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error against per-patch normalised pixels (norm_pix_loss), [B, M, P] each;
    in fp32, since under bf16 autocast the target's variance would lose its small patches."""
    target = target.float()
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return F.mse_loss(prediction.float(), (target - mean) / (var + 1e-6).sqrt())


class Decoder(nn.Module):
    """Visible tokens -> pixels of chosen patches: embed, fill the hidden positions with the
    mask token, torchvision's transformer blocks over the whole sequence (fixed sine-cosine
    positions, final LayerNorm), a linear prediction per patch."""

    def __init__(self, grid: int, in_dim: int, width: int, depth: int, out_dim: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.empty(1, 1, width).normal_(std=0.02))
        self.blocks = Encoder(seq_length=grid * grid + 1, num_layers=depth, num_heads=width // HEAD_WIDTH,
                              hidden_dim=width, mlp_dim=4 * width, dropout=0.0, attention_dropout=0.0)
        with torch.no_grad():
            self.blocks.pos_embedding.copy_(sincos_position_embedding(grid, width))
        self.blocks.pos_embedding.requires_grad_(False)
        self.predict = nn.Linear(width, out_dim)

    def forward(self, encoded: torch.Tensor, keep: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        """`encoded` [B, 1 + K, D] (class token first) of the patches at `keep` [B, K];
        returns the predicted pixels of the patches at `wanted` [B, M]: [B, M, out_dim]."""
        x = self.embed(encoded)
        b, _, width = x.shape
        patches = self.blocks.pos_embedding.shape[1] - 1
        sequence = self.mask_token.to(x.dtype).expand(b, patches, width)
        sequence = sequence.scatter(1, keep.unsqueeze(-1).expand(-1, -1, width), x[:, 1:])
        decoded = self.blocks(torch.cat([x[:, :1], sequence], dim=1))[:, 1:]
        return self.predict(_gather(decoded, wanted))


class MAE(SSLMethod):
    views = 1
    preferred_encoder = "vit_tiny"
    encoders = ("vit_tiny",)
    augmentation = ViewRecipe(
        crop_scale=(0.2, 1.0), jitter_prob=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
        grayscale_prob=0.0, blur_probs=(0.0, 0.0), solarize_probs=(0.0, 0.0),
    )

    def __init__(self, encoder: VisionTransformer, mask_ratio: float = 0.75, decoder_dim: int = 128,
                 decoder_depth: int = 2, share_decoder: bool = True):
        super().__init__()
        if not isinstance(encoder, VisionTransformer):
            raise ValueError(f"MAE masks a VisionTransformer's patches; got {type(encoder).__name__}")
        self.encoder = encoder
        self.patch = encoder.patch_size
        grid = encoder.image_size // self.patch
        self.decoder = Decoder(grid, encoder.hidden_dim, decoder_dim, decoder_depth, 3 * self.patch ** 2)
        self.projector = nn.Identity()  # the collapse monitor reads the ViT's feature itself
        self.mask_ratio = mask_ratio
        self.shared_prefixes = ("encoder.", "decoder.") if share_decoder else ("encoder.",)
        # A plain attribute, not a buffer: not state, the seeded start a site's local decoder
        # is rebuilt to.
        self._decoder_start = {k: v.clone() for k, v in self.decoder.state_dict().items()}

    @classmethod
    def from_config(cls, encoder: nn.Module, feature_dim: int, heads: HeadSizes, cfg: RunConfig) -> MAE:
        return cls(encoder, mask_ratio=cfg.mae_mask_ratio, decoder_dim=cfg.mae_decoder_dim,
                   decoder_depth=cfg.mae_decoder_depth, share_decoder=cfg.mae_share_decoder)

    def loss(self, images: torch.Tensor, keep: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The reconstruction loss of `images` with the patches at `keep` visible and those at
        `masked` predicted (index tensors [B, K] and [B, N - K])."""
        encoded = encode_visible(self.encoder, images, keep)
        prediction = self.decoder(encoded, keep, masked)
        return reconstruction_loss(prediction, _gather(patchify(images, self.patch), masked))

    def forward(self, *views: torch.Tensor) -> torch.Tensor:
        images = torch.cat(views) if len(views) > 1 else views[0]
        patches = (images.shape[-1] // self.patch) ** 2
        keep, masked = random_masking(len(images), patches, self.mask_ratio, images.device)
        return self.loss(images, keep, masked)

    def follow_global(self) -> None:
        """A local decoder is the site's own, not a copy of a shared network: kept."""

    @torch.no_grad()
    def init_local(self) -> None:
        if "decoder." not in self.shared_prefixes:
            self.decoder.load_state_dict(self._decoder_start)
