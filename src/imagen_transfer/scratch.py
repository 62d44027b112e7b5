"""The honest competitor of every frozen-feature head: a small U-Net trained end to end from the pixels on the same
labels (probe --scratch), for detection (under a CenterNet head) and segmentation (under a 1x1 classifier)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ScratchUNet(nn.Module):
    """The honest competitor: a small U-Net trained end to end from pixels (levels at strides 1, 2, 4, 8 with widths
    16, 32, 64, 128; two 3x3 convs + GroupNorm + SiLU per level), its decoder stopping at `stride`."""

    WIDTHS = (16, 32, 64, 128)

    @classmethod
    def width_at(cls, stride: int) -> int:
        return cls.WIDTHS[stride.bit_length() - 1]

    def __init__(self, channels: int, stride: int = 1):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        w = self.WIDTHS
        self.down = nn.ModuleList([block(channels, w[0])] + [block(w[i - 1], w[i]) for i in range(1, len(w))])
        levels = len(w) - stride.bit_length()  # decoder steps from stride 8 back to `stride`
        self.up = nn.ModuleList([block(w[-1 - i] + w[-2 - i], w[-2 - i]) for i in range(levels)])

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        for i, block in enumerate(self.up):
            skip = skips[-2 - i]
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], 1))
        return x


class ScratchSegmenter(nn.Module):
    """ScratchUNet at full resolution and a 1x1 classifier (the signature of ConvSegHead)."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.net, self.classify = ScratchUNet(channels, stride=1), nn.Conv2d(ScratchUNet.WIDTHS[0], classes, 1)

    def forward(self, x, size):
        return F.interpolate(self.classify(self.net(x)), size=size, mode="bilinear", align_corners=False)
