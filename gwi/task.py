"""The seismic full-waveform-inversion task ("gwi"): predict a 70 x 70 velocity map (m/s) from five
shot gathers of 70 receivers. The Kaggle metric is the MAE in m/s over the odd columns
(x = 1, 3, ..., 69), reported here as `mae_odd` next to the all-column `mae`.

Batches are (seismic (B, 5, T, 70) float16/32, velocity (B, 1, 70, 70) float32, family index (B,));
training batches with online draws (gwi/online.py) add an online flag (B,) bool, and their seismic is
simulated in `prepare_batch`.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field, field_validator, model_validator
from torch import nn

from gwi.data import SeismicInput, SeismicPairs, build_datasets, dataset_families, fold_samples
from gwi.layout import SEISMIC_SAMPLE_SHAPE, TIME_STEPS, TRAINING_LAYOUTS, VELOCITY_MAX, VELOCITY_MIN, has_training_data
from gwi import online
from gwi.models import (MODELS, check_pretrained_path, create_model, known_models, resolve_decoder_channels, resolve_drop_path,
                        resolve_encoder, resolve_layout_option)
from gwi.physics.velocity import FAMILIES
from gwi.physics_loss import PhysicsLoss, UnlabelledFiles, WithUnlabelled, check_physics_config
from gwi.pseudo import PseudoMix, PseudoRounds, check_pseudo_config
from gwi.report import report
from gwi.scaling import TTA_MODES, check_scale_range, scale_tta
from gwi.submission import evaluate_folder, is_test_folder, write_submission
from harness.errors import ConfigError, UserError
from harness.folds import FoldSamples
from harness.task import FoldKeys, Section, Task, register_task


class GwiData(FoldKeys):
    source: Literal["synthetic", "simulated", "files", "online"] = Field(
        "synthetic", description="synthetic: generated layered maps, cheap surrogate seismic (gwi/synthetic.py); simulated: "
        "OpenFWI-like maps and simulated seismic, made once into data.cache_dir, plus a scored test set (gwi/simulated.py); "
        "files: OpenFWI/Kaggle .npy pairs under data.roots; online: every training sample a fresh velocity draw, "
        "simulated on the training device (gwi/online.py)")
    roots: list[str] = Field([], description="files: folders of family folders (Kaggle train_samples/, OpenFWI, converted copies)")
    val_roots: list[str] = Field([], description="files: validate on these folders instead of a fold of data.roots; "
                                 "online: instead of a simulated validation set")
    num_train: int = Field(256, ge=1, description="synthetic, simulated: training samples (simulated: split evenly over "
                           "data.families); online: draws per epoch")
    num_val: int = Field(64, ge=1, description="synthetic, simulated, online: validation samples (online: a fixed set "
                         "simulated at the start of each run, in memory)")
    num_test: int = Field(48, ge=0, description="simulated: test samples in the Kaggle test layout, predicted and scored after training; 0 = none")
    families: list[str] = Field(["FlatVel_A", "CurveVel_A"], min_length=1,
                                description="simulated, online: velocity families of gwi.physics.velocity: " + ", ".join(FAMILIES))
    cache_dir: str = Field("data/simulated", description="simulated: one folder per (families, sizes, seed) under this; reused when complete")
    time_steps: int = Field(TIME_STEPS, ge=8, le=TIME_STEPS,
                            description=f"area-resize the {TIME_STEPS} time samples to this many; {TIME_STEPS} = no reduction")
    normalize: Literal["log_minmax", "standardize"] = Field(
        "log_minmax", description="log_minmax: OpenFWI's signed log scaled by fixed constants; standardize: per sample")
    flip: bool = Field(True, description="training only: mirror a sample (receivers, source order, map columns) with probability 1/2")
    synth_seed: int = Field(0, ge=0, description="synthetic, simulated, online: seed of the generated data (train, val and "
                            "test never share a sample; online: draw i of epoch e is a function of (synth_seed, e, i))")
    online_fraction: float = Field(0.0, ge=0, lt=1, description="files, simulated: this share of each epoch's training "
                                   "samples are online draws (N file samples get N f / (1 - f) more); 0 = none")
    velocity_roots: list[str] = Field([], description="online: folders of velocity .npy files (<Family>/model/model*.npy, "
                                      "<Family>/vel*.npy; e.g. real OpenFWI maps); their families draw from these maps, "
                                      "every 10th held out for validation; the other data.families from the generators")
    online_augment: list[Literal["affine", "crop_resize", "blend"]] = Field(
        [], description="online: velocity augmentations (gwi.physics.velocity), in this order, each with probability 1/2 "
        "(blend: with a second draw, alpha in [0.3, 0.7]); data.flip mirrors the map before it is simulated (exact)")
    online_nt: int = Field(TIME_STEPS, ge=8, le=TIME_STEPS, description=f"online: time samples simulated ({TIME_STEPS} = "
                           "OpenFWI's record); fewer simulate only the record's start, for quick CPU tests; >= data.time_steps")
    exact_flip: bool = Field(False, description="simulated: the training seismic adds a 6th source at x = 35, the mirror of "
                             "the middle one, so data.flip gives the exact gather of the mirrored map (6-source files are "
                             "always flipped exactly; online flips are exact anyway)")
    scale_augment: Optional[tuple[float, float]] = Field(
        None, description="[lo, hi]: each training sample's map times a factor a drawn per (seed, epoch, index) in "
        "[lo, hi] (must hold 1), narrowed to keep a v in [1500, 4500]; files, simulated: the seismic made F(a v) by a "
        "wavelet-shaping filter and a time stretch (gwi/scaling.py; measured on real maps: 0.5-2.6 % relative L2 "
        "error for a in 0.8-1.2 against 29-85 % uncorrected; in log_minmax terms 0.6-3.3 % for a < 1, 1.4-6.2 % for "
        "a > 1, whose last 1 - 1/a of the record is unknown); online: the map scaled before it is simulated (exact); "
        "e.g. [0.9, 1.1]; null = off")
    # Pseudo-labels and unlabelled data (gwi/pseudo.py, gwi/physics_loss.py).
    pseudo_dir: Optional[str] = Field(None, description="a test folder (<id>.npy) pseudo-labelled from the EMA (else the raw) "
                                      "weights every data.pseudo_every_epochs epochs, pairs re-simulated (gwi/pseudo.py)")
    pseudo_every_epochs: int = Field(1, ge=1, description="pseudo_dir: a new round at the start of epochs k, 2k, ... (into "
                                     "<output_dir>/pseudo/)")
    pseudo_fraction: float = Field(0.5, ge=0, le=1, description="pseudo_dir: probability that a training sample is replaced "
                                   "by a pseudo-labelled one (drawn per seed, epoch, index)")
    pseudo_max_misfit: Optional[float] = Field(None, ge=0, description="pseudo_dir: keep maps whose misfit norm(F(v) - d) / "
                                               "norm(d) is at most this; null = all")
    pseudo_tta: Literal[TTA_MODES] = Field(
        "flip", description="pseudo_dir: test-time augmentation of the predictions (as infer.py --tta)")
    unlabelled_roots: list[str] = Field([], description="test-layout folders (<id>.npy, no maps) added to training; they "
                                        "train through the physics term only (needs loss.physics_weight > 0)")

    @model_validator(mode="after")
    def _folds_split_a_fixed_training_set(self):
        if self.fold is not None and (self.source == "online" or self.online_fraction > 0):
            raise ValueError("data.fold splits a fixed training set and online draws are new every epoch: drop data.fold, "
                             "or the online data (data.source=online, data.online_fraction)")
        return self

    @field_validator("scale_augment")
    @classmethod
    def _scale_range(cls, value, info):
        if value is None:
            return value
        if info.data.get("source") == "synthetic":
            raise ValueError("the synthetic source's surrogate seismic does not follow the wave equation's scaling; "
                             "use data.source=simulated, files or online")
        return check_scale_range(value)

    @field_validator("families")
    @classmethod
    def _known_families(cls, families: list[str]) -> list[str]:
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown families {', '.join(map(repr, unknown))}; known: {', '.join(FAMILIES)}")
        if len(set(families)) != len(families):
            raise ValueError(f"{families}: a family is listed twice")
        return families


class GwiModel(Section):
    name: str = Field("inversionnet", description="a name known to gwi.models.create_model: " + ", ".join(known_models()))
    width: float = Field(
        1.0, gt=0, description="channel multiplier: inversionnet's (1.0 = the published size); encoder models' decoder_channels")
    head: Literal["sigmoid", "clamp"] = Field(
        "sigmoid", description="sigmoid: 1500 + 3000 sigmoid(x); clamp: linear, clamped to [1500, 4500] in eval")
    # Encoder models only; null = the model's default, filled in here so the saved config names it.
    encoder: Annotated[Optional[str], AfterValidator(
        lambda value, info: resolve_encoder(info.data.get("name"), value))] = Field(
        None, validate_default=True,
        description="timm encoder (unet: smp's own or tu-<timm name>; vit_*: vit_*, *dinov2*, eva02_*, deit*); null = resnet18 / "
        "hgnetv2_b0 / convnext_atto / caformer_s18 / vit_small_patch14_reg4_dinov2 (vit_tiled) / eva02_small_patch14_224 (vit_per_source)")
    pretrained_path: Annotated[Optional[str], AfterValidator(
        lambda value, info: check_pretrained_path(info.data.get("name"), value))] = Field(
        None, description="local .pth/.safetensors of encoder weights (e.g. a timm ImageNet file) loaded at build; never downloaded")
    decoder_channels: Annotated[Optional[list[int]], AfterValidator(
        lambda value, info: resolve_decoder_channels(info.data.get("name"), value))] = Field(
        None, validate_default=True, description="decoder block channels, deepest first (unet: 5, other UNets: 4; vit_tiled: any number, "
        "default 4 x 256); null = model default")
    drop_path: Annotated[Optional[float], AfterValidator(
        lambda value, info: resolve_drop_path(info.data.get("name"), info.data.get("encoder"), value))] = Field(
        None, ge=0, lt=1, validate_default=True, description="encoder stochastic depth rate (timm drop_path_rate); null = 0")
    # The ViT layouts' own options; null = the model's default, filled in (a staged run's side is its own).
    side: Annotated[Optional[int], AfterValidator(lambda value, info: resolve_layout_option(info.data.get("name"), "side", value))] = Field(
        None, ge=14, validate_default=True,
        description="vit_tiled / vit_per_source: side of the square image the seismic is laid out as, a multiple of the "
        "encoder's patch size; null = 350 / 252")
    decoder: Annotated[Optional[Literal["transformer", "conv"]], AfterValidator(
        lambda value, info: resolve_layout_option(info.data.get("name"), "decoder", value))] = Field(
        None, validate_default=True, description="vit_tiled: transformer (learned queries per 7 x 7 patch with the encoder's "
        "tokens in ViT blocks) or conv (the token grid upsampled by conv blocks); widths: decoder_channels; null = transformer")
    shared_blocks: Annotated[Optional[int], AfterValidator(
        lambda value, info: resolve_layout_option(info.data.get("name"), "shared_blocks", value))] = Field(
        None, ge=0, validate_default=True, description="vit_per_source: the first N encoder blocks run on each source alone "
        "(weights shared by the 5 sources), then the sources are averaged and the other blocks run once; null = 4")

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name not in MODELS:
            raise ValueError(MODELS.unknown(name))
        return name


class GwiLoss(Section):
    name: Literal["l1", "l1_l2", "smooth_l1"] = Field("l1", description="on velocity scaled to [0, 1]: (v - 1500) / 3000")
    l2_weight: float = Field(0.1, ge=0, description="l1_l2: weight of the squared error added to the L1")
    smooth_l1_beta: float = Field(0.01, gt=0, description="smooth_l1: quadratic below this error (0.01 = 30 m/s)")
    # The physics term (gwi/physics_loss.py).
    physics_weight: float = Field(0.0, ge=0, description="w: adds w x norm(F(prediction) - seismic) / norm(seismic) "
                                  "(adjoint gradient through the simulator; gwi/physics_loss.py); 0 = off")
    physics_every: int = Field(1, ge=1, description="physics term on every N-th update only")
    physics_batch_size: Optional[int] = Field(None, ge=1, description="physics term on at most this many samples of a "
                                              "batch, unlabelled first; null = all")
    physics_time_steps: int = Field(TIME_STEPS, ge=1, le=TIME_STEPS, description="physics term: simulate and compare the "
                                    "first this many time samples (cost ~ this)")


def scaled_velocity(velocity: torch.Tensor) -> torch.Tensor:
    """m/s -> [0, 1], so losses have sane magnitudes (an L1 of 0.01 is 30 m/s)."""
    return (velocity.float() - VELOCITY_MIN) / (VELOCITY_MAX - VELOCITY_MIN)


def per_sample_loss(predicted: torch.Tensor, target: torch.Tensor, loss: GwiLoss) -> torch.Tensor:
    """(B, 1, 70, 70) velocities in m/s -> the configured loss of each sample, (B,)."""
    predicted, target = scaled_velocity(predicted), scaled_velocity(target)
    if loss.name == "smooth_l1":
        elementwise = F.smooth_l1_loss(predicted, target, beta=loss.smooth_l1_beta, reduction="none")
    else:
        error = predicted - target
        elementwise = error.abs()
        if loss.name == "l1_l2":
            elementwise = elementwise + loss.l2_weight * error.square()
    return elementwise.flatten(1).mean(dim=1)


class GwiNet(nn.Module):
    """The seismic preparation (`SeismicInput`) followed by the network: checkpoints carry their
    preprocessing, and raw float16 batches go straight to the device."""

    def __init__(self, prepare: SeismicInput, net: nn.Module):
        super().__init__()
        self.prepare, self.net = prepare, net

    def forward(self, seismic: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(seismic))


def flip_tta(model: nn.Module):
    """seismic -> the mean of the prediction and the mirrored sample's prediction mirrored back."""
    return lambda seismic: (model(seismic).float() + model(seismic.flip(dims=(1, 3))).float().flip(dims=(3,))) / 2


