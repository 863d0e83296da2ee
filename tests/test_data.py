"""Tests of data/: image IO, MATLAB imresize, CISR/RISR/AIR training data, feedback sets, benchmarks."""

import io
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data.air import AIRDataset, find_pairs
from data.benchmark import benchmark_pairs, psnr, rgb_to_y, score_images, ssim, tiled_forward
from data.cisr import CISRDataset, bicubic_lr, prepare_subimages
from data.feedback import load_feedback
from data.images import (SeededItems, StageSampler, check_sources, list_images, load_image, modcrop, read_images,
                         save_image, to_tensor)
from data.imresize import imresize
from data.jpeg import jpeg_roundtrip
from data.risr import KERNEL_TYPES, GTCropDataset, RealESRGANDegradation, _sinc_kernels, random_blur_kernels

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
SKIMAGE_SET = ["skimage:astronaut", "skimage:coffee", "skimage:chelsea", "skimage:rocket", "skimage:camera"]


def shared(name):
    path = os.path.join(SHARED, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} absent (shared benchmark data not checked out beside the repo)")
    return path


def write_png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def random_uint8(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# images


def test_sources_folder_list_skimage_and_missing(tmp_path):
    write_png(str(tmp_path / "imgs" / "b.png"), random_uint8(8, 9, 0))
    write_png(str(tmp_path / "imgs" / "a.png"), random_uint8(8, 9, 1))
    Image.fromarray(random_uint8(6, 7, 2)[:, :, 0]).save(tmp_path / "imgs" / "gray.bmp")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "list.txt").write_text("imgs/b.png\n\n# comment\nimgs/gray.bmp\n")

    images = read_images([str(tmp_path / "imgs"), str(tmp_path / "list.txt"), "skimage:camera"])
    assert [n for n, _ in images] == ["a", "b", "gray", "b", "gray", "camera"]
    assert all(img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 for _, img in images)
    assert np.array_equal(images[2][1][:, :, 0], images[2][1][:, :, 2])  # gray -> RGB

    missing = str(tmp_path / "nope")
    assert check_sources([str(tmp_path / "imgs"), missing, "skimage:no_such_picture"]) == [
        missing,
        "skimage:no_such_picture",
    ]
    (tmp_path / "bad.txt").write_text("imgs/a.png\nimgs/zzz.png\n")
    assert check_sources([str(tmp_path / "bad.txt")]) == [str(tmp_path / "imgs" / "zzz.png")]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images([missing])


def test_to_tensor_and_save_image_round_trip(tmp_path):
    img = random_uint8(10, 12, 3)
    t = to_tensor(img)
    assert t.shape == (3, 10, 12) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    save_image(t[None] + 0.4 / 255, str(tmp_path / "out" / "x.png"))  # rounds back to the same levels
    assert np.array_equal(load_image(str(tmp_path / "out" / "x.png")), img)


# ----------------------------------------------------------------------------------------------
# imresize against an independent numpy implementation of MATLAB's algorithm


def np_cubic(x):
    x = np.abs(x)
    return np.where(x <= 1, 1.5 * x**3 - 2.5 * x**2 + 1, np.where(x <= 2, -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2, 0.0))


def np_resize_axis(a, axis, out_len, scale):
    """Output pixel i sits at input coordinate (i + 0.5) / scale - 0.5; when shrinking, the kernel is
    stretched by 1/scale; out-of-range taps mirror symmetrically; weights normalised per pixel."""
    a = np.moveaxis(a, axis, 0)
    n = a.shape[0]
    shrink = scale < 1
    radius = 2 / scale if shrink else 2
    out = np.zeros((out_len,) + a.shape[1:])
    for i in range(out_len):
        centre = (i + 0.5) / scale - 0.5
        taps = np.arange(math.floor(centre - radius) - 1, math.ceil(centre + radius) + 2)
        w = scale * np_cubic((centre - taps) * scale) if shrink else np_cubic(centre - taps)
        w = w / w.sum()
        src = [t if 0 <= t < n else (-t - 1 if t < 0 else 2 * n - 1 - t) for t in taps]
        out[i] = np.tensordot(w, a[src], axes=1)
    return np.moveaxis(out, 0, axis)


