"""Discriminators for the GAN loss, with the state-dict keys of their reference implementations.

UNetDiscriminatorSN   Real-ESRGAN (Wang et al. 2021): a U-Net that scores every pixel, spectral norm on
                      conv1-conv8 (keys convN.weight_orig / weight_u / weight_v). (B, C, H, W) -> (B, 1, H, W).
VGGStyleDiscriminator BasicSR / ESRGAN: strided convs + batch norm down to 4x4, two linear layers.
                      (B, C, S, S) with S = input_size (128 or 256) -> (B, 1).
"""
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm


def _lrelu(x):
    return F.leaky_relu(x, negative_slope=0.2)


class UNetDiscriminatorSN(nn.Module):
    def __init__(self, num_in_ch=3, num_feat=64, skip_connection=True):
        super().__init__()
        self.skip_connection = skip_connection
        self.conv0 = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        # encoder: three 4x4 stride-2 convs, channels 2, 4, 8 x num_feat
        self.conv1 = spectral_norm(nn.Conv2d(num_feat, num_feat * 2, 4, 2, 1, bias=False))
        self.conv2 = spectral_norm(nn.Conv2d(num_feat * 2, num_feat * 4, 4, 2, 1, bias=False))
        self.conv3 = spectral_norm(nn.Conv2d(num_feat * 4, num_feat * 8, 4, 2, 1, bias=False))
        # decoder: bilinear x2 then a 3x3 conv, back to 4, 2, 1 x num_feat (skips from the encoder)
        self.conv4 = spectral_norm(nn.Conv2d(num_feat * 8, num_feat * 4, 3, 1, 1, bias=False))
        self.conv5 = spectral_norm(nn.Conv2d(num_feat * 4, num_feat * 2, 3, 1, 1, bias=False))
        self.conv6 = spectral_norm(nn.Conv2d(num_feat * 2, num_feat, 3, 1, 1, bias=False))
        self.conv7 = spectral_norm(nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=False))
        self.conv8 = spectral_norm(nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=False))
        self.conv9 = nn.Conv2d(num_feat, 1, 3, 1, 1)

    def forward(self, x):
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(f"UNetDiscriminatorSN needs height and width divisible by 8 (three 2x downsamplings "
                             f"with skips), got {tuple(x.shape[-2:])}: crop or pad the images first")
        x0 = _lrelu(self.conv0(x))
        x1 = _lrelu(self.conv1(x0))  # 1/2
        x2 = _lrelu(self.conv2(x1))  # 1/4
        x3 = _lrelu(self.conv3(x2))  # 1/8
        up = self._up(x3)
        x4 = _lrelu(self.conv4(up))
        if self.skip_connection:
            x4 = x4 + x2
        x5 = _lrelu(self.conv5(self._up(x4)))
        if self.skip_connection:
            x5 = x5 + x1
        x6 = _lrelu(self.conv6(self._up(x5)))
        if self.skip_connection:
            x6 = x6 + x0
        out = _lrelu(self.conv8(_lrelu(self.conv7(x6))))
        return self.conv9(out)

    @staticmethod
    def _up(x):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class VGGStyleDiscriminator(nn.Module):
    def __init__(self, num_in_ch=3, num_feat=64, input_size=128):
        super().__init__()
        if input_size not in (128, 256):
            raise ValueError(f"VGGStyleDiscriminator supports input_size 128 or 256, got {input_size}")
        self.input_size = input_size
        # stage i: 3x3 conv (conv{i}_0), then 4x4 stride-2 conv (conv{i}_1) halving the resolution;
        # every conv but the first is followed by batch norm. 5 stages for 128 (-> 4x4), 6 for 256.
        channels = [num_feat, num_feat * 2, num_feat * 4, num_feat * 8, num_feat * 8, num_feat * 8]
        self.conv0_0 = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1, bias=True)
        self.conv0_1 = nn.Conv2d(num_feat, num_feat, 4, 2, 1, bias=False)
        self.bn0_1 = nn.BatchNorm2d(num_feat, affine=True)
        self.num_stages = 5 if input_size == 128 else 6
        for i in range(1, self.num_stages):
            setattr(self, f"conv{i}_0", nn.Conv2d(channels[i - 1], channels[i], 3, 1, 1, bias=False))
            setattr(self, f"bn{i}_0", nn.BatchNorm2d(channels[i], affine=True))
            setattr(self, f"conv{i}_1", nn.Conv2d(channels[i], channels[i], 4, 2, 1, bias=False))
            setattr(self, f"bn{i}_1", nn.BatchNorm2d(channels[i], affine=True))
        self.linear1 = nn.Linear(num_feat * 8 * 4 * 4, 100)
        self.linear2 = nn.Linear(100, 1)

    def forward(self, x):
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"VGGStyleDiscriminator(input_size={self.input_size}) needs "
                             f"{self.input_size}x{self.input_size} inputs, got {tuple(x.shape[-2:])}")
        feat = _lrelu(self.bn0_1(self.conv0_1(_lrelu(self.conv0_0(x)))))
        for i in range(1, self.num_stages):
            feat = _lrelu(getattr(self, f"bn{i}_0")(getattr(self, f"conv{i}_0")(feat)))
            feat = _lrelu(getattr(self, f"bn{i}_1")(getattr(self, f"conv{i}_1")(feat)))
        return self.linear2(_lrelu(self.linear1(feat.flatten(1))))  # feat: (B, 8 num_feat, 4, 4)
