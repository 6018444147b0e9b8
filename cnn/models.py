"""Classification models by name: `create_model(name, in_channels=, num_classes=, mean=, std=, ...)`.

Every model starts with `Normalize` (the dataset's mean/std, and uint8 -> [0, 1] for the device
loader's batches), so inputs outside the model are plain pixels in [0, 1]: adversarial attacks, test-
time augmentation and the GPU loader all work in pixel space, and a checkpoint carries its own
normalisation.

Built in: `smoke_cnn` (tests), `mnist_tiny` (< 8k parameters), `resnet9` (the DAWNBench network),
`airbench` (the airbench94 layout without whitening), `simplenet` (SimpleNet-v1, 13 layers, 5.5M); and
any timm model as `timm:<name>`, with pretrained weights only from a local file (never downloaded).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn

from harness.errors import ConfigError, UserError
from harness.optim import nested_group_matcher
from harness.registry import Registry

MODELS = Registry("model")
register_model = MODELS.register  # @register_model: the function's name is the model's name
TIMM_PREFIX = "timm:"


def known_models() -> list[str]:
    return MODELS.names()


def check_model_name(name: str) -> str:
    """`name` if create_model knows it (a registered name, or timm:<a timm model>); else ValueError."""
    if name.startswith(TIMM_PREFIX):
        if not timm.is_model(name[len(TIMM_PREFIX):]):
            raise ValueError(f"unknown timm model {name[len(TIMM_PREFIX):]!r} (see timm.list_models())")
        return name
    if name not in MODELS:
        raise ValueError(f"{MODELS.unknown(name)}, or timm:<name>")
    return name


def create_model(name: str, in_channels: int = 3, num_classes: int = 10, mean=None, std=None, width: int | None = None,
                 norm: str = "batch", dropout: float | None = None, pretrained_path: str | None = None) -> nn.Module:
    """`Normalize(mean, std)` (default: identity) followed by the network called `name`.
    `width` (channels of the first stage) and `dropout`: None means the network's own default."""
    try:
        check_model_name(name)
    except ValueError as err:
        raise ConfigError(f"key 'model.name': {err}") from None
    mean = tuple(mean) if mean is not None else (0.0,) * in_channels
    std = tuple(std) if std is not None else (1.0,) * in_channels
    if name.startswith(TIMM_PREFIX):
        net, pretrained_stats = timm_model(name[len(TIMM_PREFIX):], in_channels, num_classes, width, norm, dropout, pretrained_path)
        if pretrained_stats is not None:  # pretrained weights expect the inputs they were trained on
            mean, std = pretrained_stats
        return ImageClassifier(Normalize(mean, std), net)
    if pretrained_path is not None:
        raise ConfigError(f"key 'model.pretrained_path': only timm:<name> models load pretrained weights, not {name!r}")
    options = dict(norm=norm) | {key: value for key, value in dict(width=width, dropout=dropout).items() if value is not None}
    return ImageClassifier(Normalize(mean, std), MODELS.create(name, in_channels=in_channels, num_classes=num_classes, **options))


# ---- building blocks ---------------------------------------------------------------------------------


def to_unit_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]; the one conversion every path uses, so they agree bit for bit."""
    return pixels.float().div_(255) if pixels.dtype == torch.uint8 else pixels


class Normalize(nn.Module):
    """(x - mean) / std per channel, after uint8 -> [0, 1]. Buffers, so checkpoints carry them."""

    def __init__(self, mean, std):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"Normalize: {len(mean)} means but {len(std)} stds")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (to_unit_float(x) - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class ImageClassifier(nn.Module):
    """Pixels in [0, 1] (or uint8) -> `normalize` -> `net` -> logits."""

    def __init__(self, normalize: Normalize, net: nn.Module):
        super().__init__()
        self.normalize, self.net = normalize, net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def group_matcher(self, coarse: bool = False):
        """The blocks of `net` (timm models number theirs), for optim.layer_decay."""
        return nested_group_matcher(self.net, "net.")


class Scale(nn.Module):
    """Multiply by a constant: the fast CIFAR nets scale their logits down (resnet9 0.125, airbench 1/9)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


class Residual(nn.Module):
    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def named(**layers: nn.Module) -> nn.Sequential:
    """A Sequential whose parts have names: parameter tables and grad_norm/<layer> logs read
    `net.layer1.residual.body.0.conv` rather than `net.1.2.0.0.0`."""
    return nn.Sequential(OrderedDict(layers))


def norm_layer(norm: str, channels: int, **options) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels, **options)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; known: batch, none")


