"""gwi.physics: the OpenFWI acoustic forward model checked against things it cannot fake (a direct
transcription of the published loop, the analytic 2-D Green's function, symmetry, reciprocity,
energy absorption, refraction traveltimes, deepwave, finite-difference gradients), the exactness of
its fast path, the velocity-map generators, and the synthetic-data command.

Small grids and short runs throughout (nbc, nt and the map size are all overridable), so the file
runs in well under a minute on 2 cores."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gwi.physics import acoustic
from gwi.physics.acoustic import forward_model, ricker
from gwi.physics import velocity as vmaps
from gwi.physics.synth import main as synth_main

ROOT = Path(__file__).resolve().parent.parent
DX, DT = 10.0, 1e-3


def smooth_random_map(rng, nz, nx, low=1800.0, high=3200.0, smooth=3):
    """A heterogeneous map: box-filtered noise scaled to [low, high], plus a depth gradient."""
    noise = rng.standard_normal((nz + 2 * smooth, nx + 2 * smooth))
    k = np.ones(2 * smooth + 1) / (2 * smooth + 1)
    noise = np.apply_along_axis(np.convolve, 0, noise, k, "valid")
    noise = np.apply_along_axis(np.convolve, 1, noise, k, "valid")
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return low + (high - low) * (0.6 * noise + 0.4 * np.linspace(0, 1, nz)[:, None])


def published_loop(v, nbc, steps, wavelet, source, receivers, dx=DX, dt=DT):
    """The published update, transcribed literally in float64 numpy (np.roll = circshift, loops for
    the damping as in AbcCoef2D). Returns the receivers' p after each step 1..steps: (steps, R)."""
    nz, nx = v.shape
    vp = np.pad(v.astype(np.float64), nbc, mode="edge")
    a = (nbc - 1) * dx
    kappa = 3.0 * v.min() * np.log(1e7) / (2.0 * a)
    damp1d = kappa * ((np.arange(nbc) * dx / a) ** 2)
    damp = np.zeros(vp.shape)
    for iz in range(vp.shape[0]):
        damp[iz, :nbc] = damp1d[::-1]
        damp[iz, nx + nbc:] = damp1d
    for ix in range(nbc, nbc + nx):
        damp[:nbc, ix] = damp1d[::-1]
        damp[nz + nbc:, ix] = damp1d
    alpha, kd = (vp * dt / dx) ** 2, damp * dt
    s = np.zeros(steps)
    s[:min(len(wavelet), steps)] = wavelet[:steps]
    sz, sx = source[1] + nbc, source[0] + nbc
    p0, p1 = np.zeros(vp.shape), np.zeros(vp.shape)
    out = np.zeros((steps, len(receivers)))
    for it in range(steps):
        lap = 4 / 3 * (np.roll(p1, 1, 0) + np.roll(p1, -1, 0) + np.roll(p1, 1, 1) + np.roll(p1, -1, 1)) \
            - 1 / 12 * (np.roll(p1, 2, 0) + np.roll(p1, -2, 0) + np.roll(p1, 2, 1) + np.roll(p1, -2, 1))
        p = (2 - 5 * alpha - kd) * p1 - (1 - kd) * p0 + alpha * lap
        p[sz, sx] += s[it] * (vp[sz, sx] * dt) ** 2
        out[it] = [p[z + nbc, x + nbc] for x, z in receivers]
        p0, p1 = p1, p
    return out


