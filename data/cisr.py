"""CISR (classical image SR) training data: HR patches and their bicubic x`scale` LR partners.

The paper fine-tunes SwinIR on DF2K with BasicSR's paired protocol, where the LR files were made
offline by MATLAB's imresize of the whole (mod-cropped) HR image and saved as 8-bit PNGs. We make
the LR on the fly instead, but so that it equals a crop of that offline LR: the HR window is cut
with a margin of 3 LR pixels (the antialiased x4 kernel reaches 2 LR pixels out), resized, and the
margin discarded; windows are aligned to the LR grid, and where the margin leaves the image it is
filled by symmetric reflection, which is exactly what MATLAB does at the image border.
"""

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from data.images import (
    ImageCache,
    image_name,
    list_images,
    load_image,
    mirror_indices,
    modcrop,
    random_dihedral,
    to_8bit,
    to_tensor,
)
from data.imresize import imresize

# LR pixels of HR context kept around a patch so its LR border matches whole-image resizing.
_MARGIN = 3


def bicubic_lr(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """8-bit LR of a [..., H, W] HR tensor (H, W multiples of `scale`), as MATLAB-made LR files."""
    return to_8bit(imresize(hr, 1 / scale))


class CISRDataset(Dataset):
    """Items {"lq": [3, p, p], "gt": [3, p*scale, p*scale]}, float [0, 1], p = lr_patch.

    Every item: pick an image (index modulo the image count), pick an LR-aligned window uniformly,
    build the 8-bit bicubic LR, then apply one random flip/rotation to both. `length` is the virtual
    epoch length (default: one item per image). Randomness comes only from torch's global RNG.
    """

    def __init__(
        self,
        sources: list[str],
        scale: int = 4,
        lr_patch: int = 64,
        augment: bool = True,
        length: int | None = None,
        cache_pixels: int = 1_000_000,
    ):
        self.paths = list_images(sources)
        self.scale, self.lr_patch, self.augment = scale, lr_patch, augment
        self.length = length or len(self.paths)
        self.cache = ImageCache(max_pixels=cache_pixels)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):  # lets `for item in dataset` stop
            raise IndexError(index)
        s, p, m = self.scale, self.lr_patch, _MARGIN
        hr_img = modcrop(self.cache.get(self.paths[index % len(self.paths)]), s)
        lr_h, lr_w = hr_img.shape[0] // s, hr_img.shape[1] // s
        top = int(torch.randint(0, max(lr_h - p, 0) + 1, ()).item())
        left = int(torch.randint(0, max(lr_w - p, 0) + 1, ()).item())
        # HR window plus margin, in HR pixels; reflection covers both the margin and tiny images.
        rows = mirror_indices((top - m) * s, (top + p + m) * s, hr_img.shape[0])
        cols = mirror_indices((left - m) * s, (left + p + m) * s, hr_img.shape[1])
        hr = to_tensor(hr_img[rows[:, None], cols[None, :]])
        lq = bicubic_lr(hr, s)[:, m : m + p, m : m + p]
        gt = hr[:, m * s : (m + p) * s, m * s : (m + p) * s]
        if self.augment:
            lq, gt = random_dihedral([lq, gt])
        return {"lq": lq.contiguous(), "gt": gt.contiguous()}


def _grid_starts(length: int, crop: int, step: int, thresh_size: int) -> list[int]:
    """Window starts along one side: every `step`, plus a last window flush with the far edge when
    the leftover strip is wider than `thresh_size` (BasicSR extract_subimages)."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop + 1, step))
    if length - (starts[-1] + crop) > thresh_size:
        starts.append(length - crop)
    return starts


def prepare_subimages(sources: list[str], out_dir: str, crop: int = 480, step: int = 240, thresh_size: int = 0) -> int:
    """Cut every image into overlapping `crop` x `crop` PNG tiles `{name}_s{k:03d}.png` in `out_dir`
    (BasicSR's extract_subimages layout) and return how many were written.

    Large training sets (DF2K's 2K photos) then load as many small files that the dataset can cache
    and decode fast: pass `out_dir` as the source folder. Images smaller than `crop` are kept whole.
    One difference from BasicSR's offline pipeline: BasicSR cuts LR sub-images from the whole-image
    LR, while CISRDataset resizes each sub-image on its own, so LR pixels within 2 pixels of a
    sub-image edge see reflected rather than true neighbours.
    """
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for path in list_images(sources):
        img = load_image(path)
        h, w = img.shape[:2]
        k = 0
        for y in _grid_starts(h, crop, step, thresh_size):
            for x in _grid_starts(w, crop, step, thresh_size):
                k += 1
                tile = np.ascontiguousarray(img[y : y + crop, x : x + crop])
                Image.fromarray(tile).save(os.path.join(out_dir, f"{image_name(path)}_s{k:03d}.png"), compress_level=3)
                written += 1
    return written
