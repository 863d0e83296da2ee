"""The small fixed image set the agent looks at after every stage (the paper's T feedback images).

The set must be the same at every stage and in every re-run, so the T images are drawn once from
the sorted image list with a private torch.Generator seeded by `seed` (the global RNG is never
touched), and any synthetic degradation of an image is seeded by (seed, image name).
"""

import torch

from data.air import crop_to_common, pair_by_name
from data.benchmark import add_gaussian_noise, image_generator
from data.cisr import bicubic_lr
from data.images import ImageError, center_crop, image_name, list_images, load_image, modcrop, to_tensor

DEGRADATIONS = ("bicubic", "none", "noise", "realesrgan")


def _sample(items: list, count: int, seed: int) -> list:
    """`count` of `items` (all if fewer), chosen by a seeded permutation, returned in list order."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(items), generator=g)[: min(count, len(items))]
    return [items[i] for i in sorted(chosen.tolist())]


def load_feedback(
    sources: list[str],
    count: int,
    seed: int,
    degradation: str,
    scale: int = 4,
    sigma: float | None = None,
    lq_sources: list[str] | None = None,
    max_side: int | None = None,
) -> list[dict]:
    """T = `count` feedback items {"name", "lq": [1, 3, h, w], "gt": [1, 3, H, W] | None}.

    degradation:
      "bicubic"     CISR: gt = image cropped to a multiple of `scale`, lq = 8-bit MATLAB-bicubic 1/scale;
      "none"        lq = the image itself, no gt (real inputs such as RealSRSet); with `lq_sources`,
                    `sources` are the clean images and lq/gt are paired by name (data.air rules);
      "noise"       AIR denoising: lq = 8-bit image + N(0, sigma^2) (sigma on the 0..255 scale);
      "realesrgan"  RISR with a synthetic gt: lq = RealESRGANDegradation(scale) of the image.
    `max_side` centre-crops each image (both of a pair) to at most max_side per side, keeping the
    feedback cheap to run on a CPU."""
    if degradation not in DEGRADATIONS:
        raise ValueError(f"unknown feedback degradation {degradation!r}: one of {', '.join(DEGRADATIONS)}")
    if degradation == "noise" and sigma is None:
        raise ValueError("feedback degradation 'noise' needs sigma")
    multiple = scale if degradation in ("bicubic", "realesrgan") else 1

    def crop(img):
        return center_crop(img, max_side, multiple) if max_side else img

    if lq_sources:
        if degradation != "none":
            raise ValueError("lq_sources gives real degraded inputs: use it with degradation 'none'")
        pairs = sorted(
            pair_by_name(list_images(lq_sources), list_images(sources)), key=lambda p: (image_name(p[0]), p[0])
        )
        items = []
        for lq_path, gt_path in _sample(pairs, count, seed):
            lq, gt = crop_to_common(load_image(lq_path), load_image(gt_path))
            items.append(
                {"name": image_name(lq_path), "lq": to_tensor(crop(lq))[None], "gt": to_tensor(crop(gt))[None]}
            )
        return items

    paths = sorted(list_images(sources), key=lambda p: (image_name(p), p))
    items = []
    for path in _sample(paths, count, seed):
        name = image_name(path)
        img = crop(load_image(path))
        if degradation == "none":
            items.append({"name": name, "lq": to_tensor(img)[None], "gt": None})
            continue
        if degradation == "noise":
            gt = to_tensor(img)[None]
            lq = add_gaussian_noise(gt, sigma, image_generator(seed, name))
        else:
            gt = to_tensor(modcrop(img, scale))[None]
            if degradation == "bicubic":
                lq = bicubic_lr(gt, scale)
            else:
                from data.risr import RealESRGANDegradation

                lq = RealESRGANDegradation(scale=scale)(gt, image_generator(seed, name))
        items.append({"name": name, "lq": lq, "gt": gt})
    return items


def feedback_images(cfg, scale: int) -> list[dict]:
    """The run's T feedback images from its [feedback] settings `cfg` (see load_feedback)."""
    items = load_feedback(cfg.sources, cfg.count, cfg.seed, cfg.degradation, scale=scale, sigma=cfg.sigma,
                          lq_sources=cfg.lq_sources or None, max_side=cfg.max_side or None)
    if len(items) < cfg.count:
        raise ImageError(f"feedback.count = {cfg.count} but feedback.sources hold only {len(items)} images")
    return items