def port_loop(vel, nbc, steps, wavelet, sources, rec_depth, dx=DX, dt=DT):
    """The time indexing of the public OpenFWI port of the Kaggle 3rd-place team
    (tascj/kaggle-waveform-inversion, fwi_modules/forward_modeling.py + generate_data.py),
    transcribed in float64 torch: the wavelet array starts with a dummy zero (w[0] = 0, w[1:] the
    Ricker), the loop runs `steps` steps (1001 there) it = 0..steps-1, each computing the update,
    adding w[it] (v_src dt)^2 at every source, then recording the receiver row; the generator saves
    seis[:, 1:]. All sources at once, conv2d on the circularly padded field as the port does.
    vel (B, nz, nx) -> saved (B, S, steps - 1, nx)."""
    B, nz, nx = vel.shape
    v = F.pad(torch.as_tensor(vel, dtype=torch.float64)[:, None], (nbc,) * 4, mode="replicate")[:, 0]
    a = (nbc - 1) * dx
    kappa = 3.0 * v.amin((1, 2)) * np.log(1e7) / (2.0 * a)
    ramp = kappa[:, None] * (torch.arange(nbc, dtype=torch.float64) * dx / a) ** 2
    damp = torch.zeros_like(v)
    damp[:, :, :nbc], damp[:, :, nbc + nx:] = ramp.flip(1)[:, None], ramp[:, None]
    damp[:, :nbc, nbc:nbc + nx], damp[:, nbc + nz:, nbc:nbc + nx] = ramp.flip(1)[:, :, None], ramp[:, :, None]
    alpha, kd = (v * dt / dx) ** 2, damp * dt
    temp1, temp2 = (2 - 5 * alpha - kd)[:, None], (1 - kd)[:, None]
    kernel = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    kernel[0, 0, 2, [1, 3]] = kernel[0, 0, [1, 3], 2] = 4 / 3
    kernel[0, 0, 2, [0, 4]] = kernel[0, 0, [0, 4], 2] = -1 / 12
    w = torch.zeros(steps, dtype=torch.float64)
    w[1:1 + len(wavelet)] = torch.as_tensor(wavelet[:steps - 1])  # the dummy leading zero
    S = len(sources)
    sx = torch.tensor([x for x, _ in sources]) + nbc
    sz = torch.tensor([z for _, z in sources]) + nbc
    beta = (v[:, sz, sx] * dt) ** 2  # (B, S)
    p0 = torch.zeros(B, S, *v.shape[1:], dtype=torch.float64)
    p1 = torch.zeros_like(p0)
    seis = torch.zeros(B, S, steps, nx, dtype=torch.float64)
    for it in range(steps):
        lap = F.conv2d(F.pad(p1.reshape(B * S, 1, *v.shape[1:]), (2,) * 4, mode="circular"), kernel).reshape(p1.shape)
        p = temp1 * p1 - temp2 * p0 + alpha[:, None] * lap
        p[:, torch.arange(S), sz, sx] += beta * w[it]
        seis[:, :, it] = p[:, :, rec_depth + nbc, nbc:nbc + nx]
        p0, p1 = p1, p
    return seis[:, :, 1:]


# ---- the scheme itself ----------------------------------------------------------------------------------


def test_openfwi_defaults_and_wavelet():
    w = ricker(15.0, 1e-3)
    assert len(w) == 147 and np.argmax(w) == 73 and w[73] == 1.0  # int(2.2/15/1e-3)=146 made odd, peak centred
    seis = forward_model(np.full((2, 1, 70, 70), 2000.0, np.float32), nt=30)
    assert seis.shape == (2, 5, 30, 70) and seis.dtype == np.float32  # numpy in, numpy out


def test_matches_the_published_loop():
    """Every convention at once (damping profile and corners, circular stencil, source scaling,
    which steps are recorded) against a literal float64 transcription, on a grid small enough that
    the waves wrap around its edges within the run."""
    rng = np.random.default_rng(0)
    v = smooth_random_map(rng, 14, 18)
    nbc, nt, src = 6, 150, (3, 1)
    receivers = [(x, 1) for x in range(18)] + [(9, 13)]
    ref = published_loop(v, nbc, nt + 1, ricker(25.0, DT), src, receivers)
    for dtype, tol in ((torch.float64, 1e-11), (torch.float32, 2e-5)):
        for skip in (0, 1):
            ours = forward_model(torch.tensor(v[None]), nbc=nbc, nt=nt, freq=25.0, sources=[src], receivers=receivers,
                                 skip_steps=skip, dtype=dtype)[0, 0].double().numpy()
            np.testing.assert_allclose(ours, ref[skip:skip + nt], rtol=0, atol=tol * np.abs(ref).max())


