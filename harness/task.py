"""The Task interface: the only thing the training loop talks to, and the registry of tasks by name.

A task is a package whose `task` module subclasses `Task` and registers it with
`@register_task("name")`. The config key `task: name` imports `<name>.task`, so a third task needs no
change here or in the loop, and importing a task's other modules (e.g. `python -m gwi.physics.synth`)
never loads the task stack.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Literal, Optional, Union, get_args, get_origin

import torch
from accelerate.utils import find_batch_size
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from torch.utils.data import Dataset

from harness.errors import ConfigError, UserError
from harness.folds import FoldSamples, check_fold


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, never silently ignored, and a number
    key refuses a boolean (pydantic would take YAML's `true` as 1 for `trainer.epochs`)."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info):
        if isinstance(value, bool) and _number_not_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got {str(value).lower()} (a YAML boolean: true/false/yes/no/on/off)")
        return value


def _number_not_bool(annotation) -> bool:
    """An int or float field (optional or not) that does not also accept bool."""
    options = set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
    return bool(options & {int, float}) and bool not in options


class FoldKeys(Section):
    """The k-fold keys, under `data.` for every task: a task's data section subclasses this (one
    definition for all tasks), and the task implements `fold_samples` and reads `fold` in its
    `build_datasets` (harness/folds.py: `fold_indices`)."""

    folds: int = Field(5, ge=2, description="k-fold: the parts the training set is split into, stratified (cnn: by class; "
                                            "gwi: by family, files: whole files)")
    fold: Optional[Union[int, Literal["all"]]] = Field(
        None, description="k-fold: k = validate on part k of the training set and train on the rest; all = train.py trains "
                          "every fold into <output_dir>/fold_<k>, then writes oof.npy, oof.csv and cv.json; null = the task's "
                          "own split (cnn: data.val_size, data.val_on_test, data.val_fraction or data.val_root; gwi: data.num_val, "
                          "files: part 0)")
    split_seed: int = Field(0, description="seed of the validation split: the fold assignment and cnn's hold-outs "
                                           "(data.val_size, data.val_fraction)")

    @field_validator("fold")
    @classmethod
    def _fold_not_negative(cls, fold):
        if isinstance(fold, int) and fold < 0:
            raise ValueError(f"{fold} is negative; give 0..data.folds-1 or all")
        return fold

    @model_validator(mode="after")
    def _fold_in_range(self):
        check_fold(self.fold, self.folds)
        return self


class Task:
    """Subclass and override. `cfg` is the whole validated run config (`harness.config.RunConfig`);
    the task's own sections (`sections`) are reachable as attributes, e.g. `cfg.data.root`. The
    instance keeps it as `self.cfg`, so `loss` and `metrics` can read their options.

    Every method and attribute here is one the harness uses; nothing else of a task is read."""

    name: str = ""
    # The offline Kaggle notebook (`python -m harness.kaggle bundle`): the test folder it predicts by
    # default, the infer.py arguments it adds, and the dependencies shipped as wheels (what a Kaggle
    # image lacks or has in another version than the one the models were trained with).
    kaggle_test_dir: str = "/kaggle/input/COMPETITION/test"
    kaggle_infer_args: tuple[str, ...] = ()
    kaggle_wheels: tuple[str, ...] = ()
    # Config sections this task owns, e.g. {"data": GwiData, "model": GwiModel, "loss": GwiLoss}.
    sections: dict[str, type[Section]] = {}
    # The DataLoaders' collate function (training, evaluation, the LR finder); None: PyTorch's default.
    # A plain function (e.g. `staticmethod(f)`), so DataLoader workers need not pickle the task.
    collate_fn: Callable | None = None
    # The test-time augmentations `predict_folder` accepts (infer.py --tta); "none" is always one.
    tta_modes: tuple[str, ...] = ("none",)
    # The task's own keyword options of `predict_folder` that infer.py may pass (e.g. cnn's
    # sample_submission); any other is refused before a model is loaded.
    predict_options: tuple[str, ...] = ()

    def __init__(self, cfg=None):
        self.cfg = cfg

    def build_datasets(self, cfg) -> tuple[Dataset, Dataset]:
        """(train, val)."""
        raise NotImplementedError

    def set_epoch(self, train_set: Dataset, epoch: int) -> None:
        """Called before each pass over the training set (also a resumed one, and each cycle of the LR
        finder), so random augmentation can be a function of (seed, epoch, index) and resume exactly;
        e.g. pass it on to the dataset. The default does nothing."""

    def build_model(self, cfg, *, from_checkpoint: bool = False) -> nn.Module:
        """The model, and nothing else: no files, no printing (that is `on_train_start`). With
        `from_checkpoint` the weights are loaded from a checkpoint next (inference, init_from): skip what only
        initialises them, such as a pretrained-weights file, usually absent on the predicting machine."""
        raise NotImplementedError

    def on_train_start(self, model: nn.Module, run_dir: Path, step: int) -> None:
        """Called on every process once per training run (a resumed one too), after the model is
        built and the state restored, before the first update: `model` is the (unwrapped) model to
        train, `step` the update the run continues from (0 when it starts). E.g. write a parameter
        table into `run_dir` or attach diagnostic hooks. Not called by the LR finder or inference."""

    def prepare_batch(self, batch, device: torch.device):
        """Called on every process with each training batch as the loader delivers it (already on
        `device`), once per batch (not per replay), before the model sees it; returns the batch to
        train on. E.g. make the inputs on the training device from what the dataset drew (gwi's
        online data simulates its seismic here). Not called for evaluation batches, which are fixed.
        The default returns the batch unchanged."""
        return batch

    def on_epoch_start(self, model: nn.Module, train_set: Dataset, epoch: int, batch: int) -> None:
        """Called on every process before each pass of the training loop over the training set,
        after `set_epoch`: `model` holds the weights used for inference (the EMA when it is on, else
        the unwrapped model), `batch` the batch the pass starts at (0 unless resumed mid-epoch).
        E.g. refresh pseudo-labels. Not called by the LR finder. The default does nothing."""

    def forward(self, model: nn.Module, batch):
        """Run the model on a batch; the default takes the batch's first element as the input."""
        return model(batch[0])

    def loss(self, outputs, batch) -> torch.Tensor:
        """Scalar training loss."""
        raise NotImplementedError

    def metrics(self, outputs, batch) -> dict[str, torch.Tensor]:
        """Per-sample values, each a (B,) tensor; NaN where a metric does not apply to a sample
        (e.g. a per-family error). The loop gathers them across processes without duplicates and
        averages the non-NaN values. Must include "loss"."""
        raise NotImplementedError

    def metric_names(self) -> list[str] | None:
        """The names `metrics` returns, known once `build_datasets` has run (they may depend on the
        data), so that a mistyped `checkpoint.monitor` stops the run before its first step. None (the
        default): not declared; the monitor is then checked at the first evaluation."""
        return None

    def combine_outputs(self, outputs: list) -> torch.Tensor:
        """An ensemble's output from its members' model outputs (several --checkpoint, a k-fold run's
        folds), in the same form, so `forward`, `metrics` and prediction read it as one model's: the
        mean by default (e.g. gwi's velocity maps)."""
        return torch.stack([o.float() for o in outputs]).mean(0)

    def fold_samples(self, cfg) -> FoldSamples:
        """The training set that k-fold splits (`data.fold`): every sample's stratum, id and group, in
        a fixed order. With `data.fold` = k, `build_datasets` must train on the samples
        `harness.folds.fold_indices(self.fold_samples(cfg), folds, k, split_seed)` gives and
        validate on the others, in that order: the out-of-fold predictions of a data.fold=all run
        are put back in place by it."""
        raise ConfigError(f"key 'data.fold': task {self.name!r} has no k-fold")

    def predictions(self, outputs) -> torch.Tensor:
        """The per-sample predictions (B, ...) kept as out-of-fold predictions (oof.npy) from `forward`'s
        outputs in evaluation; the default takes the outputs themselves (e.g. gwi's velocity maps)."""
        return outputs.float()

    def prediction_columns(self) -> list[str] | None:
        """Names of the columns of `predictions` (B, C) in oof.csv (e.g. one per class); None (the
        default): too many values per sample for a CSV, which keeps the per-sample metrics only."""
        return None

    def predict_folder(self, model: nn.Module, folder: str, out: str | None, *, tta: str = "none", **options) -> dict:
        """Predict for a folder of files (infer.py --data): write `out` in the task's own format
        (e.g. a competition submission) or score a labelled folder; returns a summary to print.
        `tta` is one of `tta_modes`; `options`: batch_size, num_workers, device, save_predictions
        and the task's own (e.g. gwi's physics)."""
        raise UserError(f"task {self.name!r} has no folder inference (infer.py --data)")

    def after_update(self, model: nn.Module, step: int) -> dict[str, float]:
        """Called on every process after optimizer update `step` (the model in train mode): extra
        values to log at that step (e.g. an expensive diagnostic every N updates); usually empty."""
        return {}

    def after_training(self, run_dir, accelerator) -> dict:
        """Called on every process once a run has finished (not when it was stopped), after the final
        evaluation and checkpoint: e.g. a demo's report. Returns entries for the run's summary."""
        return {}

    def batch_size(self, batch) -> int:
        return find_batch_size(batch)


_REGISTRY: dict[str, type[Task]] = {}


def register_task(name: str):
    def add(cls: type[Task]) -> type[Task]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


# The tasks that ship with the project, named in the unknown-task error before any is imported.
BUILT_IN_TASKS = ("cnn", "gwi")


def get_task(name: str, cfg=None) -> Task:
    """The task registered under `name` (importing `<name>.task` on first use), bound to the run
    config `cfg`."""
    if name not in _REGISTRY:
        module = f"{name}.task"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name not in (name, module):
                raise
    if name not in _REGISTRY:
        known = sorted(set(BUILT_IN_TASKS) | set(_REGISTRY))
        raise ConfigError(f"key 'task': unknown task {name!r}; known tasks: {', '.join(known)}")
    return _REGISTRY[name](cfg)
