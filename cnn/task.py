"""The classification task: datasets, models by name, cross-entropy loss, per-sample accuracy."""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from cnn.models import create_model
from harness.task import Section, Task, register_task


class CnnData(Section):
    source: Literal["synthetic"] = Field("synthetic", description="synthetic: noisy gratings, one orientation per class")
    num_train: int = Field(512, ge=1, description="synthetic: training images")
    num_val: int = Field(256, ge=1, description="synthetic: validation images")
    num_classes: int = Field(10, ge=2, description="synthetic: classes")
    channels: int = Field(3, ge=1, description="synthetic: image channels")
    image_size: int = Field(32, ge=8, description="synthetic: image height and width")
    noise: float = Field(0.6, ge=0, description="synthetic: noise std added to each grating")
    synth_seed: int = Field(0, description="synthetic: seed of the generated classes and images")


class CnnModel(Section):
    name: str = Field("smoke_cnn", description="a name known to cnn.models.create_model")
    width: int = Field(16, ge=1, description="channels of the first stage")
    norm: Literal["batch", "none"] = Field("batch", description="normalisation after each conv")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the classifier")


class CnnLoss(Section):
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")


def synthetic_classes(n: int, dc: CnnData, split_seed: int) -> TensorDataset:
    """Images of sinusoidal gratings, one orientation and frequency per class (fixed by `synth_seed`,
    shared by every split), at a random phase (position) per image, plus Gaussian noise: a problem a
    small CNN learns in seconds, with no download."""
    rng_classes = np.random.default_rng(dc.synth_seed)
    angle = np.pi * (np.arange(dc.num_classes) + rng_classes.uniform(0.2, 0.8, dc.num_classes)) / dc.num_classes
    cycles = rng_classes.uniform(1.5, 4.0, dc.num_classes)  # cycles across the image
    rng = np.random.default_rng([dc.synth_seed, split_seed])
    labels = rng.integers(0, dc.num_classes, n)
    phase = rng.uniform(0, 2 * np.pi, (n, dc.channels, 1, 1))
    y, x = np.mgrid[0:dc.image_size, 0:dc.image_size] / dc.image_size
    along = (np.cos(angle)[labels, None, None] * x + np.sin(angle)[labels, None, None] * y) * cycles[labels, None, None]
    images = 0.5 + 0.5 * np.sin(2 * np.pi * along[:, None] + phase)
    images += rng.normal(0, dc.noise, images.shape)
    return TensorDataset(torch.from_numpy(images.clip(0, 1).astype(np.float32)), torch.from_numpy(labels))


@register_task("cnn")
class CnnTask(Task):
    sections = {"data": CnnData, "model": CnnModel, "loss": CnnLoss}

    def build_datasets(self, cfg) -> tuple[Dataset, Dataset]:
        return synthetic_classes(cfg.data.num_train, cfg.data, 1), synthetic_classes(cfg.data.num_val, cfg.data, 2)

    def build_model(self, cfg) -> nn.Module:
        m = cfg.model
        return create_model(m.name, in_channels=cfg.data.channels, num_classes=cfg.data.num_classes,
                            width=m.width, norm=m.norm, dropout=m.dropout)

    def loss(self, logits, batch) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch[1], label_smoothing=self.cfg.loss.label_smoothing)

    def metrics(self, logits, batch) -> dict[str, torch.Tensor]:
        labels = batch[1]
        return {
            "loss": F.cross_entropy(logits.float(), labels, reduction="none"),
            "acc": (logits.argmax(1) == labels).float(),
        }
