"""SwinIR (Liang et al., "SwinIR: Image Restoration Using Swin Transformer", ICCVW 2021).

Our own implementation whose state-dict keys match the official checkpoints key for key
(github.com/JingyunLiang/SwinIR, e.g. 001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth), so
`load_pretrained` can load them with strict=True.

Layout of the network (names = state-dict prefixes):
  conv_first                      3x3 conv, image -> embed_dim features ("shallow features")
  patch_embed.norm                LayerNorm on the tokens (one token per pixel: patch size 1)
  layers.i                        residual Swin transformer blocks (RSTB), each:
    residual_group.blocks.j       Swin transformer blocks; odd j use windows shifted by window_size // 2
    conv                          3x3 conv on the feature map, then a residual connection around the RSTB
  norm, conv_after_body           final LayerNorm and 3x3 conv, long skip from conv_first
  tail                            depends on `upsampler` (see SwinIR.__init__)

Efficiency notes (this network is benchmarked later):
  * tokens stay in raster order (B, H*W, C) between blocks; the cyclic shift and the window
    partition are done together as ONE gather with a precomputed token order (PermuteTokens),
    and undone with one gather by the inverse order, instead of roll + permute + contiguous;
    the backward of each gather is again one gather.
  * attention goes through F.scaled_dot_product_attention with the relative-position bias
    (plus the shift mask) as additive float mask; `use_sdpa=False` selects the plain
    softmax(q k^T * scale + bias) v path, which is the numerical reference.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

PRESETS = {
    # Classical SR x4, SwinIR-M (paper Table 2): 001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth, key "params".
    "classical_x4_M": dict(upscale=4, in_chans=3, img_size=64, window_size=8, img_range=1.0,
                           depths=[6, 6, 6, 6, 6, 6], embed_dim=180, num_heads=[6, 6, 6, 6, 6, 6],
                           mlp_ratio=2, upsampler="pixelshuffle", resi_connection="1conv"),
    # Real-world SR x4, SwinIR-M GAN: 003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN.pth, key "params_ema".
    "realworld_x4_M": dict(upscale=4, in_chans=3, img_size=64, window_size=8, img_range=1.0,
                           depths=[6, 6, 6, 6, 6, 6], embed_dim=180, num_heads=[6, 6, 6, 6, 6, 6],
                           mlp_ratio=2, upsampler="nearest+conv", resi_connection="1conv"),
    # Tiny network for demos and tests; no official checkpoint.
    "demo_x4": dict(upscale=4, in_chans=3, img_size=32, window_size=8, img_range=1.0,
                    depths=[2, 2], embed_dim=24, num_heads=[2, 2],
                    mlp_ratio=2, upsampler="pixelshuffle", resi_connection="1conv"),
}

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean, subtracted before the network (not a state-dict entry)


def relative_position_index(window_size):
    """(N, N) int64 with N = window_size**2: entry [i, j] indexes the bias table row for the
    offset between token i and token j of a window, (dy + ws - 1) * (2 ws - 1) + (dx + ws - 1)."""
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window_size - 1
    dx = xs[:, None] - xs[None, :] + window_size - 1
    return dy * (2 * window_size - 1) + dx


def window_order(height, width, window_size, shift, device=None):
    """Token order for (cyclic shift by -shift) + (window partition), as indices into raster order.

    tokens.index_select(1, order) turns (B, H*W, C) into (B, nW * ws*ws, C) where each run of
    ws*ws tokens is one window of the shifted image, windows in raster order."""
    index = torch.arange(height * width, device=device).view(height, width)
    if shift:
        index = index.roll((-shift, -shift), dims=(0, 1))
    index = index.view(height // window_size, window_size, width // window_size, window_size)
    return index.transpose(1, 2).reshape(-1)


def shift_mask(height, width, window_size, shift):
    """(nW, N, N) float mask for shifted windows: 0 where two tokens of a window were neighbours
    before the cyclic shift, -100 where the shift wrapped them in from the opposite border."""
    region = torch.zeros(height, width)
    bands = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in bands for c in bands):
        region[rows, cols] = label
    labels = region.flatten()[window_order(height, width, window_size, 0)].view(-1, window_size ** 2)
    different = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, -100.0)


class PermuteTokens(torch.autograd.Function):
    """tokens.index_select(1, order) for a permutation `order`, whose gradient is the gather by the
    inverse permutation: one copy, instead of autograd's zero-fill + index_add for index_select."""

    @staticmethod
    def forward(ctx, tokens, order, inverse):
        ctx.save_for_backward(inverse)
        return tokens.index_select(1, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


@functools.lru_cache(maxsize=16)
def window_layout(height, width, window_size, shift, device):
    """(order, inverse order, shift mask or None) for one input size, cached and shared by all blocks
    (the masks of a large image are big: nW * N * N floats)."""
    order = window_order(height, width, window_size, shift, device)
    mask = shift_mask(height, width, window_size, shift).to(device) if shift else None
    return order, order.argsort(), mask


def pad_to_multiple(x, multiple):
    """Pad (B, C, H, W) at the bottom/right so H and W are multiples of `multiple`.
    Reflect padding, or replicate when the image is too small to reflect."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


class DropPath(nn.Module):
    """Stochastic depth: during training, drop the whole residual branch of a sample with probability p."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        # (B, 1, ...) mask already divided by keep: one multiply over x instead of two
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)
        return x * mask


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative-position bias."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0, use_sdpa=True):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.use_sdpa = use_sdpa
        # one learned bias per head for each of the (2 ws - 1)^2 possible (dy, dx) offsets
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask=None):
        """x: (B*nW, N, C) windows of N = ws*ws tokens, grouped by image; mask: (nW, N, N) or None."""
        windows, n, c = x.shape
        heads = self.num_heads
        # (B*nW, N, 3C) -> q, k, v each (B*nW, heads, N, C/heads), strided views of the qkv output
        # (unbinding dim 2 in place lets the backward stack the three gradients straight into qkv's layout)
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(windows, n, 3, heads, c // heads).unbind(2))
        # gather from the (heads, table) view so the bias comes out contiguous: (1, heads, N, N)
        bias = self.relative_position_bias_table.t()[:, self.relative_position_index.view(-1)].view(1, heads, n, n)
        if mask is not None:
            bias = bias + mask.to(bias.dtype).unsqueeze(1)  # (nW, heads, N, N)
        drop = self.attn_drop if self.training else 0.0
        if self.use_sdpa:
            if bias.shape[0] != 1 and bias.shape[0] != windows:
                # per-window masks for a batch of B images: SDPA needs them for each of the B*nW windows
                bias = bias.repeat(windows // bias.shape[0], 1, 1, 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop, scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*nW, heads, N, N)
            attn = (attn.view(-1, bias.shape[0], heads, n, n) + bias).view(windows, heads, n, n)
            attn = attn.softmax(dim=-1)
            out = (F.dropout(attn, drop) if drop else attn) @ v
        # (B*nW, heads, N, C/heads) -> (B*nW, N, C); free when SDPA hands back (B*nW, N, heads, C/heads) storage
        out = out.transpose(1, 2).reshape(windows, n, c)
        return self.proj_drop(self.proj(out))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention + MLP, each pre-norm with a residual connection.
    Works on tokens in raster order: x (B, H*W, C)."""

    def __init__(self, dim, input_resolution, num_heads, window_size=8, shift_size=0, mlp_ratio=2.0,
                 qkv_bias=True, qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 norm_layer=nn.LayerNorm, use_sdpa=True):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        if min(self.input_resolution) <= window_size:
            # the training patch fits one window: no partition and no shift (as the official model,
            # which changes the shape of the bias table and drops attn_mask from the state dict)
            shift_size, window_size = 0, min(self.input_resolution)
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop, use_sdpa)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        if shift_size:
            # saved in the official checkpoints, so kept as a (persistent) buffer for the training size
            self.register_buffer("attn_mask", shift_mask(*self.input_resolution, window_size, shift_size))

    def forward(self, x, x_size):
        batch, length, channels = x.shape
        order, inverse, mask = window_layout(*x_size, self.window_size, self.shift_size, x.device)
        if self.shift_size and tuple(x_size) == self.input_resolution:
            mask = self.attn_mask  # the state-dict buffer (same values as the cached mask)
        # shift + partition in one gather: (B, H*W, C) -> (B*nW, ws*ws, C)
        windows = PermuteTokens.apply(self.norm1(x), order, inverse).view(-1, self.window_size ** 2, channels)
        windows = self.attn(windows, mask)
        # back to raster order (undoes partition and shift): (B*nW, ws*ws, C) -> (B, H*W, C)
        x = x + self.drop_path(PermuteTokens.apply(windows.view(batch, length, channels), inverse, order))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BasicLayer(nn.Module):
    """A stack of Swin blocks alternating regular and shifted windows."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio, qkv_bias, qk_scale,
                 drop, attn_drop, drop_path, norm_layer, use_checkpoint, use_sdpa):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, input_resolution, num_heads, window_size,
                                 shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio,
                                 qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop, attn_drop=attn_drop,
                                 drop_path=drop_path[i], norm_layer=norm_layer, use_sdpa=use_sdpa)
            for i in range(depth)])

    def forward(self, x, x_size):
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, x_size, use_reentrant=False)
            else:
                x = block(x, x_size)
        return x


