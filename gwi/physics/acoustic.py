"""OpenFWI's 2-D acoustic forward model: velocity maps (m/s) -> shot gathers, batched, in PyTorch.

The scheme is the one OpenFWI simulated its seismic with (KAUST's `a2d_mod_abc24`), written here
from its published description:

- constant-density acoustic wave equation; 4th order in space (second-derivative coefficients
  -5/2, 4/3, -1/12), 2nd order in time; dx = 10 m, dt = 1 ms;
- the map is padded by `nbc` = 120 cells on every side by edge replication; in the padding the
  field is damped by d = kappa (s / a)^2, s the distance into the layer (0 in the first padded
  cell), a = (nbc - 1) dx, kappa = 3 vmin ln(1e7) / (2 a), vmin the map's minimum velocity. As in
  the KAUST code, the four corner squares take the damping of the left / right strips (their
  horizontal distance), the top / bottom strips only cover the map's columns;
- per time step it = 1..T on the padded grid
      p = (2 - 5 alpha - kd) p1 - (1 - kd) p0 + alpha L(p1),   alpha = (v dt / dx)^2, kd = d dt,
  L the 4th-order cross stencil without its centre term (4/3 on the 4 nearest cells, -1/12 on the
  4 at distance 2). The KAUST code shifts the field circularly (`circshift`), so the stencil wraps
  around the padded grid's edges; so does this one;
- then s(it) (v_src dt)^2 is added at the source cell (s the Ricker wavelet padded with zeros, its
  first sample injected at step 1) and the receivers record p;
- a 15 Hz Ricker wavelet of int(2.2 / f / dt) samples made odd (147), peak at its centre; 5 sources
  at x cells 0, 17, 34, 52, 69 and depth cell 1; 70 receivers at depth cell 1, one per column; no
  free surface. (Positions are cells here; KAUST's code, which takes metres, moves a source or
  receiver at depth exactly 0 down one cell for its free-surface option; this one does not.)
- time axis: sample t (0-based) is the field after step t + 1 + skip_steps (1-based), the
  wavelet's first sample injected at step 1; the default `skip_steps=0` runs nt = 1000 steps and
  records every one. That is the saved output of the public OpenFWI port of the Kaggle 3rd-place
  team (tascj/kaggle-waveform-inversion): its wavelet array starts with a dummy zero, it runs 1001
  steps (the first adds that zero to a zero field), records after each step's injection and saves
  `seis[:, 1:]`, so its saved sample t is the field after the step that injected wavelet sample t,
  as ours is (a test transcribes its indexing). Its authors trained on that output mixed with the
  real OpenFWI files. `skip_steps=1` is this module's earlier default (the run is one step longer
  and the first step is not recorded): one sample later, ours[t] = the port's [t + 1].

Arithmetic: float32 fields (the coefficients are computed in float64, then rounded), the update
evaluated as fma(a3, S2, fma(a2, S1, fma(t1, p1, m2 p0))) with t1 = 2 - 5 alpha - kd, m2 = kd - 1,
a2 = 4/3 alpha, a3 = -1/12 alpha, S1 / S2 the sums of the 4 neighbours at distance 1 / 2 (torch's
addcmul is a fused multiply-add). Then |p| <= 1e-30 is set to 0 (`flush_below`; torch.hardshrink):
far ahead of a wavefront the stencil's numerical precursor decays through the denormal floats (below 1.2e-38),
which x86 CPUs process 10-100x slower; flushing them is a deterministic, explicit step that every
path performs identically, unlike the CPU's flush-to-zero mode, which is per thread. It changes
values only at the 1e-30 level. Results match a float64 evaluation of the published update to
float32 rounding (about 1e-6 of the peak amplitude; a test compares with a literal transcription).

Speed (the no-grad fast path; bench/forward.py measures it against a plain conv2d implementation
of the same scheme, figures in the README): all sources of all samples of a chunk advance together
as one (B, S, H, W) batch, in place on halo-padded buffers (no conv2d, no per-step allocation). On the CPU in float32 one fused
C kernel does the whole update in one pass (`_ckernel`, compiled on first use; the torch ops are
the fallback); on CUDA in float32 one fused Triton kernel does the whole step over the whole grid
(`triton_kernel`; no skipping). Two exact skips leave out cells that cannot change the result:
- forward: a cell whose neighbourhood is exactly zero stays exactly zero, so each step only
  updates the bounding box of the nonzero field grown by the stencil's reach (2 cells). With the
  flush, the field ahead of the wave is exactly zero, so this box grows with the wave (0.2 - 0.5
  cells per step at 1500 - 4500 m/s), not with the stencil's reach (2 cells per step). The C
  kernel reports the box every step; the torch path rescans every `tighten_every` steps;
- backward: in the last steps, cells farther from every receiver than the stencil can carry
  before the end (2 cells per remaining step) cannot affect what is recorded, so they are left out.
Both give results identical, bit for bit, to updating the whole grid (tests check it);
`skip_zeros=False` turns them off. torch.compile is not used: a compiled torch step was slower than
the C kernel, and the changing region shapes would recompile it.

The autograd path (used when `vel` requires grad and grad mode is on) updates the whole grid with
the same float operations in the same order, out of place, so it returns the same numbers (a test
checks that too); `checkpoint_steps=K` recomputes blocks of K steps in the backward pass
(torch.utils.checkpoint) instead of storing every step's field: memory ~ (T / K + K) fields
instead of T. `gradient="adjoint"` differentiates by the adjoint-state method instead
(gwi.physics.adjoint): the fast path forward, keeping two fields every K steps, and a
time-reversed sweep; the same gradient to float rounding (what `fwi.refine` uses).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gwi.layout import EXACT_FLIP_SOURCE_X, SENSOR_DEPTH, SOURCE_X, TIME_STEPS
from gwi.physics import _ckernel, adjoint, triton_kernel

# OpenFWI's geometry (gwi.layout) and settings.
OPENFWI_SOURCES = tuple((x, SENSOR_DEPTH) for x in SOURCE_X)  # (x, z) cells
# OpenFWI's sources and the mirror of the middle one (x = 35), for gathers that flip exactly
# (`forward_model(vel, sources=EXACT_FLIP_SOURCES)`; see gwi.layout.EXACT_FLIP_SOURCE_X).
EXACT_FLIP_SOURCES = tuple((x, SENSOR_DEPTH) for x in EXACT_FLIP_SOURCE_X)
RECEIVER_DEPTH = SENSOR_DEPTH  # cell; the default receivers are every column at this depth
DEFAULTS = dict(dx=10.0, dt=1e-3, nt=TIME_STEPS, freq=15.0, nbc=120, skip_steps=0)  # skip_steps: see "time axis"

# Second-derivative coefficients of the 4th-order stencil (centre, distance 1, distance 2).
C0, C1, C2 = -5.0 / 2.0, 4.0 / 3.0, -1.0 / 12.0
# Stability of the leapfrog 4th-order scheme in 2-D: (v dt / dx)^2 * 32/3 <= 4.
CFL_LIMIT = math.sqrt(3.0 / 8.0)

HALO = 2  # the stencil's reach, in cells
TIGHTEN_EVERY = 4  # torch fast path on the CPU: rescan the nonzero box every this many steps
FLUSH_BELOW = 1e-30  # |p| up to this is set to 0 after every step (see the module docstring)


def ricker(freq: float = 15.0, dt: float = 1e-3) -> np.ndarray:
    """OpenFWI's Ricker wavelet (float64): int(2.2 / freq / dt) samples, made odd, peak at the centre."""
    nw = int(2.2 / freq / dt)
    nw = 2 * (nw // 2) + 1
    centre = nw // 2
    arg = ((centre - np.arange(nw)) * freq * dt * np.pi) ** 2
    return (1.0 - 2.0 * arg) * np.exp(-arg)


def damping_profile(nz: int, nx: int, nbc: int, dx: float) -> np.ndarray:
    """(s / a)^2 on the padded grid (nz + 2 nbc, nx + 2 nbc), float64: the damping d divided by
    kappa. s is the distance into the layer (0 in the first padded cell), a = (nbc - 1) dx; the
    corner squares take the left / right strips' values (KAUST's AbcCoef2D)."""
    a = (nbc - 1) * dx
    ramp = (np.arange(nbc) * dx / a) ** 2  # ramp[i]: i cells into the layer
    prof = np.zeros((nz + 2 * nbc, nx + 2 * nbc))
    prof[:nbc, nbc:nbc + nx] = ramp[::-1, None]
    prof[nbc + nz:, nbc:nbc + nx] = ramp[:, None]
    prof[:, :nbc] = ramp[::-1]
    prof[:, nbc + nx:] = ramp
    return prof


# ---- geometry and coefficients -------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    nz: int
    nx: int
    nbc: int
    sources: tuple  # ((x, z), ...) model cells
    receivers: tuple  # ((x, z), ...) model cells

    @property
    def shape(self) -> tuple[int, int]:
        return self.nz + 2 * self.nbc, self.nx + 2 * self.nbc

    def padded(self, cells) -> tuple[np.ndarray, np.ndarray]:
        """Rows and columns, on the padded grid, of (x, z) model cells."""
        cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
        return cells[:, 1] + self.nbc, cells[:, 0] + self.nbc


def _cells(value, name: str, nz: int, nx: int) -> tuple:
    try:
        cells = np.asarray(value, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a sequence of (x, z) cells, got {value!r}") from None
    if len(cells) == 0:
        raise ValueError(f"{name}: empty")
    if not np.all(cells == np.round(cells)):
        raise ValueError(f"{name}: cells must be integers, got {value!r}")
    x, z = cells[:, 0], cells[:, 1]
    if x.min() < 0 or x.max() >= nx or z.min() < 0 or z.max() >= nz:
        raise ValueError(f"{name}: cells must lie in the {nz} x {nx} map (0 <= x < {nx}, 0 <= z < {nz}), got {value!r}")
    return tuple((int(a), int(b)) for a, b in cells)


@dataclass
class _Coefficients:
    t1: torch.Tensor  # (B, 1, H, W): 2 - 5 alpha - kd
    m2: torch.Tensor  # (B, 1, H, W): kd - 1
    a2: torch.Tensor  # (B, 1, H, W): 4/3 alpha
    a3: torch.Tensor  # (B, 1, H, W): -1/12 alpha
    amp: torch.Tensor  # (T, B, S): s(it) (v_src dt)^2


def _coefficients(vel: torch.Tensor, geom: Geometry, dx: float, dt: float, wavelet: np.ndarray, steps: int,
                  dtype: torch.dtype) -> _Coefficients:
    """Update coefficients of the maps `vel` (B, nz, nx), computed in float64 then rounded to `dtype`.
    Differentiable with respect to `vel` (including vmin's effect on the damping)."""
    v64 = vel.to(torch.float64)
    vpad = F.pad(v64[:, None], (geom.nbc,) * 4, mode="replicate")[:, 0]  # (B, H, W)
    alpha = (vpad * (dt / dx)) ** 2
    a = (geom.nbc - 1) * dx
    kappa = 3.0 * v64.amin(dim=(1, 2)) * math.log(1e7) / (2.0 * a)  # (B,)
    prof = torch.as_tensor(damping_profile(geom.nz, geom.nx, geom.nbc, dx), dtype=torch.float64, device=vel.device)
    kd = (kappa * dt)[:, None, None] * prof
    rows, cols = geom.padded(geom.sources)
    beta = vpad[:, rows, cols] ** 2 * dt**2  # (B, S): (v_src dt)^2
    s = torch.zeros(steps, dtype=torch.float64, device=vel.device)
    n = min(len(wavelet), steps)
    s[:n] = torch.as_tensor(wavelet[:n], dtype=torch.float64, device=vel.device)
    amp = s[:, None, None] * beta[None]
    out = [2.0 - 5.0 * alpha - kd, kd - 1.0, alpha * C1, alpha * C2]
    return _Coefficients(*(x.to(dtype)[:, None] for x in out), amp.to(dtype))


# ---- the update ------------------------------------------------------------------------------------


def _stencil_sums(P: torch.Tensor, r0: int, r1: int, c0: int, c1: int, out1=None, out2=None):
    """S1, S2 (sums of the 4 neighbours at distance 1 and 2) of the padded field P (..., H+4, W+4)
    over the interior rows r0:r1, columns c0:c1. With out1/out2: in place, no allocation."""
    R0, R1, Q0, Q1 = r0 + HALO, r1 + HALO, c0 + HALO, c1 + HALO
    if out1 is None:
        s1 = P[..., R0 - 1:R1 - 1, Q0:Q1] + P[..., R0 + 1:R1 + 1, Q0:Q1]
        s1 = s1 + P[..., R0:R1, Q0 - 1:Q1 - 1]
        s1 = s1 + P[..., R0:R1, Q0 + 1:Q1 + 1]
        s2 = P[..., R0 - 2:R1 - 2, Q0:Q1] + P[..., R0 + 2:R1 + 2, Q0:Q1]
        s2 = s2 + P[..., R0:R1, Q0 - 2:Q1 - 2]
        s2 = s2 + P[..., R0:R1, Q0 + 2:Q1 + 2]
        return s1, s2
    torch.add(P[..., R0 - 1:R1 - 1, Q0:Q1], P[..., R0 + 1:R1 + 1, Q0:Q1], out=out1)
    out1.add_(P[..., R0:R1, Q0 - 1:Q1 - 1])
    out1.add_(P[..., R0:R1, Q0 + 1:Q1 + 1])
    torch.add(P[..., R0 - 2:R1 - 2, Q0:Q1], P[..., R0 + 2:R1 + 2, Q0:Q1], out=out2)
    out2.add_(P[..., R0:R1, Q0 - 2:Q1 - 2])
    out2.add_(P[..., R0:R1, Q0 + 2:Q1 + 2])
    return out1, out2


def _wrap_halo_(P: torch.Tensor) -> None:
    """Fill the 2-cell halo of P (..., H+4, W+4) with the opposite edges (circular, as circshift)."""
    h, w = P.shape[-2] - 2 * HALO, P.shape[-1] - 2 * HALO
    P[..., :HALO, HALO:HALO + w] = P[..., h:h + HALO, HALO:HALO + w]
    P[..., h + HALO:, HALO:HALO + w] = P[..., HALO:2 * HALO, HALO:HALO + w]
    P[..., :, :HALO] = P[..., :, w:w + HALO]
    P[..., :, w + HALO:] = P[..., :, HALO:2 * HALO]


def _wrap_pad(p: torch.Tensor) -> torch.Tensor:
    """p (B, S, H, W) -> (B, S, H+4, W+4), circularly padded (autograd path)."""
    return F.pad(p, (HALO,) * 4, mode="circular")


# ---- exact skipping: boxes of cells -----------------------------------------------------------------


def _dilate(box, k: int, shape):
    """Grow box (r0, r1, c0, c1) by k cells; a dimension that would cross the grid's edge becomes
    the whole dimension (the stencil wraps around)."""
    if box is None:
        return None
    r0, r1, c0, c1 = box
    H, W = shape
    r0, r1 = (r0 - k, r1 + k) if r0 - k >= 0 and r1 + k <= H else (0, H)
    c0, c1 = (c0 - k, c1 + k) if c0 - k >= 0 and c1 + k <= W else (0, W)
    return r0, r1, c0, c1


def _union(a, b):
    if a is None or b is None:
        return a if b is None else b
    return min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])