def conv_block(cin: int, cout: int, norm: str, kernel: int = 3, padding: int = 1, act: type[nn.Module] = nn.ReLU,
               **norm_options) -> nn.Sequential:
    """conv -> norm -> activation (the conv has a bias only when no norm follows)."""
    return named(conv=nn.Conv2d(cin, cout, kernel, padding=padding, bias=norm == "none"),
                 norm=norm_layer(norm, cout, **norm_options), act=act())


# ---- the networks ------------------------------------------------------------------------------------


@register_model
def smoke_cnn(in_channels: int = 3, num_classes: int = 10, width: int = 16, norm: str = "batch", dropout: float = 0.0) -> nn.Module:
    """Two conv stages and a linear head: trains in seconds on a CPU, for smoke runs and tests."""
    return nn.Sequential(
        conv_block(in_channels, width, norm), nn.MaxPool2d(2),
        conv_block(width, 2 * width, norm), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(dropout), nn.Linear(2 * width, num_classes),
    )


@register_model
def mnist_tiny(in_channels: int = 1, num_classes: int = 10, width: int = 8, norm: str = "batch", dropout: float = 0.05) -> nn.Module:
    """A sub-8k-parameter MNIST net (7,400 at width 8): unpadded 3x3 convs with BN, ReLU and a small
    dropout after each, one max-pool with a 1x1 squeeze after it, global average pooling and a 1x1
    classifier: no large dense layer, which is where the parameters of a small net usually go.
    28 -> 26 -> 24 -> 22 -> pool 11 -> 9 -> 7 -> 5 -> GAP."""
    w1, w2, w3 = width, width * 3 // 2, width * 2

    def block(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
        return named(**dict(conv_block(cin, cout, norm, kernel=kernel, padding=0).named_children()), drop=nn.Dropout(dropout))

    return named(
        block1=block(in_channels, w1), block2=block(w1, w2), block3=block(w2, w3),
        pool=nn.MaxPool2d(2), squeeze=block(w3, w1, kernel=1),
        block4=block(w1, w2), block5=block(w2, w3), block6=block(w3, w2),
        gap=nn.AdaptiveAvgPool2d(1), classifier=nn.Conv2d(w2, num_classes, 1), flatten=nn.Flatten(),
    )


@register_model
def resnet9(in_channels: int = 3, num_classes: int = 10, width: int = 64, norm: str = "batch", dropout: float = 0.0) -> nn.Module:
    """David Page's DAWNBench ResNet-9 (6.57M parameters at width 64): prep 64; layer1 128 + pool +
    residual(2 convs); layer2 256 + pool; layer3 512 + pool + residual(2 convs); global max pool;
    linear without bias; logits x 0.125."""
    w = width

    def conv_pool(cin: int, cout: int) -> nn.Sequential:  # Page's order: conv, BN, ReLU, then pool
        return named(**dict(conv_block(cin, cout, norm).named_children()), pool=nn.MaxPool2d(2))

    def residual(channels: int) -> Residual:
        return Residual(conv_block(channels, channels, norm), conv_block(channels, channels, norm))

    return named(
        prep=conv_block(in_channels, w, norm),
        layer1=named(down=conv_pool(w, 2 * w), residual=residual(2 * w)),
        layer2=conv_pool(2 * w, 4 * w),
        layer3=named(down=conv_pool(4 * w, 8 * w), residual=residual(8 * w)),
        pool=nn.AdaptiveMaxPool2d(1), flatten=nn.Flatten(), drop=nn.Dropout(dropout),
        linear=nn.Linear(8 * w, num_classes, bias=False), scale=Scale(0.125),
    )


class AirbenchGroup(nn.Module):
    """conv -> pool -> BN -> GELU -> conv -> BN -> GELU: pooling before the norm halves its cost."""

    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__()
        # airbench94's BN: PyTorch momentum 0.4, eps 1e-12, scale frozen at 1 (only the shift learns).
        bn = dict(momentum=0.4, eps=1e-12)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none")
        self.pool = nn.MaxPool2d(2)
        self.norm1 = norm_layer(norm, cout, **bn)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=norm == "none")
        self.norm2 = norm_layer(norm, cout, **bn)
        self.act = nn.GELU()
        for module in (self.norm1, self.norm2):
            if isinstance(module, nn.BatchNorm2d):
                module.weight.requires_grad_(False)
        # airbench's partial identity init: the first `cin` filters of each conv pass their input
        # channel through, so every group starts close to an identity map and trains fast.
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                nn.init.dirac_(conv.weight[:conv.in_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


@register_model
def airbench(in_channels: int = 3, num_classes: int = 10, width: int = 64, norm: str = "batch", dropout: float = 0.0) -> nn.Module:
    """Keller Jordan's airbench94 layout without the data-dependent whitening (its 2x2 first conv
    is learned here): 2x2 conv (24 channels) + GELU, three conv-pool groups (64, 256, 256 at
    width 64), global max pool, linear without bias, logits x 1/9. 1.97M parameters."""
    stem = 2 * in_channels * 4  # airbench: 2 x channels x kernel area, the size of its whitening layer
    widths = (width, 4 * width, 4 * width)
    return named(
        stem=nn.Conv2d(in_channels, stem, 2, padding=0), act=nn.GELU(),
        group1=AirbenchGroup(stem, widths[0], norm), group2=AirbenchGroup(widths[0], widths[1], norm),
        group3=AirbenchGroup(widths[1], widths[2], norm),
        pool=nn.AdaptiveMaxPool2d(1), flatten=nn.Flatten(), drop=nn.Dropout(dropout),
        linear=nn.Linear(widths[2], num_classes, bias=False), scale=Scale(1 / 9),
    )


# SimpleNet-v1 for CIFAR (Hasanpour et al. 2016, "simplenet_cifar_5m"): output channels at width 64,
# "M" = 2x2 max pool, "k1" = a 1x1 conv.
SIMPLENET_LAYERS = [64, 128, 128, 128, "M", 128, 128, 256, "M", 256, 256, "M", 512, (2048, "k1"), (256, "k1"), "M", 256]


@register_model
def simplenet(in_channels: int = 3, num_classes: int = 10, width: int = 64, norm: str = "batch", dropout: float = 0.1) -> nn.Module:
    """SimpleNet-v1 (5.48M parameters at width 64): 13 conv-BN-ReLU layers, plain 3x3 except two 1x1,
    four max pools each followed by 2-D dropout, global max pool, linear. BN momentum 0.05 as in the
    paper's code; unlike that code, the 1x1 convs are unpadded (padding a 1x1 conv only adds a zero border)."""
    layers, cin = {}, in_channels
    for spec in SIMPLENET_LAYERS:
        if spec == "M":
            pools = sum(name.startswith("pool") for name in layers) + 1
            layers |= {f"pool{pools}": nn.MaxPool2d(2), f"drop{pools}": nn.Dropout2d(dropout)}
            continue
        channels, kernel = spec if isinstance(spec, tuple) else (spec, "k3")
        cout = max(1, round(channels * width / 64))
        convs = sum(name.startswith("conv") for name in layers) + 1
        layers[f"conv{convs}"] = conv_block(cin, cout, norm, kernel=1 if kernel == "k1" else 3, padding=0 if kernel == "k1" else 1,
                                            **(dict(momentum=0.05) if norm == "batch" else {}))
        cin = cout
    return named(**layers, global_pool=nn.AdaptiveMaxPool2d(1), flatten=nn.Flatten(), drop=nn.Dropout(dropout),
                 linear=nn.Linear(cin, num_classes))


def timm_model(name: str, in_channels: int, num_classes: int, width: int | None, norm: str, dropout: float | None,
               pretrained_path: str | None):
    """(a timm model, the mean/std its pretrained weights expect or None). Weights come only from
    `pretrained_path` (a local .safetensors/.pth/.bin of the model's state dict); timm adapts the first
    conv to `in_channels` and drops the classifier when `num_classes` differs. Nothing is downloaded."""
    if width is not None:
        raise ConfigError(f"key 'model.width': timm:{name} has its own widths; leave model.width unset (null)")
    if norm != "batch":
        raise ConfigError(f"key 'model.norm': timm:{name} has its own normalisation layers; leave model.norm=batch")
    options = dict(num_classes=num_classes, in_chans=in_channels, drop_rate=dropout or 0.0)
    if pretrained_path is None:
        return timm.create_model(name, pretrained=False, **options), None
    path = Path(pretrained_path)
    if not path.is_file():
        raise UserError(f"model.pretrained_path {str(path)!r}: no such file (pretrained weights are read from a local "
                        "file only; download them elsewhere and copy them here)")
    # pretrained_cfg_overlay file=... makes timm read that file instead of its hub/URL source.
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **options)
    cfg = model.pretrained_cfg
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or len(mean) != in_channels:
        return model, None
    return model, (tuple(mean), tuple(std))