def np_imresize(a, out_h, out_w, sh, sw):
    if sh <= sw:
        return np_resize_axis(np_resize_axis(a, 0, out_h, sh), 1, out_w, sw)
    return np_resize_axis(np_resize_axis(a, 1, out_w, sw), 0, out_h, sh)


@pytest.mark.parametrize("scale", [1 / 4, 1 / 2, 1 / 3, 2])
def test_imresize_matches_numpy_reference(scale):
    img = np.random.default_rng(0).random((27, 34))
    ref = np_imresize(img, math.ceil(27 * scale), math.ceil(34 * scale), scale, scale)
    x = torch.from_numpy(img)
    out64 = imresize(x, scale)
    assert out64.shape == ref.shape
    assert np.abs(out64.numpy() - ref).max() < 1e-10
    batch = torch.from_numpy(np.stack([img, 1 - img]))[None].float()  # [1, 2, H, W] float32
    out32 = imresize(batch, scale)
    assert np.abs(out32[0, 0].numpy() - ref).max() < 1e-5
    assert np.abs(out32[0, 1].numpy() - np_imresize(1 - img, *ref.shape, scale, scale)).max() < 1e-5


def test_imresize_size_argument_and_dimension_order():
    img = np.random.default_rng(1).random((20, 30))
    ref = np_imresize(img, 7, 12, 7 / 20, 12 / 30)  # scales 0.35 (H) < 0.4 (W): rows first
    assert np.abs(imresize(torch.from_numpy(img), size=(7, 12)).numpy() - ref).max() < 1e-10
    ref = np_imresize(img, 10, 9, 10 / 20, 9 / 30)  # W has the smaller scale: columns first
    assert np.abs(imresize(torch.from_numpy(img), size=(10, 9)).numpy() - ref).max() < 1e-10


