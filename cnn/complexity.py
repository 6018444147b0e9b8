"""Local complexity (Humayun, Balestriero & Baraniuk 2024, "Deep Networks Always Grok and Here is Why"):
how many neurons have their boundary (the zero of their pre-activation) running through a small
neighbourhood of an input.

A ReLU network is a continuous piecewise-linear map: every neuron cuts the input space along the set
where its pre-activation is zero, and those cuts tile the space into linear regions. Around each
sample x we take P orthonormal random directions v_1..v_P and the cross-polytope with vertices
x +- r v_i (its convex hull is the neighbourhood). A neuron whose pre-activation has the same sign on
all 2P vertices does not cut it; one whose sign differs does. Counting those per layer and averaging
over samples gives the local complexity: the density of region boundaries near the data. It is exact
for the first layer (an affine function of the input) and, as in the paper, the usual approximation
deeper in the network, where a pre-activation can change sign twice between two vertices.

Every channel x position of a conv layer is a neuron. A neuron is an input element of a ReLU-like
module (`NONLINEARITIES`), caught by a forward pre-hook: functional activations (F.relu inside a
forward) are not seen. A module applied twice in one forward counts as two layers (`name`, `name#2`).

Used by `python -m cnn.analyze local-complexity` and, during training, by `diagnostics.
local_complexity_every` (CnnTask.after_update): the measurement runs in eval mode under no_grad with
its own random generator, and puts every module's train/eval flag back, so it changes neither the
weights, the BatchNorm statistics nor the training RNG.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from tqdm.auto import tqdm

from cnn.models import to_unit_float

# Activations that bend at a pre-activation of 0 (GELU, SiLU and Mish smoothly, the rest at a kink).
# Hardswish/Hardsigmoid bend at +-3 and are left out rather than measured at the wrong place.
NONLINEARITIES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish)


@dataclass
class LocalComplexity:
    """`layers`: layer -> mean number of neurons cut per sample, in forward order; `neurons`: layer ->
    neurons per sample; `per_sample`: (N,) the total of each sample."""

    layers: dict[str, float] = field(default_factory=dict)
    neurons: dict[str, int] = field(default_factory=dict)
    per_sample: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    directions: int = 0
    radius: float = 0.0

    @property
    def total(self) -> float:
        return float(sum(self.layers.values()))

    def metrics(self, prefix: str = "lc/") -> dict[str, float]:
        """{"lc/total": ..., "lc/<layer>": ...}: what training logs."""
        return {f"{prefix}total": self.total, **{f"{prefix}{name}": value for name, value in self.layers.items()}}


def nonlinear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, NONLINEARITIES)]


def random_directions(count: int, directions: int, sample_shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """(count, P, *sample_shape): for each sample P orthonormal directions, uniformly distributed (the Q
    of a Gaussian matrix's QR decomposition, signs fixed by R's diagonal), drawn on the CPU from
    `generator` so the caller's RNG is untouched and every device gets the same directions."""
    dim = int(np.prod(sample_shape))
    if directions > dim:
        raise ValueError(f"local complexity: {directions} orthonormal directions do not fit in a {dim}-dimensional input")
    gaussian = torch.randn(count, dim, directions, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q.transpose(1, 2).reshape(count, directions, *sample_shape).float()


def check_orthonormal(basis: torch.Tensor) -> None:
    """`basis` (N, P, *shape): each sample's P directions must be orthonormal, or the vertices are not a
    cross-polytope of radius r."""
    flat = basis.reshape(basis.shape[0], basis.shape[1], -1).double()
    gram = flat @ flat.transpose(1, 2)
    eye = torch.eye(flat.shape[1], dtype=gram.dtype, device=gram.device).expand_as(gram)
    if not torch.allclose(gram, eye, atol=1e-4):
        raise ValueError("local complexity: the explicit directions are not orthonormal (V V^T != I)")


@torch.no_grad()
def local_complexity(model: nn.Module, inputs: torch.Tensor, directions: int = 8, radius: float = 0.01, seed: int = 0,
                     basis: torch.Tensor | None = None, batch_size: int = 256, progress: bool = False) -> LocalComplexity:
    """Local complexity of `model` around each of `inputs` (N, *shape), float pixels as the model takes
    them. Directions: `directions` P random orthonormal ones per sample from `seed` (the same seed gives
    the same directions, so values logged during training are comparable from step to step), or
    `basis` (P, *shape) for every sample or (N, P, *shape) per sample. The vertices x +- r v are not
    clamped to the valid pixel range: the neighbourhood must stay a cross-polytope. `batch_size` bounds
    the vertices per forward pass."""
    if radius <= 0:
        raise ValueError(f"local complexity: radius must be > 0, got {radius}")
    count, sample_shape = inputs.shape[0], tuple(inputs.shape[1:])
    if basis is not None:
        basis = basis.float()
        if basis.shape[1:] == sample_shape:
            basis = basis.unsqueeze(0).expand(count, *basis.shape)
        if basis.shape[0] != count or basis.shape[2:] != sample_shape:
            raise ValueError(f"local complexity: directions of shape {tuple(basis.shape)} do not fit inputs of shape "
                             f"{tuple(inputs.shape)}; expected (P, *sample shape) or (N, P, *sample shape)")
        check_orthonormal(basis)
        directions = basis.shape[1]
    elif directions < 1:
        raise ValueError(f"local complexity: needs at least one direction, got {directions}")
    generator = torch.Generator().manual_seed(seed)
    vertices_per_sample = 2 * directions
    chunk = max(1, batch_size // vertices_per_sample)

    # The hooks see each forward's pre-activations (chunk x 2P vertices) and keep only the per-sample
    # count of neurons whose sign is not the same on all vertices: nothing large is stored.
    counts: dict[str, list[torch.Tensor]] = defaultdict(list)
    neurons: dict[str, int] = {}
    calls = Counter()  # per forward: how often each module ran, to tell apart a module applied twice
    samples_in_chunk = [0]

    def hook_for(name: str):
        def hook(module, args):
            calls[name] += 1
            key = name if calls[name] == 1 else f"{name}#{calls[name]}"
            positive = args[0].detach().reshape(samples_in_chunk[0], vertices_per_sample, -1) > 0
            cut = positive.any(1) & ~positive.all(1)
            counts[key].append(cut.sum(1).cpu())
            neurons[key] = positive.shape[-1]

        return hook

    modes = {module: module.training for module in model.modules()}
    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in nonlinear_layers(model)]
    model.eval()  # BatchNorm uses (and does not update) its running statistics; dropout is off
    try:
        starts = range(0, count, chunk)
        if progress:
            starts = tqdm(starts, desc="local complexity", unit="chunk", disable=None)
        for start in starts:
            x = inputs[start:start + chunk].float()
            n = x.shape[0]
            v = basis[start:start + n] if basis is not None else random_directions(n, directions, sample_shape, generator)
            v = v.to(x.device)
            vertices = x.unsqueeze(1) + radius * torch.cat([v, -v], 1)  # (n, 2P, *shape)
            samples_in_chunk[0] = n
            calls.clear()
            model(vertices.reshape(n * vertices_per_sample, *sample_shape))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training

    per_layer = {name: torch.cat(values).double() for name, values in counts.items()}
    per_sample = torch.stack(list(per_layer.values())).sum(0) if per_layer else torch.zeros(count, dtype=torch.float64)
    return LocalComplexity(layers={name: float(values.mean()) for name, values in per_layer.items()}, neurons=neurons,
                           per_sample=per_sample, directions=directions, radius=radius)


def probe_indices(available: int, samples: int, seed: int) -> np.ndarray:
    """The sorted indices of `samples` images out of `available`, a function of `seed` only: training's
    probe and `cnn.analyze` pick the same images for the same seed."""
    return np.sort(np.random.default_rng(seed).choice(available, size=min(samples, available), replace=False))


class LocalComplexityProbe:
    """Training-time local complexity (diagnostics.local_complexity_*): a fixed seeded set of images of
    `dataset`, measured on demand by `__call__(model)` -> {"lc/total": ..., "lc/<layer>": ...}."""

    def __init__(self, dataset, samples: int, directions: int, radius: float, seed: int, batch_size: int):
        self.indices = probe_indices(len(dataset), samples, seed)
        # Read once, kept on the CPU: the validation set has no augmentation, so these never change.
        self.images = torch.stack([to_unit_float(torch.as_tensor(dataset[int(i)][0])).cpu() for i in self.indices])
        self.directions, self.radius, self.seed, self.batch_size = directions, radius, seed, batch_size

    def __call__(self, model: nn.Module) -> dict[str, float]:
        # DDP and torch.compile wrappers off: hooks and a new batch shape would make a compiled model recompile.
        net = extract_model_from_parallel(model)
        net = getattr(net, "_orig_mod", net)
        device = next(net.parameters()).device
        result = local_complexity(net, self.images.to(device), self.directions, self.radius, self.seed,
                                  batch_size=self.batch_size)
        return result.metrics()
