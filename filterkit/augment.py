"""Image transforms: the deterministic eval transform and MoCo v3's two random views."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(
    img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """PIL RGB image -> normalised float tensor [3, S, S]: shorter side to S, centre crop."""
    return v2.Compose(
        [
            v2.Resize(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def _view(img_size: int, blur_p: float, solarize_p: float, min_scale: float,
          mean: Sequence[float], std: Sequence[float], max_scale: float = 1.0) -> v2.Compose:
    steps = [
        v2.RandomResizedCrop(img_size, scale=(min_scale, max_scale), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if blur_p > 0:
        kernel = max(3, int(0.1 * img_size) // 2 * 2 + 1)  # ~10 % of the side, odd
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    steps += [
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]
    return v2.Compose(steps)


# Multi-crop's local views (Caron et al. 2020, section 3.2) are cropped from this fraction of
# the image area up to the global views' min_crop_scale (SwAV and DINO: 0.05-0.14 local,
# 0.14-1 global), and blurred with p = 0.5 (DINO's local recipe; no solarize).
LOCAL_MIN_SCALE = 0.05
LOCAL_BLUR_P = 0.5


def default_local_crop_size(img_size: int, token_stride: int) -> int:
    """3/7 of the input side (SwAV's 96 px at 224), rounded to a multiple of the token stride."""
    return max(token_stride, round(img_size * 3 / 7 / token_stride) * token_stride)


class TwoViews:
    """The BYOL augmentations MoCo v3 uses (Grill et al. 2020, table 6): two asymmetric views.

    view 1: crop (scale 0.08-1), colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grey p=0.2,
            blur p=1.0, flip;
    view 2: the same with blur p=0.1 and solarize p=0.2.
    Images of 64 px or less get no blur (it erases them).
    ``local_crops`` > 0 adds multi-crop's local views (``local``): ``local_size`` px, crop
    scale LOCAL_MIN_SCALE to ``min_scale``, view 1's recipe with blur p = LOCAL_BLUR_P.

        >>> x1, x2 = TwoViews(224)(pil_image)
        >>> views = TwoViews(224, 0.14, local_crops=6, local_size=96); locals_ = views.local(pil_image)
    """

    def __init__(self, img_size: int, min_scale: float = 0.08,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 local_crops: int = 0, local_size: int | None = None) -> None:
        small = img_size <= 64
        self.view1 = _view(img_size, 0.0 if small else 1.0, 0.0, min_scale, mean, std)
        self.view2 = _view(img_size, 0.0 if small else 0.1, 0.2, min_scale, mean, std)
        self.local_crops = local_crops
        if local_crops:
            self.local_view = _view(local_size, 0.0 if small else LOCAL_BLUR_P, 0.0, LOCAL_MIN_SCALE, mean, std,
                                    max_scale=min_scale)

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view1(image), self.view2(image)

    def local(self, image) -> list[torch.Tensor]:
        """The ``local_crops`` local views of ``image`` (none without multi-crop)."""
        return [self.local_view(image) for _ in range(self.local_crops)]


# -- batched views, for images already in memory (decoded once, augmented on the device) -------
# The same recipe as TwoViews, applied to a whole uint8 batch [B, 3, H, W] with per-image
# random parameters, so a GPU run is not held back by per-image PIL work on the CPU.
# Differences from the PIL path: crops are resampled by RoI-Align (bilinear, averaged over
# each output pixel's footprint), the colour-jitter order is random per batch rather than per
# image, hue is rotated in YIQ space (a linear stand-in for the HSV hue shift), and crops come
# from the centre square kept in memory (see store_transform), not from the whole photo.
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
_RGB_TO_YIQ = torch.tensor(((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312)))
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


# Random parameters are drawn on the CPU from one generator and then moved: the same seed
# gives the same views on any device, and no draw waits on the GPU.
def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(n, generator=g)).to(device)


def _chance(n: int, p: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g) < p).to(device)


