"""RISR (real-world image SR) training data: GT crops, and Real-ESRGAN's second-order degradation
that turns a batch of GT crops into realistic LR inputs on the fly (on the GPU when gt is there).

Pipeline (Wang et al., Real-ESRGAN, 2021; defaults are its train_realesrgan_x4plus settings):
  stage 1: blur (random kernel) -> random resize -> Gaussian or Poisson noise -> JPEG
  stage 2: blur (with prob. 0.8)  -> random resize -> Gaussian or Poisson noise
  final, in random order: [resize to GT/scale + sinc filter] then JPEG, or JPEG then [resize + sinc]
  clamp and round to 8 bits.
Which draws are per image and which per batch follows Real-ESRGAN:
  per image: blur kernels (type, size, sigmas, angle, beta, sinc cutoff), the final sinc filter,
             noise level, gray-vs-colour noise, JPEG quality;
  per batch: resize direction, scale and interpolation mode, Gaussian-vs-Poisson, whether the
             second blur is applied, the order of the final step.
The JPEG steps are Real-ESRGAN's DiffJPEG by default (data.jpeg). One deliberate difference: Real-ESRGAN's
gray Gaussian noise reuses one noise field for the whole batch; here each image gets its own.

RealESRGANPairs is the rest of Real-ESRGAN's feed_data: it degrades the unsharp-masked GT of a 400 crop, cuts
the training patch (lq and gt at the same place) from it, and passes the pair through the training-pair pool.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from data.images import (ImageCache, list_images, random_dihedral, reflect101_indices, to_8bit, to_device_async,
                         to_tensor)
from data.jpeg import jpeg_roundtrip
from losses.sharpen import usm_sharp

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


class GTCropDataset(Dataset):
    """Items {"gt": [3, crop, crop]}, Real-ESRGAN's way: an image with a side below `crop` is padded at its
    bottom/right by reflection without repeating the edge (its dataset's cv2.BORDER_REFLECT_101), then a random
    window is cut; a random horizontal flip, plus vertical flips/rotations if `rotate` (Real-ESRGAN trains with
    use_hflip only, hence the default). Real-ESRGAN degrades a crop of 400 and cuts the 256 training patch from
    it after the degradation (RealESRGANPairs)."""

    def __init__(
        self,
        sources: list[str],
        crop: int = 400,
        augment: bool = True,
        length: int | None = None,
        rotate: bool = False,
        cache_pixels: int = 1_000_000,
    ):
        self.paths = list_images(sources)
        self.crop, self.augment, self.rotate = crop, augment, rotate
        self.length = length or len(self.paths)
        self.cache = ImageCache(max_pixels=cache_pixels)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):  # lets `for item in dataset` stop
            raise IndexError(index)
        img, p = self.cache.get(self.paths[index % len(self.paths)]), self.crop
        h, w = img.shape[:2]
        if h < p or w < p:
            img = img[reflect101_indices(max(h, p), h)[:, None], reflect101_indices(max(w, p), w)[None, :]]
        top = int(torch.randint(0, img.shape[0] - p + 1, ()).item())
        left = int(torch.randint(0, img.shape[1] - p + 1, ()).item())
        gt = to_tensor(img[top : top + p, left : left + p])
        if self.augment:
            (gt,) = random_dihedral([gt], hflip=True, rot=self.rotate)
        return {"gt": gt}


# ----------------------------------------------------------------------------------------------
# Random draws. The sizes, branches and per-image parameters come from a CPU generator: the degradation reads
# them on the host (a resize factor sets a shape, a coin picks a branch), and reading a CPU tensor never waits
# for the GPU. Only the per-pixel noise is drawn on the images' device, from a generator seeded by the CPU one.


def _rand(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device)


def _uniform(lo: float, hi: float, n: int, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * _rand(n, g)


def _choice(probs, n: int, g: torch.Generator) -> torch.Tensor:
    """n indices drawn with the given (unnormalised) probabilities."""
    cum = torch.tensor(probs, dtype=torch.float32, device=g.device).cumsum(0)
    return torch.searchsorted(cum / cum[-1], _rand(n, g), right=True).clamp(max=len(probs) - 1)


def _coin(p: float, g: torch.Generator) -> bool:
    return bool(_rand(1, g).item() < p)


# ----------------------------------------------------------------------------------------------
# Blur kernels. Every kernel is built on a 21 x 21 grid and zeroed outside its own (odd) size, which
# equals Real-ESRGAN's "make a size-k kernel, then zero-pad it to 21".


def _grid(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ax = torch.arange(size, device=device, dtype=torch.float32) - size // 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")  # xx: column offset, yy: row offset
    return xx, yy


def _sinc_kernels(cutoff: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """Circular low-pass (2-D sinc) kernels, cutoff [n] in radians: w J1(w r) / (2 pi r), and its
    limit w^2 / (4 pi) at r = 0."""
    r = torch.sqrt(xx * xx + yy * yy)[None]
    w = cutoff[:, None, None]
    safe_r = r.clamp_min(1e-6)
    return torch.where(r > 0, w * torch.special.bessel_j1(w * safe_r) / (2 * math.pi * safe_r), w * w / (4 * math.pi))


def _mask_and_normalise(kernels: torch.Tensor, sizes: torch.Tensor, xx, yy) -> torch.Tensor:
    half = (sizes // 2).to(kernels.dtype)[:, None, None]
    inside = (xx.abs()[None] <= half) & (yy.abs()[None] <= half)
    kernels = kernels * inside
    return kernels / kernels.sum(dim=(1, 2), keepdim=True)


def random_blur_kernels(
    n: int,
    g: torch.Generator,
    kernel_sizes,
    kernel_prob,
    sinc_prob: float,
    sigma_range,
    betag_range,
    betap_range,
    grid_size: int = 21,
) -> tuple[torch.Tensor, list[str]]:
    """n random blur kernels [n, 21, 21] and their type names, as Real-ESRGAN's dataset draws them:
    size uniform over `kernel_sizes`; with prob. `sinc_prob` a sinc with cutoff U[pi/3, pi] (size < 13)
    or U[pi/5, pi]; otherwise a type from KERNEL_TYPES with `kernel_prob`:
      gaussian  exp(-q / 2),   generalized  exp(-q^beta / 2),   plateau  1 / (1 + q^beta),
    where q = [x y] Sigma^-1 [x y]^T, Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T, sx (and sy for
    anisotropic types) ~ U[sigma_range], theta ~ U[-pi, pi] (isotropic: sy = sx, theta = 0), beta
    drawn below or above 1 with equal odds from betag_range / betap_range."""
    xx, yy = _grid(grid_size, g.device)
    sizes = torch.tensor(kernel_sizes, device=g.device)[_choice([1] * len(kernel_sizes), n, g)]
    types = _choice(kernel_prob, n, g)
    sinc = _rand(n, g) < sinc_prob
    cutoff = torch.where(sizes < 13, _uniform(math.pi / 3, math.pi, n, g), _uniform(math.pi / 5, math.pi, n, g))

    isotropic = (types == 0) | (types == 2) | (types == 4)
    sx = _uniform(*sigma_range, n, g)
    sy = torch.where(isotropic, sx, _uniform(*sigma_range, n, g))
    theta = torch.where(isotropic, torch.zeros_like(sx), _uniform(-math.pi, math.pi, n, g))

    def below_or_above_one(lo, hi):
        return torch.where(_rand(n, g) < 0.5, _uniform(lo, 1.0, n, g), _uniform(1.0, hi, n, g))

    generalized, plateau = (types == 2) | (types == 3), (types == 4) | (types == 5)
    beta = torch.ones_like(sx)
    beta = torch.where(generalized, below_or_above_one(*betag_range), beta)
    beta = torch.where(plateau, below_or_above_one(*betap_range), beta)

    # Inverse covariance entries: R diag(1/sx^2, 1/sy^2) R^T.
    c, s = torch.cos(theta), torch.sin(theta)
    d1, d2 = 1 / sx**2, 1 / sy**2
    a, b, cc = c * c * d1 + s * s * d2, c * s * (d1 - d2), s * s * d1 + c * c * d2
    q = a[:, None, None] * xx**2 + 2 * b[:, None, None] * xx * yy + cc[:, None, None] * yy**2
    qb = q ** beta[:, None, None]
    kernels = torch.where(plateau[:, None, None], 1 / (qb + 1), torch.exp(-0.5 * qb))
    kernels = torch.where(sinc[:, None, None], _sinc_kernels(cutoff, xx, yy), kernels)
    names = ["sinc" if sinc[i] else KERNEL_TYPES[types[i]] for i in range(n)]
    return _mask_and_normalise(kernels, sizes, xx, yy), names


def final_sinc_kernels(n: int, g: torch.Generator, kernel_sizes, prob: float, grid_size: int = 21):
    """With prob. `prob` per image a sinc kernel (random size, cutoff U[pi/3, pi]), else the identity
    (a centred unit pulse). Returns kernels [n, 21, 21] and the per-image sinc flags [n]."""
    xx, yy = _grid(grid_size, g.device)
    use = _rand(n, g) < prob
    sizes = torch.tensor(kernel_sizes, device=g.device)[_choice([1] * len(kernel_sizes), n, g)]
    cutoff = _uniform(math.pi / 3, math.pi, n, g)
    sinc = _mask_and_normalise(_sinc_kernels(cutoff, xx, yy), sizes, xx, yy)
    pulse = ((xx == 0) & (yy == 0)).float()[None].expand_as(sinc)
    return torch.where(use[:, None, None], sinc, pulse), use


# ----------------------------------------------------------------------------------------------
# Image operations.


def _reflect_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices -pad..n+pad-1 folded into [0, n) by reflection without edge repeat (F.pad 'reflect'),
    valid even when pad >= n (tiny images after a strong downscale)."""
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = idx % (2 * n - 2)
    return torch.where(period < n, period, 2 * n - 2 - period)


def filter2d(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image of x [B, C, H, W] with its own kernel [B, k, k] (correlation, as
    F.conv2d), reflect-padded. Kernels are trimmed to the largest non-zero extent in the batch."""
    b, c, h, w = x.shape
    k = kernels.shape[-1]
    used = (kernels.abs().sum(0) > 0).nonzero()  # on the kernels' device: the CPU here, so no wait for the GPU
    r = int((used - k // 2).abs().max())
    kernels = to_device_async(kernels[:, k // 2 - r : k // 2 + r + 1, k // 2 - r : k // 2 + r + 1], x.device)
    x = x.index_select(2, _reflect_index(h, r, x.device)).index_select(3, _reflect_index(w, r, x.device))
    weight = kernels.to(x.dtype).repeat_interleave(c, dim=0)[:, None]  # [B*C, 1, k, k], image-major
    out = F.conv2d(x.reshape(1, b * c, h + 2 * r, w + 2 * r), weight, groups=b * c)
    return out.view(b, c, h, w)


def _interpolate(x: torch.Tensor, mode: str, size=None, scale_factor=None) -> torch.Tensor:
    align = None if mode == "area" else False
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode=mode, align_corners=align)


def _gaussian_noise(x, sigma_range, gray_prob, g, gd):
    n = x.shape[0]
    sigma = _uniform(*sigma_range, n, g)[:, None, None, None] / 255.0
    gray = (_rand(n, g) < gray_prob)[:, None, None, None]
    colour = torch.randn(x.shape, generator=gd, device=gd.device, dtype=x.dtype)
    mono = torch.randn((n, 1) + x.shape[2:], generator=gd, device=gd.device, dtype=x.dtype)
    noise = torch.where(to_device_async(gray, x.device), mono.expand_as(x), colour) * to_device_async(sigma, x.device)
    return (x + noise).clamp(0, 1), gray.flatten().tolist()


def _shot_noise(img: torch.Tensor, gd: torch.Generator) -> torch.Tensor:
    """Poisson noise of 8-bit-valued images [B, C, H, W]: photon counts scaled so the number of
    levels is the next power of two above the image's distinct values (Real-ESRGAN/skimage rule).
    The distinct values are counted in a 256-bin table on the device: torch.unique would wait for the GPU."""
    codes = (img * 255).round().long().flatten(1)  # [B, C*H*W] 8-bit codes
    seen = torch.zeros(img.shape[0], 256, dtype=img.dtype, device=img.device).scatter_(1, codes, 1.0)
    vals = (2 ** torch.ceil(torch.log2(seen.sum(1))))[:, None, None, None]
    return torch.poisson(img * vals, generator=gd) / vals - img


def _poisson_noise(x, scale_range, gray_prob, g, gd):
    n = x.shape[0]
    scale = _uniform(*scale_range, n, g)[:, None, None, None]
    gray = (_rand(n, g) < gray_prob)[:, None, None, None]
    noise = _shot_noise(to_8bit(x), gd)
    if gray.any():
        # torchvision's rgb_to_grayscale weights.
        luma = to_8bit(0.2989 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:])
        noise = torch.where(to_device_async(gray, x.device), _shot_noise(luma, gd).expand_as(x), noise)
    return (x + noise * to_device_async(scale, x.device)).clamp(0, 1), gray.flatten().tolist()


# ----------------------------------------------------------------------------------------------


@dataclass
class RealESRGANDegradation:
    """Real-ESRGAN's second-order degradation, batched; any field can be overridden by keyword
    (e.g. `RealESRGANDegradation(scale=4, sinc_prob=1.0)`).

    `deg(gt, generator)` maps gt [B, 3, H, W] in [0, 1] (H, W multiples of `scale`) to the 8-bit-valued
    lq [B, 3, H/scale, W/scale] on gt's device; every random draw comes from `generator`, a CPU generator
    (the noise from a device generator that it seeds), so the same seed gives the same lq on a device. On a
    GPU nothing in it waits for the GPU. After each call `trace` records the branches taken (kernel types,
    resize choices, noise kinds, JPEG qualities, final order)."""

    scale: int = 4
    kernel_sizes: tuple = (7, 9, 11, 13, 15, 17, 19, 21)
    # first degradation
    kernel_prob: tuple = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # in KERNEL_TYPES order
    sinc_prob: float = 0.1
    blur_sigma: tuple = (0.2, 3.0)
    betag_range: tuple = (0.5, 4.0)
    betap_range: tuple = (1.0, 2.0)
    resize_prob: tuple = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple = (1.0, 30.0)
    poisson_scale_range: tuple = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple = (30.0, 95.0)
    # second degradation
    second_blur_prob: float = 0.8
    kernel_prob2: tuple = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple = (0.2, 1.5)
    betag_range2: tuple = (0.5, 4.0)
    betap_range2: tuple = (1.0, 2.0)
    resize_prob2: tuple = (0.3, 0.4, 0.3)
    resize_range2: tuple = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple = (1.0, 25.0)
    poisson_scale_range2: tuple = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple = (30.0, 95.0)
    # final step
    final_sinc_prob: float = 0.8
    resize_first_prob: float = 0.5  # [resize + sinc] before JPEG, else after
    resize_modes: tuple = ("area", "bilinear", "bicubic")
    jpeg: str = "diffjpeg"  # data.jpeg style: Real-ESRGAN's DiffJPEG, or libjpeg's integer tables

    def __post_init__(self):
        self.trace: dict = {}

    def _random_resize(self, x, g, probs, scale_range, base_size=None):
        """Resize the batch up, down or not at all. Stage 1 scales the current size; stage 2 scales
        `base_size` (GT size / scale), as Real-ESRGAN does."""
        direction = ("up", "down", "keep")[int(_choice(probs, 1, g))]
        if direction == "up":
            factor = float(_uniform(1.0, scale_range[1], 1, g))
        elif direction == "down":
            factor = float(_uniform(scale_range[0], 1.0, 1, g))
        else:
            factor = 1.0
        mode = self.resize_modes[int(_choice([1] * len(self.resize_modes), 1, g))]
        if base_size is None:
            x = _interpolate(x, mode, scale_factor=factor)
        else:
            x = _interpolate(x, mode, size=(int(base_size[0] * factor), int(base_size[1] * factor)))
        return x, (direction, mode, factor)

    def _noise(self, x, g, gd, gaussian_prob, sigma_range, poisson_range, gray_prob):
        if _coin(gaussian_prob, g):
            x, gray = _gaussian_noise(x, sigma_range, gray_prob, g, gd)
            return x, ("gaussian", gray)
        x, gray = _poisson_noise(x, poisson_range, gray_prob, g, gd)
        return x, ("poisson", gray)

    def _jpeg(self, x, g, quality_range):
        quality = _uniform(*quality_range, x.shape[0], g)
        return jpeg_roundtrip(x.clamp(0, 1), to_device_async(quality, x.device), self.jpeg), quality.tolist()

    @torch.no_grad()
    def __call__(self, gt: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        g, n = generator, gt.shape[0]
        if g.device.type != "cpu":
            raise ValueError(f"the generator lives on {g.device}: make it with torch.Generator() (a CPU one)")
        gd = torch.Generator(gt.device).manual_seed(int(torch.randint(2**62, (), generator=g)))
        h, w = gt.shape[-2:]
        lq_size = (h // self.scale, w // self.scale)
        trace = {}
        kernel1, trace["kernel1"] = random_blur_kernels(
            n,
            g,
            self.kernel_sizes,
            self.kernel_prob,
            self.sinc_prob,
            self.blur_sigma,
            self.betag_range,
            self.betap_range,
        )
        kernel2, trace["kernel2"] = random_blur_kernels(
            n,
            g,
            self.kernel_sizes,
            self.kernel_prob2,
            self.sinc_prob2,
            self.blur_sigma2,
            self.betag_range2,
            self.betap_range2,
        )
        sinc, trace["final_sinc"] = final_sinc_kernels(n, g, self.kernel_sizes, self.final_sinc_prob)
        trace["final_sinc"] = trace["final_sinc"].tolist()

        # first degradation
        x = filter2d(gt.float(), kernel1)
        x, trace["resize1"] = self._random_resize(x, g, self.resize_prob, self.resize_range)
        x, trace["noise1"] = self._noise(
            x, g, gd, self.gaussian_noise_prob, self.noise_range, self.poisson_scale_range, self.gray_noise_prob
        )
        x, trace["jpeg1"] = self._jpeg(x, g, self.jpeg_range)

        # second degradation
        trace["second_blur"] = _coin(self.second_blur_prob, g)
        if trace["second_blur"]:
            x = filter2d(x, kernel2)
        x, trace["resize2"] = self._random_resize(x, g, self.resize_prob2, self.resize_range2, base_size=lq_size)
        x, trace["noise2"] = self._noise(
            x, g, gd, self.gaussian_noise_prob2, self.noise_range2, self.poisson_scale_range2, self.gray_noise_prob2
        )

        # final step: [resize to LR size + sinc] and JPEG, in random order (other orders give
        # twisted lines, say the Real-ESRGAN authors)
        resize_first = _coin(self.resize_first_prob, g)
        mode = self.resize_modes[int(_choice([1] * len(self.resize_modes), 1, g))]
        if resize_first:
            x = filter2d(_interpolate(x, mode, size=lq_size), sinc)
            x, trace["jpeg2"] = self._jpeg(x, g, self.jpeg_range2)
        else:
            x, trace["jpeg2"] = self._jpeg(x, g, self.jpeg_range2)
            x = filter2d(_interpolate(x, mode, size=lq_size), sinc)
        trace["final"] = ("resize_first" if resize_first else "jpeg_first", mode)
        self.trace = trace
        return to_8bit(x).to(gt.dtype)


class PairPool:
    """Real-ESRGAN's training-pair pool (its queue_size, _dequeue_and_enqueue): while it fills, each batch trains as
    it is and is kept; once full, each new batch goes in and a batch drawn from the shuffled pool comes out, so a
    batch mixes the degradations of many iterations. The pairs are 8-bit-valued, so the pool keeps them as uint8
    on their device, a quarter of the memory, exactly."""

    def __init__(self, size: int):
        self.size, self.filled, self.lq, self.gt = size, 0, None, None

    def __call__(self, lq: torch.Tensor, gt: torch.Tensor, generator: torch.Generator):
        b = lq.shape[0]
        if self.size % b:
            raise ValueError(f"the pair pool's size {self.size} must be a multiple of the batch size per rank {b}")
        if self.lq is None:
            self.lq = torch.zeros((self.size, *lq.shape[1:]), dtype=torch.uint8, device=lq.device)
            self.gt = torch.zeros((self.size, *gt.shape[1:]), dtype=torch.uint8, device=gt.device)
        if self.filled < self.size:
            self.lq[self.filled : self.filled + b], self.gt[self.filled : self.filled + b] = _codes(lq), _codes(gt)
            self.filled += b
            return lq, gt
        order = to_device_async(torch.randperm(self.size, generator=generator), lq.device)
        self.lq, self.gt = self.lq[order], self.gt[order]
        out = self.lq[:b].float() / 255.0, self.gt[:b].float() / 255.0
        self.lq[:b], self.gt[:b] = _codes(lq), _codes(gt)
        return out

    def state_dict(self) -> dict:
        return {"filled": self.filled, "lq": None if self.lq is None else self.lq.cpu(),
                "gt": None if self.gt is None else self.gt.cpu()}

    def load_state_dict(self, state: dict, device) -> None:
        self.filled = state["filled"]
        self.lq, self.gt = (None if state[k] is None else state[k].to(device) for k in ("lq", "gt"))


def _codes(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round().to(torch.uint8)


class RealESRGANPairs:
    """Real-ESRGAN's feed_data for a batch of GT crops gt [B, 3, S, S] (S = the degraded crop, 400): the LQ is the
    degradation of usm_sharp(gt); one random patch place for the whole batch (BasicSR's paired_random_crop) cuts
    the lq [B, 3, P/scale, P/scale] and gt [B, 3, P, P] patches; then the pair pool (`pool_size` 0: none). Every
    random draw comes from `generator` (a CPU one), so a seeded stage gives the same pairs."""

    def __init__(self, scale: int, patch: int, pool_size: int = 0, jpeg: str = "diffjpeg"):
        self.scale, self.patch = scale, patch
        self.degradation = RealESRGANDegradation(scale=scale, jpeg=jpeg)
        self.pool = PairPool(pool_size) if pool_size else None

    def __call__(self, gt: torch.Tensor, generator: torch.Generator):
        lq = self.degradation(usm_sharp(gt), generator)
        p, s = self.patch // self.scale, self.scale
        top = int(torch.randint(0, lq.shape[-2] - p + 1, (), generator=generator))
        left = int(torch.randint(0, lq.shape[-1] - p + 1, (), generator=generator))
        lq = lq[..., top : top + p, left : left + p].contiguous()
        gt = gt[..., top * s : (top + p) * s, left * s : (left + p) * s].contiguous()
        return self.pool(lq, gt, generator) if self.pool else (lq, gt)

