"""Optimizers (any of timm's by name), learning-rate schedules and the weight EMA, built from the config.

Optimizers come from timm's factory (`timm.optim.create_optimizer_v2`), one path for every name in
`timm.optim.list_optimizers()`: it drops the arguments an optimizer does not take (betas, eps,
momentum), applies the name's own defaults (`sgd` is Nesterov SGD, `momentum` classical SGD, `nmuon`
Nesterov Muon), and builds the weight-decay groups (no decay on 1-D parameters, i.e. biases and norm
weights, when optim.no_decay_bias_norm, since decaying them hurts, nor on the names the model's
`no_weight_decay()` lists) and the layer-decay groups (from the model's `group_matcher()`).

Muon is timm's (`muon`, `nmuon`, `adamuon`, `nadamuon`), not `torch.optim.Muon`: torch's accepts 2-D
matrices only, so every conv kernel, bias and norm weight would need a second optimizer beside it (two
state dicts, two schedules, two SAM and LR-finder paths). timm's orthogonalises every weight with at
least two dimensions of size >= 4 (conv kernels flattened to out x in*kh*kw; aspect ratio <= 128) and
gives the rest (biases, norm weights, depthwise kernels, position embeddings) an AdamW update inside the
same optimizer; it records the choice per parameter in its state (`use_muon`).
"""
from __future__ import annotations

import difflib
import inspect
import math

import torch
from timm.models import group_parameters
from timm.optim import Muon, create_optimizer_v2, get_optimizer_class, get_optimizer_info, list_optimizers
from timm.utils import ModelEmaV3
from torch import nn

from harness.errors import ConfigError

OWN_KEYS = ("lr", "weight_decay", "momentum", "betas", "eps", "nesterov")  # optim.* keys of their own, not opt_args
# Arguments of timm's factory, not of an optimizer class, that optim.opt_args may also carry: name patterns
# (fnmatch) of parameters timm's Muon updates with its AdamW too, e.g. ["head.*"] (MuonWithAuxAdam's split).
FALLBACK_ARGS = ("fallback_list", "fallback_no_weight_decay")


def constructor_args(name: str) -> set[str] | None:
    """The keyword arguments of optimizer `name`'s class; None for the apex / bitsandbytes ones, which
    timm names by import path and imports only when they are built (they need CUDA)."""
    opt_class = get_optimizer_info(name).opt_class
    if isinstance(opt_class, str):
        return None
    return set(inspect.signature(opt_class).parameters) - {"self", "params"}


def name_problem(name: str) -> str | None:
    """What is wrong with `optim.name`, or None: unknown to timm (with the nearest names), or an
    optimizer that needs second-order gradients, which the loop does not compute."""
    known = list_optimizers()
    if name not in known:
        near = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        return (f"unknown optimizer {name!r}" + (f"; nearest: {', '.join(near)}" if near else "")
                + f" (any of the {len(known)} in timm.optim.list_optimizers())")
    if get_optimizer_info(name).second_order:
        return f"{name} needs second-order gradients (a backward with create_graph), which the loop does not take"
    return None


def betas_problem(name: str, betas) -> str | None:
    info = get_optimizer_info(name)
    if betas is not None and info.has_betas and len(betas) != info.num_betas:
        return f"{name} takes {info.num_betas} betas, got {len(betas)}"
    return None


def opt_args_problem(name: str, opt_args: dict) -> str | None:
    own = [key for key in opt_args if key in OWN_KEYS]
    if own:
        return f"{own[0]!r} has its own key: set optim.{own[0]} instead"
    muon = get_optimizer_info(name).opt_class is Muon
    if not muon and (fallback := [key for key in opt_args if key in FALLBACK_ARGS]):
        return f"{fallback[0]!r} chooses the parameters Muon leaves to AdamW; {name} is not a Muon"
    takes = constructor_args(name)
    unknown = sorted(set(opt_args) - takes - set(FALLBACK_ARGS)) if takes is not None else []
    if unknown:
        near = difflib.get_close_matches(unknown[0], takes - set(OWN_KEYS), n=1)
        hint = f"nearest: {near[0]}" if near else f"it takes {', '.join(sorted(takes - set(OWN_KEYS)))}"
        return f"{name} takes no argument {unknown[0]!r}; {hint}"
    return None


def nested_group_matcher(inner: nn.Module, prefix: str):
    """A `group_matcher` for a model that wraps a timm model `inner` as attribute `prefix` (e.g. "net."),
    so layer decay numbers the wrapper's parameters by `inner`'s blocks; the wrapper's own parameters
    (a decoder, a head) come last, at the full lr. A model without a group_matcher is one layer."""
    if not hasattr(inner, "group_matcher"):
        return lambda name: 0
    layers = group_parameters(inner, inner.group_matcher(coarse=False), reverse=True)
    top = max(layers.values()) + 1
    return lambda name: layers.get(name[len(prefix):], top) if name.startswith(prefix) else top


def build_optimizer(oc, model: nn.Module) -> torch.optim.Optimizer:
    try:
        get_optimizer_class(oc.name)  # the apex / bitsandbytes names import their package here and assert CUDA
    except (ImportError, AssertionError) as err:
        raise ConfigError(f"key 'optim.name': {oc.name} cannot be built here ({err or 'needs CUDA'})") from None
    kwargs = dict(oc.opt_args)
    if oc.betas is not None:
        kwargs["betas"] = tuple(oc.betas)
    if oc.eps is not None:
        kwargs["eps"] = oc.eps
    if "nesterov" in (constructor_args(oc.name) or ()):
        if oc.momentum == 0:
            kwargs["nesterov"] = False  # torch's SGD refuses Nesterov without momentum
        elif oc.nesterov is not None:
            kwargs["nesterov"] = oc.nesterov
    optimizer = create_optimizer_v2(model, oc.name, lr=oc.lr, weight_decay=oc.weight_decay, momentum=oc.momentum,
                                    filter_bias_and_bn=oc.no_decay_bias_norm, layer_decay=oc.layer_decay, **kwargs)
    for group in optimizer.param_groups:
        group["lr"] *= group.pop("lr_scale", 1.0)  # timm's schedulers apply a layer's lr_scale, torch's ignore it
    # Group 0 at the full lr (the loop logs it as train/lr; the LR finder scales the others by their ratio
    # to it), decayed before undecayed: the order of the hand-built adamw / sgd, so their checkpoints resume.
    optimizer.param_groups.sort(key=lambda group: (-group["lr"], -group["weight_decay"]))
    if oc.layer_decay is not None and oc.layer_decay < 1 and len({group["lr"] for group in optimizer.param_groups}) == 1:
        raise ConfigError(f"key 'optim.layer_decay': {type(model).__name__} has no layers to decay over; layer decay needs "
                          "a model whose group_matcher() numbers its blocks (timm's models have one)")
    return optimizer


def build_scheduler(sc, optimizer: torch.optim.Optimizer, total_steps: int, mode: str):
    """A schedule stepped once per optimizer update (plateau: once per evaluation, with the monitored
    metric)."""
    total_steps = max(total_steps, 1)
    if sc.name == "onecycle":
        if sc.pct_start * total_steps <= 1:  # torch's OneCycleLR divides by zero on a rise of one update or less
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
