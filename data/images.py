"""Reading, converting and saving images, plus the small helpers every dataset here shares.

A "source" names a set of images in one of four ways:
  - a folder: its png/jpg/jpeg/bmp/tif/tiff files, sorted by name, not recursive;
  - a `.txt` list file: one image path per line, relative to the list file's folder (blank lines and
    lines starting with '#' are skipped);
  - a single image file;
  - `skimage:NAME`: a picture shipped with scikit-image (`skimage:astronaut`), handy offline.
Decoded images are uint8 H x W x 3 RGB numpy arrays (grayscale and RGBA inputs become RGB); tensors
are float [0, 1] in [3, H, W] or [N, 3, H, W].

Randomness in the crop/augment helpers comes only from torch's global RNG. `StageSampler` and
`SeededItems` seed that RNG per item, so a training patch depends only on (run seed, stage, rank, position),
whichever worker makes it.
"""

import os

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SKIMAGE_PREFIX = "skimage:"


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _folder_images(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if is_image_file(n))
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def read_list_file(list_file: str) -> list[str]:
    root = os.path.dirname(os.path.abspath(list_file))
    with open(list_file) as f:
        lines = [line.strip() for line in f]
    return [os.path.join(root, line) for line in lines if line and not line.startswith("#")]


def _skimage_exists(source: str) -> bool:
    import skimage.data

    name = source[len(SKIMAGE_PREFIX) :]
    return not name.startswith("_") and callable(getattr(skimage.data, name, None))


def check_sources(sources: list[str]) -> list[str]:
    """Return every path named by `sources` that does not exist (the sources themselves, and for list
    files, the entries they list), so a caller can report all of them in one error."""
    missing = []
    for source in sources:
        if source.startswith(SKIMAGE_PREFIX):
            if not _skimage_exists(source):
                missing.append(source)
        elif not os.path.exists(source):
            missing.append(source)
        elif source.endswith(".txt"):
            missing += [p for p in read_list_file(source) if not os.path.isfile(p)]
    return missing


def list_images(sources: list[str]) -> list[str]:
    """Image paths (or `skimage:NAME` entries) named by `sources`, in source order, without decoding.

    Raises FileNotFoundError naming the first missing path; a folder without images is an error too,
    because an empty training or benchmark set is always a mistake in the command line."""
    if isinstance(sources, str):
        sources = [sources]
    paths = []
    for source in sources:
        missing = check_sources([source])
        if missing:
            raise FileNotFoundError(f"image source not found: {missing[0]}")
        if source.startswith(SKIMAGE_PREFIX):
            paths.append(source)
        elif os.path.isdir(source):
            found = _folder_images(source)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {source}")
            paths += found
        elif source.endswith(".txt"):
            paths += read_list_file(source)
        else:
            paths.append(source)
    return paths


def image_name(path: str) -> str:
    """The name an image is reported under: the file name without extension, or NAME of skimage:NAME."""
    if path.startswith(SKIMAGE_PREFIX):
        return path[len(SKIMAGE_PREFIX) :]
    return os.path.splitext(os.path.basename(path))[0]