def _grey(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GREY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _crop_boxes(n: int, height: int, width: int, min_scale: float, g: torch.Generator, device,
                tries: int = 10, max_scale: float = 1.0) -> torch.Tensor:
    """RandomResizedCrop's boxes (area fraction U(min_scale, max_scale), log-uniform aspect
    3/4-4/3, first of ``tries`` draws that fits, else the whole image) as [n, 4] x0, y0, x1, y1."""
    area = _uniform(n * tries, min_scale, max_scale, g, device).view(n, tries) * height * width
    log_ratio = _uniform(n * tries, math.log(3 / 4), math.log(4 / 3), g, device).view(n, tries)
    w = (area * log_ratio.exp()).sqrt()
    h = (area / log_ratio.exp()).sqrt()
    fits = (w <= width) & (h <= height)
    first = fits.float().argmax(1, keepdim=True)  # index of the first fitting draw
    w = torch.where(fits.any(1), w.gather(1, first).squeeze(1), torch.full_like(w[:, 0], width))
    h = torch.where(fits.any(1), h.gather(1, first).squeeze(1), torch.full_like(h[:, 0], height))
    x0 = _uniform(n, 0.0, 1.0, g, device) * (width - w)
    y0 = _uniform(n, 0.0, 1.0, g, device) * (height - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def _jitter(x: torch.Tensor, apply: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """ColorJitter(0.4, 0.4, 0.2, 0.1) on the images where ``apply`` is true."""
    n, dev = x.shape[0], x.device
    one = torch.ones(n, device=dev)
    factors = {
        "brightness": torch.where(apply, _uniform(n, 0.6, 1.4, g, dev), one),
        "contrast": torch.where(apply, _uniform(n, 0.6, 1.4, g, dev), one),
        "saturation": torch.where(apply, _uniform(n, 0.8, 1.2, g, dev), one),
        "hue": torch.where(apply, _uniform(n, -0.1, 0.1, g, dev), torch.zeros_like(one)),
    }
    order = torch.randperm(4, generator=g).tolist()
    for name in [list(factors)[i] for i in order]:
        f = factors[name].view(n, 1, 1, 1)
        if name == "brightness":
            x = x * f
        elif name == "contrast":
            x = f * x + (1 - f) * _grey(x).mean((2, 3), keepdim=True)
        elif name == "saturation":
            x = f * x + (1 - f) * _grey(x)
        else:  # rotate the chroma plane (I, Q) by 2*pi*hue
            angle = 2 * math.pi * factors["hue"]
            cos, sin = angle.cos(), angle.sin()
            rot = torch.zeros(n, 3, 3, device=dev, dtype=x.dtype)
            rot[:, 0, 0] = 1
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
            m = _YIQ_TO_RGB.to(dev, x.dtype) @ rot @ _RGB_TO_YIQ.to(dev, x.dtype)  # [n, 3, 3]
            x = torch.einsum("nij,njhw->nihw", m, x)
        x = x.clamp(0, 1)
    return x


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur of each image with its own sigma [n], reflect padding."""
    n, c, h, w = x.shape
    offsets = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(n, 1).to(x.dtype) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, size]
    flat = x.reshape(1, n * c, h, w)
    pad = size // 2
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, size), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel.view(n * c, 1, size, 1), groups=n * c)
    return flat.view(n, c, h, w)


def _blur(x: torch.Tensor, apply: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur, sigma U(0.1, 2.0) per image, kernel ~10 % of the side (as TwoViews)."""
    size = max(3, int(0.1 * x.shape[2]) // 2 * 2 + 1)
    sigma = _uniform(x.shape[0], 0.1, 2.0, g, x.device)
    return torch.where(apply.view(-1, 1, 1, 1), _gaussian_blur(x, sigma, size), x)


def _resample(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each uint8 image to its box [x0, y0, x1, y1] (pixel edges) and resize to
    ``size``: float [n, 3, size, size] in 0..1. RoI-Align with an adaptive sampling ratio
    averages each output pixel's whole footprint, so shrinking does not alias."""
    n = images.shape[0]
    rois = torch.cat([torch.arange(n, device=images.device, dtype=boxes.dtype).view(n, 1), boxes], 1)
    x = roi_align(images.float() / 255, rois, (size, size), sampling_ratio=0, aligned=True)
    return x.clamp(0, 1)


def batch_view(images: torch.Tensor, img_size: int, min_scale: float, g: torch.Generator,
               jitter_p: float = 0.8, grey_p: float = 0.2, blur_p: float = 0.0, solarize_p: float = 0.0,
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
               max_scale: float = 1.0) -> torch.Tensor:
    """One random view of each image of a uint8 batch [B, 3, H, W]: normalised float [B, 3, S, S]."""
    n, _, height, width = images.shape
    dev = images.device
    x = _resample(images, _crop_boxes(n, height, width, min_scale, g, dev, max_scale=max_scale), img_size)
    x = _jitter(x, _chance(n, jitter_p, g, dev), g)
    x = torch.where(_chance(n, grey_p, g, dev).view(n, 1, 1, 1), _grey(x).expand_as(x), x)
    if blur_p > 0:
        x = _blur(x, _chance(n, blur_p, g, dev), g)
    if solarize_p > 0:
        x = torch.where(_chance(n, solarize_p, g, dev).view(n, 1, 1, 1) & (x >= 128 / 255), 1 - x, x)
    x = torch.where(_chance(n, 0.5, g, dev).view(n, 1, 1, 1), x.flip(3), x)
    m = torch.tensor(mean, device=dev, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=dev, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


class BatchTwoViews:
    """TwoViews' asymmetric recipe for uint8 batches on any device (see ``batch_view``), and
    its local views (``local``)."""

    def __init__(self, img_size: int, min_scale: float = 0.08,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 local_crops: int = 0, local_size: int | None = None) -> None:
        small = img_size <= 64
        common = dict(img_size=img_size, min_scale=min_scale, mean=mean, std=std)
        self.view1 = dict(common, blur_p=0.0 if small else 1.0, solarize_p=0.0)
        self.view2 = dict(common, blur_p=0.0 if small else 0.1, solarize_p=0.2)
        self.local_crops = local_crops
        self.local_view = dict(common, img_size=local_size, min_scale=LOCAL_MIN_SCALE, max_scale=min_scale,
                               blur_p=0.0 if small else LOCAL_BLUR_P, solarize_p=0.0)

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_view(images, g=g, **self.view1), batch_view(images, g=g, **self.view2)

    def local(self, images: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
        """The ``local_crops`` local views of each image, drawn after the global ones from ``g``."""
        return [batch_view(images, g=g, **self.local_view) for _ in range(self.local_crops)]


def store_size(img_size: int) -> int:
    """Side of the square each image is kept at in memory: room for crops to keep detail
    (2x for small models, 8/7 as in the usual 256 -> 224 for large ones)."""
    return img_size * 2 if img_size <= 64 else int(round(img_size * 8 / 7))


def store_transform(size: int) -> v2.Compose:
    """PIL RGB -> uint8 [3, size, size]: shorter side to ``size``, centre crop. Random crops
    are then taken from that square: the edges of a non-square photo are never seen."""
    return v2.Compose([v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(size), v2.PILToTensor()])
