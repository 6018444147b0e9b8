"""Models from checkpoints, averaged into one ensemble, and evaluated on a task's validation data.

Each checkpoint carries its resolved config in meta.json, so a model is rebuilt exactly as trained,
whatever config files say today. Tasks add their own outputs (e.g. the Kaggle CSV) on top of this.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from harness import checkpoint as ckpt
from harness.artifacts import resolve_checkpoint
from harness.config import BaseRunConfig, apply_overrides, validate
from harness.errors import ConfigError, UserError
from harness.folds import CV_FILE, fold_run_dirs
from harness.loop import evaluate
from harness.rundir import saved_config
from harness.task import Task, get_task


class Ensemble(nn.Module):
    """Its members' outputs combined by the task (`Task.combine_outputs`: e.g. the mean; one member:
    that member's output)."""

    def __init__(self, members: list[nn.Module], combine):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.combine = combine

    def forward(self, *args, **kwargs):
        outputs = [member(*args, **kwargs) for member in self.members]
        return self.combine(outputs) if len(outputs) > 1 else outputs[0]


def checkpoint_config(path: str | os.PathLike, overrides: list[str] = ()) -> BaseRunConfig:
    return validate(apply_overrides(saved_config(ckpt.read_meta(ckpt.resolve(path))["config"]), overrides))


def expand_folds(paths: list[str]) -> list[str]:
    """The checkpoints `paths` name: a data.fold=all run folder stands for each of its folds' runs
    (their best checkpoints, in fold order); W&B artifacts are downloaded first."""
    local = [resolve_checkpoint(path) for path in paths]  # wandb:ENTITY/PROJECT/NAME:ALIAS -> downloaded directory
    return [str(fold) for path in local for fold in fold_run_dirs(path) or [path]]


def load_ensemble(paths: list[str], overrides: list[str] = ()) -> tuple[Task, BaseRunConfig, Ensemble]:
    """(task, config of the first checkpoint, ensemble of every checkpoint's inference weights)."""
    if not paths:
        raise ConfigError("give at least one --checkpoint")
    members, configs = [], []
    for path in expand_folds(paths):
        try:
            cfg = checkpoint_config(path, overrides)
        except FileNotFoundError as err:
            raise ConfigError(f"--checkpoint {path}: {err}") from None
        task = get_task(cfg.task, cfg)
        model = task.build_model(cfg, from_checkpoint=True)
        ckpt.load_weights(model, path)
        members.append(model.eval())
        configs.append(cfg)
    tasks = {cfg.task for cfg in configs}
    if len(tasks) > 1:
        raise ConfigError(f"--checkpoint: these checkpoints belong to different tasks ({', '.join(sorted(tasks))})")
    task = get_task(configs[0].task, configs[0])
    return task, configs[0], Ensemble(members, task.combine_outputs)


def evaluate_checkpoints(paths: list[str], overrides: list[str] = (), batch_size: int | None = None) -> dict:
    """Metrics of the ensemble on the validation split of the first checkpoint's config."""
    paths = [resolve_checkpoint(path) for path in paths]  # download W&B artifacts once, report local paths
    for path in paths:
        if fold_run_dirs(path):  # each fold validated on its own part: no validation set fits the ensemble
            raise UserError(f"--checkpoint {path}: a k-fold run (data.fold=all); its cross-validated score is in "
                            f"{Path(path) / CV_FILE}; give --data to predict with the fold ensemble, or name one fold_<k>")
    task, cfg, model = load_ensemble(paths, overrides)
    accelerator = Accelerator(mixed_precision=cfg.trainer.mixed_precision)
    _, val_set = task.build_datasets(cfg)
    loader = DataLoader(val_set, batch_size=batch_size or cfg.trainer.eval_batch_size or cfg.trainer.batch_size,
                        collate_fn=task.collate_fn)
    model, loader = accelerator.prepare(model, loader)
    metrics = evaluate(accelerator, task, model, loader)
    return {"checkpoints": [str(ckpt.resolve(p)) for p in paths], **{f"val/{k}": v for k, v in metrics.items()}}


def check_output_file(flag: str, path: str | os.PathLike) -> Path:
    """Refuse an output path that could not be written, before any work is done (a mistake found
    after predicting a whole folder costs the whole prediction): a directory, or a parent that is a
    file or not writable. Missing parent folders are fine (the writer creates them)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write into {parent} (permission denied)")
    return path


def print_json(values: dict) -> None:
    print(json.dumps(values, indent=1))


def predict_folder(paths: list[str], data: str, out: str | None, tta: str, batch_size: int | None,
                   num_workers: int, save_predictions: str | None, overrides: list[str] = (),
                   physics: dict | None = None, options: dict | None = None) -> dict:
    """The ensemble's predictions for a folder of data, in the task's own format (the task's
    `predict_folder`: e.g. a Kaggle submission, or metrics of a labelled folder). `physics`: the
    task's physics options (gwi: misfit / refinement, `gwi.submission.PhysicsOptions`), passed on
    only when given, on the same device as the model; `options`: the task's own (`Task.predict_options`),
    each refused by a task that has no such option. Output paths are checked first."""
    for flag, path in (("--out", out), ("--save-predictions", save_predictions)):
        if path:
            check_output_file(flag, path)
    task, cfg, model = load_ensemble(paths, overrides)
    if tta not in task.tta_modes:
        raise UserError(f"--tta {tta}: task {task.name!r} has no such test-time augmentation; it has: {', '.join(task.tta_modes)}")
    options = options or {}
    for name in options:
        if name not in task.predict_options:
            raise UserError(f"--{name.replace('_', '-')}: task {task.name!r} has no such option")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.trainer.mixed_precision)
    extra = ({"physics": physics} if physics else {}) | options
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda"):
        return task.predict_folder(model, data, out, tta=tta, batch_size=batch_size or cfg.trainer.eval_batch_size or cfg.trainer.batch_size,
                                   num_workers=num_workers, device=device, save_predictions=save_predictions, **extra)