def _as_rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 4:
        img = img[:, :, :3]
    if img.dtype != np.uint8:
        # skimage ships a few float/bool pictures; map their [0, 1] range onto 8 bits.
        img = np.clip(np.round(img.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def load_image(path: str) -> np.ndarray:
    """Decode one image (a file path or skimage:NAME) to uint8 H x W x 3 RGB."""
    if path.startswith(SKIMAGE_PREFIX):
        import skimage.data

        if not _skimage_exists(path):
            raise FileNotFoundError(f"no picture named {path[len(SKIMAGE_PREFIX) :]!r} in skimage.data")
        return _as_rgb(getattr(skimage.data, path[len(SKIMAGE_PREFIX) :])())
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            # 16-bit PNGs ('I;16') do not convert to RGB meaningfully in PIL; scale them to 8 bits first.
            if im.mode.startswith("I;16") or im.mode == "I":
                arr = np.asarray(im, dtype=np.float64) / 65535.0
                return _as_rgb(arr)
            return _as_rgb(np.asarray(im.convert("RGB")))
    except PIL_ERRORS as e:
        raise ImageError(f"cannot read the image {path} ({e}): replace it, or remove it from the set") from None


class ImageError(ValueError):
    """An image that cannot be decoded (truncated, damaged, not an image): a problem of the data, not of the code."""


# PIL's ways of saying "damaged" (a decompression bomb, an image too large to trust, is an Exception of its own).
PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# How the files of each format end when they are whole: a PNG with its IEND chunk, a JPEG with its EOI marker.
TRAILERS = {".png": b"IEND\xaeB`\x82", ".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9"}


def damaged_images(paths: list[str]) -> list[str]:
    """'path (what is wrong)' for every image of `paths` that is damaged, by a look that costs no decoding: its header
    (PIL reads it when it opens the file) and, for PNG and JPEG, how the file ends (a truncated copy lacks the end).
    Fast enough to check a whole training set (DF2K's 3450 files) before stage 0."""
    found = []
    for path in paths:
        if path.startswith(SKIMAGE_PREFIX):
            continue
        try:
            with Image.open(path):
                pass
            trailer = TRAILERS.get(os.path.splitext(path)[1].lower())
            if trailer:
                with open(path, "rb") as f:
                    f.seek(max(0, os.path.getsize(path) - 1024))
                    if trailer not in f.read():
                        found.append(f"{path} (truncated: it does not end as a whole {os.path.splitext(path)[1]} file)")
        except PIL_ERRORS as e:
            found.append(f"{path} ({e})")
    return found


def read_images(sources: list[str]) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 H x W x 3 RGB) for every image named by `sources`."""
    return [(image_name(p), load_image(p)) for p in list_images(sources)]


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 H x W x 3 -> float32 [3, H, W] in [0, 1]."""
    img = np.ascontiguousarray(img)
    if not img.flags.writeable:  # e.g. np.asarray(PIL image); torch.from_numpy warns on those
        img = img.copy()
    return torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the nearest of the 256 levels an 8-bit file can hold (still float)."""
    return x.clamp(0, 1).mul(255.0).round().div(255.0)


def save_image(t: torch.Tensor, path: str) -> None:
    """Write a [3, H, W] or [1, 3, H, W] float [0, 1] tensor as an 8-bit PNG (rounded, clamped)."""
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"save_image takes one image, got a batch of {t.shape[0]}")
        t = t[0]
    arr = to_8bit(t.detach().float().cpu()).mul(255.0).byte().permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(arr).save(path)


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop H and W (top-left anchored) down to multiples of `scale`, as SR benchmarks do for GT."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def center_crop(img: np.ndarray, max_side: int, multiple: int = 1) -> np.ndarray:
    """Centre-crop each side to at most `max_side`, keeping sides multiples of `multiple`."""
    h, w = img.shape[:2]
    th, tw = min(h, max_side), min(w, max_side)
    th, tw = th - th % multiple, tw - tw % multiple
    top, left = (h - th) // 2, (w - tw) // 2
    return img[top : top + th, left : left + tw]


def mirror_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Indices start..stop-1 folded into [0, n) by symmetric reflection (edge pixel repeated:
    ... 1 0 | 0 1 ... n-1 | n-1 n-2 ...), MATLAB's 'symmetric' padding, valid for any overshoot."""
    idx = np.arange(start, stop) % (2 * n)
    return np.where(idx < n, idx, 2 * n - 1 - idx)


def reflect101_indices(stop: int, n: int) -> np.ndarray:
    """Indices 0..stop-1 folded into [0, n) by reflection without repeating the edge pixel (... 2 1 | 0 1 ... n-1 |
    n-2 n-3 ...), OpenCV's BORDER_REFLECT_101, valid for any overshoot."""
    if n == 1:
        return np.zeros(stop, dtype=np.int64)
    idx = np.arange(stop) % (2 * n - 2)
    return np.where(idx < n, idx, 2 * n - 2 - idx)


def random_crop(imgs: list[np.ndarray], size: int, align: list[int] | None = None) -> list[np.ndarray]:
    """Crop the same random window from H x W x C arrays of equal size.

    `size` is measured on the first array; `align` gives per-array scale factors (e.g. [1, 4] for an
    LR/HR pair, where the second array is 4x larger). Arrays smaller than the window are padded by
    symmetric reflection first, so tiny images still give full patches."""
    align = align or [1] * len(imgs)
    h, w = imgs[0].shape[:2]
    top = int(torch.randint(0, max(h - size, 0) + 1, ()).item())
    left = int(torch.randint(0, max(w - size, 0) + 1, ()).item())
    out = []
    for img, s in zip(imgs, align, strict=True):
        rows = mirror_indices(top * s, (top + size) * s, img.shape[0])
        cols = mirror_indices(left * s, (left + size) * s, img.shape[1])
        out.append(img[rows[:, None], cols[None, :]])
    return out


def random_dihedral(imgs: list[torch.Tensor], hflip: bool = True, rot: bool = True) -> list[torch.Tensor]:
    """Apply one random flip/90-degree-rotation (the same one) to every [C, H, W] tensor, as BasicSR's
    augment does: horizontal flip, vertical flip and transpose, each with probability 1/2."""
    coins = torch.rand(3) < 0.5
    out = []
    for t in imgs:
        if hflip and coins[0]:
            t = t.flip(-1)
        if rot and coins[1]:
            t = t.flip(-2)
        if rot and coins[2]:
            t = t.transpose(-1, -2)
        out.append(t.contiguous())
    return out


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor onto `device` without waiting for the GPU. A plain copy to a GPU waits for all the work
    queued before it; a copy from pinned memory does not (PyTorch keeps the pinned block until the copy is done)."""
    device = torch.device(device)
    if t.device == device or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def stage_seed(seed, stage, rank):
    """A well-mixed seed for one (run seed, stage, rank): reproducible across processes and resumes."""
    return int(np.random.SeedSequence([seed, stage, rank]).generate_state(1)[0])


class StageSampler(torch.utils.data.Sampler):
    """The training items of one stage on one rank: `count` dataset indices drawn uniformly with replacement,
    each paired with a seed of its own for that item's crop and flips. It lives as long as the run, so the
    DataLoader's workers (and their image caches) persist across stages; `reseed` moves it to the next stage."""

    def __init__(self, size: int, count: int):
        self.size, self.count, self.seed = size, count, 0

    def reseed(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        indices = torch.randint(self.size, (self.count,), generator=g).tolist()
        seeds = torch.randint(2**62, (self.count,), generator=g).tolist()
        return iter(zip(indices, seeds))


class SeededItems(torch.utils.data.Dataset):
    """`dataset`, indexed by StageSampler's (index, seed) pairs: each item is drawn with torch's RNG seeded
    by its seed. The RNG is restored afterwards, so without workers the training process's RNG (drop path)
    is not disturbed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class ImageCache:
    """Decodes images on first use and keeps small ones in memory.

    Each DataLoader worker holds its own copy (datasets are pickled into workers), so memory is
    bounded per worker by `max_bytes`; images above `max_pixels` (e.g. 2K DF2K photos) are decoded
    every time instead: for those, pre-extract sub-images (data.cisr.prepare_subimages)."""

    def __init__(self, max_pixels: int = 1_000_000, max_bytes: int = 512 * 2**20):
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.cached: dict[str, np.ndarray] = {}
        self.nbytes = 0

    def get(self, path: str) -> np.ndarray:
        img = self.cached.get(path)
        if img is None:
            img = load_image(path)
            small = img.shape[0] * img.shape[1] <= self.max_pixels
            if small and self.nbytes + img.nbytes <= self.max_bytes:
                self.cached[path] = img
                self.nbytes += img.nbytes
        return img
