"""Unsharp masking of the ground truth, the Real-ESRGAN trick for sharper GAN-trained SR.

Real-ESRGAN trains its pixel and perceptual losses against a sharpened GT (the GAN loss still sees
the original GT), which pushes the generator towards crisper edges without asking the discriminator
to accept oversharpened images as real. The trainer applies `usm_sharp` to the GT when the config
switch is on; this module only supplies the operation.
"""

import torch
import torch.nn.functional as F


def gaussian_kernel1d(size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """OpenCV's getGaussianKernel(size, sigma=0): sigma derived from the size, weights summing to 1."""
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    # Made on `device`: a copy from the CPU would wait for the GPU's queued work at every training iteration.
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).to(dtype=dtype)


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise gaussian blur of x [B, C, H, W] with reflected borders (as OpenCV's default border)."""
    size, channels = kernel.numel(), x.shape[1]
    pad = size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    # The 2-D gaussian is separable: a row pass then a column pass, 2*size taps instead of size^2.
    x = F.conv2d(x, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def usm_sharp(img: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> torch.Tensor:
    """Unsharp mask img [B, C, H, W] in [0, 1], as Real-ESRGAN's usm_sharp / USMSharp.

    residual = img - gaussian_blur(img); where |residual| exceeds `threshold` (in 8-bit grey levels)
    the image becomes clip(img + weight * residual, 0, 1), blended through a blurred (soft) version
    of that mask so that sharpened and untouched regions meet without seams.
    The blur kernel has size `radius`, made odd (50 -> 51), with OpenCV's sigma for that size.
    """
    size = radius + 1 if radius % 2 == 0 else radius
    if min(img.shape[-2:]) <= size // 2:
        raise ValueError(f"usm_sharp: image {tuple(img.shape[-2:])} is too small for radius {radius}; it needs both sides > {size // 2}")
    kernel = gaussian_kernel1d(size, dtype=img.dtype, device=img.device)
    residual = img - _blur(img, kernel)
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft_mask = _blur(mask, kernel)
    sharp = torch.clamp(img + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img