def _intersect(a, b):
    if a is None or b is None:
        return None
    box = max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3])
    return box if box[0] < box[1] and box[2] < box[3] else None


def _bounding_box(rows: np.ndarray, cols: np.ndarray):
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def _nonzero_box(q: torch.Tensor, box):
    """The bounding box of q's nonzero cells (q: (B, S, h, w), the field over `box`), or None."""
    nz = q.ne(0).any(dim=0).any(dim=0)  # (h, w)
    rows, cols = nz.any(dim=1).nonzero(), nz.any(dim=0).nonzero()
    if len(rows) == 0:
        return None
    return box[0] + int(rows[0]), box[0] + int(rows[-1]) + 1, box[2] + int(cols[0]), box[2] + int(cols[-1]) + 1


# ---- the two paths -----------------------------------------------------------------------------------


def _simulate_fast(co: _Coefficients, geom: Geometry, steps: int, skip: int, skip_zeros: bool,
                   tighten_every: int, tiny: float, use_c: bool, threads: int | None,
                   keep: dict | None = None, keep_every: int = 0) -> torch.Tensor:
    """No-grad path: in-place updates on halo-padded buffers, by the C kernel or torch ops.
    Returns the records (nt, B*S, R). With `keep`: keep[k] = (p(k-1), p(k)) copies, (B, S, H, W),
    for k = keep_every, 2 keep_every, ... < steps (the adjoint's checkpoints; with the backward
    skip, cells that cannot reach a receiver any more may be stale, and so cannot matter)."""
    B, _, H, W = co.t1.shape
    S, R = len(geom.sources), len(geom.receivers)
    N, device, dtype = B * S, co.t1.device, co.t1.dtype
    Hp, Wp = H + 2 * HALO, W + 2 * HALO
    P0 = torch.zeros(B, S, Hp, Wp, dtype=dtype, device=device)
    P1 = torch.zeros_like(P0)
    srow, scol = geom.padded(geom.sources)
    rrow, rcol = geom.padded(geom.receivers)
    plane = Hp * Wp
    src_flat = torch.as_tensor(np.arange(N) * plane + np.tile((srow + HALO) * Wp + scol + HALO, B), device=device)
    rec_flat = torch.as_tensor((rrow + HALO) * Wp + rcol + HALO, device=device)
    out = torch.empty(steps - skip, N, R, dtype=dtype, device=device)
    amp = co.amp.reshape(steps, N)
    amp_nonzero = (co.amp != 0).flatten(1).any(dim=1).tolist()
    if use_c:
        stepper = _ckernel.Stepper(P0, P1, co.t1, co.m2, co.a2, co.a3, tiny, threads)
    else:
        buf1 = torch.empty(N * H * W, dtype=dtype, device=device)
        buf2 = torch.empty_like(buf1)

    full = (0, H, 0, W)
    src_box = _bounding_box(srow, scol)
    rec_box = _bounding_box(rrow, rcol)
    box0, box1 = None, None  # boxes holding the nonzero cells of P0, P1 (None: all zero)
    for it in range(1, steps + 1):
        inject = amp_nonzero[it - 1]
        if skip_zeros:
            fwd = _union(_dilate(box1, HALO, (H, W)), box0)
            bwd = _dilate(rec_box, HALO * (steps - it), (H, W))
            region = _intersect(_union(fwd, src_box) if inject else fwd, bwd)
        else:
            fwd = region = bwd = full
        written = None
        if region is not None:
            r0, r1, c0, c1 = region
            if r0 < HALO or r1 > H - HALO or c0 < HALO or c1 > W - HALO:
                _wrap_halo_(P1)
            if use_c:
                written = stepper.step(P0, P1, region)
            else:
                h, w = r1 - r0, c1 - c0
                s1 = buf1[:N * h * w].view(B, S, h, w)
                s2 = buf2[:N * h * w].view(B, S, h, w)
                _stencil_sums(P1, r0, r1, c0, c1, s1, s2)
                q = P0[..., r0 + HALO:r1 + HALO, c0 + HALO:c1 + HALO]
                q.mul_(co.m2[..., r0:r1, c0:c1])
                q.addcmul_(co.t1[..., r0:r1, c0:c1], P1[..., r0 + HALO:r1 + HALO, c0 + HALO:c1 + HALO])
                q.addcmul_(co.a2[..., r0:r1, c0:c1], s1)
                q.addcmul_(co.a3[..., r0:r1, c0:c1], s2)
                if tiny:
                    torch.hardshrink(q, tiny, out=q)
                if skip_zeros and bwd == full and tighten_every and it % tighten_every == 0:
                    written = _nonzero_box(q, region)
                else:
                    written = fwd
        if inject:
            P0.view(-1).index_put_((src_flat,), amp[it - 1], accumulate=True)
        if it > skip:
            torch.index_select(P0.view(N, plane), 1, rec_flat, out=out[it - skip - 1])
        # The new field is zero outside `written` (what the update wrote; only trusted while no cell
        # is left out for the receivers' sake) plus the sources.
        new_box = written if bwd == full else fwd
        if inject:
            new_box = _union(new_box, src_box)
        P0, P1 = P1, P0
        box0, box1 = box1, new_box
        if keep is not None and it % keep_every == 0 and it < steps:
            keep[it] = tuple(P[..., HALO:HALO + H, HALO:HALO + W].clone() for P in (P0, P1))
    return out


