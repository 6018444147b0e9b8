"""The classification task: CIFAR-10/100, MNIST, Fashion-MNIST or generated images; models by name;
cross-entropy with label smoothing; per-sample loss and accuracy."""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import Dataset

from cnn.adversarial import FreePerturbation, RobustOutputs, fgsm, pgd
from cnn.complexity import LocalComplexityProbe
from cnn.data import AUGMENTATIONS, build_datasets, collate, dataset_spec
from cnn.diagnostics import attach_layer_grad_norms, report_parameters
from cnn.models import check_model_name, create_model
from harness.errors import ConfigError, is_main_process
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


class CnnAdversarial(Section):
    """L-inf adversarial training and robust evaluation (cnn/adversarial.py), in pixel units."""

    mode: Literal["none", "fgsm", "pgd", "free"] = Field(
        "none", description="adversarial training: fgsm = fast AT (Wong et al. 2020: random start, one step); pgd = PGD-AT "
                            "(Madry et al. 2018); free = free AT (Shafahi et al. 2019: needs trainer.batch_replays = m > 1)")
    eps: float = Field(8 / 255, gt=0, le=1, description="L-inf radius in pixels of [0, 1], a number or a fraction (default 8/255; MNIST: 0.3), for training and val/robust_acc")
    alpha: Optional[float] = Field(None, gt=0, description="training step size; null = the mode's usual one: fgsm 1.25 eps, pgd 2.5 eps / train_steps, free eps")
    train_steps: int = Field(7, ge=1, description="pgd: attack steps per training batch")
    eval_pgd_steps: int = Field(0, ge=0, description="k > 0: evaluation also logs val/robust_acc and val/robust_loss under PGD-k from a random start; 0 = off")
    eval_alpha: Optional[float] = Field(None, gt=0, description="evaluation PGD step; null = 2.5 eps / eval_pgd_steps")
    eval_restarts: int = Field(1, ge=1, description="evaluation PGD restarts; per sample the worst one counts")

    @field_validator("eps", "alpha", "eval_alpha", mode="before")
    @classmethod
    def _fraction(cls, value):
        # YAML and overrides read 8/255 as a string; pixel budgets are usually written that way.
        if isinstance(value, str) and "/" in value:
            top, bottom = value.split("/", 1)
            try:
                return float(top) / float(bottom)
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"expected a number or a fraction such as 8/255, got {value!r}") from None
        return value


class CnnDiagnostics(Section):
    """Measurements logged while training (cnn/complexity.py); they leave the training itself unchanged."""

    local_complexity_every: int = Field(0, ge=0, description="log lc/total and lc/<layer> (local complexity: neurons whose boundary cuts a cross-polytope around each image) every N optimizer updates; 0 = off")
    local_complexity_samples: int = Field(32, ge=1, description="validation images (a fixed set, seeded by seed) the local complexity is averaged over")
    local_complexity_directions: int = Field(8, ge=1, description="P: orthonormal random directions per image; the cross-polytope has 2P vertices")
    local_complexity_radius: float = Field(0.01, gt=0, description="r: distance of the vertices from the image, in pixels of [0, 1]")


