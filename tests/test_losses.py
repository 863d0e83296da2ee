"""Tests of the loss repository (losses/). CPU only, small images, no downloads.

Perceptual and LPIPS are tested with random backbones (pretrained=False) and with random weight
files written to a temporary $TORCH_HOME, which exercises the real loading path offline.
"""

import numpy as np
import pytest
import torch
from torch import nn

from losses import LOSSES, build_loss_repository, required_files, usm_sharp
from losses.gan import GAN_TYPES, GANLoss
from losses.lpips_loss import LPIPSLoss
from losses.perceptual import PerceptualLoss

# Options that keep every loss cheap and offline in tests.
TEST_OPTIONS = {
    "Perceptual": {"pretrained": False},
    "LPIPS": {"pretrained": False},
    "GAN": {"num_feat": 8},
}


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache: as on a fresh node without internet."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def images(size=32, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(batch, 3, size, size, generator=g)
    restored = (gt + 0.1 * torch.randn(batch, 3, size, size, generator=g)).clamp(0, 1).requires_grad_()
    return restored, gt


# ---------------------------------------------------------------- every loss


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_is_finite_scalar_with_gradient_to_restored(name):
    loss_fn = LOSSES[name](**TEST_OPTIONS.get(name, {}))
    restored, gt = images()
    loss = loss_fn(restored, gt)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert restored.grad is not None and restored.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["L1", "MSE", "Charbonnier", "SSIM", "FFT", "Perceptual", "LPIPS"])
def test_identical_images_score_lowest(name):
    loss_fn = LOSSES[name](**TEST_OPTIONS.get(name, {}))
    restored, gt = images()
    same = loss_fn(gt, gt).item()
    assert same <= loss_fn(restored.detach(), gt).item()
    assert same == pytest.approx(1e-3 if name == "Charbonnier" else 0.0, abs=1e-5)


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    restored, gt = images(size=48)
    ours = 1 - LOSSES["SSIM"]()(restored.detach()[:1], gt[:1]).item()
    ref = structural_similarity(
        restored.detach()[0].permute(1, 2, 0).numpy(),
        gt[0].permute(1, 2, 0).numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=2,
    )
    assert ours == pytest.approx(ref, abs=1e-4)


def test_charbonnier_approaches_l1_for_large_errors():
    restored, gt = torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.5)
    assert LOSSES["Charbonnier"]()(restored, gt).item() == pytest.approx(0.5, abs=1e-5)


def test_fft_ortho_norm_is_patch_size_independent_scale_of_backward():
    restored, gt = images(size=32)
    ortho = LOSSES["FFT"]()(restored, gt)
    raw = LOSSES["FFT"](norm="backward")(restored, gt)
    assert raw.item() == pytest.approx(ortho.item() * 32, rel=1e-4)  # sqrt(H * W) = 32


def test_losses_run_under_autocast():
    restored, gt = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name in LOSSES:
            loss = LOSSES[name](**TEST_OPTIONS.get(name, {}))(restored, gt)
            assert torch.isfinite(loss), name


# ---------------------------------------------------------------- repository building


def test_paper_repositories_build_in_order():
    for names in (["L1", "Perceptual", "GAN"], ["L1", "Perceptual", "LPIPS"]):
        repo = build_loss_repository(names, TEST_OPTIONS)
        assert isinstance(repo, nn.ModuleDict)
        assert list(repo.keys()) == names
        assert isinstance(repo[names[1]], PerceptualLoss)


def test_options_reach_the_loss():
    repo = build_loss_repository(["Charbonnier", "FFT"], {"Charbonnier": {"eps": 0.5}, "FFT": {"norm": "backward"}})
    assert repo["Charbonnier"].eps == 0.5 and repo["FFT"].norm == "backward"


def test_unknown_loss_lists_known_ones():
    with pytest.raises(ValueError, match="unknown loss 'Perceptul'; known losses: L1, MSE, Charbonnier, SSIM, Perceptual, LPIPS, GAN, FFT"):
        build_loss_repository(["L1", "Perceptul"])
    with pytest.raises(ValueError, match="unknown loss 'Perceptul'"):
        build_loss_repository(["L1"], {"Perceptul": {}})


def test_bad_option_names_loss_key_and_accepted_keys():
    with pytest.raises(ValueError) as err:
        build_loss_repository(["L1", "Perceptual"], {"Perceptual": {"layer_weight": {}, "pretrained": False}})
    msg = str(err.value)
    assert "'Perceptual'" in msg and "layer_weight" in msg and "layer_weights, use_input_norm, criterion, pretrained, weights_path" in msg
    with pytest.raises(ValueError, match="bad option.*eps for loss 'L1'; accepted options: \\(none\\)"):
        build_loss_repository(["L1"], {"L1": {"eps": 1e-3}})


