"""PromptIR (Potlapalli et al., "PromptIR: Prompting for All-in-One Blind Image Restoration", NeurIPS 2023).

Our own implementation whose state-dict keys match the official checkpoint (github.com/va1shn9v/PromptIR,
net/model.py; the released model.ckpt is a Lightning checkpoint whose keys carry a "net." prefix, which
`load_pretrained` strips).

A 4-level Restormer U-Net (transformer blocks with channel attention, "MDTA", and a gated-dconv
feed-forward, "GDFN"). With decoder=True, each decoder level asks a prompt block for a prompt: a
softmax-weighted mix of 5 learned prompt tensors, the weights predicted from the pooled features;
the prompt is concatenated to the features and fused by an extra transformer block + 1x1 conv.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# Parameters the official model defines but never uses in forward(): they never receive a gradient,
# the official training ran DDP with find_unused_parameters=True because of them (our trainer uses DDP's static
# graph instead, or that search when train.static_graph is off). They are kept so the
# official checkpoint loads strictly. Name prefixes, as in model.named_parameters():
UNUSED_PARAMETERS = ("chnl_reduce1.", "chnl_reduce2.", "chnl_reduce3.",
                     "reduce_noise_channel_1.", "reduce_noise_channel_2.", "reduce_noise_channel_3.")


class WithBiasLayerNorm(nn.Module):
    """LayerNorm over the last dimension (eps 1e-5), with learned scale and shift."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class BiasFreeLayerNorm(nn.Module):
    """Divides by the standard deviation over the last dimension without subtracting the mean."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5) * self.weight


class LayerNorm(nn.Module):
    """Normalises (B, C, H, W) over C at every pixel."""

    def __init__(self, dim, LayerNorm_type):
        super().__init__()
        self.body = BiasFreeLayerNorm(dim) if LayerNorm_type == "BiasFree" else WithBiasLayerNorm(dim)

    def forward(self, x):
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FeedForward(nn.Module):
    """GDFN: 1x1 conv to 2 hidden halves, 3x3 depthwise conv, gelu(first half) * second half, 1x1 conv."""

    def __init__(self, dim, ffn_expansion_factor, bias):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class Attention(nn.Module):
    """MDTA: attention across channels (a C/heads x C/heads map per head), so cost is linear in pixels.
    q and k are L2-normalised over pixels and the logits scaled by a learned per-head temperature."""

    def __init__(self, dim, num_heads, bias):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        b, c, h, w = x.shape
        # each of q, k, v: (B, C, H, W) -> (B, heads, C/heads, H*W)
        q, k, v = (t.reshape(b, self.num_heads, c // self.num_heads, h * w)
                   for t in self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)  # (B, heads, C/heads, C/heads)
        return self.project_out((attn @ v).reshape(b, c, h, w))


class TransformerBlock(nn.Module):
    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type):
        super().__init__()
        self.norm1 = LayerNorm(dim, LayerNorm_type)
        self.attn = Attention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim, LayerNorm_type)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    """3x3 conv from the image to `embed_dim` features."""

    def __init__(self, in_c=3, embed_dim=48, bias=False):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x):
        return self.proj(x)


class Downsample(nn.Module):
    """Halve the resolution, double the channels: conv to C/2, then pixel-unshuffle (x4 channels)."""

    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class Upsample(nn.Module):
    """Double the resolution, halve the channels: conv to 2C, then pixel-shuffle (/4 channels)."""

    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


class PromptGenBlock(nn.Module):
    """Prompt = 3x3 conv( resize( sum_i softmax(linear(pooled x))_i * prompt_i ) ) at the size of x."""

    def __init__(self, prompt_dim=128, prompt_len=5, prompt_size=96, lin_dim=192):
        super().__init__()
        self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        weights = F.softmax(self.linear_layer(x.mean(dim=(-2, -1))), dim=1)  # (B, prompt_len)
        prompt = torch.einsum("bl,lchw->bchw", weights, self.prompt_param[0])  # (B, prompt_dim, size, size)
        prompt = F.interpolate(prompt, x.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv3x3(prompt)


class PromptIR(nn.Module):
    """PromptIR. Takes (B, 3, H, W) in [0, 1] of any size (reflect-padded to a multiple of 8 inside,
    output cropped back), returns the restored (B, 3, H, W). The paper model is decoder=True
    (the official constructor defaults to decoder=False; we default to the paper model).
    decoder=False builds the official prompt-free layout for counting/loading only; it cannot run."""

    def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
                 heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias", decoder=True):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim must be even (the down/up-sampling halves channels), got {dim}")

        def blocks(n, channels, num_heads):
            return nn.Sequential(*[TransformerBlock(channels, num_heads, ffn_expansion_factor, bias, LayerNorm_type)
                                   for _ in range(n)])

        self.decoder = decoder
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        if decoder:
            # prompt sizes are fixed by the paper model (dim 48): channels 64/128/320 at levels 1/2/3
            self.prompt1 = PromptGenBlock(prompt_dim=64, prompt_len=5, prompt_size=64, lin_dim=dim * 2)
            self.prompt2 = PromptGenBlock(prompt_dim=128, prompt_len=5, prompt_size=32, lin_dim=dim * 4)
            self.prompt3 = PromptGenBlock(prompt_dim=320, prompt_len=5, prompt_size=16, lin_dim=dim * 8)
        # never used in forward (see UNUSED_PARAMETERS); present in the official checkpoint
        self.chnl_reduce1 = nn.Conv2d(64, 64, kernel_size=1, bias=bias)
        self.chnl_reduce2 = nn.Conv2d(128, 128, kernel_size=1, bias=bias)
        self.chnl_reduce3 = nn.Conv2d(320, 256, kernel_size=1, bias=bias)
        self.reduce_noise_channel_1 = nn.Conv2d(dim + 64, dim, kernel_size=1, bias=bias)
        self.reduce_noise_channel_2 = nn.Conv2d(dim * 2 + 128, dim * 2, kernel_size=1, bias=bias)
        self.reduce_noise_channel_3 = nn.Conv2d(dim * 4 + 256, dim * 4, kernel_size=1, bias=bias)

        # encoder: channels dim, 2 dim, 4 dim at full, 1/2, 1/4 resolution; latent 8 dim at 1/8
        self.encoder_level1 = blocks(num_blocks[0], dim, heads[0])
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = blocks(num_blocks[1], dim * 2, heads[1])
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = blocks(num_blocks[2], dim * 4, heads[2])
        self.down3_4 = Downsample(dim * 4)
        self.latent = blocks(num_blocks[3], dim * 8, heads[3])

        # decoder. The official code writes these channel counts for dim=48 (e.g. dim*2 + 224 for
        # noise_level2); we write the same numbers in terms of dim so smaller models work too.
        # Each noise_level block fuses the features with a prompt of 320 / 128 / 64 channels.
        self.up4_3 = Upsample(dim * 4)  # applied to the fused latent (4 dim channels) -> 2 dim
        self.reduce_chan_level3 = nn.Conv2d(dim * 2 + dim * 4, dim * 4, kernel_size=1, bias=bias)
        self.noise_level3 = TransformerBlock(dim * 8 + 320, heads[2], ffn_expansion_factor, bias, LayerNorm_type)
        self.reduce_noise_level3 = nn.Conv2d(dim * 8 + 320, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = blocks(num_blocks[2], dim * 4, heads[2])
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.noise_level2 = TransformerBlock(dim * 4 + 128, heads[2], ffn_expansion_factor, bias, LayerNorm_type)
        self.reduce_noise_level2 = nn.Conv2d(dim * 4 + 128, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level2 = blocks(num_blocks[1], dim * 2, heads[1])
        self.up2_1 = Upsample(dim * 2)
        self.noise_level1 = TransformerBlock(dim * 2 + 64, heads[2], ffn_expansion_factor, bias, LayerNorm_type)
        self.reduce_noise_level1 = nn.Conv2d(dim * 2 + 64, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level1 = blocks(num_blocks[0], dim * 2, heads[0])
        self.refinement = blocks(num_refinement_blocks, dim * 2, heads[0])
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, inp_img):
        if not self.decoder:
            raise NotImplementedError(
                "PromptIR(decoder=False) can be built (to count or load parameters) but not run: as in the "
                "official model, up4_3 expects the 4*dim channels that only the prompt path produces. "
                "Use decoder=True (the paper model).")
        height, width = inp_img.shape[-2:]
        pad_h, pad_w = -height % 8, -width % 8  # three 2x downsamplings
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            inp_img = F.pad(inp_img, (0, pad_w, 0, pad_h), mode=mode)

        enc1 = self.encoder_level1(self.patch_embed(inp_img))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.latent(self.down3_4(enc3))
        latent = torch.cat([latent, self.prompt3(latent)], 1)
        latent = self.reduce_noise_level3(self.noise_level3(latent))

        dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], 1))
        dec3 = self.decoder_level3(dec3)
        dec3 = torch.cat([dec3, self.prompt2(dec3)], 1)
        dec3 = self.reduce_noise_level2(self.noise_level2(dec3))

        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], 1))
        dec2 = self.decoder_level2(dec2)
        dec2 = torch.cat([dec2, self.prompt1(dec2)], 1)
        dec2 = self.reduce_noise_level1(self.noise_level1(dec2))

        dec1 = torch.cat([self.up2_1(dec2), enc1], 1)  # no channel reduction at level 1: 2 dim channels
        dec1 = self.refinement(self.decoder_level1(dec1))
        out = self.output(dec1) + inp_img
        return out[..., :height, :width]


def summary_rows():
    """(name, parameters, state-dict keys) for the paper model, with and without the prompt decoder."""
    rows = []
    for decoder in (True, False):
        model = PromptIR(decoder=decoder)
        rows.append((f"PromptIR decoder={decoder}", sum(p.numel() for p in model.parameters()),
                     len(model.state_dict())))
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="PromptIR at a glance.")
    parser.add_argument("--summary", action="store_true", help="print parameter and state-dict key counts")
    if not parser.parse_args().summary:
        parser.error("nothing to do: pass --summary")
    for name, params, keys in summary_rows():
        print(f"{name:28s} {params:>12,d} parameters {keys:>5d} state-dict keys")