@register_task("cnn")
class CnnTask(Task):
    """Batches are (images (B, C, H, W): float32 pixels in [0, 1], or uint8 from data.gpu_loader, labels (B,))."""

    sections = {"data": CnnData, "model": CnnModel, "loss": CnnLoss, "adversarial": CnnAdversarial,
                "diagnostics": CnnDiagnostics}
    collate_fn = staticmethod(collate)  # passes the device loader's ready batches through
    free: FreePerturbation | None = None  # adversarial.mode=free: the perturbation that persists across batches

    val_set: Dataset | None = None  # kept by build_datasets: diagnostics.local_complexity_* measures around its images
    lc_probe: LocalComplexityProbe | None = None

    def build_datasets(self, cfg) -> tuple[Dataset, Dataset]:
        train_set, self.val_set = build_datasets(cfg.data, cfg.seed, cfg.trainer.num_workers)
        return train_set, self.val_set

    def set_epoch(self, train_set, epoch: int) -> None:
        train_set.set_epoch(epoch)  # augmentation seeded per (seed, epoch, index)

    def after_update(self, model: nn.Module, step: int) -> dict[str, float]:
        """diagnostics.local_complexity_every = N: lc/total and lc/<layer> every N updates, around a fixed
        seeded set of validation images, of the weights being trained (not the EMA copy). Only the main
        process logs, so only it measures."""
        diag = self.cfg.diagnostics
        if not diag.local_complexity_every or step % diag.local_complexity_every or not is_main_process():
            return {}
        if self.lc_probe is None:
            tc = self.cfg.trainer
            self.lc_probe = LocalComplexityProbe(self.val_set, diag.local_complexity_samples, diag.local_complexity_directions,
                                                 diag.local_complexity_radius, self.cfg.seed, tc.eval_batch_size or tc.batch_size)
        return self.lc_probe(model)

    def build_model(self, cfg, *, from_checkpoint: bool = False) -> nn.Module:
        if cfg.adversarial.mode == "free" and cfg.trainer.batch_replays < 2:
            raise ConfigError("key 'adversarial.mode': free adversarial training replays each batch m times and strengthens "
                              "its perturbation on every replay; set trainer.batch_replays to m > 1 (Shafahi et al. use "
                              "m = 8 on CIFAR-10), which also divides the passes over the data by m")
        spec, m = dataset_spec(cfg.data), cfg.model
        model = create_model(m.name, in_channels=spec.channels, num_classes=spec.num_classes, mean=spec.mean, std=spec.std,
                             width=m.width, norm=m.norm, dropout=m.dropout,
                             pretrained_path=None if from_checkpoint else m.pretrained_path)
        return model

    def on_train_start(self, model: nn.Module, run_dir, step: int) -> None:
        """The parameter table (printed, parameters.csv) and, with model.log_grad_norms, the per-layer
        gradient-norm hooks (cnn/diagnostics.py)."""
        report_parameters(model, self.cfg, run_dir)
        if self.cfg.model.log_grad_norms:
            attach_layer_grad_norms(model, self.cfg, run_dir, step)

    def forward(self, model: nn.Module, batch):
        """Training: the logits of the batch, or with adversarial.mode of its adversarial examples (the
        model learns on those only, as in Madry et al.). Evaluation: the logits, and with
        adversarial.eval_pgd_steps also those of the PGD-k examples (RobustOutputs)."""
        images, labels = batch[0], batch[1]
        adv = self.cfg.adversarial
        if model.training:
            if adv.mode != "none":
                images = self.adversarial_inputs(model, images, labels)
            return model(images)
        logits = model(images)
        if not adv.eval_pgd_steps:
            return logits
        alpha = adv.eval_alpha or 2.5 * adv.eps / adv.eval_pgd_steps
        attacked = pgd(model, images, labels, adv.eps, alpha, adv.eval_pgd_steps, random_start=True, restarts=adv.eval_restarts)
        return RobustOutputs(logits, model(attacked))

    def adversarial_inputs(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training inputs of adversarial.mode, float32 pixels within eps of `images`."""
        adv = self.cfg.adversarial
        if adv.mode == "free":
            if self.free is None:
                self.free = FreePerturbation(adv.eps, adv.alpha or adv.eps)
            return self.free(images)
        if adv.mode == "fgsm":  # Wong et al.: a uniform start in the eps ball makes one step enough
            return fgsm(model, images, labels, adv.eps, random_start=True, alpha=adv.alpha)
        return pgd(model, images, labels, adv.eps, adv.alpha or 2.5 * adv.eps / adv.train_steps, adv.train_steps)

    def loss(self, outputs, batch) -> torch.Tensor:
        logits = outputs.clean if isinstance(outputs, RobustOutputs) else outputs
        return F.cross_entropy(logits.float(), batch[1], label_smoothing=self.cfg.loss.label_smoothing)

    def metric_names(self) -> list[str]:
        return ["loss", "acc"] + (["robust_loss", "robust_acc"] if self.cfg.adversarial.eval_pgd_steps else [])

    def metrics(self, outputs, batch) -> dict[str, torch.Tensor]:
        labels = batch[1]
        logits = outputs.clean if isinstance(outputs, RobustOutputs) else outputs
        values = {
            "loss": F.cross_entropy(logits.float(), labels, reduction="none"),
            "acc": (logits.argmax(1) == labels).float(),
        }
        if isinstance(outputs, RobustOutputs):
            values["robust_loss"] = F.cross_entropy(outputs.attacked.float(), labels, reduction="none")
            values["robust_acc"] = (outputs.attacked.argmax(1) == labels).float()
        return values
