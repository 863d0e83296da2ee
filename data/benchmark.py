"""Benchmark sets and scores, following the protocols the paper's numbers come from.

PSNR / SSIM   two protocols, the ones the published tables used:
              basicsr   BasicSR's calculate_psnr / calculate_ssim (SwinIR's and Real-ESRGAN's tables): images
                        rounded to 8 bits, optional border crop, optional Y channel of ITU-R BT.601 (MATLAB
                        rgb2ycbcr), SSIM with an 11 x 11 gaussian window (sigma 1.5) over the valid region,
                        averaged over channels for RGB;
              promptir  PromptIR's test code (utils/val_utils.py): scikit-image's peak_signal_noise_ratio and
                        structural_similarity with their defaults (7 x 7 uniform window, sample covariance) and
                        data_range 1, on float RGB images clipped to [0, 1], not rounded.
other metrics pyiqa with its defaults (NIQE, MUSIQ, LPIPS, ...), on the full RGB output.
test sets     `benchmark_pairs` builds the (lq, gt) pairs each kind of set needs; `BENCHMARKS`
              records, per named set, which kind it is and how SR/AIR papers score it.
"""

import os
import zlib
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from data.air import crop_to_common, pair_by_name
from data.cisr import bicubic_lr
from data.images import image_name, list_images, load_image, modcrop, to_8bit, to_tensor

# Per named set: its kind for benchmark_pairs and how the papers score PSNR/SSIM on it. SR sets: the basicsr
# protocol on Y with `scale` pixels of border cropped (SwinIR/BasicSR); the all-in-one sets: PromptIR's.
BENCHMARKS = {
    "Set5": {"kind": "sr_bicubic", "protocol": "basicsr", "y_channel": True, "crop_border": "scale"},
    "Set14": {"kind": "sr_bicubic", "protocol": "basicsr", "y_channel": True, "crop_border": "scale"},
    "BSD100": {"kind": "sr_bicubic", "protocol": "basicsr", "y_channel": True, "crop_border": "scale"},
    "Urban100": {"kind": "sr_bicubic", "protocol": "basicsr", "y_channel": True, "crop_border": "scale"},
    "Manga109": {"kind": "sr_bicubic", "protocol": "basicsr", "y_channel": True, "crop_border": "scale"},
    "OST300": {"kind": "noref"},
    "RealSRSet": {"kind": "noref"},
    "BSD68": {"kind": "denoise", "protocol": "promptir"},
    "Rain100L": {"kind": "pairs", "protocol": "promptir"},
    "SOTS": {"kind": "pairs", "protocol": "promptir"},
}


# ----------------------------------------------------------------------------------------------
# Full-reference metrics


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """Y of ITU-R BT.601 YCbCr for RGB [..., 3, H, W] in [0, 1] -> [..., 1, H, W] in [16/255, 235/255]
    (MATLAB's rgb2ycbcr on double input)."""
    r, g, b = img.unbind(-3)
    return (16.0 + 65.481 * r + 128.553 * g + 24.966 * b).unsqueeze(-3) / 255.0