def test_default_time_axis_is_the_ports():
    """Our sample t is the public port's saved sample t (dummy leading zero in its wavelet, steps
    + 1 steps, seis[:, 1:] saved), in float64 to rounding and in float32 to float32 rounding;
    skip_steps=1, the old default, is one sample later: ours[t] = the port's [t + 1]."""
    rng = np.random.default_rng(7)
    v = np.stack([smooth_random_map(rng, 10, 12), smooth_random_map(rng, 10, 12, 1500, 4400)])
    nbc, nt, sources = 5, 60, [(0, 1), (5, 1), (11, 1)]
    port = port_loop(v, nbc, nt + 2, ricker(25.0, DT), sources, rec_depth=1).numpy()  # (B, S, nt + 1, R)
    scale = np.abs(port).max()
    kw = dict(nbc=nbc, nt=nt, freq=25.0, sources=sources)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        ours = forward_model(torch.tensor(v), dtype=dtype, **kw).double().numpy()
        np.testing.assert_allclose(ours, port[:, :, :nt], rtol=0, atol=tol * scale)
        old = forward_model(torch.tensor(v), dtype=dtype, skip_steps=1, **kw).double().numpy()
        np.testing.assert_allclose(old, port[:, :, 1:], rtol=0, atol=tol * scale)
        assert np.abs(old - port[:, :, :nt]).max() > 0.05 * scale  # the two alignments differ visibly


def test_homogeneous_medium_matches_analytic_greens_function():
    """Direct wave in a homogeneous medium against the exact 2-D solution. The update adds
    s(t) (v dt)^2 at one cell, i.e. p_tt = v^2 lap p + v^2 dx^2 s(t) delta(x); with the 2-D Green's
    function G = H(vt - r) / (2 pi v sqrt(v^2 t^2 - r^2)) and tau = (r/v) cosh(u):
        p(r, t) = dx^2 / (2 pi) * integral_0^acosh(vt/r) s(t - (r/v) cosh u) du.
    Sample k (skip_steps=0) is the field after step k+1, time (k+1) dt; wavelet sample j acts at
    j dt. Tolerance: at 15 Hz and v = 2000 m/s there are 13 cells per wavelength; the 4th-order
    stencil's phase-velocity error there is ~(k dx)^4 / 180 ~ 3e-4 and the 2nd-order time step's
    ~(w dt)^2 / 24 ~ 4e-4 (about 2 % at the wavelet's 40 Hz upper end), so over 8-24 cells the
    waveform should differ by well under 2 % (measured 0.3-0.8 %, growing with distance), with no
    shift: a 1 ms error alone would make a ~9 % difference."""
    v0, n, c, offsets, nt = 2000.0, 81, 40, (8, 16, 24), 320
    seis = forward_model(np.full((1, n, n), v0), dtype=torch.float64, nbc=30, nt=nt, skip_steps=0,
                         sources=[(c, c)], receivers=[(c + d, c) for d in offsets])[0, 0]
    t = (np.arange(nt) + 1) * DT
    t0, f = 73 * DT, 15.0

    def source(tt):
        a = (np.pi * f * (tt - t0)) ** 2
        return np.where(np.abs(tt - t0) <= t0, (1 - 2 * a) * np.exp(-a), 0.0)

    u01 = np.linspace(0, 1, 4001)
    for j, d in enumerate(offsets):
        r = d * DX
        exact = np.zeros(nt)
        for i, ti in enumerate(t):
            if v0 * ti > r:
                u = u01 * np.arccosh(v0 * ti / r)
                exact[i] = DX * DX / (2 * np.pi) * np.trapezoid(source(ti - r / v0 * np.cosh(u)), u)
        window = t < r / v0 + 2 * t0 + 0.03  # the whole direct pulse, long before any boundary echo
        sim, ana = seis[window, j], exact[window]
        lag = np.argmax(np.correlate(sim, ana, "full")) - (len(ana) - 1)
        assert lag == 0, (d, lag)
        assert abs(np.abs(sim).max() / np.abs(ana).max() - 1) < 0.02, d
        assert np.linalg.norm(sim - ana) / np.linalg.norm(ana) < 0.02, d


