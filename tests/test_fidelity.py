"""Faithful to the reference code of the paper's recipes: Real-ESRGAN's RISR inputs (the sharpened GT degraded, its
DiffJPEG, a larger crop, the pair pool) and PromptIR's test metrics. Each reference is derived here from the
published formulas, tables and parameters, on real photographs, not from our own code."""
import glob
import os

import numpy as np
import pytest
import scipy.fft
import torch

import lossagent
from data.benchmark import psnr_promptir, ssim_promptir
from data.images import SeededItems, load_image, stage_seed, to_tensor
from data.pairs import TrainingPairs
from data.jpeg import jpeg_roundtrip
from data.risr import GTCropDataset, PairPool, RealESRGANDegradation, RealESRGANPairs
from losses.sharpen import usm_sharp
from test_data import shared

# ITU T.81 Annex K, rows = vertical frequency, as the standard prints them.
LUMA = np.array([[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
                 [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
                 [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=np.float64)
CHROMA = np.full((8, 8), 99.0)
CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def diffjpeg_reference(img, quality):
    """Real-ESRGAN's JPEG model (BasicSR's DiffJPEG, differentiable=False), one image H x W x 3 in [0, 1], from its
    description: factor (5000/q or 200 - 2q) / 100 times the tables, the luma table transposed, zero padding to a
    multiple of 16, JFIF YCbCr, 2 x 2 chroma means, orthonormal 8 x 8 DCT, rounding, nearest chroma upsampling,
    clipped to [0, 255] and not rounded."""
    h, w, _ = img.shape
    x = np.pad(img * 255.0, ((0, -h % 16), (0, -w % 16), (0, 0)))
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    factor = (5000.0 / quality if quality < 50 else 200.0 - 2 * quality) / 100.0

    def codec(plane, table):
        out = np.empty_like(plane)
        for i in range(0, plane.shape[0], 8):
            for j in range(0, plane.shape[1], 8):
                coef = scipy.fft.dctn(plane[i:i + 8, j:j + 8] - 128, norm="ortho")
                out[i:i + 8, j:j + 8] = scipy.fft.idctn(np.round(coef / table) * table, norm="ortho") + 128
        return out

    def subsample(c):
        return c.reshape(c.shape[0] // 2, 2, c.shape[1] // 2, 2).mean(axis=(1, 3))

    y = codec(y, LUMA.T * factor)
    cb, cr = (codec(subsample(c), CHROMA.T * factor).repeat(2, 0).repeat(2, 1) for c in (cb, cr))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], -1)
    return np.clip(rgb, 0, 255)[:h, :w] / 255.0


@pytest.mark.parametrize("quality", [30, 62.5, 95])
def test_diffjpeg_is_real_esrgan_jpeg(quality):
    img = load_image("skimage:astronaut")[100:300, 120:352].astype(np.float64) / 255  # sides not multiples of 16
    ours = jpeg_roundtrip(torch.from_numpy(img).permute(2, 0, 1)[None].float(), quality, "diffjpeg")[0]
    reference = diffjpeg_reference(img, quality)
    assert np.abs(ours.permute(1, 2, 0).double().numpy() - reference).max() < 2e-4
    assert not torch.equal(ours * 255, (ours * 255).round())  # DiffJPEG does not round
    libjpeg = jpeg_roundtrip(torch.from_numpy(img).permute(2, 0, 1)[None].float(), quality, "libjpeg")[0]
    assert (ours - libjpeg).abs().mean() > 1e-3  # the two are not the same codec
    assert RealESRGANDegradation().jpeg == "diffjpeg"  # the RISR recipe's default


def test_risr_lq_is_the_degradation_of_the_sharpened_gt():
    """Real-ESRGAN's feed_data degrades usm_sharp(gt), not gt: with the same draws, the training LQ of a RISR batch
    is the degradation of the sharpened ground truth."""
    cfg = lossagent.Config()
    cfg.task.name, cfg.data.train, cfg.data.patch_size = "risr", ["skimage:astronaut", "skimage:coffee"], 64
    cfg.train.batch_size, cfg.train.iters_per_stage, cfg.train.num_workers = 2, 1, 0
    pairs = TrainingPairs(cfg, 0, 1, torch.device("cpu"))
    (lq, gt, _), = list(pairs.stage(1))
    generator = torch.Generator().manual_seed(stage_seed(cfg.train.seed, 1, 0))
    assert torch.equal(lq, RealESRGANDegradation(scale=4)(usm_sharp(gt), generator))
    plain = RealESRGANDegradation(scale=4)(gt, torch.Generator().manual_seed(stage_seed(cfg.train.seed, 1, 0)))
    assert not torch.equal(lq, plain)


def blockiness(lq):
    """Mean |neighbour difference| across the 8-pixel grid over the mean elsewhere, rows and columns of lq [B,3,h,w]."""
    gray = lq.mean(1)
    dx, dy = (gray[:, :, 1:] - gray[:, :, :-1]).abs(), (gray[:, 1:] - gray[:, :-1]).abs()
    on_x, on_y = torch.arange(dx.shape[-1]) % 8 == 7, torch.arange(dy.shape[-2]) % 8 == 7
    on = torch.cat([dx[:, :, on_x].flatten(), dy[:, on_y].flatten()]).mean()
    off = torch.cat([dx[:, :, ~on_x].flatten(), dy[:, ~on_y].flatten()]).mean()
    return float(on / off)


def test_the_jpeg_grid_is_not_locked_to_the_training_patch():
    """Degrading a 400 crop and cutting the 256 patch after puts the JPEG blocks at any offset of the patch; degrading
    the patch itself puts them on its 8-pixel grid. The final JPEG step is made the last one to show it."""
    photos = sorted(glob.glob(os.path.join(shared("CBSD68"), "*.png")))[:32]
    measured = {}
    for crop in (256, 400):
        crops = SeededItems(GTCropDataset(photos, crop=crop, augment=False))
        pairs = RealESRGANPairs(scale=4, patch=256)
        pairs.degradation.resize_first_prob = 1.0
        values = []
        for k in range(8):
            gt = torch.stack([crops[(4 * k + i) % len(photos), 1000 * k + i]["gt"] for i in range(4)])
            lq, out_gt = pairs(gt, torch.Generator().manual_seed(k))
            assert lq.shape == (4, 3, 64, 64) and out_gt.shape == (4, 3, 256, 256)
            values.append(blockiness(lq))
        measured[crop] = np.mean(values)
    assert measured[256] > 1.15 and measured[400] < 1.08, measured


def test_the_patch_is_cut_where_its_lq_was_cut():
    gt = torch.stack([to_tensor(load_image(n)[:400, :400]) for n in ("skimage:astronaut", "skimage:coffee")])
    pairs = RealESRGANPairs(scale=4, patch=256)
    lq, patch = pairs(gt, torch.Generator().manual_seed(3))
    whole = RealESRGANDegradation(scale=4)(usm_sharp(gt), torch.Generator().manual_seed(3))  # [2, 3, 100, 100]
    offsets = [(t, s) for t in range(37) for s in range(37) if torch.equal(whole[..., t:t + 64, s:s + 64], lq)]
    assert len(offsets) == 1
    top, left = offsets[0]
    assert torch.equal(patch, gt[..., 4 * top:4 * top + 256, 4 * left:4 * left + 256])


def test_the_pair_pool_mixes_iterations_like_real_esrgan():
    """Real-ESRGAN's _dequeue_and_enqueue with queue_size 6 and batches of 2: three batches fill it and train as
    they are; after that each batch goes in and two pairs drawn from the shuffled pool come out."""
    pool, g = PairPool(6), torch.Generator().manual_seed(0)

    def batch(k):  # pair 2k + i has lq value (2k + i) / 255 and gt value (100 + 2k + i) / 255
        ids = torch.tensor([2.0 * k, 2.0 * k + 1]).view(2, 1, 1, 1)
        return ids.expand(2, 3, 4, 4) / 255, (100 + ids).expand(2, 3, 16, 16) / 255

    inside, out = set(), []
    for k in range(8):
        lq, gt = batch(k)
        out_lq, out_gt = pool(lq, gt, g)
        ids = [round(float(x[0, 0, 0] * 255)) for x in out_lq]
        assert [round(float(x[0, 0, 0] * 255)) - 100 for x in out_gt] == ids  # pairs stay pairs
        if k < 3:
            assert torch.equal(out_lq, lq) and torch.equal(out_gt, gt) and ids == [2 * k, 2 * k + 1]
        else:
            assert set(ids) <= inside and len(set(ids)) == 2  # drawn from the pool, before this batch went in
            inside -= set(ids)
            out += ids
        inside |= {2 * k, 2 * k + 1}
    assert out != sorted(out)  # shuffled, not first in, first out
    state = pool.state_dict()
    again = PairPool(6)
    again.load_state_dict(state, "cpu")
    lq, gt = batch(9)
    assert all(torch.equal(a, b) for a, b in zip(pool(lq, gt, torch.Generator().manual_seed(5)),
                                                 again(lq, gt, torch.Generator().manual_seed(5))))
    with pytest.raises(ValueError, match="multiple of the batch size"):
        PairPool(5)(lq, gt, g)


def test_gt_crops_are_padded_like_real_esrgan(tmp_path):
    """cv2.copyMakeBorder(img, 0, pad_h, 0, pad_w, BORDER_REFLECT_101): numpy's 'reflect' padding at the end."""
    from PIL import Image
    img = load_image("skimage:coffee")[:120, :90]
    Image.fromarray(img).save(tmp_path / "small.png")
    crop = GTCropDataset([str(tmp_path / "small.png")], crop=256, augment=False)[0]["gt"]
    reference = np.pad(img, ((0, 136), (0, 166), (0, 0)), mode="reflect")
    assert torch.equal(crop, to_tensor(reference))


def test_promptir_psnr_and_ssim_are_scikit_images_with_promptirs_arguments():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    for path in sorted(glob.glob(os.path.join(shared("CBSD68"), "*.png")))[:4]:
        clean = load_image(path).astype(np.float32) / 255
        restored = np.clip(clean + np.random.default_rng(0).normal(0, 0.04, clean.shape), 0, 1).astype(np.float32)
        a, b = (torch.from_numpy(x).permute(2, 0, 1)[None] for x in (restored, clean))
        assert abs(ssim_promptir(a, b) - structural_similarity(clean, restored, data_range=1, channel_axis=-1)) < 1e-5
        assert abs(psnr_promptir(a, b) - peak_signal_noise_ratio(clean, restored, data_range=1)) < 1e-4


def test_the_all_in_one_sets_are_scored_by_promptirs_protocol(tmp_path):
    """`eval` on BSD68 (PromptIR's denoising set): PSNR and SSIM by PromptIR's test code, not BasicSR's."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from data.benchmark import benchmark_pairs
    from tools import evaluate
    bsd68 = shared("CBSD68")
    (tmp_path / "air.toml").write_text(f'[task]\nname = "air"\nscale = 1\n[agent]\nbackend = "fixed"\n'
                                       f'[[benchmarks]]\nname = "BSD68"\ngt = "{bsd68}"\nsigma = 25.0\n')
    cfg = lossagent.load_config(tmp_path / "air.toml")

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    results = evaluate.evaluate_network(cfg, Identity(), "identity", ["psnr", "ssim"], torch.device("cpu"),
                                        tmp_path / "eval.json")["BSD68_sigma25"]["metrics"]
    items = benchmark_pairs("denoise", gt_dir=bsd68, sigma=25.0)
    noisy, clean = (items[0][k][0].permute(1, 2, 0).numpy() for k in ("lq", "gt"))
    name = items[0]["name"]
    assert results["ssim"]["per_image"][name] == pytest.approx(
        structural_similarity(clean, noisy, data_range=1, channel_axis=-1), abs=1e-5)
    assert results["psnr"]["per_image"][name] == pytest.approx(peak_signal_noise_ratio(clean, noisy, data_range=1), abs=1e-4)
