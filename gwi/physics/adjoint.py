"""The gradient of the acoustic forward model by the adjoint-state method: a custom autograd
Function whose forward is the no-grad fast propagation and whose backward propagates the residual
back in time, recomputing the forward fields segment by segment from checkpoints.

The discrete scheme (gwi.physics.acoustic), per step j = 1..T on the padded grid, N = B x S fields:

    u_j = m2 p_{j-2} + t1 p_{j-1} + a2 S1(p_{j-1}) + a3 S2(p_{j-1})
    p_j = flush(u_j) + amp_j at the source cells,   records r_j = p_j at the receivers (j > skip)

with S1 / S2 the sums of the 4 neighbours at distance 1 / 2 on the circularly wrapped grid and
flush(u) = u where |u| > tiny, else 0 (torch.hardshrink; tiny = 0: no flush). Its adjoint, with
g_j = dL/dr_j, lambda_j = dL/dp_j (everything p_j feeds) and mu_j = dL/du_j, for j = T..1:

    lambda_j = g_j at the receivers + t1 mu_{j+1} + S1(a2 mu_{j+1}) + S2(a3 mu_{j+1}) + m2 mu_{j+2}
    mu_j     = lambda_j where |u_j| > tiny, else 0
    dL/damp_j = lambda_j at the source cells
    dL/dm2 += mu_j p_{j-2},  dL/dt1 += mu_j p_{j-1},  dL/da2 += mu_j S1(p_{j-1}),  dL/da3 += mu_j S2(p_{j-1})

(S1 and S2 are symmetric, circular wrap included, so they are their own transposes; the
coefficients vary by cell, so the adjoint applies them before the sums, the forward after.) The
coefficient gradients are summed over the sources; autograd then carries them through
`acoustic._coefficients` to the velocity: alpha = (v dt / dx)^2, the damping's dependence on vmin
and the source amplitude (v_src dt)^2, exactly as on the autograd path, so the two gradients agree
to float rounding (summation order): 1e-12 relative in float64; in float32 both are ~1.5e-5 off the
float64 gradient over a few hundred steps, and so ~2e-5 off each other (tests check both).

The flush: it is what autograd differentiates too (hardshrink's derivative is the mask above), so
the adjoint is the exact derivative of the flushed scheme, which is smooth except where some
|u_j| crosses tiny (a jump of at most tiny in one cell). Against the unflushed scheme it leaves out
the terms lambda_j du_j/dv of the cells holding |u_j| <= tiny = 1e-30, the numerical precursor
ahead of the wavefront; a precursor value is a product of the coefficients over the steps it
travelled, so its derivative is at most ~T |u_j| / v: all such terms together are below ~1e-30 x T
x cells x max|lambda| / v, some 1e-18 of the gradient's own scale, far below float32 (and float64)
resolution; the float64 finite-difference test sees no difference at 1e-6. The mask is the flushed
field's nonzero pattern (flush(u) != 0 exactly when |u| > tiny); at the source cells the value
before the injection is kept for it.

Memory: the forward keeps the two fields (p_{k-1}, p_k) every `every` steps (2 T / every fields of
N cells); the backward recomputes one segment at a time (every + 2 fields) and holds the adjoint's
two fields, its scratch and four gradient accumulators (~10 fields). every = sqrt(2 T) minimises
the total (~2.8 sqrt(T) + 10 fields: ~100 at OpenFWI's 1001 steps, against ~4 T = 4000 for
storing every step through autograd). Cost: one forward with the fast path, one recomputation and
the adjoint sweep, whatever `every`. On the CPU in float32 the recomputation runs the fused C
update and each sweep step is one fused C pass (`_ckernel`); elsewhere (CUDA, float64) torch ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from gwi.physics import _ckernel


@dataclass
class Propagation:
    """What the adjoint needs from the simulator (gwi.physics.acoustic builds it)."""
    shape: tuple[int, int, int, int]  # (B, S, H, W): fields on the padded grid, without halo
    steps: int  # T
    skip: int  # steps not recorded (records start at step skip + 1)
    tiny: float  # the flush threshold (0: none)
    every: int  # checkpoint spacing in steps
    src_flat: torch.Tensor  # (N,): the source cell of field n, an index into the flattened (B, S, H, W) field
    rec_flat: torch.Tensor  # (R,): the receivers, indices into one (H, W) plane
    # coefficients (t1, m2, a2, a3, amp) -> records (T - skip, N, R) and {k: (p_{k-1}, p_k)} for
    # k = every, 2 every, ... < T, fields (B, S, H, W)
    forward: Callable
    # (coefficients, p_{k-1}, p_k, first=k+1, last) -> ([p_{k-1}, p_k, ..., p_last] (B, S, H, W) in one
    # layout, possibly views with a halo; [u_j at the source cells (N,) for j = first..last])
    replay: Callable
    use_c: bool = False  # the sweep's C kernel (CPU float32; gwi.physics._ckernel)
    threads: int | None = None  # its threads (default torch.get_num_threads())


class _AdjointPropagation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prop: Propagation, t1, m2, a2, a3, amp):
        coefficients = (t1, m2, a2, a3, amp)
        records, kept = prop.forward(coefficients)
        ks = sorted(kept)
        ctx.prop, ctx.ks = prop, ks
        ctx.save_for_backward(t1, m2, a2, a3, amp, *(f for k in ks for f in kept[k]))
        return records

    @staticmethod
    @once_differentiable  # no second derivatives: the sweep is not itself differentiated
    def backward(ctx, grad_records):
        prop = ctx.prop
        t1, m2, a2, a3, amp, *fields = ctx.saved_tensors
        kept = {k: (fields[2 * i], fields[2 * i + 1]) for i, k in enumerate(ctx.ks)}
        with torch.no_grad():
            grads = _sweep(prop, (t1, m2, a2, a3, amp), kept, grad_records)
        return (None, *grads)


def propagate(prop: Propagation, t1, m2, a2, a3, amp) -> torch.Tensor:
    """Records (T - skip, N, R) of the scheme with these coefficients ((B, 1, H, W) each, amp
    (T, B, S)), differentiable with respect to all five by the adjoint-state method."""
    return _AdjointPropagation.apply(prop, t1, m2, a2, a3, amp)


def _sweep(prop: Propagation, coefficients, kept: dict, grad_records: torch.Tensor):
    t1, m2, a2, a3, amp = coefficients
    B, S, H, W = prop.shape
    N, T = B * S, prop.steps
    zeros = t1.new_zeros(B, S, H, W)
    use_c = prop.use_c and _ckernel.available()
    # The gradients of t1, m2, a2, a3: summed over the sources as they accumulate (C) or at the end.
    grads = [t1.new_zeros(B, 1 if use_c else S, H, W) for _ in range(4)]
    g_t1, g_m2, g_a2, g_a3 = grads
    g_amp = amp.new_zeros(T, N)
    mu1, mu2 = zeros, torch.zeros_like(zeros)  # mu_{j+1}, mu_{j+2}
    if use_c:
        G = torch.zeros_like(zeros)  # the records' gradient at the receivers, zero elsewhere
        src_plane = prop.src_flat % (H * W)
        mu1 = torch.zeros_like(zeros)
    n = prop.src_flat // (H * W)
    src_cells = (n // S, n % S, (prop.src_flat % (H * W)) // W, prop.src_flat % W)  # (b, s, row, column) indices
    grad_records = grad_records.contiguous()
    for k in reversed(range(0, T, prop.every)):  # the segments (k, min(k + every, T)], last first
        last = min(k + prop.every, T)
        p_prev, p_cur = kept[k] if k else (zeros, zeros)
        field, before = prop.replay(coefficients, p_prev, p_cur, k + 1, last)  # field[j - k + 1] = p_j
        for j in range(last, k, -1):
            pj, p1, p0 = field[j - k + 1], field[j - k], field[j - k - 1]
            # The flush acted before the injection: the mask at the source cells is that of u_j there.
            injected = pj[src_cells].clone()
            pj[src_cells] = before[j - k - 1]
            if use_c:
                if j > prop.skip:
                    G.view(N, H * W).index_add_(1, prop.rec_flat, grad_records[j - prop.skip - 1])
                _ckernel.adjoint_step(mu2, mu1, G, pj, p1, p0, t1, m2, a2, a3, src_plane, g_amp[j - 1], g_t1, g_m2, g_a2,
                                      g_a3, bool(prop.tiny), prop.threads)
                if j > prop.skip:
                    G.view(N, H * W)[:, prop.rec_flat] = 0
                mu = mu2
            else:
                lam = m2 * mu2
                lam.addcmul_(t1, mu1)
                lam.add_(_ring(a2 * mu1, 1))
                lam.add_(_ring(a3 * mu1, 2))
                if j > prop.skip:
                    lam.view(N, H * W).index_add_(1, prop.rec_flat, grad_records[j - prop.skip - 1])
                g_amp[j - 1] = lam.view(-1)[prop.src_flat]
                mu = lam.mul_(pj != 0) if prop.tiny else lam
                g_m2.addcmul_(mu, p0)
                g_t1.addcmul_(mu, p1)
                g_a2.addcmul_(mu, _ring(p1, 1))
                g_a3.addcmul_(mu, _ring(p1, 2))
            pj[src_cells] = injected
            mu2, mu1 = mu1, mu
        del field, before
    return (*(g.sum(1, keepdim=True) if g.shape[1] != 1 else g for g in grads), g_amp.view(T, B, S))


def _ring(x: torch.Tensor, d: int) -> torch.Tensor:
    """The sum of the 4 neighbours at distance d of every cell of x (..., H, W), the grid wrapping
    around, added in the forward's order ((up + down) + left) + right (acoustic._stencil_sums); the
    operator is symmetric, so it also is its own transpose."""
    P = F.pad(x, (d,) * 4, mode="circular")
    out = P[..., :-2 * d, d:-d] + P[..., 2 * d:, d:-d]
    out += P[..., d:-d, :-2 * d]
    out += P[..., d:-d, 2 * d:]
    return out