def _prepare(a: torch.Tensor, b: torch.Tensor, crop_border: int, y_channel: bool):
    """Both images as float64 [C, H, W] in 0..255, rounded to 8 bits, border-cropped, optionally Y."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    out = []
    for x in (a, b):
        x = x.detach().double().reshape(x.shape[-3:])
        x = to_8bit(x)
        if y_channel:
            x = rgb_to_y(x)
        x = x * 255.0
        if crop_border:
            x = x[:, crop_border:-crop_border, crop_border:-crop_border]
        out.append(x)
    return out


def psnr(a: torch.Tensor, b: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> float:
    """PSNR in dB between [3, H, W] or [1, 3, H, W] images in [0, 1] (inf for identical images)."""
    a, b = _prepare(a, b, crop_border, y_channel)
    mse = torch.mean((a - b) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(255.0**2 / mse)).item()


def _gaussian_window(device) -> torch.Tensor:
    x = torch.arange(11, dtype=torch.float64, device=device) - 5
    k = torch.exp(-(x**2) / (2 * 1.5**2))
    return k / k.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> float:
    """SSIM (Wang et al. 2004) between [3, H, W] or [1, 3, H, W] images in [0, 1], per channel over
    the valid region of an 11 x 11 gaussian window (sigma 1.5), averaged over channels."""
    a, b = _prepare(a, b, crop_border, y_channel)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    k = _gaussian_window(a.device)
    channels = a.shape[0]

    def blur(x):  # separable 'valid' gaussian filter of x [C, H, W], one channel at a time
        x = F.conv2d(x[None], k.view(1, 1, 11, 1).expand(channels, 1, 11, 1), groups=channels)
        return F.conv2d(x, k.view(1, 1, 1, 11).expand(channels, 1, 1, 11), groups=channels)[0]

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(1, 2)).mean().item()


def _float_pair(a: torch.Tensor, b: torch.Tensor):
    """Both images as float64 [C, H, W], clipped to [0, 1] and not rounded (PromptIR's np.clip)."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return [x.detach().double().reshape(x.shape[-3:]).clamp(0, 1) for x in (a, b)]


def psnr_promptir(a: torch.Tensor, b: torch.Tensor) -> float:
    """PromptIR's PSNR: scikit-image's peak_signal_noise_ratio(gt, restored, data_range=1) on float images."""
    a, b = _float_pair(a, b)
    mse = torch.mean((a - b) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(1.0 / mse)).item()


def ssim_promptir(a: torch.Tensor, b: torch.Tensor) -> float:
    """PromptIR's SSIM: scikit-image's structural_similarity(gt, restored, data_range=1, channel_axis=-1) with its
    defaults: per channel, a 7 x 7 uniform window, the sample covariance (N / (N - 1), N = 49), K1 = 0.01,
    K2 = 0.03, the mean over the pixels whose window lies inside the image, then the mean over channels."""
    a, b = _float_pair(a, b)
    channels, n = a.shape[0], 49
    window = torch.full((channels, 1, 7, 7), 1.0 / n, dtype=a.dtype, device=a.device)

    def mean(x):  # the 7 x 7 window mean of x [C, H, W] where the window fits: [C, H - 6, W - 6]
        return F.conv2d(x[None], window, groups=channels)[0]

    mu_a, mu_b = mean(a), mean(b)
    var_a = (mean(a * a) - mu_a**2) * n / (n - 1)
    var_b = (mean(b * b) - mu_b**2) * n / (n - 1)
    cov = (mean(a * b) - mu_a * mu_b) * n / (n - 1)
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(1, 2)).mean().item()


# ----------------------------------------------------------------------------------------------
# Inference on big images


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    return list(range(0, length - tile, stride)) + [length - tile]


@torch.no_grad()
def tiled_forward(net, lq: torch.Tensor, scale: int, tile: int | None = None, overlap: int = 32) -> torch.Tensor:
    """net(lq) for lq [B, C, H, W], optionally in overlapping `tile` x `tile` LR tiles (stride
    tile - overlap) to bound memory. Near a tile edge that is inside the image the network sees
    artificial borders, so each tile's outer overlap/2 band there is dropped and the remaining overlaps
    are averaged; for a network whose receptive field reaches at most overlap/2 LR pixels the result
    equals the whole-image output. Output: [B, C', H * scale, W * scale]."""
    if tile is None:
        return net(lq)
    if overlap >= tile:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap})")
    h, w = lq.shape[-2:]
    th, tw = min(tile, h), min(tile, w)
    margin = overlap // 2
    out = count = None
    for y in _tile_starts(h, th, tile - overlap):
        for x in _tile_starts(w, tw, tile - overlap):
            sr = net(lq[..., y : y + th, x : x + tw])
            if out is None:
                out = lq.new_zeros(sr.shape[:2] + (h * scale, w * scale))
                count = lq.new_zeros((1, 1, h * scale, w * scale))
            # Trusted part of this tile, in LR coordinates of the image.
            y0, y1 = y + (margin if y > 0 else 0), y + th - (margin if y + th < h else 0)
            x0, x1 = x + (margin if x > 0 else 0), x + tw - (margin if x + tw < w else 0)
            out[..., y0 * scale : y1 * scale, x0 * scale : x1 * scale] += sr[
                ..., (y0 - y) * scale : (y1 - y) * scale, (x0 - x) * scale : (x1 - x) * scale
            ]
            count[..., y0 * scale : y1 * scale, x0 * scale : x1 * scale] += 1
    return out / count


