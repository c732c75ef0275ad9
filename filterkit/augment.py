"""Image transforms: the deterministic eval transform and MoCo v3's two random views."""

from __future__ import annotations

from collections.abc import Sequence

import torch
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
          mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    steps = [
        v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), antialias=True),
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


class TwoViews:
    """The BYOL augmentations MoCo v3 uses (Grill et al. 2020, table 6): two asymmetric views.

    view 1: crop (scale 0.08-1), colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grey p=0.2,
            blur p=1.0, flip;
    view 2: the same with blur p=0.1 and solarize p=0.2.
    Images of 64 px or less get no blur (it erases them).

        >>> x1, x2 = TwoViews(224)(pil_image)
    """

    def __init__(self, img_size: int, min_scale: float = 0.08,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        small = img_size <= 64
        self.view1 = _view(img_size, 0.0 if small else 1.0, 0.0, min_scale, mean, std)
        self.view2 = _view(img_size, 0.0 if small else 0.1, 0.2, min_scale, mean, std)

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view1(image), self.view2(image)
