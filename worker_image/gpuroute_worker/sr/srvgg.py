"""SRVGGNetCompact, Real-ESRGAN's small VGG-style model (realesr-general-x4v3 and kin).

Names follow Real-ESRGAN's srvgg_arch.py: `body` is a ModuleList alternating convs and
activations (body.0 conv, body.1 PReLU, ..., body.{2 + 2*num_conv} last conv), and the
last conv's channels are pixel-shuffled to the output size. The network predicts a
residual over the nearest-upsampled input.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _activation(act_type: str, num_feat: int) -> nn.Module:
    if act_type == "prelu":
        return nn.PReLU(num_parameters=num_feat)
    if act_type == "relu":
        return nn.ReLU(inplace=True)
    if act_type == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.1, inplace=True)
    raise ValueError(f"unknown activation {act_type!r}; expected prelu, relu or leakyrelu")


class SRVGGNetCompact(nn.Module):
    """Convs at input resolution only; upsampling is the final PixelShuffle."""

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_conv: int = 16,
        upscale: int = 4,
        act_type: str = "prelu",
    ) -> None:
        super().__init__()
        self.num_in_ch = num_in_ch
        self.num_out_ch = num_out_ch
        self.num_feat = num_feat
        self.num_conv = num_conv
        self.upscale = upscale
        self.act_type = act_type

        self.body = nn.ModuleList()
        self.body.append(nn.Conv2d(num_in_ch, num_feat, 3, 1, 1))
        self.body.append(_activation(act_type, num_feat))
        for _ in range(num_conv):
            self.body.append(nn.Conv2d(num_feat, num_feat, 3, 1, 1))
            self.body.append(_activation(act_type, num_feat))
        self.body.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.upsampler = nn.PixelShuffle(upscale)

    @property
    def input_multiple(self) -> int:
        return 1

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        out = self.upsampler(out)
        return out + F.interpolate(x, scale_factor=self.upscale, mode="nearest")