def test_mirror_symmetry():
    """Mirroring the map's columns swaps the mirror-image sources (x = 0 and 69) and reverses the
    receivers. Not bit-exact: the mirrored stencil adds left and right neighbours in the other order."""
    rng = np.random.default_rng(1)
    v = smooth_random_map(rng, 70, 70)
    kw = dict(nbc=10, nt=300, sources=[(0, 1), (69, 1), (17, 1), (52, 1)])
    both = forward_model(torch.tensor(np.stack([v, v[:, ::-1].copy()])), **kw)
    seis, mirrored = both[0], both[1]
    expected = mirrored[[1, 0, 3, 2]].flip(-1)
    assert torch.allclose(seis, expected, rtol=0, atol=1e-5 * float(seis.abs().max()))
    assert not torch.allclose(seis, seis[[1, 0, 3, 2]].flip(-1), atol=1e-2 * float(seis.abs().max()))  # not trivially symmetric


def test_source_receiver_reciprocity():
    """(1/v^2) p_tt - lap p is symmetric, and the damped, discretised version keeps that: the
    recurrence in q = p / v has symmetric matrices, and the source enters as v^2 s. So the trace at
    B from a source at A equals the trace at A from a source at B, on any model, to rounding."""
    rng = np.random.default_rng(2)
    v = torch.tensor(smooth_random_map(rng, 40, 40, 1600, 3400)[None])
    a, b = (4, 1), (31, 27)
    kw = dict(nbc=15, nt=500, dtype=torch.float64)
    ab = forward_model(v, sources=[a], receivers=[b], **kw)[0, 0, :, 0]
    ba = forward_model(v, sources=[b], receivers=[a], **kw)[0, 0, :, 0]
    assert ab.abs().max() > 1e-3
    assert torch.allclose(ab, ba, rtol=0, atol=1e-9 * float(ab.abs().max()))


def _model_energy(monkeypatch=None):
    n = 40
    cells = [(x, z) for z in range(n) for x in range(n)]  # a receiver in every cell: the whole field
    p = forward_model(torch.full((1, n, n), 2000.0), nbc=40, nt=2000, skip_steps=0, sources=[(20, 20)], receivers=cells,
                      dtype=torch.float64)[0, 0]
    return (p ** 2).sum(dim=1)  # energy proxy per time step over the map


def test_damping_layer_absorbs_the_wave(monkeypatch):
    """In a 40 x 40 homogeneous map padded by 40 cells the wave leaves the map within ~0.3 s; the
    stencil wraps around the grid's edges, so without damping it would come back forever. After
    2 s the field left in the map is a tiny fraction of its peak; with the damping switched off
    (control) it is not."""
    energy = _model_energy()
    peak = float(energy.max())
    assert float(energy[1200:].max()) < 1e-4 * peak
    monkeypatch.setattr(acoustic, "damping_profile", lambda nz, nx, nbc, dx: np.zeros((nz + 2 * nbc, nx + 2 * nbc)))
    undamped = _model_energy()
    assert float(undamped[1200:].max()) > 1e-2 * float(undamped.max())


# ---- traveltimes: deepwave and refraction theory -------------------------------------------------------------


TWO_LAYER = dict(v1=1500.0, v2=3000.0, nz=40, nx=161, top_of_layer2=13, sx=80, nt=600)


def _two_layer():
    g = TWO_LAYER
    vel = np.full((g["nz"], g["nx"]), g["v1"], np.float32)
    vel[g["top_of_layer2"]:] = g["v2"]
    seis = forward_model(vel[None], nbc=60, nt=g["nt"], skip_steps=0, sources=[(g["sx"], 1)],
                         receivers=[(x, 1) for x in range(g["nx"])])[0, 0]
    return vel, seis


def first_breaks(traces: np.ndarray, frac: float = 0.02) -> np.ndarray:
    """Index of the first sample whose magnitude exceeds `frac` of its trace's maximum."""
    env = np.abs(traces)
    return np.argmax(env > frac * env.max(axis=0), axis=0)


