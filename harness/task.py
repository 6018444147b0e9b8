"""The Task interface: the only thing the training loop talks to, and the registry of tasks by name.

A task is a package whose `task` module subclasses `Task` and registers it with
`@register_task("name")`. The config key `task: name` imports `<name>.task`, so a third task needs no
change here or in the loop, and importing a task's other modules (e.g. `python -m gwi.physics.synth`)
never loads the task stack.
"""
from __future__ import annotations

import importlib
from types import UnionType
from typing import Union, get_args, get_origin

import torch
from accelerate.utils import find_batch_size
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn
from torch.utils.data import Dataset

from harness.errors import ConfigError, UserError


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


class Task:
    """Subclass and override. `cfg` is the whole validated run config (`harness.config.RunConfig`);
    the task's own sections (`sections`) are reachable as attributes, e.g. `cfg.data.root`. The
    instance keeps it as `self.cfg`, so `loss` and `metrics` can read their options."""

    name: str = ""
    # Config sections this task owns, e.g. {"data": GwiData, "model": GwiModel, "loss": GwiLoss}.
    sections: dict[str, type[Section]] = {}

    def __init__(self, cfg=None):
        self.cfg = cfg

    def build_datasets(self, cfg) -> tuple[Dataset, Dataset]:
        """(train, val). A dataset with `set_epoch(epoch)` is told the epoch before each pass, so its
        random augmentation can be a function of (seed, epoch, index) and resume exactly."""
        raise NotImplementedError

    def build_model(self, cfg) -> nn.Module:
        raise NotImplementedError

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

    def predict(self, model: nn.Module, batch) -> torch.Tensor:
        """Inference-time prediction (e.g. with test-time augmentation); defaults to `forward`."""
        return self.forward(model, batch)

    def predict_folder(self, model: nn.Module, folder: str, out: str | None, **options) -> dict:
        """Predict for a folder of files (infer.py --data): write `out` in the task's own format
        (e.g. a competition submission) or score a labelled folder; returns a summary to print."""
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