def _simulate_triton(co: _Coefficients, geom: Geometry, steps: int, skip: int, tiny: float) -> torch.Tensor:
    """No-grad path on CUDA: the fused Triton kernel over the whole grid (no skipping: the boxes
    would be decided on the host every step, which a captured CUDA graph cannot do; they save
    15-20 % on the CPU). Returns (nt, B*S, R)."""
    _, _, H, W = co.t1.shape
    srow, scol = geom.padded(geom.sources)
    rrow, rcol = geom.padded(geom.receivers)
    return triton_kernel.simulate(co.t1, co.m2, co.a2, co.a3, co.amp, srow * W + scol, rrow * W + rcol, steps, skip, tiny)


def _steps_autograd(p0, p1, co: _Coefficients, amp, src_flat, rec_flat, first: int, last: int, skip: int, tiny: float,
                    fields: list | None = None):
    """Steps first..last (1-based, inclusive) out of place on the whole grid; returns p0, p1 and the
    records of the steps after `skip` (k, N, R). With `fields`: appends (the sources' cells before
    the injection (N,), the new field) per step (the adjoint's recomputation)."""
    B, S, H, W = p0.shape
    records = []
    for it in range(first, last + 1):
        s1, s2 = _stencil_sums(_wrap_pad(p1), 0, H, 0, W)
        p = p0 * co.m2
        p = torch.addcmul(p, co.t1, p1)
        p = torch.addcmul(p, co.a2, s1)
        p = torch.addcmul(p, co.a3, s2)
        if tiny:
            p = torch.hardshrink(p, tiny)
        if fields is not None:
            fields.append((p.view(-1)[src_flat], p))
        p.view(-1).index_put_((src_flat,), amp[it - first], accumulate=True)  # p is fresh: in place is safe
        if it > skip:
            records.append(p.reshape(B * S, H * W)[:, rec_flat])
        p0, p1 = p1, p
    rec = torch.stack(records) if records else p0.new_zeros(0, B * S, len(rec_flat))
    return p0, p1, rec


