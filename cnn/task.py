"""The classification task: CIFAR-10/100, MNIST, Fashion-MNIST, image files (a folder of class folders
or a Kaggle train.csv) or generated images; models by name; cross-entropy with label smoothing, or
binary cross-entropy for multi-label CSVs; per-sample loss and accuracy, overall and per class;
prediction of test folders into a validated submission (cnn/predict.py)."""
from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.utils.data import Dataset

from cnn.adversarial import FreePerturbation, RobustOutputs, fgsm, pgd
from cnn.complexity import LocalComplexityProbe
from cnn.data import AUGMENTATIONS, build_datasets, class_names, collate, dataset_spec, fold_samples
from cnn.images import FILE_SOURCES, is_multi_label, resolve_classes
from cnn.predict import predict_folder
from cnn.diagnostics import attach_layer_grad_norms, report_parameters
from cnn.models import check_model_name, create_model
from harness.errors import ConfigError, is_main_process
from harness.folds import FoldSamples
from harness.task import FoldKeys, Section, Task, register_task

Augmentation = Literal[AUGMENTATIONS]


class CnnData(FoldKeys):
    source: Literal["synthetic", "cifar10", "cifar100", "mnist", "fashion_mnist", "folder", "csv"] = Field(
        "synthetic", description="synthetic: noisy gratings, one orientation per class; folder: <data.root>/<class>/<image>; csv: "
        "data.csv (id and label columns) with images in data.images; the others are read by torchvision's classes from data.root")
    root: str = Field("data", description="folder: a folder of class folders (ImageFolder's layout); torchvision sources: "
                      "cifar-10-batches-py/, cifar-100-python/, MNIST/raw/, FashionMNIST/raw/ under it")
    csv: Optional[str] = Field(None, description="csv: the training CSV (Kaggle's train.csv), one line per image")
    images: Optional[str] = Field(None, description="csv: the folder of the images <id><data.extension>; null = data.csv's folder")
    id_column: str = Field("id", description="csv: the column of image ids")
    label_column: Optional[Union[str, list[str]]] = Field(
        "label", description="csv: the label column (class names or integers); a list of columns, or null for every column but "
        "the id: one 0/1 column per class (multi-label, binary cross-entropy)")
    extension: Optional[str] = Field(None, description="csv: appended to an id to name its image (.jpg, .png, or '' when ids are "
                                     "file names); null = the image file in data.images whose name or stem is the id")
    classes: Optional[list[str]] = Field(None, description="folder, csv: class names in label order; null = read from the data "
                                         "(sorted folder names / labels; multi-label: the columns), and saved so in the run's config")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="folder, csv: fraction of each class held out (seeded by data.split_seed) to validate on")
    val_root: Optional[str] = Field(None, description="folder: validate on this folder of class folders instead of a fraction of data.root")
    download: bool = Field(False, description="let torchvision download a missing dataset into data.root (needs internet)")
    val_size: int = Field(5000, ge=1, description="torchvision sources: training images held out (seeded by data.split_seed) to validate on")
    val_on_test: bool = Field(False, description="validate on the official test split instead (and train on the whole training split)")
    augment: list[Augmentation] = Field([], description="training augmentation, applied in the order listed")
    crop_padding: int = Field(4, ge=0, description="pad_crop: reflect-pad by this many pixels, then crop back to size at random")
    cutout_size: int = Field(8, ge=1, description="cutout: side of the square zeroed at a random place")
    affine_degrees: float = Field(10.0, ge=0, description="affine: rotation drawn from +-this many degrees")
    affine_translate: float = Field(0.1, ge=0, lt=1, description="affine: shift drawn from +-this fraction of the size")
    affine_scale: float = Field(0.1, ge=0, lt=1, description="affine: zoom drawn from 1 +- this")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="random_resized_crop: the range of the crop's area, a fraction of the image's")
    jitter: float = Field(0.4, ge=0, description="color_jitter: brightness, contrast and saturation drawn from 1 +- this")
    gpu_loader: bool = Field(False, description="keep the whole set on the device (uint8) and augment batches there (pad_crop, hflip, cutout); CPU too")
    num_train: int = Field(512, ge=1, description="synthetic: training images")
    num_val: int = Field(256, ge=1, description="synthetic: validation images")
    num_classes: int = Field(10, ge=2, description="synthetic: classes")
    channels: int = Field(3, ge=1, description="synthetic: image channels; folder, csv: 3 = RGB (grayscale, palette, RGBA made RGB) or 1 = grayscale")
    image_size: int = Field(32, ge=8, description="synthetic: image height and width; folder, csv: images of any size are resized to this square")
    noise: float = Field(0.6, ge=0, description="synthetic: noise std added to each grating")
    synth_seed: int = Field(0, description="synthetic: seed of the generated classes and images")

    @model_validator(mode="after")
    def _file_classes(self):
        """Image files: the class names are read from the data once and kept in the config, so a
        checkpoint carries them (infer.py writes names) and a resume sees a changed class list."""
        if self.source not in FILE_SOURCES:
            return self
        if self.channels not in (1, 3):
            raise ConfigError(f"key 'data.channels': {self.channels}; image files are read as RGB (3) or grayscale (1)")
        if self.classes is None:
            self.classes = resolve_classes(self)
        if len(self.classes) < 2 and not is_multi_label(self):
            raise ConfigError(f"key 'data.classes': {self.classes}; a classifier needs at least two classes")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"key 'data.classes': a class is listed twice ({self.classes})")
        return self


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


