"""gwi.physics.adjoint: the adjoint-state gradient of the forward model against the autograd path's
and against finite differences, its checkpoints' memory, and on CUDA when there is one.

Small grids and short runs (a few seconds in all on one thread)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gwi.physics import acoustic
from gwi.physics.acoustic import forward_model
from test_physics import smooth_random_map

pytestmark = pytest.mark.usefixtures("one_thread")


def gradient(v: torch.Tensor, weights: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(seismic, d/dv of sum(weights * seismic)) with the given forward_model options."""
    x = v.clone().requires_grad_(True)
    seismic = forward_model(x, **kw)
    (seismic.double() * weights).sum().backward()
    return seismic.detach(), x.grad


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_float64_gradient_equals_autograd_and_finite_differences():
    """float64, 8 x 9 map, 2 sources, 40 steps with one skipped, the flush on: the adjoint's gradient
    equals autograd's to rounding, with and without checkpoints (the same bits either way: the
    recomputation is exact), and central differences per cell and along a random direction."""
    rng = np.random.default_rng(3)
    v = torch.tensor(smooth_random_map(rng, 8, 9, 1900, 2600, smooth=1)[None])
    weights = torch.tensor(rng.standard_normal((1, 2, 40, 9)))
    kw = dict(nbc=4, nt=40, freq=25.0, sources=[(1, 1), (7, 2)], dtype=torch.float64)
    _, reference = gradient(v, weights, gradient="autograd", **kw)
    seismic, adjoint = gradient(v, weights, gradient="adjoint", **kw)
    _, checkpointed = gradient(v, weights, gradient="adjoint", checkpoint_steps=7, **kw)
    assert torch.equal(seismic, forward_model(v, **kw))
    assert relative(adjoint, reference) < 1e-12
    assert torch.equal(checkpointed, adjoint)
    # A flush that matters (0.3 of fields of ~1, not 1e-30; a weak noise wavelet, so that the cells the
    # sources are injected into are flushed at times): its mask enters the gradient.
    flush = dict(kw, flush_below=0.3, wavelet=0.1 * rng.standard_normal(30))
    _, reference = gradient(v, weights, gradient="autograd", **flush)
    _, flushed = gradient(v, weights, gradient="adjoint", checkpoint_steps=7, **flush)
    assert relative(flushed, reference) < 1e-12

    def loss(vel):
        return float((forward_model(vel, **kw) * weights).sum())

    h = 1e-2
    argmin = np.unravel_index(int(v.argmin()), v.shape)  # vmin sets the damping: its cell has an extra term
    for cell in [(0, 1, 1), (0, 0, 4), (0, 5, 7), argmin]:
        e = torch.zeros_like(v)
        e[cell] = h
        fd = (loss(v + e) - loss(v - e)) / (2 * h)
        assert abs(fd - float(adjoint[cell])) <= 1e-6 * abs(fd) + 1e-12, cell
    direction = torch.tensor(rng.standard_normal(v.shape))
    fd = (loss(v + h * direction) - loss(v - h * direction)) / (2 * h)
    assert abs(fd - float((adjoint * direction).sum())) <= 1e-6 * abs(fd)


@pytest.mark.parametrize("checkpoint_steps, backend", [(None, "auto"), (50, "auto"), (50, "torch")])
def test_float32_gradient_equals_autograd(checkpoint_steps, backend):
    """float32, the C kernels (or the torch ops) forward, recomputation and sweep, both exact skips, waves wrapping around a
    small grid, sources inside the map, receivers on a sparse line: the records are the no-grad
    path's bits; the gradient is as close to the float64 gradient as autograd's own: both are
    1.6e-5 off it (the float32 noise of 300 steps; 1.2e-5 at 120), so they agree to ~2e-5, not to
    1e-5 (float64 agrees to 1e-12, above)."""
    rng = np.random.default_rng(4)
    maps = np.stack([smooth_random_map(rng, 30, 32), smooth_random_map(rng, 30, 32, 1500, 4400)])
    v = torch.tensor(maps, dtype=torch.float32).double()
    kw = dict(nbc=8, nt=300, sources=[(0, 1), (20, 3)], receivers=[(x, 2) for x in range(0, 32, 3)], skip_steps=2)
    weights = torch.tensor(rng.standard_normal((2, 2, 300, 11)))
    _, reference = gradient(v, weights, gradient="autograd", **kw)
    seismic, adjoint = gradient(v, weights, gradient="adjoint", checkpoint_steps=checkpoint_steps, backend=backend, **kw)
    assert seismic.dtype == torch.float32 and torch.equal(seismic, forward_model(v, **kw))
    _, exact = gradient(v, weights, gradient="autograd", dtype=torch.float64, **kw)
    assert relative(adjoint, reference) < 3e-5
    assert relative(adjoint, exact) < 1.5 * relative(reference, exact)