def _flat_cells(geom: Geometry, B: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The source cell of each of the B x S fields as an index into the flattened (B, S, H, W)
    fields, and the receivers' cells as indices into one (H, W) plane (no halo)."""
    H, W = geom.shape
    S = len(geom.sources)
    srow, scol = geom.padded(geom.sources)
    rrow, rcol = geom.padded(geom.receivers)
    src_flat = torch.as_tensor(np.arange(B)[:, None] * S * H * W + np.arange(S) * H * W + srow * W + scol,
                               device=device).reshape(-1)
    return src_flat, torch.as_tensor(rrow * W + rcol, device=device)


def _simulate_autograd(co: _Coefficients, geom: Geometry, steps: int, skip: int,
                       checkpoint_steps: int | None, tiny: float) -> torch.Tensor:
    B, _, H, W = co.t1.shape
    S = len(geom.sources)
    N = B * S
    src_flat, rec_flat = _flat_cells(geom, B, co.t1.device)
    amp = co.amp.reshape(steps, N)
    p0 = co.t1.new_zeros(B, S, H, W)
    p1 = co.t1.new_zeros(B, S, H, W)
    block = checkpoint_steps or steps
    records = []
    for first in range(1, steps + 1, block):
        last = min(first + block - 1, steps)
        args = (p0, p1, co, amp[first - 1:last], src_flat, rec_flat, first, last, skip, tiny)
        if checkpoint_steps:
            p0, p1, rec = checkpoint(_steps_autograd, *args, use_reentrant=False)
        else:
            p0, p1, rec = _steps_autograd(*args)
        records.append(rec)
    return torch.cat(records)


def _simulate_adjoint(co: _Coefficients, geom: Geometry, steps: int, skip: int, checkpoint_steps: int | None,
                      skip_zeros: bool, tighten_every: int, tiny: float, use_c: bool, threads: int | None) -> torch.Tensor:
    """The fast path forward, the adjoint-state method backward (gwi.physics.adjoint): checkpoints
    every `checkpoint_steps` steps (None: none; the backward recomputes all steps at once). The
    backward recomputes the fields with the C kernel (use_c) or the autograd path's torch ops."""
    B, _, H, W = co.t1.shape
    S = len(geom.sources)
    N = B * S
    src_flat, rec_flat = _flat_cells(geom, B, co.t1.device)
    every = checkpoint_steps or steps

    def forward(coefficients):
        kept = {}
        records = _simulate_fast(_Coefficients(*coefficients), geom, steps, skip, skip_zeros, tighten_every, tiny, use_c,
                                 threads, keep=kept, keep_every=every)
        return records, kept

    def replay(coefficients, p0, p1, first, last):
        c = _Coefficients(*coefficients)
        amp = c.amp.reshape(steps, N)
        if not use_c:
            fields = []
            _steps_autograd(p0, p1, c, amp[first - 1:last], src_flat, rec_flat, first, last, steps, tiny, fields)
            return [p0, p1] + [p for _, p in fields], [u for u, _ in fields]
        # The C kernel on halo-padded copies, the whole grid (the fast path's in-place buffers hold two fields).
        padded = []
        for p in (p0, p1):
            P = p.new_zeros(B, S, H + 2 * HALO, W + 2 * HALO)
            P[..., HALO:HALO + H, HALO:HALO + W] = p
            padded.append(P)
        plane = padded[0][0, 0].numel()
        n = src_flat // (H * W)
        src_padded = n * plane + (src_flat % (H * W) // W + HALO) * (W + 2 * HALO) + src_flat % W + HALO
        before = []
        for it in range(first, last + 1):
            P, P1 = padded[-2].clone(), padded[-1]
            _wrap_halo_(P1)
            _ckernel.Stepper(P, P1, c.t1, c.m2, c.a2, c.a3, tiny, threads).step(P, P1, (0, H, 0, W))
            before.append(P.view(-1)[src_padded])
            P.view(-1).index_put_((src_padded,), amp[it - 1], accumulate=True)
            padded.append(P)
        return [P[..., HALO:HALO + H, HALO:HALO + W] for P in padded], before

    prop = adjoint.Propagation((B, S, H, W), steps, skip, tiny, every, src_flat, rec_flat, forward, replay, use_c, threads)
    return adjoint.propagate(prop, co.t1, co.m2, co.a2, co.a3, co.amp)


# ---- public API ----------------------------------------------------------------------------------


def forward_model(
    vel,
    *,
    dx: float = DEFAULTS["dx"],
    dt: float = DEFAULTS["dt"],
    nt: int = DEFAULTS["nt"],
    freq: float = DEFAULTS["freq"],
    nbc: int = DEFAULTS["nbc"],
    sources=OPENFWI_SOURCES,
    receivers=None,
    skip_steps: int = DEFAULTS["skip_steps"],
    wavelet=None,
    dtype: torch.dtype = torch.float32,
    batch_size: int | None = None,
    grad: bool | None = None,
    checkpoint_steps: int | None = None,
    gradient: str = "autograd",
    skip_zeros: bool = True,
    tighten_every: int | None = None,
    flush_below: float = FLUSH_BELOW,
    backend: str = "auto",
    threads: int | None = None,
):
    """Shot gathers of velocity maps, with OpenFWI's defaults.

    vel: (B, nz, nx) or (B, 1, nz, nx) velocities in m/s, a torch tensor (any device; the result is
        on the same one) or a numpy array (the result is then a numpy array); (nz, nx) for one map.
    Returns (B, S, nt, R) in `dtype` (float32): S sources, nt time samples, R receivers; for
        OpenFWI's defaults (B, 5, 1000, 70).

    dx, dt: grid spacing (m) and time step (s). nt: recorded samples; the run is nt + skip_steps
        steps and the first skip_steps are not recorded. freq: Ricker peak frequency (Hz); or
        `wavelet`: any source time function (1-D, sampled at dt, first sample at step 1). nbc:
        absorbing cells on every side. sources / receivers: sequences of (x, z) model cells;
        receivers default to every column at depth cell 1. batch_size: maps simulated together
        (default: all of them; smaller bounds memory). grad: autograd path (default: when `vel`
        requires grad and grad mode is on); gradient: how that path differentiates, "autograd"
        (torch records every op) or "adjoint" (the fast path forward and the adjoint-state
        method backward, gwi.physics.adjoint: the same gradient to float rounding, faster and
        with far less memory); checkpoint_steps: on that path, recompute blocks of this many steps
        in the backward pass instead of storing every field (adjoint: keep the fields every this
        many steps; None: none, the backward recomputes every step at once). skip_zeros,
        tighten_every: the exact skipping of the fast path (see the module's docstring).
        flush_below: |p| up to this becomes 0 after each step (0: never). backend: the fast
        path's update, "c" (the fused C kernel, CPU float32), "triton" (the fused Triton kernel,
        float32: CUDA tensors, or CPU tensors under Triton's interpreter, which is slow and only
        for tests), "torch" (the reference torch ops), or "auto": C on the CPU and Triton on CUDA
        where they apply and are available (GWI_PHYSICS_NO_C / GWI_PHYSICS_NO_TRITON turn them
        off). threads: the C kernel's threads (default torch.get_num_threads()).
    """
    as_numpy = isinstance(vel, np.ndarray)
    v = torch.as_tensor(vel)
    single = v.ndim == 2
    if single:
        v = v[None]
    if v.ndim == 4:
        if v.shape[1] != 1:
            raise ValueError(f"vel: expected (B, nz, nx) or (B, 1, nz, nx), got shape {tuple(v.shape)}")
        v = v[:, 0]
    if v.ndim != 3 or v.shape[0] == 0 or min(v.shape[1:]) < 1:
        raise ValueError(f"vel: expected (B, nz, nx) or (B, 1, nz, nx), got shape {tuple(v.shape)}")
    if not v.is_floating_point():
        v = v.to(torch.float64)
    with torch.no_grad():
        vmin, vmax = float(v.min()), float(v.max())
    if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmin <= 0:
        raise ValueError(f"vel: velocities must be finite and positive, got range [{vmin}, {vmax}]")
    if not (dx > 0 and dt > 0):
        raise ValueError(f"dx and dt must be positive, got dx={dx}, dt={dt}")
    if vmax * dt / dx > CFL_LIMIT:
        raise ValueError(f"unstable: vmax * dt / dx = {vmax * dt / dx:.3f} exceeds {CFL_LIMIT:.3f} "
                         f"(vmax {vmax:g} m/s, dt {dt:g} s, dx {dx:g} m); lower dt")
    if int(nt) != nt or nt < 1 or int(skip_steps) != skip_steps or skip_steps < 0:
        raise ValueError(f"nt must be a positive integer and skip_steps a non-negative one, got {nt}, {skip_steps}")
    if int(nbc) != nbc or nbc < 2:
        raise ValueError(f"nbc must be an integer >= 2, got {nbc}")
    nt, skip_steps, nbc = int(nt), int(skip_steps), int(nbc)
    nz, nx = v.shape[1:]
    if receivers is None:
        receivers = [(x, RECEIVER_DEPTH if nz > RECEIVER_DEPTH else 0) for x in range(nx)]
    geom = Geometry(nz, nx, nbc, _cells(sources, "sources", nz, nx), _cells(receivers, "receivers", nz, nx))
    if wavelet is None:
        if not freq > 0:
            raise ValueError(f"freq must be positive, got {freq}")
        wavelet = ricker(freq, dt)
    wavelet = np.asarray(wavelet, dtype=np.float64).ravel()
    steps = nt + skip_steps
    if grad is None:
        grad = torch.is_grad_enabled() and v.requires_grad
    if checkpoint_steps is not None and (int(checkpoint_steps) != checkpoint_steps or checkpoint_steps < 1):
        raise ValueError(f"checkpoint_steps must be a positive integer, got {checkpoint_steps}")
    if gradient not in ("autograd", "adjoint"):
        raise ValueError(f"gradient must be autograd or adjoint, got {gradient!r}")
    if tighten_every is None:
        tighten_every = TIGHTEN_EVERY if v.device.type == "cpu" else 0
    batch_size = int(batch_size or len(v))
    if backend not in ("auto", "c", "triton", "torch"):
        raise ValueError(f"backend must be auto, c, triton or torch, got {backend!r}")
    c_applies = (not grad or gradient == "adjoint") and v.device.type == "cpu" and dtype == torch.float32
    use_c = backend in ("auto", "c") and c_applies and _ckernel.available()
    if backend == "c" and not use_c:
        raise ValueError("backend='c': " + ("needs the no-grad or adjoint path on the CPU in float32" if not c_applies
                                              else f"the C kernel is unavailable ({_ckernel.unavailable_reason()})"))
    triton_applies = not grad and dtype == torch.float32 and (backend == "triton" or v.device.type == "cuda")
    triton_missing = triton_kernel.unavailable_reason(v.device)
    use_triton = backend in ("auto", "triton") and triton_applies and triton_missing is None
    if backend == "triton" and not use_triton:
        raise ValueError("backend='triton': " + ("needs the no-grad path in float32" if not triton_applies
                                                   else f"the Triton kernel is unavailable ({triton_missing})"))

    outputs = []
    with torch.set_grad_enabled(grad):
        for start in range(0, len(v), batch_size):
            chunk = v[start:start + batch_size]
            co = _coefficients(chunk, geom, dx, dt, wavelet, steps, dtype)
            if grad and gradient == "adjoint":
                rec = _simulate_adjoint(co, geom, steps, skip_steps, checkpoint_steps, skip_zeros, tighten_every,
                                        flush_below, use_c, threads)
            elif grad:
                rec = _simulate_autograd(co, geom, steps, skip_steps, checkpoint_steps, flush_below)
            elif use_triton:
                rec = _simulate_triton(co, geom, steps, skip_steps, flush_below)
            else:
                rec = _simulate_fast(co, geom, steps, skip_steps, skip_zeros, tighten_every, flush_below, use_c, threads)
            # (nt, B*S, R) -> (B, S, nt, R)
            outputs.append(rec.view(nt, len(chunk), len(geom.sources), -1).permute(1, 2, 0, 3).contiguous())
    seismic = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if single:
        seismic = seismic[0]
    return seismic.detach().cpu().numpy() if as_numpy else seismic
