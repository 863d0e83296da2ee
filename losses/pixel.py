"""Pixel-space losses: L1, MSE, Charbonnier, SSIM and a frequency-domain L1.

All take (restored, gt), both [B, 3, H, W] in [0, 1], and return a scalar (mean over everything).
"""

import torch
import torch.nn.functional as F
from torch import nn


class L1Loss(nn.Module):
    """Mean absolute error, the fidelity term of SwinIR and PromptIR."""

    def forward(self, restored: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(restored, gt)


class MSELoss(nn.Module):
    """Mean squared error (the PSNR objective)."""

    def forward(self, restored: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(restored, gt)


class CharbonnierLoss(nn.Module):
    """A smooth L1: mean(sqrt(d^2 + eps^2)).

    We follow the MPRNet/Restormer convention, eps=1e-3 squared inside the root, which is the same
    as BasicSR's form sqrt(d^2 + eps) with eps=1e-6. BasicSR's default eps=1e-12 makes the loss an L1
    with a kink at zero; 1e-3 (a quarter of one 8-bit grey level) rounds that kink so the gradient of
    nearly-correct pixels fades out instead of flipping sign, which is the point of Charbonnier.
    """

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = eps

    def forward(self, restored: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        diff = restored - gt
        return torch.sqrt(diff * diff + self.eps * self.eps).mean()


class SSIMLoss(nn.Module):
    """1 - SSIM, so that lower is better like every other loss here.

    SSIM as in Wang et al. 2004: gaussian window 11x11 with sigma 1.5, constants for data range 1,
    computed per RGB channel on the 'valid' region (no padding) and averaged. This matches
    skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False).
    """

    def __init__(self, window_size: int = 11, sigma: float = 1.5):
        super().__init__()
        coords = torch.arange(window_size, dtype=torch.float32) - (window_size - 1) / 2
        g = torch.exp(-(coords**2) / (2 * sigma**2))
        g = g / g.sum()
        # One 2-D window per RGB channel for a depthwise conv: [3, 1, window, window].
        # Not persistent: it is a constant, so it has no place in checkpoints.
        self.register_buffer("window", torch.outer(g, g).expand(3, 1, window_size, window_size).contiguous(), persistent=False)

    def forward(self, restored: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        # Variances are E[x^2] - E[x]^2, a difference of close numbers: in half precision it
        # cancels to noise, so SSIM always runs in float32, even under autocast.
        with torch.autocast(device_type=restored.device.type, enabled=False):
            x, y = restored.float(), gt.float()

            def blur(t):
                return F.conv2d(t, self.window, groups=3)

            mu_x, mu_y = blur(x), blur(y)
            var_x = blur(x * x) - mu_x**2
            var_y = blur(y * y) - mu_y**2
            cov_xy = blur(x * y) - mu_x * mu_y
            c1, c2 = 0.01**2, 0.03**2
            ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
            return 1 - ssim_map.mean()


class FFTLoss(nn.Module):
    """L1 between the 2-D spectra of restored and gt (real and imaginary parts as separate values).

    Like the FFTLoss used with BasicSR (rfft2, stack real/imag, L1), with one change: norm="ortho"
    by default, which divides the spectrum by sqrt(H*W). Then the loss no longer grows with the patch
    size and sits on the same scale as L1, which keeps the weights an LLM picks comparable between
    losses. norm="backward" gives the unnormalised BasicSR values.
    """

    def __init__(self, norm: str = "ortho"):
        super().__init__()
        if norm not in ("ortho", "backward", "forward"):
            raise ValueError(f"FFT loss: norm must be 'ortho', 'backward' or 'forward', got {norm!r}")
        self.norm = norm

    def forward(self, restored: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        # FFTs of half-precision tensors are restricted to power-of-two sizes, so use float32.
        spec_restored = torch.fft.rfft2(restored.float(), norm=self.norm)  # complex [B, 3, H, W//2+1]
        spec_gt = torch.fft.rfft2(gt.float(), norm=self.norm)
        return F.l1_loss(torch.view_as_real(spec_restored), torch.view_as_real(spec_gt))