def test_c_sweep_with_a_flush_that_matters_and_threads(monkeypatch):
    """float32 on the CPU: the C sweep in several threads' row bands, with a flush that zeroes many
    cells (their mask enters the gradient), equals autograd's gradient to float32 rounding."""
    if not acoustic._ckernel.available():
        pytest.skip(f"C kernel unavailable: {acoustic._ckernel.unavailable_reason()}")
    monkeypatch.setattr(acoustic._ckernel, "MIN_CELLS_PER_THREAD", 50)
    rng = np.random.default_rng(8)
    v = torch.tensor(smooth_random_map(rng, 8, 9, 1900, 2600, smooth=1)[None], dtype=torch.float32).double()
    weights = torch.tensor(rng.standard_normal((1, 2, 40, 9)))
    kw = dict(nbc=4, nt=40, sources=[(1, 1), (7, 2)], flush_below=0.3, wavelet=0.1 * rng.standard_normal(30), threads=3)
    _, reference = gradient(v, weights, gradient="autograd", **kw)
    _, adjoint = gradient(v, weights, gradient="adjoint", checkpoint_steps=7, **kw)
    assert relative(adjoint, reference) < 1e-5


def test_checkpoints_bound_the_stored_fields():
    """What the forward keeps for the backward: the coefficients and 2 fields every K steps, i.e.
    2 (ceil(T / K) - 1) fields of (B, S, H, W); the autograd path keeps several per step."""
    B, S, nz, nx, nbc, nt = 2, 2, 12, 12, 4, 99
    v = torch.full((B, nz, nx), 2000.0, requires_grad=True)
    field = B * S * (nz + 2 * nbc) * (nx + 2 * nbc)

    def stored_fields(**kw) -> int:
        saved = []

        def pack(t):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward_model(v, nbc=nbc, nt=nt, sources=[(2, 1), (9, 1)], skip_steps=1, **kw)
        return sum(n == field for n in saved)

    K = 10  # 100 steps: checkpoints after steps 10, 20, ..., 90
    assert stored_fields(gradient="adjoint", checkpoint_steps=K) == 2 * (math.ceil((nt + 1) / K) - 1) == 18
    assert stored_fields(gradient="adjoint") == 0
    assert stored_fields(gradient="autograd") > 2 * (nt + 1)


def test_bad_gradient_option_is_refused():
    with pytest.raises(ValueError, match="gradient must be autograd or adjoint, got 'backprop'"):
        forward_model(np.full((1, 8, 8), 2000.0), nt=5, sources=[(1, 1)], gradient="backprop")


@pytest.mark.gpu
def test_cuda_adjoint_equals_autograd():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(6)
    v = torch.tensor(np.stack([smooth_random_map(rng, 70, 70) for _ in range(2)]), dtype=torch.float32).double().cuda()
    weights = torch.tensor(rng.standard_normal((2, 5, 200, 70))).cuda()
    _, reference = gradient(v, weights, nt=200, gradient="autograd", checkpoint_steps=25)
    _, adjoint = gradient(v, weights, nt=200, gradient="adjoint", checkpoint_steps=25)
    assert relative(adjoint, reference) < 3e-5  # float32 noise, as on the CPU