def test_first_arrivals_agree_with_deepwave():
    """deepwave (PML, sub-stepping, its own source convention) on the same two-layer model: first
    breaks within 3 ms at every offset >= 50 m, and before any boundary effect the whole
    waveform agrees within a few percent (deepwave's sample i is time i dt, ours (i+1) dt, and its
    sign is opposite)."""
    deepwave = pytest.importorskip("deepwave")
    g = TWO_LAYER
    vel, ours = _two_layer()
    wavelet = torch.zeros(1, 1, g["nt"])
    wavelet[0, 0, :147] = torch.from_numpy(ricker(15.0, DT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = deepwave.scalar(torch.from_numpy(vel), DX, DT, source_amplitudes=wavelet,
                              source_locations=torch.tensor([[[1, g["sx"]]]]),
                              receiver_locations=torch.tensor([[[1, x] for x in range(g["nx"])]]),
                              accuracy=4, pml_width=30, pml_freq=15.0)[-1][0].T.numpy()
    offset = np.abs(np.arange(g["nx"]) - g["sx"]) * DX
    ours_t = (first_breaks(ours) + 1) * DT
    theirs_t = first_breaks(out) * DT
    far = offset >= 50
    assert np.abs(ours_t[far] - theirs_t[far]).max() <= 0.003 + 1e-9
    a, b = ours[10:-10], -out[11:-9]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05


def test_first_arrivals_follow_refraction_theory():
    """Two layers (1500 over 3000 m/s): near the source the first arrival is the direct wave
    (moveout 1/v1), beyond the crossover distance x_c = 2 h sqrt((v2 + v1) / (v2 - v1)) it is the
    head wave (moveout 1/v2), which comes in before the direct wave would. Picks are first breaks
    at 2 % of each trace's peak: a roughly constant delay after the true onset for one kind of wave,
    hence the slopes are compared (1 % for the direct wave, 5 % for the weaker head wave, whose
    pick delay changes with offset as its amplitude does)."""
    g = TWO_LAYER
    _, seis = _two_layer()
    offset = np.abs(np.arange(g["nx"]) - g["sx"]) * DX
    picks = (first_breaks(seis) + 1) * DT
    h = (g["top_of_layer2"] - 0.5 - 1) * DX  # interface between cells, below the source row
    v1, v2 = g["v1"], g["v2"]
    crossover = 2 * h * np.sqrt((v2 + v1) / (v2 - v1))
    near = (offset >= 50) & (offset <= crossover - 100)
    far = offset >= crossover + 150
    slope_near, delay = np.polyfit(offset[near], picks[near], 1)
    slope_far, _ = np.polyfit(offset[far], picks[far], 1)
    assert abs(1 / slope_near / v1 - 1) < 0.01
    assert abs(1 / slope_far / v2 - 1) < 0.05
    direct = offset / v1 + delay
    assert np.all(picks[offset >= crossover + 300] < direct[offset >= crossover + 300] - 0.05)


# ---- gradients and the two paths -------------------------------------------------------------------------------


def test_gradient_matches_finite_differences():
    """float64, tiny problem: autograd's gradient of a random linear functional of the data against
    central differences, per cell and along a random direction, with and without checkpointing."""
    rng = np.random.default_rng(3)
    v = torch.tensor(smooth_random_map(rng, 8, 9, 1900, 2600, smooth=1)[None])
    weights = torch.tensor(rng.standard_normal((1, 2, 40, 9)))
    kw = dict(nbc=4, nt=40, freq=25.0, sources=[(1, 1), (7, 2)], dtype=torch.float64)

    def loss(vel, **extra):
        return (forward_model(vel, **kw, **extra) * weights).sum()

    grads = []
    for extra in ({}, {"checkpoint_steps": 7}):
        x = v.clone().requires_grad_(True)
        loss(x, **extra).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)
    grad = grads[0]
    h = 1e-2
    with torch.no_grad():
        argmin = np.unravel_index(int(v.argmin()), v.shape)
        for cell in [(0, 1, 1), (0, 0, 4), (0, 5, 7), argmin]:
            e = torch.zeros_like(v)
            e[cell] = h
            fd = (loss(v + e) - loss(v - e)) / (2 * h)
            assert abs(float(fd) - float(grad[cell])) <= 1e-6 * abs(float(fd)) + 1e-12, cell
        direction = torch.tensor(rng.standard_normal(v.shape))
        fd = (loss(v + h * direction) - loss(v - h * direction)) / (2 * h)
        assert abs(float(fd) - float((grad * direction).sum())) <= 1e-6 * abs(float(fd))


def test_fast_path_equals_autograd_path():
    """float32: the no-grad fast path (in place, skipping) returns bit-identical numbers to the
    autograd path (out of place, whole grid), here with waves wrapping around a small grid."""
    rng = np.random.default_rng(4)
    v = torch.tensor(np.stack([smooth_random_map(rng, 30, 32), smooth_random_map(rng, 30, 32, 1500, 4400)]),
                     dtype=torch.float32)
    kw = dict(nbc=8, nt=300, sources=[(0, 1), (20, 3)])
    fast = forward_model(v, **kw)
    assert torch.equal(fast, forward_model(v, backend="torch", **kw))
    slow = forward_model(v.clone().requires_grad_(True), **kw)
    assert slow.requires_grad
    assert torch.equal(fast, slow.detach())
    checkpointed = forward_model(v.clone().requires_grad_(True), checkpoint_steps=50, **kw)
    assert torch.equal(fast, checkpointed.detach())


def _backends():
    return ["torch", "c"] if acoustic._ckernel.available() else ["torch"]


@pytest.mark.parametrize("backend", ["torch", "c"])
@pytest.mark.parametrize("batch_size, tighten_every", [(None, 1), (None, 4), (1, 4), (None, 0)])
def test_skipping_is_exact(backend, batch_size, tighten_every, monkeypatch):
    """The fast path's forward / backward skipping gives the same bits as updating the whole grid,
    including when the field wraps around the edges, for any batching, with either backend; and
    the C kernel gives the same bits as the torch ops."""
    if backend not in _backends():
        pytest.skip(f"C kernel unavailable: {acoustic._ckernel.unavailable_reason()}")
    monkeypatch.setattr(acoustic._ckernel, "MIN_CELLS_PER_THREAD", 100)  # several threads even on this small grid
    rng = np.random.default_rng(5)
    v = torch.tensor(np.stack([smooth_random_map(rng, 40, 40, 1500, 2000), smooth_random_map(rng, 40, 40, 2500, 4500)]),
                     dtype=torch.float32)
    kw = dict(nbc=12, nt=400, sources=[(3, 1), (35, 30)], receivers=[(x, 2) for x in range(0, 40, 3)])
    full = forward_model(v, skip_zeros=False, backend="torch", **kw)
    skipped = forward_model(v, skip_zeros=True, tighten_every=tighten_every, batch_size=batch_size, backend=backend,
                            threads=2, **kw)
    assert torch.equal(full, skipped)


def test_c_kernel_equals_torch_at_openfwi_size():
    """Full OpenFWI geometry (310 x 310 padded grid, several threads' row bands), a few hundred steps."""
    if "c" not in _backends():
        pytest.skip(f"C kernel unavailable: {acoustic._ckernel.unavailable_reason()}")
    maps = torch.from_numpy(vmaps.generate("CurveFault_B", 1, 0))
    c = forward_model(maps, nt=100, backend="c", threads=3)
    t = forward_model(maps, nt=100, backend="torch", skip_zeros=False)
    assert torch.equal(c, t)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(6)
    v = torch.tensor(np.stack([smooth_random_map(rng, 70, 70) for _ in range(2)]), dtype=torch.float32)
    cpu = forward_model(v, nt=300)
    gpu = forward_model(v.cuda(), nt=300)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5 * float(cpu.abs().max()))
    x = v.cuda().requires_grad_(True)
    forward_model(x, nt=100, checkpoint_steps=25).square().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(vel=np.zeros((2, 3, 8, 8))), "expected (B, nz, nx)"),
    (dict(vel=np.full((1, 8, 8), -1.0)), "finite and positive"),
    (dict(vel=np.full((1, 8, 8), 7000.0)), "unstable"),
    (dict(vel=np.full((1, 8, 8), 2000.0), sources=[(8, 1)]), "sources: cells must lie"),
    (dict(vel=np.full((1, 8, 8), 2000.0), sources=[(1, 1)], receivers=[(1.5, 1)]), "receivers: cells must be integers"),
    (dict(vel=np.full((1, 8, 8), 2000.0), nbc=1), "nbc"),
])
def test_bad_input_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        forward_model(kwargs.pop("vel"), nt=5, **kwargs)