@register_task("gwi")
class GwiTask(Task):
    """Batches are (seismic (B, 5, T, 70) float16/32, velocity (B, 1, 70, 70) float32, family index (B,))."""

    sections = {"data": GwiData, "model": GwiModel, "loss": GwiLoss}
    tta_modes = TTA_MODES
    kaggle_test_dir = "/kaggle/input/waveform-inversion/test"
    kaggle_infer_args = ("--tta", "flip")
    kaggle_wheels = ("timm", "segmentation-models-pytorch")  # the encoders build exactly as trained
    tta: str = "none"  # of `predict`, set by predict_folder (infer.py --tta); "flip": see predict
    collate_fn = staticmethod(online.collate)  # online draws' batches carry their seismic empty, filled on the device
    simulator: online.OnlineSimulator | None = None  # with online data: `prepare_batch`

    @cached_property
    def families(self) -> list[str]:
        """The names of the family indices batches carry (batch[2]), which name the per-family
        metrics: the built datasets' list, or the same list found from the config when this instance
        built none (e.g. a task rebuilt from a checkpoint)."""
        if self.cfg.data.source == "online":
            return online.online_families(self.cfg.data)
        return dataset_families(self.cfg.data)

    step = 0  # optimizer updates done (on_train_start, after_update): when the physics term applies

    @cached_property
    def physics(self) -> PhysicsLoss | None:
        """The loss with the physics term (and unlabelled samples), or None for the plain loss."""
        if not (self.cfg.loss.physics_weight or self.cfg.data.unlabelled_roots):
            return None
        return PhysicsLoss(self.cfg.loss, lambda predicted, target: per_sample_loss(predicted, target, self.cfg.loss))

    def build_datasets(self, cfg) -> tuple[SeismicPairs, SeismicPairs]:
        check_physics_config(cfg.data, cfg.loss)
        if online.uses_online(cfg.data):
            train, val = online.build_datasets(cfg.data, cfg.seed)
            self.simulator = online.OnlineSimulator(cfg.data.online_nt)
        else:
            train, val = build_datasets(cfg.data, cfg.seed)
        self.families = val.families
        if cfg.data.unlabelled_roots:
            train = WithUnlabelled(train, UnlabelledFiles(cfg.data.unlabelled_roots))
        if cfg.data.pseudo_dir:
            check_pseudo_config(cfg.data)
            train = PseudoMix(train, cfg.data.pseudo_fraction, cfg.seed)
            self.pseudo_rounds = PseudoRounds(self, cfg)
        return train, val

    def prepare_batch(self, batch, device):
        """Online draws: their seismic simulated on the device (gwi.online.OnlineSimulator)."""
        return batch if self.simulator is None else self.simulator(batch, device)

    def after_update(self, model: nn.Module, step: int) -> dict[str, float]:
        """With online data, every log.every_steps updates: the simulation's share of the wall time and
        its samples per second; with the physics term, its misfit at each update that computed it."""
        self.step = step
        values = {}
        if self.simulator is not None and not step % self.cfg.log.every_steps:
            values |= self.simulator.throughput()
        if self.physics is not None and self.physics.last_misfit is not None:
            values["train/physics_misfit"], self.physics.last_misfit = self.physics.last_misfit, None
        return values

    def fold_samples(self, cfg) -> FoldSamples:
        """By family; the files source by whole files (gwi.data.fold_samples)."""
        return fold_samples(cfg.data)

    def set_epoch(self, train_set: SeismicPairs, epoch: int) -> None:
        train_set.set_epoch(epoch)  # the flip augmentation is drawn per (seed, epoch, index)

    def on_train_start(self, model: nn.Module, run_dir, step: int) -> None:
        self.step = step

    def on_epoch_start(self, model: nn.Module, train_set, epoch: int, batch: int) -> None:
        if self.cfg.data.pseudo_dir:  # a new round of pseudo-labels, or the current one read back
            self.pseudo_rounds.start_epoch(model, train_set, epoch, batch)

    def build_model(self, cfg, *, from_checkpoint: bool = False) -> nn.Module:
        # pretrained_path only initialises the encoder: a checkpoint's weights replace it anyway.
        init_only = {"pretrained_path"} if from_checkpoint else set()
        net = create_model(cfg.model.name, **cfg.model.model_dump(exclude={"name", *init_only}, exclude_none=True))
        return GwiNet(SeismicInput(cfg.data.time_steps, cfg.data.normalize), net)

    def loss(self, outputs: torch.Tensor, batch) -> torch.Tensor:
        if self.physics is not None:
            return self.physics(outputs, batch, self.step)
        return per_sample_loss(outputs, batch[1], self.cfg.loss).mean()

    def metric_names(self) -> list[str]:
        return ["loss", "mae", "mae_odd"] + ([f"mae_{name}" for name in self.families] if len(self.families) > 1 else [])

    def metrics(self, outputs: torch.Tensor, batch) -> dict[str, torch.Tensor]:
        velocity = batch[1]
        error = (outputs.float() - velocity.float()).abs()
        values = {
            "loss": per_sample_loss(outputs, velocity, self.cfg.loss),
            "mae": error.flatten(1).mean(dim=1),
            "mae_odd": error[..., 1::2].flatten(1).mean(dim=1),  # the Kaggle metric
        }
        if len(self.families) > 1:  # NaN marks "not this family"; the loop averages the rest
            family = torch.as_tensor(batch[2], device=error.device)
            for index, name in enumerate(self.families):
                values[f"mae_{name}"] = torch.where(family == index, values["mae"], torch.nan)
        return values

    def predict(self, model: nn.Module, batch) -> torch.Tensor:
        """The velocity maps of a batch for submission and scoring (gwi.submission, the demo), with
        the test-time augmentation `self.tta`."""
        seismic = batch[0]
        predict = flip_tta(model) if self.tta in ("flip", "flip+scale") else model
        if self.tta in ("scale", "flip+scale"):  # the median over gwi.scaling.SCALE_TTA's factors
            return scale_tta(predict, seismic)
        return predict(seismic).float()

    def after_training(self, run_dir, accelerator) -> dict:
        """The demo's report on simulated data: the best checkpoint predicts the simulated test set
        into <run_dir>/submission.csv, which is scored (test MAE) and pictured (predictions.png);
        see gwi.report. Nothing for other data sources."""
        if self.cfg.data.source != "simulated":
            return {}
        return report(self.cfg, Path(run_dir), accelerator)

    def predict_folder(self, model: nn.Module, folder: str, out: str | None, *, tta: str = "none", **options) -> dict:
        """A test folder (`<id>.npy` files) -> the Kaggle submission CSV at `out`; a labelled folder
        (training layout) -> MAE overall, on odd columns and per family (+ predictions .npy)."""
        self.tta = tta
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"--data {folder}: not a directory")
        save_predictions = options.pop("save_predictions", None)
        if is_test_folder(folder):
            if not out:
                raise UserError("--out: give the submission CSV path for a test folder")
            if save_predictions:
                raise UserError(f"--save-predictions: {folder} is a test folder, whose predictions are the submission "
                                "(--out); --save-predictions saves a labelled folder's predictions")
            return write_submission(self, model.eval(), folder, Path(out), **options)
        if not has_training_data(folder):
            raise UserError(f"--data {folder}: {'empty' if not any(folder.iterdir()) else 'no data found'}; expected a test "
                            f"folder of <id>.npy files {SEISMIC_SAMPLE_SHAPE} or a labelled folder in the training layout "
                            f"({TRAINING_LAYOUTS})")
        return evaluate_folder(self, model.eval(), folder, save_predictions=save_predictions, **options)
