"""AIR (all-in-one restoration) training data, PromptIR's three-task protocol in one dataset:
  denoise  clean images (BSD400 + WED) plus Gaussian noise, sigma in {15, 25, 50}, made on the fly;
  derain   Rain100L training pairs;
  dehaze   RESIDE OTS/SOTS outdoor pairs.

Paired folders are recognised by their sub-folder names (degraded, clean), first match wins:
  rainy/ + norain/       Rain100L as distributed (rain-001.png <-> norain-001.png)
  rainy/ + gt/           PromptIR's data/Train/Derain layout (rain-12.png <-> norain-12.png)
  hazy/ + clear/, hazy/ + gt/   RESIDE/SOTS (0001_0.8_0.2.jpg <-> 0001.png)
  synthetic/ + original/ PromptIR's data/Train/Dehaze layout (synthetic/part1/0025_0.8_0.04.jpg <-> original/0025.jpg)
  input/ + target/       PromptIR's test layout and Restormer-style sets (same names)
Degraded images are found recursively under the degraded folder (PromptIR splits OTS into part1..4).
The clean partner of a degraded image is the first clean image whose name (without extension)
equals: the degraded name; its part before the first '_' (hazy naming); or 'no' + the name when it
starts with 'rain' (rain-12 -> norain-12). Instead of a folder, a `.txt` list file of degraded
images (paths relative to the list file, like PromptIR's rainTrain.txt / hazy_outside.txt placed in
the dataset folder) may be given: the clean folder is then looked up beside the list file.
"""

import os

import torch
from torch.utils.data import Dataset

from data.images import (
    ImageCache,
    image_name,
    is_image_file,
    list_images,
    random_crop,
    random_dihedral,
    read_list_file,
    to_8bit,
    to_tensor,
)

PAIR_LAYOUTS = (
    ("rainy", "norain"),
    ("rainy", "gt"),
    ("hazy", "clear"),
    ("hazy", "gt"),
    ("synthetic", "original"),
    ("input", "target"),
)


def clean_name_candidates(name: str) -> list[str]:
    """Names (without extension) the clean partner of degraded image `name` may have, in order."""
    candidates = [name, name.split("_")[0]]
    if name.startswith("rain"):
        candidates.append("no" + name)
    return candidates


def pair_by_name(lq_paths: list[str], gt_paths: list[str]) -> list[tuple[str, str]]:
    """(degraded, clean) path pairs, matching each degraded image to a clean one by the naming rules
    above; a degraded image without partner raises FileNotFoundError naming it."""
    by_name = {}
    for path in gt_paths:
        by_name.setdefault(image_name(path), path)
    pairs = []
    for lq in lq_paths:
        match = next((by_name[c] for c in clean_name_candidates(image_name(lq)) if c in by_name), None)
        if match is None:
            folder = os.path.dirname(gt_paths[0]) if gt_paths else "the clean set"
            tried = ", ".join(clean_name_candidates(image_name(lq)))
            raise FileNotFoundError(f"no clean image for {lq} in {folder} (looked for names: {tried})")
        pairs.append((lq, match))
    return pairs


def _images_recursive(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if is_image_file(f)]
    return found


def find_pairs(source: str) -> list[tuple[str, str]]:
    """(degraded, clean) pairs of a paired dataset folder, or of a `.txt` list of degraded images."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"paired dataset not found: {source}")
    listed = source.endswith(".txt") and os.path.isfile(source)
    root = os.path.dirname(os.path.abspath(source)) if listed else source
    for lq_dir, gt_dir in PAIR_LAYOUTS:
        lq_root, gt_root = os.path.join(root, lq_dir), os.path.join(root, gt_dir)
        if os.path.isdir(gt_root) and (listed or os.path.isdir(lq_root)):
            lq_paths = read_list_file(source) if listed else _images_recursive(lq_root)
            if not lq_paths:
                raise FileNotFoundError(f"no degraded images in {source if listed else lq_root}")
            return pair_by_name(lq_paths, list_images([gt_root]))
    layouts = ", ".join(f"{a}/+{b}/" for a, b in PAIR_LAYOUTS)
    raise FileNotFoundError(f"{root} has none of the paired layouts (degraded/+clean/): {layouts}")


def crop_to_common(a, b):
    """Crop two H x W x C arrays (top-left anchored) to their common size: a few datasets ship pairs
    a pixel or two apart."""
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    return a[:h, :w], b[:h, :w]


class AIRDataset(Dataset):
    """Items {"lq": [3, patch, patch], "gt": same, "task": "denoise_25" | "derain" | "dehaze"}.

    Mixing follows PromptIR's training list: every clean image appears `repeats[0]` times per sigma,
    every rain pair `repeats[1]` times (Rain100L's 200 pairs are few) and every hazy pair
    `repeats[2]` times; an epoch walks that list (shuffle it with the DataLoader). With `length` set,
    each item instead draws a random entry of the list, keeping the same task proportions.
    Noise, crops and the shared flip/rotation come from torch's global RNG. Noisy inputs are
    rounded to 8 bits (PromptIR truncates them with astype(uint8), a -0.5 level bias we do not copy).
    """

    def __init__(
        self,
        denoise_sources=(),
        derain_dir: str | None = None,
        dehaze_dir: str | None = None,
        patch: int = 128,
        sigmas=(15, 25, 50),
        augment: bool = True,
        length: int | None = None,
        repeats: tuple[int, int, int] = (3, 120, 1),
        cache_pixels: int = 1_000_000,
    ):
        self.patch, self.augment = patch, augment
        # entries: (task, degraded path or None, clean path, sigma or None)
        self.entries = []
        if denoise_sources:
            clean = list_images(list(denoise_sources))
            for sigma in sigmas:
                self.entries += [(f"denoise_{sigma}", None, p, sigma) for p in clean] * repeats[0]
        if derain_dir is not None:
            self.entries += [("derain", lq, gt, None) for lq, gt in find_pairs(derain_dir)] * repeats[1]
        if dehaze_dir is not None:
            self.entries += [("dehaze", lq, gt, None) for lq, gt in find_pairs(dehaze_dir)] * repeats[2]
        if not self.entries:
            raise ValueError("AIRDataset needs denoise_sources, derain_dir or dehaze_dir")
        self.length = length
        self.cache = ImageCache(max_pixels=cache_pixels)

    def __len__(self) -> int:
        return self.length or len(self.entries)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):  # lets `for item in dataset` stop
            raise IndexError(index)
        if self.length is not None:
            index = int(torch.randint(0, len(self.entries), ()).item())
        task, lq_path, gt_path, sigma = self.entries[index % len(self.entries)]
        if lq_path is None:
            (crop,) = random_crop([self.cache.get(gt_path)], self.patch)
            (gt,) = random_dihedral([to_tensor(crop)]) if self.augment else (to_tensor(crop),)
            lq = to_8bit(gt + torch.randn(gt.shape) * (sigma / 255.0))
        else:
            lq_img, gt_img = crop_to_common(self.cache.get(lq_path), self.cache.get(gt_path))
            lq_crop, gt_crop = random_crop([lq_img, gt_img], self.patch)
            lq, gt = to_tensor(lq_crop), to_tensor(gt_crop)
            if self.augment:
                lq, gt = random_dihedral([lq, gt])
        return {"lq": lq, "gt": gt, "task": task}
