"""The classification task: CIFAR-10/100, MNIST, Fashion-MNIST or generated images; models by name;
cross-entropy with label smoothing; per-sample loss and accuracy."""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import Dataset

from cnn.data import AUGMENTATIONS, build_datasets, collate, dataset_spec
from cnn.diagnostics import attach_layer_grad_norms, report_parameters
from cnn.models import check_model_name, create_model
from harness.task import Section, Task, register_task

Augmentation = Literal[AUGMENTATIONS]


class CnnData(Section):
    source: Literal["synthetic", "cifar10", "cifar100", "mnist", "fashion_mnist"] = Field(
        "synthetic", description="synthetic: noisy gratings, one orientation per class; the others are read by torchvision's classes from data.root")
    root: str = Field("data", description="folder in torchvision's layout: cifar-10-batches-py/, cifar-100-python/, MNIST/raw/, FashionMNIST/raw/")
    download: bool = Field(False, description="let torchvision download a missing dataset into data.root (needs internet)")
    val_size: int = Field(5000, ge=1, description="training images held out (seeded by data.split_seed) to validate on")
    val_on_test: bool = Field(False, description="validate on the official test split instead (and train on the whole training split)")
    split_seed: int = Field(0, description="seed of the validation hold-out")
    augment: list[Augmentation] = Field([], description="training augmentation, applied in the order listed")
    crop_padding: int = Field(4, ge=0, description="pad_crop: reflect-pad by this many pixels, then crop back to size at random")
    cutout_size: int = Field(8, ge=1, description="cutout: side of the square zeroed at a random place")
    affine_degrees: float = Field(10.0, ge=0, description="affine: rotation drawn from +-this many degrees")
    affine_translate: float = Field(0.1, ge=0, lt=1, description="affine: shift drawn from +-this fraction of the size")
    affine_scale: float = Field(0.1, ge=0, lt=1, description="affine: zoom drawn from 1 +- this")
    gpu_loader: bool = Field(False, description="keep the whole set on the device (uint8) and augment batches there (pad_crop, hflip, cutout); CPU too")
    num_train: int = Field(512, ge=1, description="synthetic: training images")
    num_val: int = Field(256, ge=1, description="synthetic: validation images")
    num_classes: int = Field(10, ge=2, description="synthetic: classes")
    channels: int = Field(3, ge=1, description="synthetic: image channels")
    image_size: int = Field(32, ge=8, description="synthetic: image height and width")
    noise: float = Field(0.6, ge=0, description="synthetic: noise std added to each grating")
    synth_seed: int = Field(0, description="synthetic: seed of the generated classes and images")


class CnnModel(Section):
    name: str = Field("smoke_cnn", description="smoke_cnn, mnist_tiny, resnet9, airbench, simplenet, or timm:<any timm model>")
    width: Optional[int] = Field(None, ge=1, description="channels of the first stage; null = the model's own (smoke_cnn 16, mnist_tiny 8, others 64)")
    norm: Literal["batch", "none"] = Field("batch", description="normalisation after each conv")
    dropout: Optional[float] = Field(None, ge=0, lt=1, description="mnist_tiny: after every conv (null: 0.05); simplenet: after every pool (null: 0.1); others: before the classifier (null: 0)")
    pretrained_path: Optional[str] = Field(None, description="timm models: a local state-dict file to start from (never downloaded)")
    log_grad_norms: bool = Field(False, description="log grad_norm/<layer> every log.every_steps updates (grad_norms.jsonl, W&B)")

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        return check_model_name(name)


class CnnLoss(Section):
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")


@register_task("cnn")
class CnnTask(Task):
    """Batches are (images (B, C, H, W): float32 pixels in [0, 1], or uint8 from data.gpu_loader, labels (B,))."""

    sections = {"data": CnnData, "model": CnnModel, "loss": CnnLoss}
    collate_fn = staticmethod(collate)  # passes the device loader's ready batches through

    def build_datasets(self, cfg) -> tuple[Dataset, Dataset]:
        return build_datasets(cfg.data, cfg.seed, cfg.trainer.num_workers)

    def build_model(self, cfg) -> nn.Module:
        spec, m = dataset_spec(cfg.data), cfg.model
        model = create_model(m.name, in_channels=spec.channels, num_classes=spec.num_classes, mean=spec.mean, std=spec.std,
                             width=m.width, norm=m.norm, dropout=m.dropout, pretrained_path=m.pretrained_path)
        report_parameters(model, cfg)
        if m.log_grad_norms:
            attach_layer_grad_norms(model, cfg)
        return model

    def loss(self, logits, batch) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch[1], label_smoothing=self.cfg.loss.label_smoothing)

    def metrics(self, logits, batch) -> dict[str, torch.Tensor]:
        labels = batch[1]
        return {
            "loss": F.cross_entropy(logits.float(), labels, reduction="none"),
            "acc": (logits.argmax(1) == labels).float(),
        }