def conv_block(dim, resi_connection):
    """The conv closing each RSTB and the body: '1conv' = one 3x3 conv, '3conv' = a cheaper bottleneck."""
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if resi_connection == "3conv":
        return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
                             nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, inplace=True),
                             nn.Conv2d(dim // 4, dim, 3, 1, 1))
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {resi_connection!r}")


class RSTB(nn.Module):
    """Residual Swin Transformer Block: Swin blocks, a 3x3 conv on the feature map, and a skip."""

    def __init__(self, dim, resi_connection, **layer_kwargs):
        super().__init__()
        self.residual_group = BasicLayer(dim=dim, **layer_kwargs)
        self.conv = conv_block(dim, resi_connection)

    def forward(self, x, x_size):
        batch, _, channels = x.shape
        y = self.residual_group(x, x_size)
        # tokens (B, H*W, C) seen as an image (B, C, H, W): a channels-last view, no copy;
        # the conv keeps channels-last, so flattening back to tokens is a view too
        y = self.conv(y.transpose(1, 2).view(batch, channels, *x_size))
        return y.flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    """Feature map (B, C, H, W) -> tokens (B, H*W, C), optionally layer-normed (patch size 1)."""

    def __init__(self, dim, norm_layer=None):
        super().__init__()
        self.norm = norm_layer(dim) if norm_layer is not None else None

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


class Upsample(nn.Sequential):
    """(conv to 4C, pixel shuffle x2) per factor 2, or (conv to 9C, pixel shuffle x3) for scale 3."""

    def __init__(self, scale, num_feat):
        layers = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"upscale {scale} is not supported by 'pixelshuffle': use 2, 3, 4 or 8")
        super().__init__(*layers)