def test_bad_option_values_are_rejected():
    with pytest.raises(ValueError, match="gan_type"):
        GANLoss(gan_type="wgan")
    with pytest.raises(ValueError, match="conv6_1"):
        PerceptualLoss(layer_weights={"conv6_1": 1.0}, pretrained=False)
    with pytest.raises(ValueError, match="criterion"):
        PerceptualLoss(criterion="fro", pretrained=False)


def test_frozen_backbones_stay_in_eval_mode_when_repository_trains():
    repo = build_loss_repository(["Perceptual", "LPIPS", "GAN"], TEST_OPTIONS)
    repo.train()
    assert not repo["Perceptual"].features.training
    assert not any(m.training for m in repo["LPIPS"].model.modules())
    assert repo["GAN"].net_d.training  # the discriminator does train
    assert not any(p.requires_grad for name in ("Perceptual", "LPIPS") for p in repo[name].parameters())


# ---------------------------------------------------------------- weight files (offline)


def test_required_files_lists_without_building(empty_torch_home, tmp_path):
    expected = str(empty_torch_home / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth")
    assert required_files("Perceptual") == [(expected, "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth")]
    assert required_files("Perceptual", {"weights_path": str(tmp_path / "v.pth")})[0][0] == str(tmp_path / "v.pth")
    assert required_files("Perceptual", {"pretrained": False}) == []
    assert required_files("LPIPS", {"net": "vgg"})[0][0].endswith("vgg16-397923af.pth")
    assert required_files("LPIPS")[0][1] == "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
    assert required_files("L1") == [] and required_files("GAN") == []
    with pytest.raises(ValueError, match="bad option"):
        required_files("Perceptual", {"layer": 1})


def test_perceptual_without_weights_fails_early_and_clearly(empty_torch_home):
    with pytest.raises(FileNotFoundError) as err:
        build_loss_repository(["L1", "Perceptual"])
    msg = str(err.value)
    assert "vgg19-dcbb9e9d.pth" in msg
    assert str(empty_torch_home / "hub" / "checkpoints") in msg
    assert "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in msg
    assert "weights_path" in msg


@pytest.mark.parametrize("net, filename", [("alex", "alexnet-owt-7be5be79.pth"), ("vgg", "vgg16-397923af.pth")])
def test_lpips_without_weights_fails_early_and_clearly(empty_torch_home, net, filename):
    with pytest.raises(FileNotFoundError) as err:
        LPIPSLoss(net=net)
    msg = str(err.value)
    assert filename in msg and str(empty_torch_home / "hub" / "checkpoints") in msg
    assert f"https://download.pytorch.org/models/{filename}" in msg and "weights_path" in msg


@pytest.fixture
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a loss tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_perceptual_loads_weight_file_and_keeps_frozen_layers_up_to_deepest(empty_torch_home, no_downloads):
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.vgg19(weights=None).state_dict()
    path = empty_torch_home / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)

    loss_fn = build_loss_repository(["Perceptual"])["Perceptual"]
    # conv5_4 is torchvision's features[34]: layers 0..34 are kept, pool5 and the classifier are not.
    assert len(loss_fn.features) == 35
    assert torch.equal(loss_fn.features[34].weight, state["features.34.weight"])
    assert torch.equal(loss_fn.features[0].bias, state["features.0.bias"])
    assert all(not p.requires_grad for p in loss_fn.parameters())
    loss_fn.train()
    assert not loss_fn.features.training

    shallow = PerceptualLoss(layer_weights={"conv3_4": 1.0}, weights_path=str(path))
    assert len(shallow.features) == 17

    restored, gt = images()
    gt.requires_grad_()
    loss_fn(restored, gt).backward()
    assert restored.grad.abs().sum() > 0
    assert gt.grad is None  # targets come from the detached ground truth
    assert all(p.grad is None for p in loss_fn.parameters())


def test_lpips_loads_backbone_file_without_download(empty_torch_home, no_downloads):
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    path = empty_torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)

    loss_fn = LPIPSLoss()
    net = loss_fn.model.net
    # lpips keeps torchvision's layer indices: slice1[0] is features[0], slice5[10] is features[10].
    assert torch.equal(net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(net.slice5[0].weight, state["features.10.weight"])
    assert all(not p.requires_grad for p in loss_fn.parameters())
    # The package's calibrated linear layers are loaded too (they are non-negative by construction).
    assert all((lin.model[1].weight >= 0).all() for lin in loss_fn.model.lins)
    loss_fn.train()
    assert not any(m.training for m in loss_fn.modules() if m is not loss_fn)

    restored, gt = images(size=64)
    loss = loss_fn(restored, gt)
    loss.backward()
    assert loss.item() > 0 and restored.grad.abs().sum() > 0


# ---------------------------------------------------------------- GAN


def generated_pair():
    """A 1-conv 'generator' producing the restored image, so we can see which network gets gradients."""
    torch.manual_seed(0)
    generator = nn.Conv2d(3, 3, 3, padding=1)
    lq, gt = images(size=32)
    return generator, generator(lq.detach()), gt


@pytest.mark.parametrize("gan_type", GAN_TYPES)
def test_discriminator_step_updates_discriminator_only(gan_type):
    gan = GANLoss(gan_type=gan_type, num_feat=8)
    generator, restored, gt = generated_pair()
    before = [p.detach().clone() for p in gan.net_d.parameters()]
    logs = gan.discriminator_step(restored, gt)
    assert set(logs) == {"D_real", "D_fake", "D_out_real", "D_out_fake"}
    assert all(v.shape == () and not v.requires_grad and torch.isfinite(v) for v in logs.values())
    assert any(not torch.equal(b, p) for b, p in zip(before, gan.net_d.parameters()))
    assert all(p.grad is None for p in generator.parameters())


@pytest.mark.parametrize("gan_type", GAN_TYPES)
def test_generator_term_updates_generator_not_discriminator(gan_type):
    gan = GANLoss(gan_type=gan_type, num_feat=8)
    generator, restored, gt = generated_pair()
    loss = gan(restored, gt)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())
    assert all(p.grad is None for p in gan.net_d.parameters())
    assert all(p.requires_grad for p in gan.net_d.parameters())  # restored after the call