# ----------------------------------------------------------------------------------------------
# Test sets


def crop_to_multiple(img, base: int):
    """Centre-crop H x W x C so both sides are multiples of `base` (PromptIR's crop_img)."""
    h, w = img.shape[:2]
    dh, dw = h % base, w % base
    return img[dh // 2 : h - dh + dh // 2, dw // 2 : w - dw + dw // 2]


def image_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for image `name`: its synthetic noise depends only on (seed, name), not on
    which other images are in the set or their order."""
    return torch.Generator().manual_seed((seed * 2**32 + zlib.crc32(name.encode())) % 2**63)


def add_gaussian_noise(gt: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """gt + N(0, (sigma/255)^2), clipped and rounded to 8 bits (a noisy 8-bit image)."""
    noise = torch.randn(gt.shape, generator=generator) * (sigma / 255.0)
    return to_8bit(gt + noise.to(gt.device))


def _item(name, lq, gt=None) -> dict:
    return {"name": name, "lq": to_tensor(lq)[None], "gt": None if gt is None else to_tensor(gt)[None]}


def benchmark_pairs(
    kind: str,
    gt_dir: str | None = None,
    lq_dir: str | None = None,
    scale: int = 4,
    sigma: float | None = None,
    seed: int = 0,
    crop_base: int | None = None,
) -> list[dict]:
    """Items {"name", "lq": [1, 3, h, w], "gt": [1, 3, H, W] | None} of a test set, by kind:
      sr_bicubic  gt_dir (Set5, Set14, BSD100, Urban100, Manga109): GT cropped to a multiple of
                  `scale`, LR = 8-bit MATLAB-bicubic downscale; with lq_dir, its LR files are used
                  instead (matched by name);
      noref       lq_dir only (OST300, RealSRSet): real inputs, no GT;
      denoise     gt_dir (BSD68, CBSD68): 8-bit gt + N(0, sigma^2), noise seeded per image by
                  (seed, name);
      pairs       lq_dir + gt_dir (Rain100L, SOTS): matched by name as in data.air (SOTS hazy
                  0001_0.8_0.2 -> 0001).
    `crop_base` centre-crops lq and gt to multiples of it; None means the protocol default: 16 for
    denoise and pairs (PromptIR's test code), none for the SR kinds."""
    if kind not in ("sr_bicubic", "noref", "denoise", "pairs"):
        raise ValueError(f"unknown benchmark kind {kind!r}: sr_bicubic, noref, denoise or pairs")
    needs = {
        "sr_bicubic": ("gt_dir",),
        "noref": ("lq_dir",),
        "denoise": ("gt_dir", "sigma"),
        "pairs": ("lq_dir", "gt_dir"),
    }
    given = {"gt_dir": gt_dir, "lq_dir": lq_dir, "sigma": sigma}
    missing = [k for k in needs[kind] if given[k] is None]
    if missing:
        raise ValueError(f"benchmark kind {kind} needs {' and '.join(missing)}")
    if crop_base is None:
        crop_base = 16 if kind in ("denoise", "pairs") else 1

    def crop(img):
        return crop_to_multiple(img, crop_base) if crop_base > 1 else img

    items = []
    if kind == "sr_bicubic":
        gt_paths = list_images([gt_dir])
        lq_for = {}
        if lq_dir is not None:
            lq_for = {gt: lq for lq, gt in pair_by_name(list_images([lq_dir]), gt_paths)}
        for path in gt_paths:
            gt = modcrop(crop(load_image(path)), scale)
            if path in lq_for:
                items.append(_item(image_name(path), load_image(lq_for[path]), gt))
            else:
                gt_t = to_tensor(gt)[None]
                items.append({"name": image_name(path), "lq": bicubic_lr(gt_t, scale), "gt": gt_t})
    elif kind == "noref":
        items = [_item(image_name(p), crop(load_image(p))) for p in list_images([lq_dir])]
    elif kind == "denoise":
        for path in list_images([gt_dir]):
            name = image_name(path)
            gt = to_tensor(crop(load_image(path)))[None]
            items.append({"name": name, "lq": add_gaussian_noise(gt, sigma, image_generator(seed, name)), "gt": gt})
    else:
        for lq_path, gt_path in pair_by_name(list_images([lq_dir]), list_images([gt_dir])):
            lq, gt = crop_to_common(load_image(lq_path), load_image(gt_path))
            items.append(_item(image_name(lq_path), crop(lq), crop(gt)))
    return items


# ----------------------------------------------------------------------------------------------
# Scoring


@contextmanager
def pyiqa_weights(metric: str, download: bool = True):
    """Make pyiqa look for weights under the *current* $TORCH_HOME/hub/pyiqa and turn an offline
    download attempt into one message naming the missing file. With download=False nothing is
    fetched: a missing file fails at once (lossagent.py's `doctor` check).

    pyiqa computes its weight folder (pyiqa.utils.download_util.DEFAULT_CACHE_DIR) once, when it is
    first imported, so a TORCH_HOME set later (as tests and the CLI do) would be ignored; we re-point
    it at call time. Its downloads all go through download_util.download_url_to_file, which we wrap
    to learn the file's URL and destination should the download fail."""
    from pyiqa.utils import download_util

    cache_dir = os.path.join(torch.hub.get_dir(), "pyiqa")
    saved = download_util.DEFAULT_CACHE_DIR, download_util.download_url_to_file
    failed = {}

    def fetch(url, dst, *args, **kwargs):
        try:
            if not download:
                raise ConnectionError("downloads are off")
            return saved[1](url, dst, *args, **kwargs)
        except Exception:
            failed.update(url=url, dst=dst)
            raise

    download_util.DEFAULT_CACHE_DIR, download_util.download_url_to_file = cache_dir, fetch
    try:
        yield
    except Exception as err:
        if not failed:
            raise
        raise FileNotFoundError(
            f"pyiqa metric {metric!r} needs {os.path.basename(failed['dst'])} in {os.path.dirname(failed['dst'])} "
            f"and could not download it ({type(err).__name__}: {err}). On a machine with internet run "
            f"`python lossagent.py prefetch --config <your config>` (or download {failed['url']}) and copy the "
            f"file there, or set TORCH_HOME to a folder whose hub/pyiqa/ holds it."
        ) from err
    finally:
        download_util.DEFAULT_CACHE_DIR, download_util.download_url_to_file = saved


# What each metric says, in a line an LLM can read (the prompt's system part); an expert's `meaning` overrides it.
MEANINGS = {
    "psnr": "PSNR, the fidelity to the ground-truth image in dB",
    "ssim": "SSIM, the structural similarity to the ground-truth image (0 to 1)",
    "lpips": "LPIPS, the perceptual distance to the ground-truth image",
    "niqe": "NIQE, a no-reference score of how far the image statistics are from natural images",
    "maniqa": "MANIQA, a learned no-reference perceptual quality score (0 to 1)",
    "clipiqa": "CLIP-IQA, a no-reference quality score from a vision-language model (0 to 1)",
    "musiq": "MUSIQ, a learned no-reference quality score (0 to 100)",
    "qalign": "Q-Align, a quality rating by a multimodal LLM (1 = bad to 5 = excellent)",
}


# The metrics this module computes itself, by benchmark protocol (see the module docstring); every other name is a
# pyiqa metric.
OURS = {"psnr": {"basicsr": psnr, "promptir": psnr_promptir}, "ssim": {"basicsr": ssim, "promptir": ssim_promptir}}


def is_full_reference(name: str) -> bool:
    """Does metric `name` need the ground truth?"""
    if name in OURS:
        return True
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    return DEFAULT_CONFIGS.get(name, {}).get("metric_mode") == "FR"


class Metric:
    """One metric, ready to score images [1, 3, H, W] in [0, 1] one at a time: `metric(img, gt)` -> float.

    Ours (`protocol` given, name in OURS: {"style": "basicsr", "crop_border", "y_channel"} or {"style": "promptir"})
    or a pyiqa metric created once; `full_reference`, `lower_better` and `score_range` (low, high or None) describe
    it, `to(device)` moves a pyiqa metric's network."""

    def __init__(self, name: str, device, protocol: dict | None = None, download: bool = True, options=None):
        self.name, self.iqa = name, None
        if protocol is not None and name in OURS:
            settings = dict(protocol)
            fn = OURS[name][settings.pop("style", "basicsr")]
            self.fn = lambda img, gt: fn(img, gt, **settings)
            self.full_reference, self.lower_better, self.score_range = True, False, None
            return
        import pyiqa
        from pyiqa.default_model_configs import DEFAULT_CONFIGS

        if name not in DEFAULT_CONFIGS:
            raise ValueError(f"unknown metric '{name}'; see pyiqa.list_models()")
        # Weights may load at creation or on first use: the first call happens inside the context too.
        self.download = download
        with pyiqa_weights(name, download=download):
            self.iqa = pyiqa.create_metric(name, device=device, **(options or {}))
        self.full_reference = self.iqa.metric_mode == "FR"
        self.lower_better = self.iqa.lower_better
        self.score_range = _parse_range(DEFAULT_CONFIGS[name].get("score_range"))

    def to(self, device):
        if self.iqa is not None:
            self.iqa.to(device)
            self.iqa.device = device  # pyiqa's own note of its device, where it sends the inputs
        return self

    @torch.no_grad()
    def __call__(self, img: torch.Tensor, gt: torch.Tensor | None = None) -> float:
        if self.full_reference and gt is None:
            raise ValueError(f"metric {self.name} is full-reference and needs the ground truth")
        if self.iqa is None:
            return self.fn(img, gt)
        device = self.iqa.device
        with pyiqa_weights(self.name, download=self.download):
            value = self.iqa(img.to(device), gt.to(device)) if self.full_reference else self.iqa(img.to(device))
        return float(value.mean())


def _parse_range(text):
    """pyiqa writes score ranges as '~0, ~100' (the tilde: approximate)."""
    try:
        low, high = (float(x.strip().lstrip("~")) for x in text.split(","))
        return low, high
    except (AttributeError, ValueError):
        return None


class MetricError(ValueError):
    """A metric could not score an image (too small for it, say); the message names the image and its size."""


def score(metric: Metric, images: list[torch.Tensor], gts: list | None = None, names: list | None = None) -> list[float]:
    """The one scoring loop: `metric` on each image [1, 3, H, W] (sizes differ, so one at a time) and its ground
    truth (a list in the same order, or None)."""
    values = []
    for k, img in enumerate(images):
        try:
            values.append(metric(img.float().clamp(0, 1), None if gts is None else gts[k].float()))
        except (RuntimeError, ValueError, IndexError, AssertionError) as e:  # pyiqa's ways of refusing an image
            name = names[k] if names else f"number {k + 1}"
            raise MetricError(f"{metric.name} cannot score the image {name} ({img.shape[-2]}x{img.shape[-1]} pixels): "
                              f"{str(e).splitlines()[0] if str(e) else e.__class__.__name__}") from None
    return values


def score_images(
    images: list[tuple[str, torch.Tensor]],
    metrics: list[str],
    device,
    gts=None,
    protocol: dict | None = None,
) -> dict:
    """Score restored images [1, 3, H, W] in [0, 1] by each metric of `metrics` (benchmark evaluation).

    `gts`: reference images, a dict name -> tensor or a list in the order of `images` (needed by psnr, ssim and
    pyiqa's full-reference metrics such as lpips). "psnr"/"ssim" use this module's functions with the set's
    `protocol` (see Metric; default basicsr on RGB, uncropped); any other name is pyiqa's metric with its
    defaults, on the full RGB image. Returns {"metrics": {metric: {"mean": float, "per_image": {name: float}}}}.
    A metric that cannot score one of the images (a broken network's output can have no finite NIQE features) gives
    the set no mean: {"mean": None, "per_image": {}, "error": why}, and the other metrics still count."""
    if isinstance(gts, dict):
        gts = [gts[name] for name, _ in images]
    results = {}
    for name in metrics:
        metric = Metric(name, device, protocol=protocol or {})
        if metric.full_reference and gts is None:
            raise ValueError(f"metric {name} needs ground truth images (gts)")
        try:
            values = score(metric, [img for _, img in images], gts, [n for n, _ in images])
        except MetricError as e:
            results[name] = {"mean": None, "per_image": {}, "error": str(e)}
            continue
        results[name] = {"mean": sum(values) / max(len(values), 1),
                         "per_image": {n: v for (n, _), v in zip(images, values)}}
    return {"metrics": results}
