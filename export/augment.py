"""Training augmentation: the jitter a fixed camera over a fixture really shows.

uint8 crops (n, height, width) in, uint8 crops of the same shape out; numpy
and OpenCV with an explicit Generator, so a seed draws the same jitter.

    geometry     shift of a few % of the crop, rotation of a few degrees,
                 scale of a few %, borders replicated; flips only with
                 allow_flips (a mirrored part can be a defect)
    photometric  contrast and brightness around a fixed pivot, gamma,
                 Gaussian noise, sometimes a slight blur

The trunk standardizes each crop, so brightness and contrast alone change
little; gamma, noise and blur are what another camera or lamp adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

LIGHTING_PIVOT = 128.0  # fixed pivot: a defect changes only its own pixels


@dataclass(frozen=True)
class Augmentation:
    """One recipe; the field defaults are the strong one."""

    shift: float = 0.06  # fraction of the crop's width / height (+-2 px on 36x26)
    rotate_deg: float = 3.0
    scale: float = 0.03
    brightness: float = 0.10
    contrast: float = 0.15
    gamma: float = 0.2  # log-uniform in [1 / (1 + g), 1 + g]
    noise_sigma: float = 4.0  # grey levels, drawn uniformly up to this per crop
    blur_p: float = 0.2  # share of crops blurred
    blur_sigma: tuple[float, float] = (0.3, 0.7)  # pixels of the model input


# Named recipes (TrainConfig.augmentation). "light" is the default: rotations and blur erase part of what
# separates thin defects at 36 x 26 (the measurements: docs/model.md, "Generalization (issue 15)").
STRONG_AUGMENTATION = Augmentation()
MEDIUM_AUGMENTATION = Augmentation(
    shift=0.06, rotate_deg=1.5, scale=0.02, brightness=0.10, contrast=0.10, gamma=0.1, noise_sigma=3.0, blur_p=0.0
)
# Shifts of +-6 % (2 px), light +-10 %, noise up to 3 grey levels.
LIGHT_AUGMENTATION = Augmentation(
    shift=0.06, rotate_deg=0.0, scale=0.0, brightness=0.10, contrast=0.10, gamma=0.0, noise_sigma=3.0, blur_p=0.0
)
NO_AUGMENTATION = Augmentation(
    shift=0.0, rotate_deg=0.0, scale=0.0, brightness=0.0, contrast=0.0, gamma=0.0, noise_sigma=0.0, blur_p=0.0
)
AUGMENTATIONS = {
    "light": LIGHT_AUGMENTATION,
    "medium": MEDIUM_AUGMENTATION,
    "strong": STRONG_AUGMENTATION,
    "none": NO_AUGMENTATION,
}
DEFAULT_AUGMENTATION = LIGHT_AUGMENTATION


def augment(
    crops: np.ndarray, rng: np.random.Generator, allow_flips: bool = False, recipe: Augmentation = DEFAULT_AUGMENTATION
) -> np.ndarray:
    """Randomly moved, relit, noisy copies of uint8 crops (same shape and dtype)."""
    crops = np.asarray(crops)
    if crops.ndim != 3 or crops.dtype != np.uint8:
        raise ValueError(f"augment wants uint8 crops (n, height, width), got {crops.dtype} {crops.shape}")
    n = len(crops)
    out = geometric(crops, rng, recipe).astype(np.float32)
    if allow_flips:
        flip_h = rng.random(n) < 0.5
        flip_v = rng.random(n) < 0.5
        out[flip_h] = out[flip_h, :, ::-1]
        out[flip_v] = out[flip_v, ::-1, :]
    return photometric(out, rng, recipe)


def geometric(crops: np.ndarray, rng: np.random.Generator, recipe: Augmentation) -> np.ndarray:
    n, height, width = crops.shape
    shift = rng.uniform(-recipe.shift, recipe.shift, (n, 2)) * np.array([width, height])
    angle = rng.uniform(-recipe.rotate_deg, recipe.rotate_deg, n)
    scale = rng.uniform(1 - recipe.scale, 1 + recipe.scale, n)
    if not (recipe.shift or recipe.rotate_deg or recipe.scale):
        return crops.copy()
    center = ((width - 1) / 2.0, (height - 1) / 2.0)
    out = np.empty_like(crops)
    for i in range(n):
        matrix = cv2.getRotationMatrix2D(center, float(angle[i]), float(scale[i]))
        matrix[:, 2] += shift[i]
        out[i] = cv2.warpAffine(
            crops[i], matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
    return out


def photometric(out: np.ndarray, rng: np.random.Generator, recipe: Augmentation) -> np.ndarray:
    """float32 crops in grey levels -> relit, gamma-bent, blurred, noisy uint8 crops."""
    n = len(out)
    contrast = rng.uniform(1 - recipe.contrast, 1 + recipe.contrast, (n, 1, 1)).astype(np.float32)
    brightness = rng.uniform(1 - recipe.brightness, 1 + recipe.brightness, (n, 1, 1)).astype(np.float32)
    out = ((out - LIGHTING_PIVOT) * contrast + LIGHTING_PIVOT) * brightness
    if recipe.gamma:
        log_gamma = np.log1p(recipe.gamma)
        gamma = np.exp(rng.uniform(-log_gamma, log_gamma, (n, 1, 1))).astype(np.float32)
        out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** gamma
    if recipe.blur_p:
        blurred = np.flatnonzero(rng.random(n) < recipe.blur_p)
        sigmas = rng.uniform(*recipe.blur_sigma, len(blurred))
        for i, sigma in zip(blurred, sigmas):
            out[i] = cv2.GaussianBlur(out[i], (0, 0), float(sigma), borderType=cv2.BORDER_REPLICATE)
    if recipe.noise_sigma:
        sigma = rng.uniform(0, recipe.noise_sigma, (n, 1, 1)).astype(np.float32)
        out = out + rng.standard_normal(out.shape, dtype=np.float32) * sigma
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
