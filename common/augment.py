"""Two-view SSL augmentation on batches of uint8 images, with per-sample randomness.

Why not torchvision: a v2 transform applied to a batched tensor draws one set of
random parameters for the whole batch (every image gets the same crop), and
applying it image by image costs more CPU than a compact encoder's training step.
Here the random parameters are drawn per sample as small tensors, and each
transform is a few tensor ops over the whole batch, so one code path serves CPU
and CUDA.

What each view gets is the method's recipe (``ViewRecipe``, declared by each
method in ``common/methods/``), at the run's image size (``ViewRecipe.at``).
Pipeline per view, in the papers' order: random resized crop + horizontal flip
(one ``grid_sample``), colour jitter with probability ``jitter_prob``
(brightness, contrast, saturation and hue in a random order drawn per sample, as
torchvision's ColorJitter draws one per call), grayscale, gaussian blur,
solarize, normalise. Pixels stay float in [0, 1] until the final normalise.

Randomness: parameters are drawn with the given generator (the global CPU one
when none is given) on that generator's device, and the per-sample bookkeeping
(crop boxes, jitter orders and 3x3 colour matrices, blur kernels, which samples
to blur) is done on the CPU, then copied to the images' device. With a CPU
generator (what ``common.training`` passes) a seed therefore gives the same
views whatever device the images are on, up to floating-point rounding in the
transforms, and the draws cost no device sync; the copies of the small
parameter tensors to a CUDA device are ordinary blocking host-to-device copies.
A CUDA generator draws a different random stream and costs a sync per draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["MEAN", "STD", "AugmentConfig", "TwoViewAugment", "ViewRecipe", "normalize"]

MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# ITU-R 601 luma, the weights of torchvision's rgb_to_grayscale.
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_RGB_TO_YIQ = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [0.595716, -0.274453, -0.321263],
        [0.211456, -0.522591, 0.311135],
    ]
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)

# torchvision's RandomResizedCrop defaults, and BYOL's blur sigma range.
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_ATTEMPTS = 10
_BLUR_SIGMA = (0.1, 2.0)


def _normalize_unit(images: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] -> normalised, written straight into channels_last.

    One fused pass (x * 1/std - mean/std) into a channels_last buffer, instead
    of subtract, divide and a layout copy: the encoders run ~3x faster on CPU
    with channels_last input.
    """
    std = torch.tensor(STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    out = torch.empty_like(images, memory_format=torch.channels_last)
    return torch.addcmul(-mean / std, images, 1.0 / std, out=out)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 normalised with MEAN/STD, in channels_last."""
    return _normalize_unit(images.float().div_(255.0))


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings at one image size; pairs are (view 1, view 2).

    A run builds this from its method's ``ViewRecipe`` (``ViewRecipe.at``); the
    defaults here are BYOL's recipe, so a bare ``AugmentConfig(image_size=...)``
    still gives BYOL's views.
    """

    image_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_probs: tuple[float, float] = (1.0, 0.1)
    solarize_probs: tuple[float, float] = (0.0, 0.2)
    flip_prob: float = 0.5  # last, so the fields above keep their positions

    def __post_init__(self) -> None:
        if self.image_size < 2:
            raise ValueError(f"image_size={self.image_size}: must be >= 2")
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale={self.crop_scale}: need 0 < low <= high <= 1")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue={self.hue}: must be in [0, 0.5]")
        for name in ("flip_prob", "jitter_prob", "grayscale_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1]")
        for name in ("blur_probs", "solarize_probs"):
            pair = getattr(self, name)
            if len(pair) != 2 or not all(0.0 <= p <= 1.0 for p in pair):
                raise ValueError(f"{name}={pair}: need (view 1, view 2) probabilities in [0, 1]")

    @property
    def blur_kernel_size(self) -> int:
        # About 10% of the image side, odd (BYOL: 23 px at 224); 3 px at 32.
        size = max(3, int(0.1 * self.image_size))
        return size if size % 2 == 1 else size + 1


