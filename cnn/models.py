"""Classification models by name: `create_model(name, in_channels=, num_classes=, ...)`."""
from __future__ import annotations

from torch import nn

_MODELS = {}


def register_model(fn):
    _MODELS[fn.__name__] = fn
    return fn


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _MODELS:
        from harness.config import ConfigError

        raise ConfigError(f"key 'model.name': unknown model {name!r}; known: {', '.join(sorted(_MODELS))}")
    return _MODELS[name](**kwargs)


def conv_block(cin: int, cout: int, norm: str) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none")]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(cout))
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


@register_model
def smoke_cnn(in_channels: int = 3, num_classes: int = 10, width: int = 16, norm: str = "batch", dropout: float = 0.0) -> nn.Module:
    """Two conv stages and a linear head: trains in seconds on a CPU, for smoke runs and tests."""
    return nn.Sequential(
        conv_block(in_channels, width, norm), nn.MaxPool2d(2),
        conv_block(width, 2 * width, norm), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(dropout), nn.Linear(2 * width, num_classes),
    )