def test_discriminator_learns_to_separate_real_from_fake():
    torch.manual_seed(0)
    gan = GANLoss(num_feat=8, lr=1e-3)
    gt = torch.rand(2, 3, 32, 32)
    fake = torch.full_like(gt, 0.5)  # a flat grey "restoration"
    first = gan.discriminator_step(fake, gt)
    for _ in range(20):
        last = gan.discriminator_step(fake, gt)
    assert last["D_out_real"] > last["D_out_fake"]
    assert last["D_real"] + last["D_fake"] < first["D_real"] + first["D_fake"]


def test_gan_with_vgg_discriminator_and_under_autocast():
    gan = GANLoss(discriminator="vgg", num_feat=8, input_size=128, gan_type="ragan")
    restored, gt = images(size=128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = gan(restored, gt)
    loss.backward()  # the generator's backward comes first: the D step changes D's weights in place
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logs = gan.discriminator_step(restored, gt)
    assert torch.isfinite(loss) and restored.grad.abs().sum() > 0
    assert all(torch.isfinite(v) for v in logs.values())


def test_gan_options_and_trainer_attributes():
    gan = build_loss_repository(["GAN"], {"GAN": {"num_feat": 8, "lr": 2e-4, "betas": [0.5, 0.999], "update_when_zero": True}})["GAN"]
    assert gan.opt_d.param_groups[0]["lr"] == 2e-4 and gan.opt_d.param_groups[0]["betas"] == (0.5, 0.999)
    assert gan.update_when_zero is True
    assert {id(p) for p in gan.opt_d.param_groups[0]["params"]} == {id(p) for p in gan.net_d.parameters()}
    assert GANLoss().gan_type == "vanilla"


# ---------------------------------------------------------------- USM sharpening


def photo(size=96):
    from skimage.data import astronaut
    from skimage.transform import resize

    img = resize(astronaut(), (size, size), anti_aliasing=True).astype(np.float32)
    return torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W]


def high_frequency_energy(img):
    lap = img[..., 1:-1, 1:-1] * 4 - img[..., :-2, 1:-1] - img[..., 2:, 1:-1] - img[..., 1:-1, :-2] - img[..., 1:-1, 2:]
    return (lap**2).mean().item()


def test_usm_sharpening_adds_high_frequencies_and_keeps_range_and_shape():
    img = torch.cat([photo(), photo().flip(-1)])  # a batch of 2
    sharp = usm_sharp(img)
    assert sharp.shape == img.shape and sharp.dtype == img.dtype
    assert sharp.min() >= 0 and sharp.max() <= 1
    assert high_frequency_energy(sharp) > 1.1 * high_frequency_energy(img)
    assert torch.allclose(usm_sharp(img, weight=0.0), img, atol=1e-6)
    # Each image in the batch is sharpened on its own.
    assert torch.allclose(sharp[1:], usm_sharp(img[1:]), atol=1e-6)


def test_usm_sharp_matches_opencv_reference():
    import cv2

    img = photo()
    ours = usm_sharp(img, weight=0.5, radius=50, threshold=10)[0].permute(1, 2, 0).numpy()

    # Real-ESRGAN's recipe written with OpenCV (BORDER_REFLECT_101 default, sigma from kernel size).
    x = img[0].permute(1, 2, 0).numpy()
    residual = x - cv2.GaussianBlur(x, (51, 51), 0)
    mask = (np.abs(residual) * 255 > 10).astype(np.float32)
    soft = cv2.GaussianBlur(mask, (51, 51), 0)
    ref = soft * np.clip(x + 0.5 * residual, 0, 1) + (1 - soft) * x
    assert np.abs(ours - ref).max() < 1e-4


def test_usm_sharp_rejects_images_smaller_than_its_kernel():
    with pytest.raises(ValueError, match="too small"):
        usm_sharp(torch.rand(1, 3, 20, 20))
