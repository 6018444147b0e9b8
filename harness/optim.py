"""Optimizers, learning-rate schedules and the weight EMA, built by name from the config."""
from __future__ import annotations

import math

import torch
from timm.utils import ModelEmaV3
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, skip_bias_and_norm: bool) -> list[dict]:
    """Weight decay on weight matrices and kernels only: decaying biases and norm scales hurts
    (the usual practice in timm and the fast CIFAR recipes)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if skip_bias_and_norm and param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(oc, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, oc.weight_decay, oc.no_decay_bias_norm)
    if oc.name == "adamw":
        return torch.optim.AdamW(groups, lr=oc.lr, betas=tuple(oc.betas))
    if oc.name == "sgd":
        return torch.optim.SGD(groups, lr=oc.lr, momentum=oc.momentum, nesterov=oc.nesterov and oc.momentum > 0)
    raise ValueError(f"unknown optimizer {oc.name!r}")


def build_scheduler(sc, optimizer: torch.optim.Optimizer, total_steps: int, mode: str):
    """A schedule stepped once per optimizer update (plateau: once per evaluation, with the monitored
    metric)."""
    total_steps = max(total_steps, 1)
    if sc.name == "onecycle":
        if sc.pct_start * total_steps <= 1:  # torch's OneCycleLR divides by zero on a rise of one update or less
            from harness.errors import ConfigError

            raise ConfigError(f"key 'sched.name': onecycle needs sched.pct_start x updates > 1, got {sc.pct_start} x "
                              f"{total_steps}; train longer or use sched.name=cosine")
        # cycle_momentum off: the configured momentum / betas stay what the config says.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps,
            pct_start=sc.pct_start, div_factor=sc.div_factor, final_div_factor=sc.final_div_factor,
            anneal_strategy="cos", cycle_momentum=False,
        )
    if sc.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=sc.plateau_factor,
                                                          patience=sc.plateau_patience)
    warmup = sc.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if sc.name == "constant":
            return 1.0
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return sc.min_lr_ratio + (1 - sc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_ema(ec, model: nn.Module) -> ModelEmaV3 | None:
    if not ec.enabled:
        return None
    return ModelEmaV3(model, decay=ec.decay, use_warmup=ec.warmup)
