"""Physics on predicted velocity maps: re-simulate them and compare with the observed seismic
(`seismic_misfit`), and improve them by gradient-based full-waveform inversion (`refine`).

Definitions (per sample; F is `forward_model` with the same simulator options, d the observed
seismic (S, nt, R), norms over all sources, time samples and receivers):

    misfit(v) = ||F(v) - d||_2 / ||d||_2

0 when v explains the data exactly, 1 for a map that predicts no seismic at all. Independent of the
data's amplitude scale, so one number compares samples, families and datasets. Observed seismic
that is all zeros has no scale and is refused.

    TV(v) = mean |x[z+1, x] - x[z, x]| + mean |x[z, x+1] - x[z, x]|,   x = (v - 1500) / 3000

the anisotropic total variation of the map scaled to [0, 1], averaged over the vertical and the
horizontal neighbour pairs (so it does not grow with the map size). On the generated OpenFWI-like
maps (gwi.physics.velocity) the median TV is ~0.005 for the A families, ~0.03 for the B ones and
0.05 for Style_B; white noise of 30 m/s alone adds ~0.02.

`refine` minimises  J(v) = misfit(v) + tv_weight * TV(v)  from the given maps by Adam on x, the
map scaled to [0, 1], and projects x back onto [0, 1] (clamps it) after every step:
- the misfit itself, not its square, is minimised: the value reported is the value optimised,
  and tv_weight keeps one meaning whatever the misfit's size (with Adam the data term's scale
  only matters relative to the TV term);
- Adam in scaled units: `lr` is the first steps' size per cell, 0.005 = 15 m/s, whatever the
  gradient's size, which differs by orders of magnitude between shallow and deep cells and
  between maps (plain gradient descent would need a step size per sample);
- a clamp (projected gradient), not a bounded reparametrisation such as v = 1500 + 3000
  sigmoid(u): network predictions often lie exactly on the bounds (water at 1500 m/s, a clamped
  head), where u is infinite and the sigmoid's gradient zero, so those cells could never move;
  inside the bounds a reparametrisation would also rescale Adam's steps near the bounds. The
  clamp leaves steps inside the bounds untouched and keeps v where the simulator is stable
  (4500 m/s at dt = 1 ms, dx = 10 m is 0.45, below the 0.61 limit);
- `keep_best` (default): the objective of every iterate, the last one included (one more forward,
  without gradient), is tracked per sample, and each sample's best iterate is returned. Adam with
  a fixed step can overshoot or, far from the truth, skip a cycle; then the sample keeps its best
  map, never one worse (in J) than the network's prediction.
Samples are independent: J is summed over the batch, so each map receives only its own gradient
(Adam is elementwise), and `batch_size` only bounds memory. The gradient is the adjoint-state
method's (gwi.physics.adjoint; `gradient="autograd"` differentiates the simulation with torch's
autograd instead, the same gradient to float rounding): the fast forward keeps two fields every
`checkpoint_steps` = K steps (default K ~ sqrt(T), T the time steps), the backward pass recomputes
one block at a time and propagates the residual back in time: ~2 T / K + K + 10 fields per map
instead of ~4 T (autograd: ~2 T / K + ~4 K), one extra forward.

What it buys (measured on simulated data; figures in the README): with a TV weight, refinement
lowers both the misfit and the MAE; without TV the misfit falls as far but the MAE rises: the data
do not pin every cell down, and Adam's per-cell steps add noise where they do not. So lowering the
misfit is no proof of a better map; use a TV weight and check on a labelled folder.

Cost: a misfit is one no-grad forward per map; a refinement step one forward and backward with
checkpointing. On a CPU refine one map at a time: batching multiplies the memory and gains nothing
(the threads already share each map's grid), and the autograd path's many small operations suffer
badly when OpenMP threads compete with other processes for the cores (OMP_NUM_THREADS=1 on a busy
machine). A GPU is the place for it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from gwi.layout import VELOCITY_MAX, VELOCITY_MIN
from gwi.physics.acoustic import DEFAULTS, OPENFWI_SOURCES, forward_model

DEFAULT_LR = 0.005  # Adam's step on the map scaled to [0, 1]: 15 m/s


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def total_variation(velocity: torch.Tensor) -> torch.Tensor:
    """TV (see the module docstring) of (B, nz, nx) or (B, 1, nz, nx) maps in m/s: (B,)."""
    x = (velocity - VELOCITY_MIN) / (VELOCITY_MAX - VELOCITY_MIN)
    vertical = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(dim=1)
    horizontal = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(dim=1)
    return vertical + horizontal


def _as_maps(velocity, name: str = "velocity") -> torch.Tensor:
    """(B, nz, nx) float32 maps from (B, nz, nx) / (B, 1, nz, nx) / (nz, nx) tensors or arrays."""
    v = torch.as_tensor(velocity)
    if v.ndim == 4 and v.shape[1] == 1:
        v = v[:, 0]
    elif v.ndim == 2:
        v = v[None]
    if v.ndim != 3 or 0 in v.shape:
        raise ValueError(f"{name}: expected (B, nz, nx) or (B, 1, nz, nx) maps, got shape {tuple(v.shape)}")
    return v.float()


def _as_observed(observed, maps: torch.Tensor, simulator: dict) -> torch.Tensor:
    """The observed seismic as float32 (B, S, nt, R), checked against what the simulator produces
    for `maps` with these options (before any expensive simulation)."""
    d = torch.as_tensor(observed)
    if d.ndim == 3 and maps.shape[0] == 1:
        d = d[None]
    receivers = simulator.get("receivers")
    expected = (maps.shape[0], len(simulator.get("sources", OPENFWI_SOURCES)), int(simulator.get("nt", DEFAULTS["nt"])),
                maps.shape[2] if receivers is None else len(receivers))
    if tuple(d.shape) != expected:
        raise ValueError(f"observed: shape {tuple(d.shape)}, expected {expected} (maps, sources, time samples, "
                         f"receivers) for {maps.shape[0]} maps of {maps.shape[1]} x {maps.shape[2]} with these simulator options")
    d = d.float()
    norm = torch.linalg.vector_norm(d.flatten(1), dim=1)
    if not torch.isfinite(norm).all():
        raise ValueError(f"observed: samples {_indices(~torch.isfinite(norm))} contain NaN or inf values")
    if (norm == 0).any():
        raise ValueError(f"observed: samples {_indices(norm == 0)} are all zeros; the normalised misfit is undefined")
    return d


def _indices(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def _checkpoint_steps(value, simulator: dict) -> int | None:
    """"auto": about the square root of the time steps T, which roughly minimises the stored fields
    (2 T / K at the blocks' boundaries + ~4 K inside the block being recomputed)."""
    if value == "auto":
        steps = int(simulator.get("nt", DEFAULTS["nt"])) + int(simulator.get("skip_steps", DEFAULTS["skip_steps"]))
        return max(1, math.ceil(math.sqrt(steps)))
    return value


def relative_misfit(simulated: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """(B,) relative L2 misfit, accumulated in float64 (1e5+ values per sample)."""
    residual = torch.linalg.vector_norm((simulated - observed).flatten(1), dim=1, dtype=torch.float64)
    return residual / torch.linalg.vector_norm(observed.flatten(1), dim=1, dtype=torch.float64)


def seismic_misfit(velocity, observed, *, batch_size: int | None = None, device=None, **simulator):
    """||F(v) - d|| / ||d|| per sample (module docstring) of maps `velocity` ((B, nz, nx) or
    (B, 1, nz, nx) m/s) against `observed` (B, S, nt, R); simulator options go to `forward_model`
    (OpenFWI's geometry by default). Simulated `batch_size` maps at a time (default all) on `device`
    (default CUDA when available). Returns (B,) float64 on the maps' device (numpy for numpy)."""
    as_numpy = isinstance(velocity, np.ndarray)
    maps = _as_maps(velocity)
    observed = _as_observed(observed, maps, simulator)
    device = torch.device(device) if device is not None else default_device()
    batch_size = int(batch_size or len(maps))
    out = []
    with torch.no_grad(), torch.autocast(device.type, enabled=False):  # the physics is float32 whatever the caller autocasts
        for start in range(0, len(maps), batch_size):
            chunk = maps[start:start + batch_size].to(device)
            simulated = forward_model(chunk, grad=False, **simulator)
            out.append(relative_misfit(simulated, observed[start:start + batch_size].to(device)).to(maps.device))
    misfit = torch.cat(out)
    return misfit.numpy() if as_numpy else misfit


def refine(velocity, observed, steps: int, *, tv_weight: float = 0.0, lr: float = DEFAULT_LR, keep_best: bool = True,
           batch_size: int | None = None, checkpoint_steps="auto", gradient: str = "adjoint", device=None, progress=False,
           **simulator):
    """`steps` Adam steps of full-waveform inversion from the maps `velocity` ((B, nz, nx) or
    (B, 1, nz, nx), m/s) towards the observed seismic (B, S, nt, R): minimises misfit + tv_weight * TV
    within [1500, 4500] m/s (module docstring). Returns the refined maps, float32, in the input's
    shape and on its device (numpy for numpy).

    batch_size: maps refined together (default all). gradient: "adjoint" (the adjoint-state
    method, gwi.physics.adjoint) or "autograd" (torch records the simulation; the same gradient to
    float rounding, slower, more memory). checkpoint_steps: "auto" (~sqrt(time steps)), an int, or
    None: the fields kept for the backward pass (module docstring). keep_best: return each map's best iterate (module
    docstring), else the last. device: default CUDA when available. progress: True for a bar, or a
    tqdm bar to advance (by maps x steps). Simulator options go to `forward_model`.
    """
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")
    if not tv_weight >= 0:
        raise ValueError(f"tv_weight must be >= 0, got {tv_weight}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    as_numpy = isinstance(velocity, np.ndarray)
    original = torch.as_tensor(velocity)
    maps = _as_maps(velocity)
    observed = _as_observed(observed, maps, simulator)
    device = torch.device(device) if device is not None else default_device()
    batch_size = int(batch_size or len(maps))
    checkpoint_steps = _checkpoint_steps(checkpoint_steps, simulator)
    bar = tqdm(total=len(maps) * int(steps), desc="refine", unit="map-step") if progress is True else progress or None

    refined = []
    with torch.autocast(device.type, enabled=False):  # float32 physics even inside the caller's autocast
        for start in range(0, len(maps), batch_size):
            chunk = _refine_chunk(maps[start:start + batch_size].to(device), observed[start:start + batch_size].to(device),
                                  int(steps), tv_weight, lr, keep_best, checkpoint_steps, gradient, simulator, bar)
            refined.append(chunk.to(maps.device))
    if progress is True:
        bar.close()
    out = torch.cat(refined).reshape(original.shape)
    return out.numpy() if as_numpy else out


def _refine_chunk(maps, observed, steps, tv_weight, lr, keep_best, checkpoint_steps, gradient, simulator, bar) -> torch.Tensor:
    start = maps.clamp(VELOCITY_MIN, VELOCITY_MAX)  # the projection holds from the first iterate on
    if steps == 0:
        return start
    x = ((start - VELOCITY_MIN) / (VELOCITY_MAX - VELOCITY_MIN)).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    best, best_objective = start.clone(), torch.full((len(x),), math.inf, dtype=torch.float64, device=x.device)
    # Objective of iterates 0..steps-1 with the gradient, then of the last one without (keep_best
    # only). Gradients are on whatever the caller's mode (infer.py predicts under no_grad).
    for step in range(steps + 1 if keep_best else steps):
        last = step == steps
        with torch.set_grad_enabled(not last):
            velocity = VELOCITY_MIN + (VELOCITY_MAX - VELOCITY_MIN) * x
            simulated = forward_model(velocity, grad=not last, checkpoint_steps=None if last else checkpoint_steps,
                                      gradient=gradient, **simulator)
            objective = relative_misfit(simulated, observed)
            if tv_weight:
                objective = objective + tv_weight * total_variation(velocity)
            if not last:
                optimizer.zero_grad(set_to_none=True)
                objective.sum().backward()  # a sum: each map gets its own objective's gradient
        with torch.no_grad():
            better = objective < best_objective
            if step > 0:  # iterate 0 is the start itself (kept exactly, not (v - 1500) / 3000 * 3000 + 1500)
                best[better] = velocity[better]
            best_objective = torch.where(better, objective, best_objective)
            if last:
                break
            optimizer.step()
            x.clamp_(0, 1)  # projected gradient: see the module docstring
        if bar is not None:
            bar.update(len(x))
    return best if keep_best else (VELOCITY_MIN + (VELOCITY_MAX - VELOCITY_MIN) * x).detach()