def test_imresize_documented_values_and_constant_image():
    # Octave's imresize (MATLAB's algorithm) on [0..15] as a 4x4 row-major image, without antialiasing:
    # documented output [[2.1875, 4.3125], [10.6875, 12.8125]].
    img = torch.arange(16, dtype=torch.float64).view(4, 4)
    expected = torch.tensor([[2.1875, 4.3125], [10.6875, 12.8125]], dtype=torch.float64)
    assert torch.allclose(imresize(img, 0.5, antialiasing=False), expected, atol=1e-12)
    const = torch.full((2, 3, 17, 23), 0.37)
    for scale in (1 / 4, 1 / 3, 2):
        assert torch.allclose(imresize(const, scale), torch.full_like(imresize(const, scale), 0.37), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# CISR


def test_cisr_patches_are_crops_of_whole_image_lr(tmp_path):
    # 202 x 233: not multiples of 4, so the dataset must mod-crop like the offline LR files
    write_png(str(tmp_path / "hr.png"), load_image("skimage:astronaut")[:202, :233])
    hr = modcrop(load_image(str(tmp_path / "hr.png")), 4)
    hr_t, whole_lr = to_tensor(hr), bicubic_lr(to_tensor(hr), 4)  # LR [3, 50, 58]
    ds = CISRDataset([str(tmp_path / "hr.png")], scale=4, lr_patch=40, augment=False, length=8)
    torch.manual_seed(0)
    near_border = 0
    for item in ds:
        assert item["lq"].shape == (3, 40, 40) and item["gt"].shape == (3, 160, 160)
        assert torch.equal(item["lq"] * 255, (item["lq"] * 255).round())
        # find where the GT patch came from, then compare with the same window of the whole-image LR
        hits = [
            (y, x)
            for y in range(0, 50 - 40 + 1)
            for x in range(0, 58 - 40 + 1)
            if torch.equal(hr_t[:, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4], item["gt"][:, :4, :4])
            and torch.equal(hr_t[:, 4 * y : 4 * y + 160, 4 * x : 4 * x + 160], item["gt"])
        ]
        assert len(hits) == 1
        y, x = hits[0]
        near_border += min(y, x, 10 - y, 18 - x) < 3  # the LR kernel reaches past the image edge
        ref = whole_lr[:, y : y + 40, x : x + 40]
        assert (item["lq"] - ref).abs().max() <= 1 / 255 + 1e-6  # equal but for rare float ties
        assert (item["lq"] - ref).abs().mean() < 1e-4
    assert near_border >= 2


def test_cisr_loader_reproducible_with_workers_and_subimages(tmp_path):
    write_png(str(tmp_path / "hr" / "a.png"), load_image("skimage:coffee")[:100, :130])
    assert prepare_subimages([str(tmp_path / "hr")], str(tmp_path / "sub"), crop=48, step=24) == 4 * 5
    names = sorted(os.listdir(tmp_path / "sub"))
    assert names[0] == "a_s001.png" and load_image(str(tmp_path / "sub" / names[0])).shape == (48, 48, 3)

    ds = CISRDataset([str(tmp_path / "sub")], scale=4, lr_patch=8, length=8)

    def batches(seed):
        loader = torch.utils.data.DataLoader(
            ds, batch_size=4, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(seed)
        )
        return [b["lq"] for b in loader]

    first, again, other = batches(0), batches(0), batches(1)
    assert first[0].shape == (4, 3, 8, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_stage_sampler_items_do_not_depend_on_workers_or_earlier_stages(tmp_path):
    """Persistent workers: one loader for the run, reseeded per stage. A stage's patches depend only on its seed,
    not on the worker count or on the stages drawn before it (what a resumed run needs)."""
    ds = SeededItems(CISRDataset(["skimage:coffee", "skimage:chelsea"], scale=4, lr_patch=8))

    def loader(workers):
        return torch.utils.data.DataLoader(ds, batch_size=2, sampler=StageSampler(len(ds), 6), num_workers=workers,
                                           persistent_workers=workers > 0)

    def stage(loader, seed):
        loader.sampler.reseed(seed)
        return torch.cat([b["lq"] for b in loader])

    persistent, fresh = loader(2), loader(0)
    seq = [stage(persistent, seed) for seed in (11, 12, 11)]
    assert seq[0].shape == (6, 3, 8, 8)
    assert torch.equal(seq[0], seq[2]) and not torch.equal(seq[0], seq[1])
    assert torch.equal(stage(fresh, 12), seq[1])
    state = torch.get_rng_state()
    ds[(0, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # the training process's RNG is left as it was
    assert torch.equal(ds[(1, 5)]["lq"], ds[(1, 5)]["lq"]) and not torch.equal(ds[(1, 5)]["lq"], ds[(1, 6)]["lq"])


# ----------------------------------------------------------------------------------------------
# RISR


def gt_batch(n=2, size=64):
    imgs = [to_tensor(load_image(name))[:, :size, :size] for name in SKIMAGE_SET[:n]]
    return torch.stack(imgs)


def test_degradation_seeded_shapes_and_8bit():
    gt = gt_batch(3, 96)
    deg = RealESRGANDegradation(scale=4)
    out = deg(gt, torch.Generator().manual_seed(7))
    assert out.shape == (3, 3, 24, 24)
    assert 0 <= out.min() and out.max() <= 1
    assert torch.equal(out * 255, (out * 255).round())
    assert torch.equal(out, deg(gt, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, deg(gt, torch.Generator().manual_seed(8)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: checks that the degradation never waits for it")
def test_degradation_on_a_gpu_never_synchronises():
    gt = gt_batch(2, 64).cuda()
    torch.cuda.set_sync_debug_mode("error")  # any host read of a GPU tensor, or a blocking copy, raises
    try:
        for seed in range(4):  # both noise kinds and both final orders
            out = RealESRGANDegradation(scale=4)(gt, torch.Generator().manual_seed(seed))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == gt.device and out.shape == (2, 3, 16, 16)


BRANCHES = [
    ({"sinc_prob": 1.0, "sinc_prob2": 1.0}, lambda t: set(t["kernel1"] + t["kernel2"]) == {"sinc"}),
    *[
        (
            {"kernel_prob": tuple(float(i == k) for i in range(6)), "sinc_prob": 0.0},
            lambda t, k=k: set(t["kernel1"]) == {KERNEL_TYPES[k]},
        )
        for k in range(6)
    ],
    *[
        ({"resize_prob": p, "resize_prob2": p}, lambda t, d=d: t["resize1"][0] == t["resize2"][0] == d)
        for p, d in [((1, 0, 0), "up"), ((0, 1, 0), "down"), ((0, 0, 1), "keep")]
    ],
    *[
        ({"resize_modes": (m,)}, lambda t, m=m: t["resize1"][1] == t["final"][1] == m)
        for m in ("area", "bilinear", "bicubic")
    ],
    (
        {"gaussian_noise_prob": 1.0, "gaussian_noise_prob2": 1.0, "gray_noise_prob": 1.0},
        lambda t: t["noise1"] == ("gaussian", [True, True]) and t["noise2"][0] == "gaussian",
    ),
    (
        {"gaussian_noise_prob": 0.0, "gaussian_noise_prob2": 0.0, "gray_noise_prob": 1.0, "gray_noise_prob2": 0.0},
        lambda t: t["noise1"] == ("poisson", [True, True]) and t["noise2"] == ("poisson", [False, False]),
    ),
    ({"second_blur_prob": 1.0}, lambda t: t["second_blur"]),
    ({"second_blur_prob": 0.0}, lambda t: not t["second_blur"]),
    (
        {"resize_first_prob": 1.0, "final_sinc_prob": 1.0},
        lambda t: t["final"][0] == "resize_first" and all(t["final_sinc"]),
    ),
    (
        {"resize_first_prob": 0.0, "final_sinc_prob": 0.0},
        lambda t: t["final"][0] == "jpeg_first" and not any(t["final_sinc"]),
    ),
]


@pytest.mark.parametrize("overrides,taken", BRANCHES)
def test_degradation_every_branch(overrides, taken):
    deg = RealESRGANDegradation(**overrides)
    out = deg(gt_batch(2, 64), torch.Generator().manual_seed(0))
    assert taken(deg.trace), deg.trace
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    assert torch.equal(out * 255, (out * 255).round()) and 0 <= out.min() and out.max() <= 1


def test_blur_kernels_shapes_and_formulas():
    g = torch.Generator().manual_seed(0)
    kernels, names = random_blur_kernels(
        200, g, (7, 9, 21), (0.45, 0.25, 0.12, 0.03, 0.12, 0.03), 0.1, (0.2, 3), (0.5, 4), (1, 2)
    )
    assert kernels.shape == (200, 21, 21) and set(names) == set(KERNEL_TYPES) | {"sinc"}
    assert torch.allclose(kernels.sum(dim=(1, 2)), torch.ones(200), atol=1e-5)
    for k, name in zip(kernels, names, strict=True):
        if name in ("iso", "generalized_iso", "plateau_iso"):
            assert torch.allclose(k, k.T, atol=1e-6) and torch.allclose(k, k.flip(0), atol=1e-6)
    # An isotropic gaussian of fixed sigma and size 7 is the textbook sampled gaussian, zero-padded to 21.
    k, _ = random_blur_kernels(1, g, (7,), (1, 0, 0, 0, 0, 0), 0.0, (1.3, 1.3 + 1e-9), (0.5, 4), (1, 2))
    ax = np.arange(-3, 4)
    ref = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * 1.3**2))
    assert np.abs(k[0, 7:14, 7:14].numpy() - ref / ref.sum()).max() < 1e-6 and k[0, :7].abs().sum() == 0
    # the sinc kernel follows w J1(w r) / (2 pi r)
    from scipy.special import j1

    ax21 = torch.arange(21.0) - 10
    yy, xx = torch.meshgrid(ax21, ax21, indexing="ij")
    sinc = _sinc_kernels(torch.tensor([1.1]), xx, yy)[0].double().numpy()
    r = np.hypot(xx.numpy(), yy.numpy())
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.where(r > 0, 1.1 * j1(1.1 * r) / (2 * np.pi * r), 1.1**2 / (4 * np.pi))
    assert np.abs(sinc - ref).max() < 1e-6


def test_jpeg_roundtrip_close_to_libjpeg():
    img = load_image("skimage:astronaut")[:200, :232]  # sides not multiples of 16 on purpose
    t = to_tensor(img)[None]
    for quality in (30, 90):
        ours = jpeg_roundtrip(t, quality)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality, subsampling=2)
        ref = to_tensor(np.asarray(Image.open(io.BytesIO(buf.getvalue()))))[None]
        assert ours.shape == t.shape and torch.equal(ours * 255, (ours * 255).round())
        assert abs(psnr(ours, t) - psnr(ref, t)) < 1.0
        assert psnr(ours, ref) > 38
    assert psnr(jpeg_roundtrip(t, 30), t) < psnr(jpeg_roundtrip(t, 90), t)


def test_gt_crop_dataset_pads_small_images(tmp_path):
    write_png(str(tmp_path / "small.png"), random_uint8(40, 50, 5))
    ds = GTCropDataset([str(tmp_path)], crop=64, length=3)
    assert len(ds) == 3 and ds[0]["gt"].shape == (3, 64, 64)


# ----------------------------------------------------------------------------------------------
# AIR


def make_air_folders(root):
    """Tiny Rain100L- and SOTS-style sets whose degraded image is the photographic negative of the
    clean one, so any crop/flip mismatch between the two shows."""
    clean = [load_image(n)[:150, :160] for n in SKIMAGE_SET[:3]]
    write_png(f"{root}/denoise/a.png", clean[0])
    for i, img in enumerate(clean[:2], start=1):
        write_png(f"{root}/rain/rainy/rain-{i}.png", 255 - img)
        write_png(f"{root}/rain/norain/norain-{i}.png", img)
    write_png(f"{root}/haze/hazy/0001_0.8_0.2.png", 255 - clean[2][:148])  # 2 rows short of its GT
    write_png(f"{root}/haze/gt/0001.png", clean[2])


def test_air_mixture_yields_all_tasks_with_aligned_pairs(tmp_path):
    make_air_folders(tmp_path)
    ds = AIRDataset(
        denoise_sources=[str(tmp_path / "denoise")],
        derain_dir=str(tmp_path / "rain"),
        dehaze_dir=str(tmp_path / "haze"),
        patch=32,
        repeats=(1, 1, 1),
    )
    assert len(ds) == 3 + 2 + 1
    torch.manual_seed(0)
    items = [ds[i] for i in range(len(ds))]
    assert {it["task"] for it in items} == {"denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"}
    for it in items:
        assert it["lq"].shape == it["gt"].shape == (3, 32, 32)
        assert torch.equal(it["lq"] * 255, (it["lq"] * 255).round())
        if it["task"] in ("derain", "dehaze"):
            assert torch.allclose(it["lq"], 1 - it["gt"], atol=1e-6)
    noise = {it["task"]: (it["lq"] - it["gt"]).std().item() * 255 for it in items if it["task"].startswith("denoise")}
    assert noise["denoise_15"] < noise["denoise_25"] < noise["denoise_50"]

    # With a virtual length, items draw random entries; the default collate keeps tasks as strings.
    mixed = AIRDataset(
        [str(tmp_path / "denoise")],
        str(tmp_path / "rain"),
        str(tmp_path / "haze"),
        patch=32,
        length=64,
        repeats=(1, 1, 1),
    )
    tasks = next(iter(torch.utils.data.DataLoader(mixed, batch_size=64)))["task"]
    assert {"derain", "dehaze"} <= set(tasks) and any(t.startswith("denoise") for t in tasks)


def test_air_promptir_layouts_and_missing_folder(tmp_path):
    img = load_image("skimage:coffee")[:64, :64]
    write_png(f"{tmp_path}/Derain/rainy/rain-12.png", 255 - img)
    write_png(f"{tmp_path}/Derain/gt/norain-12.png", img)
    (tmp_path / "Derain" / "rainTrain.txt").write_text("rainy/rain-12.png\n")
    write_png(f"{tmp_path}/Dehaze/synthetic/part1/0025_0.8_0.04.png", 255 - img)
    write_png(f"{tmp_path}/Dehaze/original/0025.png", img)
    for source in (f"{tmp_path}/Derain", f"{tmp_path}/Derain/rainTrain.txt"):
        assert find_pairs(source) == [(f"{tmp_path}/Derain/rainy/rain-12.png", f"{tmp_path}/Derain/gt/norain-12.png")]
    assert find_pairs(f"{tmp_path}/Dehaze")[0][1] == f"{tmp_path}/Dehaze/original/0025.png"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        AIRDataset(derain_dir=str(tmp_path / "no_such_dir"))
    with pytest.raises(FileNotFoundError, match="paired layouts"):
        find_pairs(str(tmp_path / "Dehaze" / "original"))


# ----------------------------------------------------------------------------------------------
# feedback


@pytest.mark.parametrize("degradation", ["bicubic", "noise", "realesrgan", "none"])
def test_feedback_set_is_stable(degradation):
    kwargs = {"scale": 4, "sigma": 25, "max_side": 96}
    a = load_feedback(SKIMAGE_SET, 2, seed=3, degradation=degradation, **kwargs)
    b = load_feedback(SKIMAGE_SET, 2, seed=3, degradation=degradation, **kwargs)
    c = load_feedback(SKIMAGE_SET, 2, seed=4, degradation=degradation, **kwargs)
    assert [x["name"] for x in a] == [x["name"] for x in b] != [x["name"] for x in c]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["lq"], y["lq"])
        assert x["lq"].dim() == 4 and max(x["lq"].shape[-2:]) <= 96
        if degradation == "none":
            assert x["gt"] is None
        else:
            assert torch.equal(x["gt"], y["gt"])
            factor = 4 if degradation in ("bicubic", "realesrgan") else 1
            assert x["gt"].shape[-2:] == tuple(s * factor for s in x["lq"].shape[-2:])


def test_feedback_pairs_by_name(tmp_path):
    make_air_folders(tmp_path)
    items = load_feedback(
        [str(tmp_path / "rain" / "norain")], 5, 0, "none", lq_sources=[str(tmp_path / "rain" / "rainy")]
    )
    assert [x["name"] for x in items] == ["rain-1", "rain-2"]
    assert torch.allclose(items[0]["lq"], 1 - items[0]["gt"], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# benchmark


def np_ssim_channel(a, b):
    from skimage.metrics import structural_similarity

    return structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def test_psnr_ssim_match_skimage_on_y_and_rgb():
    from skimage.color import rgb2ycbcr
    from skimage.metrics import peak_signal_noise_ratio

    gt = load_image("skimage:chelsea")[:120, :150]
    noisy = np.clip(gt + np.random.default_rng(0).normal(0, 12, gt.shape), 0, 255).round().astype(np.uint8)
    a, b = to_tensor(noisy)[None], to_tensor(gt)[None]
    # Y channel with a 4-pixel border: skimage's rgb2ycbcr Y is the same BT.601 formula.
    ya, yb = (rgb2ycbcr(x)[4:-4, 4:-4, 0] for x in (noisy, gt))
    assert abs(psnr(a, b, crop_border=4, y_channel=True) - peak_signal_noise_ratio(yb, ya, data_range=255)) < 1e-6
    assert abs(ssim(a, b, crop_border=4, y_channel=True) - np_ssim_channel(ya, yb)) < 1e-6
    rgb_ref = np.mean([np_ssim_channel(noisy[..., c].astype(float), gt[..., c].astype(float)) for c in range(3)])
    assert abs(ssim(a, b) - rgb_ref) < 1e-6
    assert abs(psnr(a, b) - peak_signal_noise_ratio(gt, noisy)) < 1e-6
    assert torch.allclose(rgb_to_y(torch.ones(3, 1, 1)), torch.tensor(235 / 255).view(1, 1, 1))
    assert psnr(b, b) == float("inf") and abs(ssim(b, b) - 1) < 1e-12


def test_tiled_forward_equals_whole_image():
    torch.manual_seed(0)
    # receptive field: 3 LR pixels each side, within overlap / 2 = 4
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 12, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(12, 12, 3, padding=1),
        torch.nn.PixelShuffle(2),
    )
    lq = torch.rand(1, 3, 45, 38)
    whole = net(lq).detach()
    tiled = tiled_forward(net, lq, scale=2, tile=16, overlap=8)
    assert tiled.shape == (1, 3, 90, 76)
    assert torch.allclose(tiled, whole, atol=1e-6)
    assert torch.equal(tiled_forward(net, lq, scale=2), whole)


def test_benchmark_kinds(tmp_path):
    make_air_folders(tmp_path)
    sr = benchmark_pairs("sr_bicubic", gt_dir=str(tmp_path / "denoise"), scale=4)
    assert sr[0]["gt"].shape == (1, 3, 148, 160) and sr[0]["lq"].shape == (1, 3, 37, 40)
    den = benchmark_pairs("denoise", gt_dir=str(tmp_path / "denoise"), sigma=50, seed=1)
    assert den[0]["gt"].shape == (1, 3, 144, 160)  # PromptIR crops to multiples of 16
    assert torch.equal(
        den[0]["lq"], benchmark_pairs("denoise", gt_dir=str(tmp_path / "denoise"), sigma=50, seed=1)[0]["lq"]
    )
    assert 40 < (den[0]["lq"] - den[0]["gt"]).std().item() * 255 < 55
    haze = benchmark_pairs("pairs", lq_dir=str(tmp_path / "haze" / "hazy"), gt_dir=str(tmp_path / "haze" / "gt"))
    assert haze[0]["name"] == "0001_0.8_0.2" and haze[0]["lq"].shape == haze[0]["gt"].shape == (1, 3, 144, 160)
    noref = benchmark_pairs("noref", lq_dir=str(tmp_path / "denoise"))
    assert noref[0]["gt"] is None
    with pytest.raises(ValueError, match="sigma"):
        benchmark_pairs("denoise", gt_dir=str(tmp_path / "denoise"))


def test_score_images_psnr_ssim_and_offline_niqe(tmp_path, monkeypatch):
    cset5 = shared("CSet5")
    mat = shared("niqe_modelparameters.mat")
    items = benchmark_pairs("sr_bicubic", gt_dir=cset5, scale=4)
    restored = [(it["name"], torch.nn.functional.interpolate(it["lq"], scale_factor=4, mode="bicubic")) for it in items]
    gts = {it["name"]: it["gt"] for it in items}

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    os.makedirs(tmp_path / "torch_home" / "hub" / "pyiqa")
    shutil.copy(mat, tmp_path / "torch_home" / "hub" / "pyiqa" / "niqe_modelparameters.mat")
    res = score_images(restored, ["psnr", "ssim", "niqe"], "cpu", gts=gts, protocol=dict(crop_border=4, y_channel=True))
    res = res["metrics"]
    assert set(res["niqe"]["per_image"]) == {"baby", "bird", "butterfly", "head", "woman"}
    assert 24 < res["psnr"]["mean"] < 32 and 0.7 < res["ssim"]["mean"] < 0.95
    assert 3 < res["niqe"]["mean"] < 15
    name, img = restored[0]
    assert res["psnr"]["per_image"][name] == psnr(img, gts[name], crop_border=4, y_channel=True)


def test_score_images_missing_weights_message(tmp_path, monkeypatch):
    from urllib.error import URLError

    from pyiqa.utils import download_util

    def offline(url, dst, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(download_util, "download_url_to_file", offline)
    img = torch.rand(1, 3, 64, 64)
    with pytest.raises(FileNotFoundError, match=r"niqe_modelparameters\.mat in .*empty_home"):
        score_images([("x", img)], ["niqe"], "cpu")
