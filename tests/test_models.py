"""Tests for models/: official layouts (parameter and key counts, key names), load_pretrained,
arbitrary input sizes, SDPA vs plain attention, discriminators, gradient flow. CPU only."""
import argparse

import pytest
import torch

from models import load_pretrained
from models.discriminators import UNetDiscriminatorSN, VGGStyleDiscriminator
from models.promptir import UNUSED_PARAMETERS, PromptIR
from models.swinir import PRESETS, PermuteTokens, SwinIR, relative_position_index, shift_mask, window_order

SMALL_PROMPTIR = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1])


def small_swinir(**overrides):
    config = dict(PRESETS["demo_x4"], drop_path_rate=0.0)
    config.update(overrides)
    return SwinIR(**config)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def official_swinir_keys(depths, upsampler):
    """State-dict keys of the official SwinIR checkpoints, written out from its documented layout."""
    keys = ["conv_first.weight", "conv_first.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"]
    for i, depth in enumerate(depths):
        for j in range(depth):
            block = f"layers.{i}.residual_group.blocks.{j}."
            keys += [block + k for k in (
                "norm1.weight", "norm1.bias", "attn.relative_position_bias_table", "attn.relative_position_index",
                "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "norm2.weight",
                "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
            if j % 2:
                keys.append(block + "attn_mask")
        keys += [f"layers.{i}.conv.weight", f"layers.{i}.conv.bias"]
    keys += ["norm.weight", "norm.bias", "conv_after_body.weight", "conv_after_body.bias",
             "conv_before_upsample.0.weight", "conv_before_upsample.0.bias"]
    if upsampler == "pixelshuffle":
        tail = ("upsample.0", "upsample.2", "conv_last")
    else:
        tail = ("conv_up1", "conv_up2", "conv_hr", "conv_last")
    return set(keys + [f"{t}.{p}" for t in tail for p in ("weight", "bias")])


def official_promptir_keys(num_blocks=(4, 6, 6, 8), num_refinement_blocks=4):
    """State-dict keys of the official PromptIR (decoder=True), from its documented layout."""
    block = ("norm1.body.weight", "norm1.body.bias", "attn.temperature", "attn.qkv.weight", "attn.qkv_dwconv.weight",
             "attn.project_out.weight", "norm2.body.weight", "norm2.body.bias", "ffn.project_in.weight",
             "ffn.dwconv.weight", "ffn.project_out.weight")
    stacks = {"encoder_level1": num_blocks[0], "encoder_level2": num_blocks[1], "encoder_level3": num_blocks[2],
              "latent": num_blocks[3], "decoder_level3": num_blocks[2], "decoder_level2": num_blocks[1],
              "decoder_level1": num_blocks[0], "refinement": num_refinement_blocks}
    keys = [f"{name}.{i}.{k}" for name, n in stacks.items() for i in range(n) for k in block]
    keys += [f"noise_level{i}.{k}" for i in (1, 2, 3) for k in block]
    keys += [f"prompt{i}.{k}" for i in (1, 2, 3) for k in ("prompt_param", "linear_layer.weight",
                                                             "linear_layer.bias", "conv3x3.weight")]
    convs = ["patch_embed.proj", "chnl_reduce1", "chnl_reduce2", "chnl_reduce3", "reduce_noise_channel_1",
             "reduce_noise_channel_2", "reduce_noise_channel_3", "down1_2.body.0", "down2_3.body.0",
             "down3_4.body.0", "up4_3.body.0", "up3_2.body.0", "up2_1.body.0", "reduce_chan_level3",
             "reduce_chan_level2", "reduce_noise_level3", "reduce_noise_level2", "reduce_noise_level1", "output"]
    return set(keys + [c + ".weight" for c in convs])


# ---------------------------------------------------------------- official layouts


@pytest.mark.parametrize("preset, params, keys", [
    ("classical_x4_M", 11_900_199, 550),
    ("realworld_x4_M", 11_715_559, 552),
])
def test_swinir_paper_configurations_match_official_checkpoints(preset, params, keys):
    model = SwinIR(**PRESETS[preset])
    state = model.state_dict()
    assert n_params(model) == params
    assert len(state) == keys
    assert set(state) == official_swinir_keys([6] * 6, PRESETS[preset]["upsampler"])
    assert "mean" not in state  # the RGB mean is a constant, not a checkpoint entry
    index = state["layers.0.residual_group.blocks.0.attn.relative_position_index"]
    assert index.shape == (64, 64) and index.dtype == torch.int64
    assert state["layers.5.residual_group.blocks.5.attn_mask"].shape == (64, 64, 64)


def test_promptir_paper_configuration_matches_official_checkpoint():
    model = PromptIR()
    state = model.state_dict()
    assert n_params(model) == 35_592_263
    assert len(state) == 548
    assert set(state) == official_promptir_keys()
    assert state["prompt1.prompt_param"].shape == (1, 5, 64, 64, 64)
    assert state["prompt3.conv3x3.weight"].shape == (320, 320, 3, 3)
    without_prompts = PromptIR(decoder=False)
    assert n_params(without_prompts) == 32_107_288
    assert set(without_prompts.state_dict()) == {k for k in state if not k.startswith("prompt")}


def test_swinir_buffers_follow_the_shifted_window_scheme():
    # 16x16 image, window 8, shift 4: after the cyclic shift, window 0 is one region, window 1 (top right)
    # holds 2 regions of 32 tokens, window 3 (bottom right) 4 regions of 16 tokens; -100 across regions
    mask = shift_mask(16, 16, 8, 4)
    assert mask.shape == (4, 64, 64)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert [(m == 0).sum().item() for m in mask] == [64 * 64, 2 * 32 * 32, 2 * 32 * 32, 4 * 16 * 16]
    index = relative_position_index(8)
    assert index.min() == 0 and index.max() == 15 * 15 - 1
    assert (index.diagonal() == 7 * 15 + 7).all()  # zero offset maps to the centre of the bias table


def test_window_order_is_cyclic_shift_then_window_partition():
    image = torch.arange(16 * 24).view(16, 24)
    for shift in (0, 4):
        rolled = image.roll((-shift, -shift), dims=(0, 1))
        windows = [rolled[i:i + 8, j:j + 8].flatten() for i in range(0, 16, 8) for j in range(0, 24, 8)]
        assert torch.equal(window_order(16, 24, 8, shift), torch.cat(windows))


def test_permute_tokens_gradient_is_the_inverse_gather():
    order = window_order(8, 12, 4, 2)
    tokens = torch.rand(2, 8 * 12, 3, dtype=torch.float64, requires_grad=True)
    assert torch.equal(PermuteTokens.apply(tokens, order, order.argsort()), tokens[:, order])
    assert torch.autograd.gradcheck(PermuteTokens.apply, (tokens, order, order.argsort()))


def test_state_dict_reloads_strictly_into_a_fresh_model(tmp_path):
    torch.manual_seed(0)
    source = small_swinir().eval()
    torch.save(source.state_dict(), tmp_path / "swinir.pth")
    torch.manual_seed(1)
    target = load_pretrained(small_swinir().eval(), tmp_path / "swinir.pth")
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


# ---------------------------------------------------------------- load_pretrained


def _assert_same_weights(model, state_dict):
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state_dict[name]), name


@pytest.mark.parametrize("layout", ["raw", "params", "params_ema", "lightning", "lossagent"])
def test_load_pretrained_reads_every_checkpoint_layout(tmp_path, layout):
    torch.manual_seed(0)
    weights = small_swinir().state_dict()
    other = {k: torch.zeros_like(v) for k, v in weights.items()}  # a second, different set of weights
    checkpoint = {
        "raw": weights,
        "params": {"params": weights},
        "params_ema": {"params": other, "params_ema": weights},  # EMA wins by default
        "lightning": {"state_dict": {"net." + k: v for k, v in weights.items()}, "epoch": 3, "global_step": 10},
        "lossagent": {"params": weights, "stage": 2, "weights": [1.0], "optimizer": {"state": {}}},
    }[layout]
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    _assert_same_weights(load_pretrained(small_swinir(), tmp_path / "ckpt.pth"), weights)


def test_load_pretrained_key_picks_the_entry(tmp_path):
    torch.manual_seed(0)
    weights = small_swinir().state_dict()
    other = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    torch.save({"params": other, "params_ema": weights}, tmp_path / "ckpt.pth")
    _assert_same_weights(load_pretrained(small_swinir(), tmp_path / "ckpt.pth", key="params"), other)
    with pytest.raises(RuntimeError, match="no entry 'ema'"):
        load_pretrained(small_swinir(), tmp_path / "ckpt.pth", key="ema")


def test_load_pretrained_reports_missing_and_unexpected_keys(tmp_path):
    weights = small_swinir().state_dict()
    broken = dict(weights)
    del broken["conv_first.weight"], broken["norm.bias"]
    broken["extra.weight"] = torch.zeros(1)
    torch.save({"params": broken}, tmp_path / "ckpt.pth")
    with pytest.raises(RuntimeError) as error:
        load_pretrained(small_swinir(), tmp_path / "ckpt.pth")
    message = str(error.value)
    assert "2 missing keys" in message and "conv_first.weight" in message and "norm.bias" in message
    assert "1 unexpected keys" in message and "extra.weight" in message


def test_load_pretrained_reports_wrong_shapes(tmp_path):
    torch.save(small_swinir(embed_dim=32).state_dict(), tmp_path / "ckpt.pth")
    with pytest.raises(RuntimeError, match="wrong shape"):
        load_pretrained(small_swinir(), tmp_path / "ckpt.pth")


def test_load_pretrained_missing_file_says_what_to_download(tmp_path):
    path = tmp_path / "001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth"
    with pytest.raises(FileNotFoundError) as error:
        load_pretrained(small_swinir(), path)
    assert str(path) in str(error.value)
    assert "https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/" in str(error.value)
    with pytest.raises(FileNotFoundError, match="va1shn9v/PromptIR"):
        load_pretrained(PromptIR(**SMALL_PROMPTIR), tmp_path / "model.ckpt")


def test_load_pretrained_needs_trust_for_pickled_objects(tmp_path):
    weights = small_swinir().state_dict()
    # a Lightning-style checkpoint whose hyper-parameters are a Python object (not allowed by weights_only)
    checkpoint = {"state_dict": {"net." + k: v for k, v in weights.items()},
                  "hyper_parameters": argparse.Namespace(lr=2e-4)}
    torch.save(checkpoint, tmp_path / "model.ckpt")
    with pytest.raises(RuntimeError, match="trusted=True"):
        load_pretrained(small_swinir(), tmp_path / "model.ckpt")
    with pytest.warns(UserWarning, match="weights_only=False"):
        model = load_pretrained(small_swinir(), tmp_path / "model.ckpt", trusted=True)
    _assert_same_weights(model, weights)


# ---------------------------------------------------------------- any input size


@pytest.mark.parametrize("upsampler, upscale", [
    ("pixelshuffle", 4), ("pixelshuffle", 3), ("nearest+conv", 4), ("pixelshuffledirect", 2), ("", 1)])
def test_swinir_output_is_exactly_scale_times_input(upsampler, upscale):
    model = small_swinir(upsampler=upsampler, upscale=upscale).eval()
    with torch.no_grad():
        for height, width in [(37, 53), (5, 6), (32, 32)]:
            out = model(torch.rand(2, 3, height, width))
            assert out.shape == (2, 3, height * upscale, width * upscale)
            assert torch.isfinite(out).all()


def test_swinir_denoiser_is_close_to_identity_plus_residual():
    # upscale 1 adds the predicted residual to the input: with the last conv zeroed, output == input
    model = small_swinir(upsampler="", upscale=1).eval()
    torch.nn.init.zeros_(model.conv_last.weight)
    torch.nn.init.zeros_(model.conv_last.bias)
    x = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x, atol=1e-6, rtol=0)


