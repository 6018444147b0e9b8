"""L-infinity adversarial examples in pixel space, and the perturbation of free adversarial training.

- `fgsm`: one signed-gradient step (Goodfellow et al. 2015); with `random_start`, the fast adversarial
  training attack of Wong et al. 2020 (a uniform start in the eps ball, then a step of ~1.25 eps).
- `pgd`: projected gradient descent (Madry et al. 2018): `steps` signed steps of `alpha`, each
  projected back into the eps ball and the [0, 1] pixel box, from a random start, repeated `restarts`
  times keeping per sample the worst restart.
- `FreePerturbation`: free adversarial training (Shafahi et al. 2019): one perturbation that persists
  across replays of a batch and across batches, stepped with the input gradient of the very backward
  pass that trains the weights, so the attack costs no extra passes.

Models take pixels in [0, 1] (their normalisation is their first layer), so eps and alpha are in pixel
units: 8/255 is the usual CIFAR-10 budget, 0.3 MNIST's. The perturbation is a float32 tensor whatever
the model computes in: under bf16 autocast only the model's own layers run in bf16, the input
gradient arrives in float32, and its sign (all a step uses) survives the coarse precision.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cnn.models import to_unit_float
from harness.sam import frozen_norm_stats


def attack_module(model: nn.Module) -> nn.Module:
    """The module an attack differentiates: inside DistributedDataParallel (also under torch.compile),
    the wrapped module. DDP's forward prepares its gradient reducer for a backward over the weights;
    an attack's input-only gradients would leave that reduction unfinished and break the next step.
    The inner module keeps Accelerate's autocast (it patches that module's forward, not DDP's)."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return inner.module if isinstance(inner, DistributedDataParallel) else model


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, random_start: bool = False,
         alpha: float | None = None) -> torch.Tensor:
    """Adversarial images one signed step from `images` (or, with `random_start`, from a uniform point
    of the eps ball); `alpha` defaults to eps, or 1.25 eps with a random start (Wong et al.'s choice).
    The result stays within eps of `images` and in [0, 1]."""
    if alpha is None:
        alpha = 1.25 * eps if random_start else eps
    return pgd(model, images, labels, eps, alpha, steps=1, random_start=random_start)


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, alpha: float, steps: int,
        random_start: bool = True, restarts: int = 1) -> torch.Tensor:
    """Adversarial images by L-inf PGD: float32 pixels in [0, 1], within eps of `images` (uint8 or
    float pixels). Each of `restarts` runs starts at a uniform point of the eps ball (or at the image
    itself without `random_start`) and takes `steps` ascent steps of the cross-entropy; per sample
    the run that misclassifies is kept, else the one with the highest loss.

    Runs in whatever mode the model is in (eval: BatchNorm uses its running statistics; train: the
    batch's, with the running statistics left untouched) and under any surrounding autocast; gradients
    are taken w.r.t. the perturbation only, never accumulated into the weights' .grad."""
    if steps < 1 or restarts < 1:
        raise ValueError(f"pgd: steps ({steps}) and restarts ({restarts}) must be >= 1")
    net = attack_module(model)
    images = to_unit_float(images).detach().float()
    best, best_wrong, best_loss = None, None, None
    with torch.enable_grad(), frozen_norm_stats(net):  # evaluation runs under no_grad
        for _ in range(restarts):
            delta = torch.zeros_like(images)
            if random_start:
                delta.uniform_(-eps, eps)
            delta = project(images, delta, eps)
            for _ in range(steps):
                delta.requires_grad_(True)
                # Summed, not averaged: each sample's input gradient is that of its own loss, not 1/B of it,
                # which under fp16 autocast could underflow to zero and leave the pixel without a step.
                loss = F.cross_entropy(net(images + delta).float(), labels, reduction="sum")
                (grad,) = torch.autograd.grad(loss, delta)
                delta = project(images, delta.detach() + alpha * signed(grad), eps)
            if restarts == 1:  # nothing to choose between: skip the scoring pass
                return (images + delta).clamp(0, 1)
            with torch.no_grad():
                logits = net(images + delta).float()
                loss = F.cross_entropy(logits, labels, reduction="none")
                wrong = logits.argmax(1) != labels
            if best is None:
                best, best_wrong, best_loss = delta, wrong, loss
                continue
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best = torch.where(better.view(-1, *[1] * (images.ndim - 1)), delta, best)
            best_wrong, best_loss = best_wrong | wrong, torch.where(better, loss, best_loss)
    return (images + best).clamp(0, 1)  # the clamp only removes rounding: delta kept images + delta in the box


def project(images: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """delta clipped to the eps ball, then to what keeps images + delta in [0, 1] (pixels already in
    [0, 1] stay within eps of themselves either way)."""
    return (images + delta.clamp(-eps, eps)).clamp(0, 1) - images


def signed(grad: torch.Tensor) -> torch.Tensor:
    """The step direction; a non-finite gradient entry (an fp16 overflow) gives no step rather than NaN."""
    return torch.nan_to_num(grad.sign(), nan=0.0)


class FreePerturbation:
    """Free adversarial training's perturbation (Shafahi et al. 2019). The loop replays each batch m
    times (trainer.batch_replays); every training forward feeds the model clamp(x + delta, 0, 1) as a
    leaf that requires grad, so the loop's own backward leaves its input gradient beside the weights'.
    The next forward first steps delta by `step` x sign(that gradient) and clips it to the eps ball:
    one replay's backward both updates the weights and strengthens the attack on the next replay, and
    delta carries over to the next batch instead of restarting from zero (it is not checkpointed: a
    resumed run starts it from zero again)."""

    def __init__(self, eps: float, step: float):
        self.eps, self.step = eps, step
        self.delta = None  # float32 (B, C, H, W)
        self.inputs = None  # the last adversarial input; its .grad is what the loop's backward left

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = to_unit_float(images).detach().float()
        if self.delta is None or self.delta.shape != images.shape or self.delta.device != images.device:
            self.delta = torch.zeros_like(images)  # Shafahi et al. start from zero
        elif self.inputs is not None and self.inputs.grad is not None:
            # The gradient w.r.t. the clamped input, as in the paper's code: a saturated pixel still
            # moves delta (a gradient through the clamp would be zero there).
            self.delta = (self.delta + self.step * signed(self.inputs.grad)).clamp(-self.eps, self.eps)
        self.inputs = (images + self.delta).clamp(0, 1).requires_grad_(True)
        return self.inputs


@dataclass
class RobustOutputs:
    """What the task's forward returns in evaluation when adversarial.eval_pgd_steps > 0: the logits of
    the images and of their PGD-k adversarial examples, for val/acc and val/robust_acc side by side."""

    clean: torch.Tensor
    attacked: torch.Tensor