@dataclass(frozen=True, kw_only=True)
class ViewRecipe:
    """A method's two-view augmentation, as its paper gives it at ImageNet size.

    Every field is spelled out by the method that declares it (``common/methods/``,
    with its source); pairs are (view 1, view 2). The jitter strengths are
    torchvision ColorJitter's (factors drawn from [1 - s, 1 + s], hue shift from
    [-h, h]).
    """

    crop_scale: tuple[float, float]
    jitter_prob: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale_prob: float
    blur_probs: tuple[float, float]
    solarize_probs: tuple[float, float]
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        self.at(32)  # one set of checks, AugmentConfig's

    def at(self, image_size: int, *, blur: bool = True,
           crop_min_scale: float | None = None) -> AugmentConfig:
        """This recipe at ``image_size``, with the run config's two overrides.

        ``blur`` False drops the gaussian blur from both views (the run config's
        ``blur`` key, default false: at 32 px SimSiam's and SimCLR's CIFAR settings
        use none); True keeps the recipe's per-view blur probabilities.
        ``crop_min_scale``, when given, replaces the recipe's lower crop bound (the
        run config's ``crop-min-scale`` always gives one). Everything else (jitter,
        grayscale, solarize, flip) is the recipe's.
        """
        crop = self.crop_scale if crop_min_scale is None else (crop_min_scale, 1.0)
        return AugmentConfig(
            image_size=image_size,
            crop_scale=crop,
            jitter_prob=self.jitter_prob,
            brightness=self.brightness,
            contrast=self.contrast,
            saturation=self.saturation,
            hue=self.hue,
            grayscale_prob=self.grayscale_prob,
            blur_probs=self.blur_probs if blur else (0.0, 0.0),
            solarize_probs=self.solarize_probs,
            flip_prob=self.flip_prob,
        )


# ----------------------------------------------------------------- random draws
# Every parameter is drawn for every sample, even where its transform ends up
# unused, so the random stream (hence the views for a seed) does not depend on
# which transforms fire.


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) drawn on the generator's device, returned on the CPU.

    A CPU generator (or none) costs nothing extra; a CUDA generator costs a sync
    per draw, which is why a CPU generator is the one to use.
    """
    device = generator.device if generator is not None else None
    return torch.rand(shape, generator=generator, device=device).cpu()


def _uniform(shape, low: float, high: float, generator) -> torch.Tensor:
    return _rand(shape, generator) * (high - low) + low


def _bernoulli(n: int, p: float, generator) -> torch.Tensor:
    return _rand((n,), generator) < p


def _sample_crop_boxes(
    n: int, height: int, width: int, scale: tuple[float, float], generator
) -> torch.Tensor:
    """[n, 4] boxes (x0, y0, w, h) in pixels, distributed as RandomResizedCrop's.

    torchvision retries up to 10 times until a box fits, then falls back to a
    centre crop; here the 10 attempts are drawn at once and the first that fits
    is kept. Sizes and offsets stay continuous: grid_sample needs no whole pixels.
    """
    attempts = (n, _CROP_ATTEMPTS)
    target_area = height * width * _uniform(attempts, *scale, generator)
    log_ratio = _uniform(attempts, *(math.log(r) for r in _CROP_RATIO), generator)
    w = torch.sqrt(target_area * torch.exp(log_ratio))
    h = torch.sqrt(target_area / torch.exp(log_ratio))
    fits = (w <= width) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax: first of ties
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    # torchvision's fallback: the whole image, trimmed to the nearest allowed ratio.
    any_fit = fits.any(dim=1)
    w = torch.where(any_fit, w, min(width, height * _CROP_RATIO[1]))
    h = torch.where(any_fit, h, min(height, width / _CROP_RATIO[0]))

    offset = _rand((n, 2), generator)
    x0 = torch.where(any_fit, offset[:, 0], 0.5) * (width - w)
    y0 = torch.where(any_fit, offset[:, 1], 0.5) * (height - h)
    return torch.stack([x0, y0, w, h], dim=1)


# ------------------------------------------------------ per-sample parameters
# Small tensors ([B], [B, 2, 3], [B, 3, 3], [B, k]), built on the CPU.


def _crop_flip_theta(
    boxes: torch.Tensor, flip: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """[B, 2, 3] affine maps from output to input coordinates for affine_grid.

    With align_corners=False, normalised -1/+1 are the outer edges of the first
    and last pixel, so a box edge e maps to 2 e / side - 1; the whole-image box
    samples exactly at the input's pixel centres (identity at equal sizes).
    """
    x0, y0, w, h = boxes.unbind(dim=1)
    theta = torch.zeros(len(boxes), 2, 3, dtype=boxes.dtype, device=boxes.device)
    theta[:, 0, 0] = torch.where(flip, -w, w) / width  # a negative x scale mirrors the crop
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    return theta


# Colour jitter as torchvision's ColorJitter: brightness, contrast, saturation
# and hue, each followed by a clamp to [0, 1], in an order drawn per sample. Each
# of the four is a 3x3 matrix on a pixel's RGB, contrast plus a blend toward the
# image's mean grey, so step k of the order is one batched matmul whatever op
# each sample has there: four passes over the pixels for any mix of the 24
# orders, with the clamps where torchvision has them.

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
_NO_JITTER = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the four factors that change nothing


def _to_gray_matrix(n: int) -> torch.Tensor:
    """[n, 3, 3]: every output channel is the pixel's luma."""
    return _LUMA.expand(n, 3, 3)


