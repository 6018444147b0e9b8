"""Models that map seismic shot gathers (B, 5, T, 70) to velocity maps (B, 1, 70, 70) in m/s, and a
factory that builds them by name (`create_model`), so a config picks the model with `model.name`."""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import nn

VELOCITY_MIN, VELOCITY_MAX = 1500.0, 4500.0  # m/s
MAP_SIZE = 70  # cells per side of the velocity map


def conv_block(in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


def deconv_block(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


class InversionNet(nn.Module):
    """InversionNet (Wu & Lin, OpenFWI): a convolutional encoder over (time, receiver) down to a
    1 x 1 latent vector, and a transposed-convolution decoder up to an 80 x 80 map cropped to 70 x 70.

    The encoder first halves only the time axis (four times), since 1000 samples against 70
    receivers is very unbalanced, then halves both axes (three times); for 1000 x 70 input that
    leaves an 8 x 9 grid. An adaptive average pool brings any other time length (time-reduced
    data) to that grid, and a convolution covering the whole grid makes the latent vector, so the
    latent keeps where things are, as a fully connected layer would. Unlike the original, that
    last encoder layer has no BatchNorm, which cannot normalise a 1 x 1 map of a batch of one.

    `width` scales every channel count (1.0 = the original 32..512), so a CPU smoke model can be
    tiny. `head` maps the last layer's output to m/s: "sigmoid" gives 1500 + 3000 sigmoid(x),
    always in range; "clamp" gives 3000 + 1500 x, clamped to [1500, 4500] only in eval mode, so
    training gets gradients everywhere.
    """

    latent_grid = (8, 9)  # encoder output for 1000 x 70 input

    def __init__(self, in_channels: int = 5, width: float = 1.0, head: Literal["sigmoid", "clamp"] = "sigmoid"):
        super().__init__()
        if head not in ("sigmoid", "clamp"):
            raise ValueError(f"InversionNet head must be 'sigmoid' or 'clamp', got {head!r}")
        if width <= 0:
            raise ValueError(f"InversionNet width must be positive, got {width}")
        self.head = head
        c1, c2, c3, c4, c5 = (max(1, round(c * width)) for c in (32, 64, 128, 256, 512))
        along_time = dict(kernel_size=(3, 1), padding=(1, 0))
        self.encoder = nn.Sequential(
            conv_block(in_channels, c1, kernel_size=(7, 1), stride=(2, 1), padding=(3, 0)),
            conv_block(c1, c2, stride=(2, 1), **along_time),
            conv_block(c2, c2, **along_time),
            conv_block(c2, c2, stride=(2, 1), **along_time),
            conv_block(c2, c2, **along_time),
            conv_block(c2, c3, stride=(2, 1), **along_time),
            conv_block(c3, c3, **along_time),
            conv_block(c3, c3, stride=2),
            conv_block(c3, c3),
            conv_block(c3, c4, stride=2),
            conv_block(c4, c4),
            conv_block(c4, c4, stride=2),
            conv_block(c4, c4),
            nn.AdaptiveAvgPool2d(self.latent_grid),
            nn.Conv2d(c4, c5, kernel_size=self.latent_grid),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.decoder = nn.Sequential(
            deconv_block(c5, c5, kernel_size=5),  # 1 -> 5
            conv_block(c5, c5),
            deconv_block(c5, c4, kernel_size=4, stride=2, padding=1),  # 10
            conv_block(c4, c4),
            deconv_block(c4, c3, kernel_size=4, stride=2, padding=1),  # 20
            conv_block(c3, c3),
            deconv_block(c3, c2, kernel_size=4, stride=2, padding=1),  # 40
            conv_block(c2, c2),
            deconv_block(c2, c1, kernel_size=4, stride=2, padding=1),  # 80
            conv_block(c1, c1),
        )
        self.to_velocity = nn.Conv2d(c1, 1, kernel_size=3, padding=1)

    def forward(self, seismic: torch.Tensor) -> torch.Tensor:
        features = self.decoder(self.encoder(seismic))
        border = (features.shape[-1] - MAP_SIZE) // 2
        features = features[..., border : border + MAP_SIZE, border : border + MAP_SIZE]
        x = self.to_velocity(features)
        if self.head == "sigmoid":
            return VELOCITY_MIN + (VELOCITY_MAX - VELOCITY_MIN) * torch.sigmoid(x)
        velocity = (VELOCITY_MIN + VELOCITY_MAX) / 2 + (VELOCITY_MAX - VELOCITY_MIN) / 2 * x
        return velocity if self.training else velocity.clamp(VELOCITY_MIN, VELOCITY_MAX)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "inversionnet": InversionNet,
}


def known_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """The model registered as `name`, built with `kwargs` (e.g. width, head)."""
    if name not in MODELS:
        raise ValueError(f"unknown gwi model {name!r}; known models: {', '.join(known_models())}")
    return MODELS[name](**kwargs)
