"""Sharpness-Aware Minimization (Foret et al. 2021) and its adaptive form ASAM (Kwon et al. 2021) as a
second pass around whatever optimizer the config builds: the loop takes the gradient at w, moves the
weights to the worst point of a rho-ball (w + e), takes the gradient there, puts w back, and lets the
ordinary optimizer (and clipping, and the grad scaler) apply that second gradient.

Written here rather than taken from a package: the usual SAM code wraps the optimizer, which would
hide the base optimizer from Accelerate, the schedules and the checkpoint; as a context manager it
leaves all of those untouched.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class SharpnessAware:
    """e = rho * g / ||g|| (SAM), or e = rho * T^2 g / ||T g|| with T = |w| + eta elementwise (ASAM,
    whose ball scales with each weight, so rho is typically 10x larger, e.g. 0.5-2).

    ASAM scales only the parameters whose name contains "weight" (conv and linear kernels, norm
    scales); biases and any other parameter keep T = 1, as in the authors' code (SamsungLabs/ASAM,
    asam.py: `if 'weight' in n`), while still counting, unscaled, in the norm ||T g||."""

    def __init__(self, params, rho: float, adaptive: bool = False, eta: float = 0.01):
        self.params = [p for p in params if p.requires_grad]
        self.rho, self.adaptive, self.eta = rho, adaptive, eta

    @torch.no_grad()
    def perturbation(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(param, e) for every parameter with a gradient; `model` names them (ASAM scales the weights
        only). Empty when the gradient is not finite (an fp16 grad scaler overflow): the second pass
        then runs at w itself, overflows the same way, and the scaler skips the step as usual. The
        direction is scale-free, so scaled fp16 gradients give the same e as unscaled ones."""
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return []
        weights = {id(p) for name, p in model.named_parameters() if "weight" in name} if self.adaptive else set()
        scale = [(p.abs() + self.eta) if id(p) in weights else None for p in with_grad]
        scaled = [p.grad * s if s is not None else p.grad for p, s in zip(with_grad, scale)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in scaled]))
        if not torch.isfinite(norm) or norm == 0:
            return []
        factor = self.rho / norm
        return [(p, (g * s if s is not None else g) * factor.to(g.dtype)) for p, g, s in zip(with_grad, scaled, scale)]

    @contextmanager
    def perturbed(self, model: nn.Module):
        """Inside: the weights are w + e and BatchNorm running statistics are frozen (they were
        updated by the first pass; the second pass must not count the batch twice). On exit the exact
        original weights are back."""
        moves = self.perturbation(model)
        originals = [p.detach().clone() for p, _ in moves]
        with torch.no_grad():
            for p, e in moves:
                p.add_(e)
        try:
            with frozen_norm_stats(model):
                yield
        finally:
            with torch.no_grad():
                for (p, _), original in zip(moves, originals):
                    p.copy_(original)


@contextmanager
def frozen_norm_stats(model: nn.Module):
    """Forward passes inside leave every BatchNorm's running mean/var and batch count as they were
    (normalisation still uses the batch's own statistics in train mode). Used for SAM's second pass
    and for the forward passes of adversarial attacks during training."""
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats and module.running_mean is not None:
            saved.append((module, module.running_mean.clone(), module.running_var.clone(), module.num_batches_tracked.clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, mean, var, count in saved:
                module.running_mean.copy_(mean)
                module.running_var.copy_(var)
                module.num_batches_tracked.copy_(count)