def _saturation_matrix(factor: torch.Tensor) -> torch.Tensor:
    # As torchvision: blend each pixel with its own grey level.
    factor = factor.view(-1, 1, 1)
    return factor * torch.eye(3) + (1 - factor) * _to_gray_matrix(len(factor))


def _hue_matrix(shift: torch.Tensor) -> torch.Tensor:
    """Rotation of the YIQ chroma plane by ``shift`` turns; exactly the identity at 0.

    Stands in for torchvision's per-pixel RGB -> HSV -> RGB round trip and stays
    linear: greys stay grey and luma is kept, which is what the augmentation needs.
    """
    angle = -shift * (2 * math.pi)  # sign: turns the same way as torchvision's adjust_hue
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(len(shift), 3, 3)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    # The YIQ round trip is exact only up to rounding; no shift must change nothing.
    turned = _YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ
    return torch.where((shift == 0).view(-1, 1, 1), torch.eye(3), turned)


def _jitter_steps(order: torch.Tensor, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step of the order, each sample's matrix and contrast factor.

    ``order`` [B, 4]: the op each sample applies at each step; ``factors`` [B, 4]:
    its brightness, contrast and saturation factors and hue shift. Returns
    matrices [4, B, 3, 3] and contrast [4, B] (1 where the step is not contrast).
    """
    n = len(order)
    eye = torch.eye(3).expand(n, 3, 3)
    by_op = torch.stack(
        [
            factors[:, BRIGHTNESS].view(-1, 1, 1) * eye,
            factors[:, CONTRAST].view(-1, 1, 1) * eye,
            _saturation_matrix(factors[:, SATURATION]),
            _hue_matrix(factors[:, HUE]),
        ],
        dim=1,
    )  # [B, op, 3, 3]
    samples = torch.arange(n)
    matrices = torch.stack([by_op[samples, order[:, k]] for k in range(4)])
    contrast = torch.where(order.T == CONTRAST, factors[:, CONTRAST], 1.0)
    return matrices, contrast


def _gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """[B, size] normalised 1-D gaussian kernels, one sigma per sample."""
    x = torch.arange(size, dtype=sigma.dtype, device=sigma.device) - (size - 1) / 2
    kernels = torch.exp(-(x**2) / (2 * sigma.view(-1, 1) ** 2))
    return kernels / kernels.sum(dim=1, keepdim=True)


class _ViewParams(NamedTuple):
    """One view's per-sample parameters, on the CPU (moved to the images when used)."""

    theta: torch.Tensor  # [B, 2, 3] crop + flip
    jitter: torch.Tensor  # [B] bool
    jitter_order: torch.Tensor  # [B, 4] the op (BRIGHTNESS, ...) each sample applies at each step
    jitter_factors: torch.Tensor  # [B, 4] brightness, contrast, saturation, hue (no-ops: no jitter)
    gray: torch.Tensor  # [B] bool
    blur: torch.Tensor  # [B] bool
    blur_kernels: torch.Tensor  # [B, k]
    solarize: torch.Tensor  # [B] bool


def _draw_view_params(
    cfg: AugmentConfig,
    n: int,
    height: int,
    width: int,
    blur_prob: float,
    solarize_prob: float,
    generator: torch.Generator | None,
) -> _ViewParams:
    g = generator
    boxes = _sample_crop_boxes(n, height, width, cfg.crop_scale, g)
    flip = _bernoulli(n, cfg.flip_prob, g)
    jitter = _bernoulli(n, cfg.jitter_prob, g)
    brightness = _uniform((n,), max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, g)
    contrast = _uniform((n,), max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, g)
    saturation = _uniform((n,), max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, g)
    hue = _uniform((n,), -cfg.hue, cfg.hue, g)
    gray = _bernoulli(n, cfg.grayscale_prob, g)
    blur = _bernoulli(n, blur_prob, g)
    sigma = _uniform((n,), *_BLUR_SIGMA, g)
    solarize = _bernoulli(n, solarize_prob, g)
    # Drawn last, so that the draws above are those of a pipeline without it.
    order = _rand((n, 4), g).argsort(dim=1)  # a uniform random permutation per sample

    # Samples without jitter get factors that change nothing, so the whole batch
    # runs the same ops and no sample is computed twice.
    factors = torch.stack([brightness, contrast, saturation, hue], dim=1)
    return _ViewParams(
        theta=_crop_flip_theta(boxes, flip, height, width),
        jitter=jitter,
        jitter_order=order,
        jitter_factors=torch.where(jitter.view(-1, 1), factors, _NO_JITTER),
        gray=gray,
        blur=blur,
        blur_kernels=_gaussian_kernels(sigma, cfg.blur_kernel_size),
        solarize=solarize,
    )


# ------------------------------------------------------------------ transforms
# Each takes the float batch [B, 3, H, W] in [0, 1] and per-sample parameters
# on the batch's device, and returns the batch in [0, 1]. Some work in place:
# the pipeline owns every batch after the crop, so no copy is needed.


def _crop_flip_resize(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Crop, mirror and resize every sample in one bilinear resample."""
    grid = F.affine_grid(theta, [len(theta), 3, size, size], align_corners=False)
    # Sample points stay inside the box, but the outer half of its edge pixels
    # lies beyond the last pixel centre: "border" clamps there instead of fading
    # towards zero.
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _mean_grey(images: torch.Tensor) -> torch.Tensor:
    # Luma is linear, so the mean luma is the luma of the channel means; no grey image is needed.
    return images.mean(dim=(2, 3)) @ _LUMA.to(images.device)


def _jitter_step(
    images: torch.Tensor, matrix: torch.Tensor, contrast: torch.Tensor, blends: bool
) -> torch.Tensor:
    """One step of each sample's jitter order: ``matrix @ rgb``, plus contrast's
    ``(1 - factor) * mean grey`` where ``blends``, clamped to [0, 1] as torchvision
    clamps after every op. For brightness and contrast the matrix is the factor
    times the identity; for saturation and hue, their colour matrices."""
    b, c, h, w = images.shape
    flat = images.reshape(b, c, h * w)
    if blends:
        offset = ((1 - contrast) * _mean_grey(images)).view(b, 1, 1)
        out = torch.baddbmm(offset, matrix, flat)
    else:
        out = torch.bmm(matrix, flat)
    return out.view(b, c, h, w).clamp_(0.0, 1.0)


def _colour_jitter(
    images: torch.Tensor, order: torch.Tensor, factors: torch.Tensor
) -> torch.Tensor:
    matrices, contrast = _jitter_steps(order, factors)  # on the CPU
    device = images.device
    for k in range(4):
        blends = bool((contrast[k] != 1).any())  # a CPU tensor: no device sync
        images = _jitter_step(images, matrices[k].to(device), contrast[k].to(device), blends)
    return images


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    luma = torch.einsum("bchw,c->bhw", images, _LUMA.to(images.device))
    return luma.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _gaussian_blur(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable blur, a different kernel per sample, as two grouped convolutions.

    Folding the batch into channels ([1, B*3, H, W] with groups=B*3) lets one
    conv call apply B different kernels. Reflect padding, as torchvision's.
    """
    b, c, h, w = images.shape
    size = kernels.shape[1]
    weight = kernels.repeat_interleave(c, dim=0)  # one kernel per (sample, channel)
    x = F.pad(images.reshape(1, b * c, h, w), [size // 2] * 4, mode="reflect")
    x = F.conv2d(x, weight.view(b * c, 1, 1, size), groups=b * c)
    x = F.conv2d(x, weight.view(b * c, 1, size, 1), groups=b * c)
    return x.view(b, c, h, w)


def _solarize(images: torch.Tensor) -> torch.Tensor:
    # Threshold 0.5: pixels >= 0.5 become 1 - x, i.e. min(x, 1 - x).
    return torch.minimum(images, 1.0 - images)


def _on_selected(
    images: torch.Tensor,
    selected: torch.Tensor,
    transform: Callable[..., torch.Tensor],
    *params: torch.Tensor,
) -> torch.Tensor:
    """Apply ``transform`` to the selected samples only, writing into ``images``.

    Cheaper than transforming the whole batch and selecting afterwards when few
    samples are picked (view 2 blurs 10% and solarizes 20%). ``selected`` is on
    the CPU, so finding the indices costs no device sync.
    """
    index = selected.nonzero().squeeze(1)
    if len(index) == 0:
        return images
    if len(index) == len(selected):
        return transform(images, *(p.to(images.device) for p in params))
    device = images.device
    picked = transform(images[index.to(device)], *(p[index].to(device) for p in params))
    return images.index_copy_(0, index.to(device), picked)


# -------------------------------------------------------------------- pipeline


def _unit(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return images.float().div_(255.0)


class TwoViewAugment:
    """Two differently augmented, normalised views of a uint8 batch; or, with ``views=1``
    (a method that trains on one view, as MAE), view 1 alone, still as a tuple.

    >>> view1, view2 = TwoViewAugment(AugmentConfig(image_size=32))(images_uint8)
    >>> (view1,) = TwoViewAugment(AugmentConfig(image_size=32), views=1)(images_uint8)
    """

    def __init__(self, cfg: AugmentConfig, views: int = 2) -> None:
        if views not in (1, 2):
            raise ValueError(f"views={views}: a recipe makes 1 or 2 views")
        self.cfg = cfg
        self.views = views

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, ...]:
        unit = _unit(images)  # shared by both views, never modified
        blur, solarize = self.cfg.blur_probs, self.cfg.solarize_probs
        return tuple(self._view(unit, blur[i], solarize[i], generator) for i in range(self.views))

    def one_view(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """View 1 alone: supervised fine-tuning needs one augmented copy per image."""
        return self._view(_unit(images), self.cfg.blur_probs[0], self.cfg.solarize_probs[0], generator)

    def _view(
        self,
        unit: torch.Tensor,
        blur_prob: float,
        solarize_prob: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        cfg = self.cfg
        n, _, height, width = unit.shape
        p = _draw_view_params(cfg, n, height, width, blur_prob, solarize_prob, generator)
        device = unit.device

        # A fresh tensor from here on: the in-place steps below never touch `unit`.
        x = _crop_flip_resize(unit, p.theta.to(device), cfg.image_size)
        if p.jitter.any():
            x = _colour_jitter(x, p.jitter_order, p.jitter_factors)
        x = _on_selected(x, p.gray, _grayscale)
        x = _on_selected(x, p.blur, _gaussian_blur, p.blur_kernels)
        x = _on_selected(x, p.solarize, _solarize)
        return _normalize_unit(x)