# ---- velocity maps ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", vmaps.FAMILIES)
def test_velocity_families(family):
    maps = vmaps.generate(family, 16, 0)
    assert maps.shape == (16, 1, 70, 70) and maps.dtype == np.float32
    assert maps.min() >= 1500 and maps.max() <= 4500
    assert np.array_equal(maps, vmaps.generate(family, 16, 0))
    assert not np.array_equal(maps, vmaps.generate(family, 16, 1))
    assert len({m.tobytes() for m in maps}) == 16  # all different
    if family.startswith("Flat") and "Fault" not in family:
        assert np.all(maps == maps[..., :1])  # flat layers: constant along x
    if family.startswith("Style"):
        assert np.abs(np.diff(maps, axis=-1)).mean() < 150  # smooth


def test_augmentations_stay_in_range_and_are_seeded():
    base = vmaps.generate("CurveFault_B", 8, 0)
    other = vmaps.generate("Style_A", 8, 0)
    for fn in (vmaps.random_affine, vmaps.crop_resize, vmaps.augment):
        out = fn(base, 1)
        assert out.shape == base.shape and out.dtype == np.float32
        assert out.min() >= 1500 and out.max() <= 4500
        assert np.array_equal(out, fn(base, 1)) and not np.array_equal(out, base)
    mixed = vmaps.blend(base, other, 2)
    alpha = (mixed - other) / np.where(base == other, np.nan, base - other)
    per_map = np.nanmedian(alpha.reshape(8, -1), axis=1)
    assert np.all((per_map >= 0.3 - 1e-3) & (per_map <= 0.7 + 1e-3))
    assert torch.is_tensor(vmaps.crop_resize(torch.from_numpy(base), 0))  # torch in, torch out