def test_promptir_output_has_the_input_size():
    model = PromptIR(**SMALL_PROMPTIR).eval()
    with torch.no_grad():
        for height, width in [(37, 53), (5, 6), (32, 32)]:
            assert model(torch.rand(1, 3, height, width)).shape == (1, 3, height, width)
    with pytest.raises(NotImplementedError, match="decoder=True"):
        PromptIR(decoder=False, **SMALL_PROMPTIR)(torch.rand(1, 3, 16, 16))


# ---------------------------------------------------------------- attention paths


def _output_and_grads(model, x, use_sdpa):
    model.use_sdpa = use_sdpa
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(0, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("size", [(37, 53), (32, 32)])  # padded size with computed masks / the img_size buffer
def test_sdpa_attention_equals_plain_attention(size):
    torch.manual_seed(0)
    model = small_swinir().train()  # drop_path 0, so train mode is deterministic
    x = torch.rand(2, 3, *size)
    out_sdpa, grads_sdpa = _output_and_grads(model, x, True)
    out_plain, grads_plain = _output_and_grads(model, x, False)
    assert (out_sdpa - out_plain).abs().max() <= 1e-5
    for name, grad in grads_plain.items():  # equal up to float32 rounding, relative to each gradient's scale
        assert (grads_sdpa[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    model.eval()
    with torch.no_grad():  # without autograd, CPU SDPA can take its fused kernel: check that one too
        model.use_sdpa = True
        fused = model(x)
        model.use_sdpa = False
        assert (fused - model(x)).abs().max() <= 1e-5


def test_gradient_checkpointing_changes_nothing():
    torch.manual_seed(0)
    model = small_swinir()
    x = torch.rand(1, 3, 20, 28)
    out, grads = _output_and_grads(model, x, True)
    for layer in model.layers:
        layer.residual_group.use_checkpoint = True
    out_ckpt, grads_ckpt = _output_and_grads(model, x, True)
    torch.testing.assert_close(out_ckpt, out)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


def test_swinir_runs_in_float64_at_odd_sizes():
    torch.manual_seed(0)
    model = small_swinir().eval()
    x = torch.rand(1, 3, 19, 23)
    with torch.no_grad():
        reference = model(x)
        torch.testing.assert_close(model.double()(x.double()).float(), reference, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- discriminators


def test_unet_discriminator_shapes_and_spectral_norm_keys():
    model = UNetDiscriminatorSN(num_in_ch=3, num_feat=64)
    assert n_params(model) == 4_376_897  # Real-ESRGAN's net_d
    state = model.state_dict()
    for i in range(1, 9):
        assert {f"conv{i}.weight_orig", f"conv{i}.weight_u", f"conv{i}.weight_v"} <= set(state)
        assert f"conv{i}.bias" not in state
    assert {"conv0.weight", "conv0.bias", "conv9.weight", "conv9.bias"} <= set(state)
    assert len(state) == 4 + 8 * 3
    small = UNetDiscriminatorSN(num_feat=8)
    assert small(torch.rand(2, 3, 48, 64)).shape == (2, 1, 48, 64)
    with pytest.raises(ValueError, match="divisible by 8"):
        small(torch.rand(1, 3, 50, 64))


@pytest.mark.parametrize("input_size", [128, 256])
def test_vgg_discriminator_shapes(input_size):
    model = VGGStyleDiscriminator(num_in_ch=3, num_feat=8, input_size=input_size)
    assert model(torch.rand(2, 3, input_size, input_size)).shape == (2, 1)
    state = model.state_dict()
    assert ("conv5_1.weight" in state) == (input_size == 256)
    assert {"conv0_0.bias", "bn4_1.running_mean", "linear1.weight", "linear2.bias"} <= set(state)
    assert state["linear1.weight"].shape == (100, 8 * 8 * 4 * 4)
    with pytest.raises(ValueError, match=f"{input_size}x{input_size}"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="128 or 256"):
        VGGStyleDiscriminator(input_size=96)


# ---------------------------------------------------------------- gradient flow


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(0, 1, out.numel()).view_as(out)).mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("upsampler", ["pixelshuffle", "nearest+conv"])
def test_swinir_every_parameter_gets_a_gradient(upsampler):
    torch.manual_seed(0)
    grads = _grads(small_swinir(upsampler=upsampler).train(), torch.rand(2, 3, 20, 28))
    dead = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert dead == []


def test_promptir_gradients_reach_all_but_the_documented_unused_parameters():
    torch.manual_seed(0)
    grads = _grads(PromptIR(**SMALL_PROMPTIR).train(), torch.rand(2, 3, 24, 24))
    unused = {n for n in grads if n.startswith(UNUSED_PARAMETERS)}
    assert len(unused) == len(UNUSED_PARAMETERS)  # bias=False: one weight each
    assert all(grads[n] is None for n in unused)
    dead = [n for n, g in grads.items() if n not in unused and (g is None or not g.abs().sum() > 0)]
    assert dead == []


def test_discriminators_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    for model, size in [(UNetDiscriminatorSN(num_feat=8), 32), (VGGStyleDiscriminator(num_feat=8), 128)]:
        grads = _grads(model.train(), torch.rand(2, 3, size, size))
        assert [n for n, g in grads.items() if g is None or not g.abs().sum() > 0] == []
