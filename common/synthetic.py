"""The embedded default data set: 10 procedurally generated shape/texture classes with random
grey levels, position, scale and rotation, so class identity is shape, never colour. No files,
no download, deterministic by generator; rendered vectorised with torch."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

SYNTHETIC_CLASSES = (
    "disc",
    "ring",
    "square",
    "triangle",
    "cross",
    "horizontal-stripes",
    "vertical-stripes",
    "diagonal-stripes",
    "checkerboard",
    "dots",
)
_SYNTHETIC_MAX_ELEMENTS = 1 << 22  # floats per temporary tensor (16 MB)


def render_synthetic(labels: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Render one image per label (index into ``SYNTHETIC_CLASSES``) -> uint8 ``[n, 3, size, size]``.

    Classes 0-4 are shapes (disc, ring, square, triangle, cross) at a random position, scale
    and rotation; 5-9 are textures filling the image (stripes at 0/90/±45 degrees, checkerboard,
    dot lattice) at a random period and phase. Foreground and background are faintly tinted grey
    levels drawn independently of the class (with a minimum contrast), on a random gradient
    with smooth grey clutter and pixel noise. Masks are rendered at 2x and averaged, so edges are antialiased.
    Work is done class by class in large tensor ops (few parallel regions: robust when the
    cores are shared), in pieces of at most ``_SYNTHETIC_MAX_ELEMENTS`` floats.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    n = labels.shape[0]
    S = size
    G = 2 * S
    u01 = torch.rand((n, 6), generator=gen)
    is_texture = labels >= 5

    # Geometry: centre, scale and angle per image (output-pixel units).
    radius = S * (0.20 + 0.20 * u01[:, 0])
    period = S * (0.14 + 0.12 * u01[:, 0])
    period = torch.where(labels == 9, period * 1.35, period)  # dot lattices read better a little coarser
    scale = torch.where(is_texture, period, radius)
    margin = 0.55 * radius
    cx = torch.where(is_texture, S * u01[:, 1], margin + (S - 2 * margin) * u01[:, 1])
    cy = torch.where(is_texture, S * u01[:, 2], margin + (S - 2 * margin) * u01[:, 2])
    jitter = (u01[:, 3] - 0.5) * 0.4  # +-0.2 rad for oriented stripes
    free = u01[:, 3] * 2 * math.pi
    sign = torch.where(u01[:, 4] < 0.5, -1.0, 1.0)
    angle = torch.stack(
        [
            free,  # shapes: any rotation
            jitter,  # horizontal stripes
            math.pi / 2 + jitter,  # vertical stripes
            sign * math.pi / 4 + jitter,  # diagonal stripes, both diagonals (flip-invariant class)
            free,  # checkerboard
            free,  # dots
        ],
        dim=1,
    )
    which = torch.clamp(labels - 4, min=0)  # 0 for shapes, 1..5 for textures
    angle = angle.gather(1, which.view(-1, 1)).squeeze(1)
    cos, sin = angle.cos() / scale, angle.sin() / scale

    # Soft masks, class by class, rendered at 2x then averaged.
    coords = (torch.arange(G, dtype=torch.float32) + 0.5) / 2  # supersampled grid, output-pixel units
    soft = torch.empty((n, 1, S, S), dtype=torch.float32)
    per = max(1, _SYNTHETIC_MAX_ELEMENTS // (G * G))
    for c in range(len(SYNTHETIC_CLASSES)):
        members = (labels == c).nonzero().flatten()
        for s in range(0, members.numel(), per):
            sel = members[s : s + per]
            m = sel.numel()
            dx = coords.view(1, 1, G) - cx[sel].view(m, 1, 1)
            dy = coords.view(1, G, 1) - cy[sel].view(m, 1, 1)
            cs, sn = cos[sel].view(m, 1, 1), sin[sel].view(m, 1, 1)
            u = dx * cs + dy * sn
            v = dy * cs - dx * sn
            mask = _class_mask(c, u, v).to(torch.float32).unsqueeze(1)
            soft[sel] = F.avg_pool2d(mask, 2)

    # Colours: a grey level with a faint tint, for background and foreground alike, with a
    # minimum contrast. Saturated random colours would make colour the easiest cue for telling
    # one image from another (SSL's colour shortcut): an encoder would learn colour
    # histograms first, and those carry nothing about the class.
    def tinted(grey: torch.Tensor) -> torch.Tensor:
        return (grey.view(n, 1, 1, 1) + 0.06 * torch.randn((n, 3, 1, 1), generator=gen)).clamp(0, 1)

    bg_grey = 0.15 + 0.7 * torch.rand(n, generator=gen)
    offset = 0.35 + 0.3 * torch.rand(n, generator=gen)
    fg_grey = torch.where(bg_grey > 0.5, bg_grey - offset, bg_grey + offset).clamp(0, 1)
    bg0, fg = tinted(bg_grey), tinted(fg_grey)
    bg1 = (bg0 + 0.15 * torch.randn((n, 3, 1, 1), generator=gen)).clamp(0, 1)
    phi = u01[:, 5] * 2 * math.pi

    pix = (torch.arange(S, dtype=torch.float32) + 0.5) / S - 0.5
    out = torch.empty((n, 3, S, S), dtype=torch.uint8)
    per = max(1, _SYNTHETIC_MAX_ELEMENTS // (3 * S * S))
    for s in range(0, n, per):
        sl = slice(s, min(s + per, n))
        m = sl.stop - s
        t = pix.view(1, 1, S) * phi[sl].cos().view(m, 1, 1) + pix.view(1, S, 1) * phi[sl].sin().view(m, 1, 1) + 0.5
        bg = bg0[sl] + (bg1[sl] - bg0[sl]) * t.unsqueeze(1)
        bg += F.interpolate(0.10 * torch.randn((m, 1, 4, 4), generator=gen), size=(S, S), mode="bicubic", align_corners=False)  # grey clutter, like the colours
        fgs = fg[sl] + F.interpolate(0.05 * torch.randn((m, 3, 3, 3), generator=gen), size=(S, S), mode="bilinear", align_corners=False)
        img = torch.lerp(bg, fgs, soft[sl].expand(m, 3, S, S))
        img += 0.035 * torch.randn((m, 3, S, S), generator=gen)
        out[sl] = img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return out


def _class_mask(c: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if c == 0:  # disc
        return u * u + v * v < 1.0
    if c == 1:  # ring
        d2 = u * u + v * v
        return (d2 < 1.0) & (d2 > 0.52**2)
    if c == 2:  # square
        return torch.maximum(u.abs(), v.abs()) < 0.8
    if c == 3:  # equilateral triangle, inradius 0.6
        h = 0.8660254
        return (v < 0.6) & (-h * u - 0.5 * v < 0.6) & (h * u - 0.5 * v < 0.6)
    if c == 4:  # plus-shaped cross
        a, b = u.abs(), v.abs()
        return ((a < 0.3) & (b < 1.0)) | ((b < 0.3) & (a < 1.0))
    if c in (5, 6, 7):  # stripes (orientation is in the angle)
        return v - v.floor() < 0.5
    if c == 8:  # checkerboard
        return (u.floor() + v.floor()).remainder(2) < 0.5
    if c == 9:  # dot lattice
        fu = u - u.floor() - 0.5
        fv = v - v.floor() - 0.5
        return fu * fu + fv * fv < 0.3**2
    raise ValueError(c)


def write_image_folder(root: Path, per_class: int, seed: int = 0, classes: int = 4) -> Path:
    """A labelled folder of real 32 px PNG files in class subfolders, drawn by
    ``render_synthetic``: a small image folder for tests, benchmarks and trying the folder
    path (`--dataset imagefolder`) without any data."""
    from PIL import Image  # only this writer needs it

    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = render_synthetic(labels, 32, gen)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = Path(root) / SYNTHETIC_CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return Path(root)