def test_plot_families(tmp_path):
    path = vmaps.plot_families(tmp_path / "f.png", per_family=2)
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"


def test_families_png_is_in_place():
    assert (ROOT / "gwi" / "physics" / "families.png").stat().st_size > 10_000


# ---- synthetic data command -------------------------------------------------------------------------------------


def _synth(*args):
    return subprocess.run([sys.executable, "-m", "gwi.physics.synth", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_synth_layout_resume_and_determinism(tmp_path, capsys):
    out = tmp_path / "synth"
    args = ["--family", "FlatFault_B", "--n", "5", "--per-file", "2", "--nt", "12", "--seed", "3", "--out", out]
    assert synth_main(list(map(str, args))) == 0
    fam = out / "FlatFault_B"
    data = [np.load(fam / "data" / f"data{k}.npy") for k in (1, 2, 3)]
    model = [np.load(fam / "model" / f"model{k}.npy") for k in (1, 2, 3)]
    assert [d.shape for d in data] == [(2, 5, 12, 70), (2, 5, 12, 70), (1, 5, 12, 70)]
    assert [m.shape for m in model] == [(2, 1, 70, 70), (2, 1, 70, 70), (1, 1, 70, 70)]
    assert all(d.dtype == np.float32 for d in data) and np.abs(data[0]).max() > 0
    assert not list(out.rglob("*.tmp"))
    # The data are the forward model of the maps.
    np.testing.assert_array_equal(data[1], forward_model(model[1], nt=12))
    # Resume: only the missing shard is simulated, finished ones are left alone.
    (fam / "data" / "data2.npy").unlink()
    before = (fam / "data" / "data1.npy").stat().st_mtime_ns
    assert synth_main(list(map(str, args))) == 0
    assert "2 of 3 shards already written" in capsys.readouterr().err
    assert (fam / "data" / "data1.npy").stat().st_mtime_ns == before
    np.testing.assert_array_equal(np.load(fam / "data" / "data2.npy"), data[1])
    # A larger --n keeps the full shards and completes the partial last one.
    args[3] = "6"
    assert synth_main(list(map(str, args))) == 0
    assert (fam / "data" / "data1.npy").stat().st_mtime_ns == before
    assert np.load(fam / "model" / "model3.npy").shape == (2, 1, 70, 70)
    np.testing.assert_array_equal(np.load(fam / "model" / "model3.npy")[:1], model[2])
    args[3] = "5"
    # Another --nt over the same folder is refused.
    assert synth_main(list(map(str, args[:6])) + ["--nt", "13", "--out", str(out)]) == 2
    assert "data1.npy exists with shape (2, 5, 12, 70), expected (2, 5, 13, 70)" in capsys.readouterr().err
    # ... and so is --float16 over float32 files (one shard writer: the simulated data source's too).
    assert synth_main(list(map(str, args)) + ["--float16"]) == 2
    assert "data1.npy exists with dtype float32, expected float16" in capsys.readouterr().err
    # Determinism: another process, two workers, other batch size, float16 -> the same samples.
    other = tmp_path / "other"
    result = _synth(*args[:-1], other, "--workers", "2", "--batch-size", "1", "--float16")
    assert result.returncode == 0, result.stderr
    for k in (1, 2, 3):
        np.testing.assert_array_equal(np.load(other / "FlatFault_B" / "model" / f"model{k}.npy"), model[k - 1])
        seismic = np.load(other / "FlatFault_B" / "data" / f"data{k}.npy")
        assert seismic.dtype == np.float16
        np.testing.assert_array_equal(seismic, data[k - 1].astype(np.float16))


def test_synth_from_velocity(tmp_path):
    src = tmp_path / "in" / "CurveVel_A" / "model"
    src.mkdir(parents=True)
    maps = vmaps.generate("CurveVel_A", 3, 0)
    np.save(src / "model4.npy", maps)
    np.save(src / "model7.npy", maps[:1, 0])  # (n, nz, nx) is accepted too
    assert synth_main(["--from-velocity", str(src), "--nt", "10", "--out", str(tmp_path / "out")]) == 0
    fam = tmp_path / "out" / "CurveVel_A"
    np.testing.assert_array_equal(np.load(fam / "model" / "model4.npy"), maps)
    np.testing.assert_array_equal(np.load(fam / "data" / "data4.npy"), forward_model(maps, nt=10))
    assert np.load(fam / "data" / "data7.npy").shape == (1, 5, 10, 70)


@pytest.mark.parametrize("args, message", [
    (["--family", "FlatVel_C", "--n", "3"], "--family 'FlatVel_C': unknown"),
    (["--family", "FlatVel_A", "--n", "0"], "--n must be at least 1"),
    (["--family", "FlatVel_A"], "--family and --n are required"),
    (["--from-velocity", "MISSING.npy"], "MISSING.npy: no such file"),
    (["--from-velocity", "BAD.npy"], "BAD.npy: shape (2, 3)"),
    (["--from-velocity", "NEG.npy"], "NEG.npy: velocities in [-1"),
    (["--from-velocity", "TEXT.npy"], "TEXT.npy: not a readable .npy file"),
])
def test_synth_errors_are_one_line(tmp_path, capsys, args, message):
    np.save(tmp_path / "BAD.npy", np.zeros((2, 3), np.float32))
    np.save(tmp_path / "NEG.npy", np.full((2, 1, 8, 8), -1.0, np.float32))
    (tmp_path / "TEXT.npy").write_text("not numpy")
    args = [str(tmp_path / a) if a.endswith(".npy") else a for a in args]
    assert synth_main([*args, "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_synth_error_exit_code_from_the_shell(tmp_path):
    result = _synth("--family", "Nope", "--n", "1", "--out", tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: --family 'Nope'") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_synth_argument_errors_are_one_line(capsys):
    for argv in (["--family", "FlatVel_A", "--n", "3"], ["--n", "three", "--out", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            synth_main(argv)
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