# Per-class metrics (acc_<class>) are logged up to this many classes; infer.py scores every class anyway.
PER_CLASS_METRICS_MAX = 32


@register_task("cnn")
class CnnTask(Task):
    """Batches are (images (B, C, H, W): float32 pixels in [0, 1], or uint8 from data.gpu_loader, labels (B,)
    integers, or (B, classes) 0/1 floats for multi-label data)."""

    sections = {"data": CnnData, "model": CnnModel, "loss": CnnLoss, "adversarial": CnnAdversarial,
                "diagnostics": CnnDiagnostics}
    kaggle_infer_args = ("--sample-submission", "/kaggle/input/COMPETITION/sample_submission.csv")
    kaggle_wheels = ("timm",)  # timm:<name> models build exactly as trained
    collate_fn = staticmethod(collate)  # passes the device loader's ready batches through
    tta_modes = ("none", "hflip")
    predict_options = ("sample_submission", "probabilities")
    tta: str = "none"  # of `predict`, set by predict_folder (infer.py --tta)
    free: FreePerturbation | None = None  # adversarial.mode=free: the perturbation that persists across batches

    val_set: Dataset | None = None  # kept by build_datasets: diagnostics.local_complexity_* measures around its images
    lc_probe: LocalComplexityProbe | None = None

    def build_datasets(self, cfg) -> tuple[Dataset, Dataset]:
        train_set, self.val_set = build_datasets(cfg.data, cfg.seed, cfg.trainer.num_workers)
        return train_set, self.val_set

    def set_epoch(self, train_set, epoch: int) -> None:
        train_set.set_epoch(epoch)  # augmentation seeded per (seed, epoch, index)

    def fold_samples(self, cfg) -> FoldSamples:
        """The training split, stratified by label (multi-label: one stratum)."""
        return fold_samples(cfg.data)

    def predictions(self, outputs) -> torch.Tensor:
        """Class probabilities of the clean logits (`probabilities`)."""
        return self.probabilities(outputs.clean if isinstance(outputs, RobustOutputs) else outputs)

    def combine_outputs(self, outputs: list) -> torch.Tensor:
        """Logits whose `probabilities` are the mean of the members' (an ensemble averages predictions,
        not logits): the log of the mean softmax, or for multi-label the logit of each class's mean."""
        if self.multi_label:
            return torch.logit(torch.stack([torch.sigmoid(o.float()) for o in outputs]).mean(0), eps=1e-7)
        return torch.stack([o.float().log_softmax(dim=1) for o in outputs]).logsumexp(dim=0) - math.log(len(outputs))

    def prediction_columns(self) -> list[str]:
        return [f"p_{name}" for name in class_names(self.cfg.data)]

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
        if is_multi_label(cfg.data) and (cfg.adversarial.mode != "none" or cfg.adversarial.eval_pgd_steps):
            raise ConfigError("key 'adversarial.mode': the attacks maximise the cross-entropy of one label per image; "
                              "multi-label data (one 0/1 column per class) trains with binary cross-entropy: set "
                              "adversarial.mode=none and adversarial.eval_pgd_steps=0")
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

    @property
    def multi_label(self) -> bool:
        return is_multi_label(self.cfg.data)

    def per_class_names(self) -> list[str]:
        """The classes with their own metric (acc_<class>): those of image files, up to PER_CLASS_METRICS_MAX."""
        classes = self.cfg.data.classes if self.cfg.data.source in FILE_SOURCES else None
        return list(classes) if classes and len(classes) <= PER_CLASS_METRICS_MAX else []

    def loss(self, outputs, batch) -> torch.Tensor:
        logits = outputs.clean if isinstance(outputs, RobustOutputs) else outputs
        smoothing = self.cfg.loss.label_smoothing
        if self.multi_label:  # each class a yes/no question; smoothing pulls the 0/1 targets towards 1/2
            target = batch[1].float() * (1 - smoothing) + smoothing / 2
            return F.binary_cross_entropy_with_logits(logits.float(), target)
        return F.cross_entropy(logits.float(), batch[1], label_smoothing=smoothing)

    def metric_names(self) -> list[str]:
        return (["loss", "acc"] + (["robust_loss", "robust_acc"] if self.cfg.adversarial.eval_pgd_steps else [])
                + [f"acc_{name}" for name in self.per_class_names()])

    def metrics(self, outputs, batch) -> dict[str, torch.Tensor]:
        labels = batch[1]
        logits = outputs.clean if isinstance(outputs, RobustOutputs) else outputs
        names = self.per_class_names()
        if self.multi_label:  # loss: BCE averaged over the classes; acc: the fraction of classes right
            target = labels.float()
            right = ((logits > 0) == (target > 0.5)).float()
            values = {"loss": F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").mean(1),
                      "acc": right.mean(1)}
            return values | {f"acc_{name}": right[:, k] for k, name in enumerate(names)}
        values = {
            "loss": F.cross_entropy(logits.float(), labels, reduction="none"),
            "acc": (logits.argmax(1) == labels).float(),
        }
        for k, name in enumerate(names):  # NaN marks "another class"; the loop averages the rest: the recall of k
            values[f"acc_{name}"] = torch.where(labels == k, values["acc"], torch.nan)
        if isinstance(outputs, RobustOutputs):
            values["robust_loss"] = F.cross_entropy(outputs.attacked.float(), labels, reduction="none")
            values["robust_acc"] = (outputs.attacked.argmax(1) == labels).float()
        return values

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, classes) probabilities of logits: softmax, or for multi-label a sigmoid per class."""
        return torch.sigmoid(logits.float()) if self.multi_label else logits.float().softmax(1)

    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """(B, classes) `probabilities`, with the test-time augmentation `self.tta` ("hflip": averaged
        with the mirrored image's)."""
        probabilities = self.probabilities(model(images))
        if self.tta == "hflip":
            probabilities = (probabilities + self.probabilities(model(images.flip(dims=(3,))))) / 2
        return probabilities

    def predict_folder(self, model: nn.Module, folder: str, out: str | None, *, tta: str = "none", **options) -> dict:
        """A test folder of images or a CSV of ids -> the submission CSV at `out`; a labelled folder (class
        folders) or CSV -> accuracy, log-loss, per class and the confusion matrix (cnn/predict.py)."""
        self.tta = tta
        return predict_folder(self, model.eval(), folder, out, **options)
