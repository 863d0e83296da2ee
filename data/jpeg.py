"""A batched JPEG round trip in torch, for synthesising compression artefacts on the GPU.

This is a non-differentiable torch model of a baseline JPEG codec, not libjpeg bit-exact: it follows the
codec's lossy steps (JFIF RGB -> YCbCr, 4:2:0 chroma subsampling by 2x2 averaging, 8x8 DCT, quantisation with
the standard tables scaled by the quality factor, rounding, dequantisation, inverse DCT, nearest-neighbour
chroma upsampling) and skips the lossless entropy coding. One quality per image, a whole batch at once.

Two styles:
  "diffjpeg"  Real-ESRGAN's (BasicSR's DiffJPEG with differentiable=False), the default of the RISR recipe:
              the luma table transposed (its coefficient (u, v) is divided by the standard entry (v, u)),
              the tables scaled by the quality factor without rounding or clamping, the image padded with
              zeros to a multiple of 16, and the output not rounded (float, clamped to [0, 1]);
  "libjpeg"   closer to real JPEG files (PIL, OpenCV): libjpeg's integer tables
              floor((base * factor + 50) / 100) in [1, 255], edge-replicated padding, 8-bit output.
"""
import math

import torch
import torch.nn.functional as F

from data.images import to_device_async

# JPEG standard (ITU T.81 Annex K) quantisation tables, the base of libjpeg's quality scaling.
LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4

# JFIF full-range YCbCr (rows: Y, Cb, Cr), applied to 0..255 RGB; chroma is offset by 128 after.
_RGB_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)


def quality_tables(quality: torch.Tensor, style: str = "libjpeg") -> tuple[torch.Tensor, torch.Tensor]:
    """Luma and chroma tables [B, 8, 8] for qualities [B] (1..100). The factor is 5000/q below 50, 200 - 2q above
    (percent); libjpeg rounds each entry to floor((base * factor + 50) / 100) in [1, 255], DiffJPEG keeps
    base * factor / 100 and transposes the tables."""
    q = quality.clamp(1, 100).to(torch.float32)[:, None, None]
    factor = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    tables = []
    for base in (LUMA_TABLE, CHROMA_TABLE):
        base = to_device_async(torch.tensor(base, dtype=torch.float32), quality.device)
        if style == "diffjpeg":
            tables.append(base.T * (factor / 100.0))  # transposed as in DiffJPEG (the chroma table is symmetric)
        else:
            tables.append(torch.floor((base * factor + 50.0) / 100.0).clamp(1, 255))
    return tables[0], tables[1]


def _dct_matrix(device, dtype) -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix D, so a block's coefficients are D @ block @ D.T (this is
    exactly JPEG's 1/4 C(u) C(v) normalisation)."""
    k = torch.arange(8, dtype=torch.float64)[:, None]
    n = torch.arange(8, dtype=torch.float64)[None, :]
    d = torch.cos((2 * n + 1) * k * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return to_device_async(d.to(dtype), device)


def _quantise_blocks(plane: torch.Tensor, table: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """DCT, quantise, dequantise and invert every 8x8 block of plane [B, 1, H, W] (H, W % 8 == 0)
    with a per-image table [B, 8, 8]."""
    b, _, h, w = plane.shape
    blocks = plane.view(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)  # [B, h/8, w/8, 8, 8]
    coef = dct @ blocks @ dct.T
    table = table[:, None, None]
    coef = torch.round(coef / table) * table
    blocks = dct.T @ coef @ dct
    return blocks.permute(0, 1, 3, 2, 4).reshape(b, 1, h, w)


@torch.no_grad()
def jpeg_roundtrip(img: torch.Tensor, quality: torch.Tensor | float, style: str = "libjpeg") -> torch.Tensor:
    """Compress and decompress a batch img [B, 3, H, W] in [0, 1] at per-image `quality` ([B] or a number,
    1..100) in the given style (see the module docstring); returns float [B, 3, H, W] in [0, 1] (8-bit-valued
    for libjpeg). Sides that are not multiples of 16 (the 4:2:0 macroblock) are padded and cropped back."""
    if style not in ("diffjpeg", "libjpeg"):
        raise ValueError(f"JPEG style must be 'diffjpeg' or 'libjpeg', got {style!r}")
    b, _, h, w = img.shape
    if not torch.is_tensor(quality):
        quality = torch.full((b,), float(quality), device=img.device)
    luma_table, chroma_table = quality_tables(to_device_async(quality, img.device), style)
    pad_h, pad_w = -h % 16, -w % 16
    mode = "constant" if style == "diffjpeg" else "replicate"
    x = F.pad(img.clamp(0, 1) * 255.0, (0, pad_w, 0, pad_h), mode=mode)
    to_ycbcr = to_device_async(torch.tensor(_RGB_TO_YCBCR, dtype=x.dtype), x.device)
    # Y keeps its 0..255 range and Cb/Cr are centred, so subtracting 128 from Y alone level-shifts all three.
    ycc = torch.einsum("oc,bchw->bohw", to_ycbcr, x)
    y = ycc[:, :1] - 128.0
    chroma = F.avg_pool2d(ycc[:, 1:], 2)  # 4:2:0, [B, 2, H/2, W/2]
    dct = _dct_matrix(x.device, x.dtype)
    y = _quantise_blocks(y, luma_table, dct) + 128.0
    cb = _quantise_blocks(chroma[:, :1], chroma_table, dct)
    cr = _quantise_blocks(chroma[:, 1:], chroma_table, dct)
    cbcr = torch.cat([cb, cr], dim=1).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    cb, cr = cbcr[:, :1], cbcr[:, 1:]
    rgb = torch.cat([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], dim=1).clamp(0, 255)
    rgb = rgb / 255.0 if style == "diffjpeg" else rgb.round() / 255.0
    return rgb[:, :, :h, :w]