class SwinIR(nn.Module):
    """SwinIR. Takes (B, in_chans, H, W) in [0, 1] of any size, returns (B, in_chans, upscale*H, upscale*W).

    upsampler: 'pixelshuffle' (classical SR), 'nearest+conv' (real-world SR, x4 only),
               'pixelshuffledirect' (lightweight SR), '' (denoising / JPEG, upscale 1).
    img_size is the training patch size: it fixes the saved attention-mask buffers; other sizes
    work (inputs are reflect-padded to a multiple of window_size and the output cropped).
    use_sdpa: attention via F.scaled_dot_product_attention (True) or the plain softmax path;
    switch later with `model.use_sdpa = False`.
    """

    def __init__(self, img_size=64, patch_size=1, in_chans=3, embed_dim=96, depths=(6, 6, 6, 6),
                 num_heads=(6, 6, 6, 6), window_size=7, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1, norm_layer=nn.LayerNorm, ape=False,
                 patch_norm=True, use_checkpoint=False, upscale=2, img_range=1.0, upsampler="",
                 resi_connection="1conv", use_sdpa=True):
        super().__init__()
        if patch_size != 1:
            raise ValueError(f"SwinIR uses one token per pixel: patch_size must be 1, got {patch_size}")
        if upsampler not in ("pixelshuffle", "pixelshuffledirect", "nearest+conv", ""):
            raise ValueError(f"unknown upsampler {upsampler!r}: use 'pixelshuffle', 'pixelshuffledirect', "
                             "'nearest+conv' or '' (no upsampling)")
        if upsampler == "nearest+conv" and upscale != 4:
            raise ValueError(f"upsampler 'nearest+conv' only supports upscale 4, got {upscale}")
        if upsampler == "" and upscale != 1:
            raise ValueError(f"upsampler '' (denoising / JPEG) keeps the size: upscale must be 1, got {upscale}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = img_size
        # inputs are padded to a multiple of the window the blocks really use (smaller when img_size is)
        self.window_size = min(window_size, *img_size)
        self.upscale = upscale
        self.upsampler = upsampler
        self.img_range = img_range
        self.ape = ape
        mean = RGB_MEAN if in_chans == 3 else (0.0,) * in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        num_feat = 64  # channels of the reconstruction tail

        # 1. shallow features
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)

        # 2. deep features: RSTBs on tokens, one token per pixel
        self.patch_embed = PatchEmbed(embed_dim, norm_layer if patch_norm else None)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, img_size[0] * img_size[1], embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        drop_path = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth grows with depth
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(RSTB(
                dim=embed_dim, resi_connection=resi_connection, input_resolution=img_size, depth=depth,
                num_heads=num_heads[i], window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=drop_path[start:start + depth], norm_layer=norm_layer,
                use_checkpoint=use_checkpoint, use_sdpa=use_sdpa))
        self.norm = norm_layer(embed_dim)
        self.conv_after_body = conv_block(embed_dim, resi_connection)

        # 3. reconstruction
        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
            self.upsample = Upsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        elif upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(embed_dim, upscale ** 2 * in_chans, 3, 1, 1), nn.PixelShuffle(upscale))
        elif upsampler == "nearest+conv":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
            self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        else:
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def use_sdpa(self):
        return all(m.use_sdpa for m in self.modules() if isinstance(m, WindowAttention))

    @use_sdpa.setter
    def use_sdpa(self, value):
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.use_sdpa = value

    def forward_features(self, x):
        """(B, C, H, W) features, H and W multiples of window_size -> same shape after the RSTBs."""
        batch, channels, height, width = x.shape
        x = self.patch_embed(x)  # (B, H*W, C)
        if self.ape:
            if (height, width) != self.img_size:
                raise ValueError(f"ape=True needs inputs of img_size {self.img_size}, got {(height, width)}")
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x, (height, width))
        x = self.norm(x)
        return x.transpose(1, 2).view(batch, channels, height, width)

    def forward(self, x):
        height, width = x.shape[-2:]
        x = pad_to_multiple(x, self.window_size)
        x = (x - self.mean) * self.img_range
        if self.upsampler == "":
            # denoising / JPEG: predict the residual of the (normalised) input image
            features = self.conv_first(x)
            x = x + self.conv_last(self.conv_after_body(self.forward_features(features)) + features)
        else:
            x = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(x)) + x
            if self.upsampler == "pixelshuffle":
                x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
            elif self.upsampler == "pixelshuffledirect":
                x = self.upsample(x)
            else:  # nearest+conv: two nearest x2 upsamplings, each followed by a conv
                x = self.conv_before_upsample(x)
                x = self.lrelu(self.conv_up1(F.interpolate(x, scale_factor=2, mode="nearest")))
                x = self.lrelu(self.conv_up2(F.interpolate(x, scale_factor=2, mode="nearest")))
                x = self.conv_last(self.lrelu(self.conv_hr(x)))
        x = x / self.img_range + self.mean
        return x[..., :height * self.upscale, :width * self.upscale]


def summary_rows():
    """(name, parameters, state-dict keys) for every preset."""
    rows = []
    for name, config in PRESETS.items():
        model = SwinIR(**config)
        rows.append((f"SwinIR {name}", sum(p.numel() for p in model.parameters()), len(model.state_dict())))
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="SwinIR presets (and PromptIR) at a glance.")
    parser.add_argument("--summary", action="store_true", help="print parameter and state-dict key counts")
    args = parser.parse_args()
    if not args.summary:
        parser.error("nothing to do: pass --summary")
    from models import promptir

    for name, params, keys in summary_rows() + promptir.summary_rows():
        print(f"{name:28s} {params:>12,d} parameters {keys:>5d} state-dict keys")
